"""SubnetSpec + Profile -> QDQ ONNX (+ encodings sidecar). Conventions converted here only.

The frozen integers (`ElasticNet.freeze`) are the truth. The graph is built in two steps:

1. An export-time copy of the fx GraphModule where every elastic layer is a plain
   module computing the float op on the *dequantized* weight and the int32-rounded
   bias, with a `deployq::Marker` custom op on each quantized tensor (activation
   inputs, weight, bias). `torch.onnx.export` (TorchScript exporter) turns any user
   model into ONNX this way, markers included, without knowing about quantization.
2. A lowering pass replaces each marker by what the profile wants: weights become
   integer initializers (container dtype) + DequantizeLinear; activations become
   [Clip ->] QuantizeLinear -> DequantizeLinear (the Clip only when b bits are
   emulated in a wider container); bias becomes an int32 initializer + DQ (scale
   act_scale * weight_scale, zero-point 0) or the float bias_int * bias_scale.

Identical activation quantizers reading the same tensor (a branch point whose
quantizers were calibrated on the same data) share one QuantizeLinear: onnxruntime
fuses a producer into its integer kernel only when its output feeds exactly one Q.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import deployq
from deployq import encodings as enc_mod
from deployq import onnx_meta
from deployq.checkpoint import Checkpoint
from deployq.errors import UserError
from deployq.fileio import check_writable, read_user_text, write_bytes, write_text
from deployq.profile import ACT, WEIGHT, Profile
from deployq.qdq import act_clamp, to_container
from deployq.spec import PER_CHANNEL, QuantSpec, SubnetSpec, check_bits

DOMAIN = "deployq"
MARKER = "Marker"
MAX_TORCH_OPSET = 20  # highest opset the TorchScript exporter writes; newer via version_converter
ONNX_DTYPE = {
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
}


@dataclass(frozen=True)
class ExportResult:
    out: Path
    kind: str  # "qdq" | "fp32"
    profile: str | None
    spec: SubnetSpec | None
    sidecars: tuple[Path, ...] = ()
    emulated: tuple[dict, ...] = ()
    violations: tuple = ()
    size_bytes: int = 0
    shared_quantizers: int = 0  # activation quantizers merged into another's Q (identical)

    @property
    def bits(self) -> str:
        if self.spec is None:
            return "fp32"
        wb = sorted(set(self.spec.weight_bits().values()))
        ab = sorted(set(self.spec.act_bits().values()))
        return f"w{'/'.join(map(str, wb))}a{'/'.join(map(str, ab))}"


# --- choosing the subnet ----------------------------------------------------------


def subnet_from_args(
    net,
    profile: Profile,
    bits: int | None = None,
    wbits: int | None = None,
    abits: int | None = None,
    config_path: str | Path | None = None,
) -> SubnetSpec:
    """A uniform subnet in the profile's form (`bits`, or `wbits` + `abits`), or a
    SubnetSpec JSON file (`config_path`). Exactly one of the three ways."""
    ways = sum([bits is not None, wbits is not None or abits is not None, config_path is not None])
    if ways != 1:
        raise UserError("choose the subnet with exactly one of --bits, --wbits/--abits or --config")
    if config_path is not None:
        return SubnetSpec.from_json(read_user_text(config_path, "subnet config"))
    if bits is not None:
        wbits = abits = bits
    if wbits is None or abits is None:
        raise UserError("--wbits and --abits go together")
    check_bits(wbits, "weight bits")
    check_bits(abits, "activation bits")
    return net.uniform_spec(profile.form, wbits, abits)


def default_output_name(ckpt_path: str | Path, profile: Profile | None, spec: SubnetSpec | None) -> Path:
    p = Path(ckpt_path)
    if profile is None or spec is None:
        return p.with_name(f"{p.stem}.fp32.onnx")
    wb = set(spec.weight_bits().values())
    ab = set(spec.act_bits().values())
    # First/last layers stay at 8 bits: name the file by the bits of the body.
    body_w = sorted(wb - {8}) or [8]
    body_a = sorted(ab - {8}) or [8]
    tag = f"w{body_w[0]}a{body_a[0]}" if len(body_w) == 1 and len(body_a) == 1 else "mixed"
    return p.with_name(f"{p.stem}.{profile.name}.{tag}.onnx")


# --- step 1: an exportable torch module ---------------------------------------------


class _Marker(torch.autograd.Function):
    """Identity in torch; a `deployq::Marker(key)` node in the exported ONNX graph."""

    @staticmethod
    def forward(ctx, x, key):
        return x.clone()

    @staticmethod
    def symbolic(g, x, key):
        out = g.op(f"{DOMAIN}::{MARKER}", x, key_s=key)
        out.setType(x.type())
        return out


def _mark(x: torch.Tensor, key: str | None) -> torch.Tensor:
    return x if key is None else _Marker.apply(x, key)


class _XWeighted(nn.Module):
    def __init__(self, m, weight: torch.Tensor, bias: torch.Tensor, name: str, quantized: bool, stored: bool = False):
        super().__init__()
        from deployq.elastic import ElasticConv2d

        self.is_conv = isinstance(m, ElasticConv2d)
        if self.is_conv:
            self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        self.register_buffer("weight", weight.detach().float())
        self.register_buffer("bias", bias.detach().float())
        self.keys = (f"{name}.input", f"{name}.weight", f"{name}.bias") if quantized else (None,) * 3
        # a shared input tensor stored at more bits than this layer reads: requantize
        self.stored_key = f"{name}.input.stored" if quantized and stored else None

    def forward(self, x):
        x = _mark(_mark(x, self.stored_key), self.keys[0])
        w = _mark(self.weight, self.keys[1])
        b = _mark(self.bias, self.keys[2])
        if self.is_conv:
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, b)


class _XWeightless(nn.Module):
    """A weightless quantized op (residual add, average pool): marked inputs, float op."""

    def __init__(self, name: str, n_inputs: int, op: nn.Module, quantized: bool, stored=()):
        super().__init__()
        self.op = op
        self.keys = tuple(f"{name}.input{i}" if quantized else None for i in range(n_inputs))
        stored = tuple(stored) or (False,) * n_inputs
        self.stored_keys = tuple(f"{k}.stored" if k and st else None for k, st in zip(self.keys, stored))

    def forward(self, *xs):
        return self.op(*(_mark(_mark(x, sk), k) for x, k, sk in zip(xs, self.keys, self.stored_keys)))


def _dequantized_weight(p) -> torch.Tensor:
    """(q - z) * s in float32, as elastic.dequantized_weight and DequantizeLinear compute
    it; in numpy because torch's intra-op threads only contend on a busy machine."""
    q = p.weight_int.numpy()
    shape = (-1,) + (1,) * (q.ndim - 1)
    z = np.round(p.weight_zero_point.numpy().astype(np.float32)).reshape(shape)
    s = p.weight_scale.detach().numpy().astype(np.float32).reshape(shape)
    return torch.from_numpy((q.astype(np.float32) - z) * s)


def _export_module(net, frozen: dict | None) -> nn.Module:
    from deployq.elastic import ElasticWeightless

    replacements: dict[str, nn.Module] = {}
    for name, m in net.layers():
        if isinstance(m, ElasticWeightless):
            stored = [st is not None for st in frozen[name].stored] if frozen is not None else ()
            replacements[name] = _XWeightless(name, len(m.aq), copy.deepcopy(m.op), frozen is not None, stored)
        elif frozen is None:
            replacements[name] = _XWeighted(m, m.weight, m.bias, name, False)
        else:
            p = frozen[name]
            bias = p.bias_int.to(torch.float32) * p.bias_scale  # what the int32 accumulator adds
            replacements[name] = _XWeighted(m, _dequantized_weight(p), bias, name, True, p.stored is not None)
    # Copy the graph module with the elastic layers swapped for their export modules
    # (the memo makes deepcopy use the replacement instead of copying the supernet's cells).
    memo = {id(net.layer(name)): new for name, new in replacements.items()}
    return copy.deepcopy(net.gm, memo).eval()


def _torch_export(module: nn.Module, input_shape: tuple[int, ...], opset: int, markers: bool) -> onnx.ModelProto:
    """markers: the module emits deployq-domain marker nodes (a quantized export). An FP32
    export must not declare the domain: torch then prints an unsilenceable C++ warning."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and custom-op notices
        torch.onnx.export(
            module,
            (torch.zeros(input_shape),),
            buf,
            dynamo=False,
            opset_version=min(opset, MAX_TORCH_OPSET),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
            custom_opsets={DOMAIN: 1} if markers else None,
        )
    return onnx.load_from_string(buf.getvalue())


# --- step 2: lowering the markers ---------------------------------------------------


@dataclass
class _Lowering:
    """Per-key integers and scales (numpy), plus what lowering produced."""

    profile: Profile
    acts: dict[str, tuple[QuantSpec, np.float32, int]] = field(default_factory=dict)
    weights: dict[str, tuple[QuantSpec, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    biases: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    emulated: list[dict] = field(default_factory=list)
    act_enc: list[enc_mod.TensorEncoding] = field(default_factory=list)
    param_enc: list[enc_mod.TensorEncoding] = field(default_factory=list)
    shared: int = 0


def _plan(frozen: dict, profile: Profile) -> _Lowering:
    from deployq.elastic import FrozenAddParams

    low = _Lowering(profile)
    for name, p in frozen.items():
        if isinstance(p, FrozenAddParams):
            for i, (s, z) in enumerate(p.act):
                low.acts[f"{name}.input{i}"] = (p.spec.act, _f32(s), int(z.reshape(-1)[0]))
                if i < len(p.stored) and p.stored[i] is not None:
                    st_spec, st_s, st_z = p.stored[i]
                    low.acts[f"{name}.input{i}.stored"] = (st_spec, _f32(st_s), int(st_z.reshape(-1)[0]))
            continue
        low.acts[f"{name}.input"] = (p.spec.act, _f32(p.act_scale), int(p.act_zero_point.reshape(-1)[0]))
        if p.stored is not None:
            st_spec, st_s, st_z = p.stored
            low.acts[f"{name}.input.stored"] = (st_spec, _f32(st_s), int(st_z.reshape(-1)[0]))
        ws = p.spec.weight
        scale = p.weight_scale.detach().float().numpy().reshape(-1).astype(np.float32)
        zp = p.weight_zero_point.detach().numpy().reshape(-1).astype(np.int64)
        low.weights[f"{name}.weight"] = (ws, p.weight_int.numpy().astype(np.int64), scale, zp)
        bscale = p.bias_scale.detach().float().numpy().reshape(-1).astype(np.float32)
        if not ws.per_channel:
            bscale = bscale[:1]
        low.biases[f"{name}.bias"] = (p.bias_int.numpy().astype(np.int32), bscale)
    return low


def _f32(t: torch.Tensor) -> np.float32:
    return np.float32(t.detach().float().reshape(-1)[0].item())


def _init(name: str, arr: np.ndarray, onnx_type: int | None = None) -> onnx.TensorProto:
    if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, onnx_type, list(arr.shape), arr.reshape(-1).astype(np.int64).tolist())
    return numpy_helper.from_array(np.require(arr, requirements='C'), name)  # keeps 0-d scalars 0-d


def _key(node: onnx.NodeProto) -> str:
    for a in node.attribute:
        if a.name == "key":
            return a.s.decode()
    raise RuntimeError(f"marker node {node.name} without key")


def _lower_act(low: _Lowering, key: str, x: str, out: str, nodes, inits, shared_q: dict) -> None:
    spec, s, z = low.acts[key]
    container = low.profile.container(spec, ACT)
    _, zc = to_container(np.zeros(0), np.array(z), spec, container)
    emulated = low.profile.is_emulated(spec, ACT)
    clamp = act_clamp(spec, float(s), z) if emulated else None
    sig = (x, float(s), int(zc), container, None if clamp is None else (float(clamp.lo), float(clamp.hi)))
    scale_name, zp_name = f"{key}_scale", f"{key}_zero_point"
    inits.append(_init(scale_name, np.array(s, dtype=np.float32)))
    inits.append(_init(zp_name, zc.reshape(()), ONNX_DTYPE[container]))
    if sig in shared_q:
        q_out = shared_q[sig]
        low.shared += 1
    else:
        q_in = x
        if clamp is not None:
            # Emulated b bits: quantize into the container first, then clamp to the b-bit
            # range and requantize on the same grid. Exact (the first Q only saturates
            # earlier than the clamp), and the producer keeps its Q right after it, so
            # runtimes still fuse it into an integer kernel (QLinearConv, a QNN node group).
            lo, hi = f"{key}_clip_min", f"{key}_clip_max"
            inits.append(_init(lo, np.array(clamp.lo, dtype=np.float32)))
            inits.append(_init(hi, np.array(clamp.hi, dtype=np.float32)))
            wide_q, wide = f"{key}_container_quantized", f"{key}_container"
            nodes.append(helper.make_node("QuantizeLinear", [x, scale_name, zp_name], [wide_q], name=f"{key}/QuantizeLinear_container"))
            nodes.append(helper.make_node("DequantizeLinear", [wide_q, scale_name, zp_name], [wide], name=f"{key}/DequantizeLinear_container"))
            q_in = f"{key}_clipped"
            nodes.append(helper.make_node("Clip", [wide, lo, hi], [q_in], name=f"{key}/Clip"))
        q_out = f"{key}_quantized"
        nodes.append(helper.make_node("QuantizeLinear", [q_in, scale_name, zp_name], [q_out], name=f"{key}/QuantizeLinear"))
        shared_q[sig] = q_out
        if emulated:
            low.emulated.append({"tensor": q_out, "role": ACT, "bits": spec.bits, "container": container})
    nodes.append(helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [out], name=f"{key}/DequantizeLinear"))
    low.act_enc.append(enc_mod.TensorEncoding(out, spec, np.array([s], dtype=np.float32), np.array([z])))


def _lower_weight(low: _Lowering, key: str, out: str, nodes, inits) -> None:
    spec, codes, scale, zp = low.weights[key]
    container = low.profile.container(spec, WEIGHT)
    qc, zc = to_container(codes, zp, spec, container)
    q_name, scale_name, zp_name = f"{key}_quantized", f"{key}_scale", f"{key}_zero_point"
    inits.append(_init(q_name, qc, ONNX_DTYPE[container]))
    attrs = {}
    if spec.granularity == PER_CHANNEL:
        inits.append(_init(scale_name, scale))
        inits.append(_init(zp_name, zc, ONNX_DTYPE[container]))
        attrs["axis"] = 0
    else:
        inits.append(_init(scale_name, scale.reshape(())))
        inits.append(_init(zp_name, zc.reshape(()), ONNX_DTYPE[container]))
    nodes.append(helper.make_node("DequantizeLinear", [q_name, scale_name, zp_name], [out], name=f"{key}/DequantizeLinear", **attrs))
    if low.profile.is_emulated(spec, WEIGHT):
        low.emulated.append({"tensor": q_name, "role": WEIGHT, "bits": spec.bits, "container": container})
    low.param_enc.append(enc_mod.TensorEncoding(out, spec, scale, zp))


def _lower_bias(low: _Lowering, key: str, out: str, nodes, inits) -> None:
    codes, scale = low.biases[key]
    if low.profile.graph.bias == "int32":
        q_name, scale_name, zp_name = f"{key}_quantized", f"{key}_scale", f"{key}_zero_point"
        inits.append(_init(q_name, codes))
        attrs = {}
        if scale.size > 1:
            inits.append(_init(scale_name, scale))
            inits.append(_init(zp_name, np.zeros(scale.shape, dtype=np.int32)))
            attrs["axis"] = 0
        else:
            inits.append(_init(scale_name, scale.reshape(())))
            inits.append(_init(zp_name, np.zeros((), dtype=np.int32)))
        nodes.append(helper.make_node("DequantizeLinear", [q_name, scale_name, zp_name], [out], name=f"{key}/DequantizeLinear", **attrs))
    else:
        # Exactly the float the PyTorch subnet adds: float32(bias_int) * bias_scale.
        value = codes.astype(np.float32) * np.broadcast_to(scale, codes.shape).astype(np.float32)
        inits.append(_init(out, value.astype(np.float32)))


def _undedupe_initializers(g: onnx.GraphProto) -> None:
    """The exporter stores identical buffers once and feeds the others through Identity
    nodes (all-zero biases of a fresh model, for instance). Give each its own
    initializer again, so every marker reads a constant of its own."""
    inits = {t.name: t for t in g.initializer}
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            g.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _lower(model: onnx.ModelProto, low: _Lowering | None) -> onnx.ModelProto:
    g = model.graph
    _undedupe_initializers(g)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    rename: dict[str, str] = {}
    shared_q: dict = {}
    replaced: set[str] = set()  # float initializers a weight/bias marker consumed
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
        if n.domain != DOMAIN:
            nodes.append(n)
            continue
        if low is None:
            raise RuntimeError("marker in an fp32 export")
        key, x, old_out = _key(n), n.input[0], n.output[0]
        rename[old_out] = key
        if key in low.acts:
            _lower_act(low, key, x, key, nodes, inits, shared_q)
        elif key in low.weights:
            replaced.add(x)
            _lower_weight(low, key, key, nodes, inits)
        elif key in low.biases:
            replaced.add(x)
            _lower_bias(low, key, key, nodes, inits)
        else:
            raise RuntimeError(f"marker {key!r} has no frozen parameters")
    for o in g.output:
        if o.name in rename:
            raise RuntimeError(f"graph output {o.name} is a marker")
    del g.node[:]
    g.node.extend(nodes)
    old = [t for t in g.initializer if t.name not in replaced]
    del g.initializer[:]
    g.initializer.extend(old + inits)
    _fold_weight_transposes(g, low)
    if low is not None:
        _requantize_before_shape_ops(g, low)
    _drop_unused_initializers(g)
    # the exporter's value_info for marker outputs is stale; let consumers re-infer
    del g.value_info[:]
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


_SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")


def _requantize_before_shape_ops(g: onnx.GraphProto, low: _Lowering) -> None:
    """pool -> Flatten -> Q/DQ -> Gemm leaves the pool in float on runtimes that fuse
    DQ -> op -> Q patterns: repeat the quantizer before the shape op as well. Exact,
    since a shape op moves values without changing them and requantizing on-grid
    values on the same grid is the identity. Skipped where the target forbids Q/DQ
    around shape ops (TensorRT)."""
    banned = set(low.profile.graph.no_qdq_ops)
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    out_nodes = list(g.node)
    for s in list(g.node):
        if s.op_type not in _SHAPE_OPS or s.op_type in banned:
            continue
        users = consumers.get(s.output[0], [])
        src = producers.get(s.input[0])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or (src and src.op_type == "DequantizeLinear"):
            continue
        chain, n = [], users[0]
        while True:  # Q [-> DQ -> Clip -> Q] -> DQ, ending at an activation key
            chain.append(n)
            nxt = consumers.get(n.output[0], [])
            if n.op_type == "DequantizeLinear" and n.output[0] in low.acts or len(nxt) != 1:
                break
            n = nxt[0]
        if chain[-1].op_type != "DequantizeLinear" or chain[-1].output[0] not in low.acts:
            continue
        copies, prev = [], s.input[0]
        for c in chain:
            new = onnx.NodeProto()
            new.CopyFrom(c)
            new.name = f"{c.name}_before_{s.op_type}"
            new.input[0] = prev
            new.output[0] = prev = f"{c.output[0]}_before_{s.op_type}"
            copies.append(new)
        s.input[0] = prev
        i = out_nodes.index(s)
        out_nodes[i:i] = copies
    del g.node[:]
    g.node.extend(out_nodes)


def _fold_weight_transposes(g: onnx.GraphProto, low: _Lowering | None) -> None:
    """torch Linear with a marked weight exports Gemm(x, Transpose(W)); give Gemm the
    torch-layout weight with transB=1 instead (the layout TensorRT/QNN/ORT expect,
    per-channel axis 0)."""
    weight_outs = set(low.weights) if low else set()
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    drop = []
    for n in g.node:
        if n.op_type != "Transpose" or n.input[0] not in weight_outs:
            continue
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        users = consumers.get(n.output[0], [])
        if perm != [1, 0] or not users or not all(
            u.op_type == "Gemm" and list(u.input).index(n.output[0]) == 1 for u in users
        ):
            continue
        for u in users:
            u.input[1] = n.input[0]
            tb = next((a for a in u.attribute if a.name == "transB"), None)
            if tb is None:
                u.attribute.append(helper.make_attribute("transB", 1))
            else:
                tb.i = 1 - tb.i
        drop.append(n)
    for n in drop:
        g.node.remove(n)


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _finish(model: onnx.ModelProto, opset: int, meta: dict) -> onnx.ModelProto:
    if opset > MAX_TORCH_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as e:  # noqa: BLE001 - the converter raises several types
            raise RuntimeError(f"cannot convert the graph to opset {opset}: {e}") from None
    model.producer_name = "deployq"
    model.producer_version = deployq.__version__
    model.graph.name = "deployq"
    model.doc_string = ""
    onnx_meta.write(model, meta)
    return model



# --- the output quantizer (targets whose integer ops cannot produce float outputs) ----

OUTPUT_QUANT_KEY = onnx_meta.OUTPUT_QUANTIZER  # metadata: how the logits were quantized
CALIB_MARGIN = 1.1  # calibrated logit range widened by 10%: top logits must not clip


def needs_output_quantizer(profile: Profile) -> bool:
    """QNN HTP runs quantized node groups only (DQ -> op -> Q): a Gemm/Conv whose output
    stays float is refused with CPU fallback disabled, so the logits get a Q/DQ."""
    return profile.backend == "qnn"


def _output_range_bound(p) -> tuple[float, float]:
    """Every logit the last layer can produce, from its integers: input codes anywhere in
    [qmin, qmax], weights and bias as frozen. A guaranteed range that needs no data."""
    from deployq.elastic import dequantized_weight

    w = dequantized_weight(p).reshape(p.weight_int.shape[0], -1).double()
    s, z, a = float(p.act_scale), float(p.act_zero_point.reshape(-1)[0]), p.spec.act
    xlo, xhi = (a.qmin - z) * s, (a.qmax - z) * s
    b = p.bias_int.double() * p.bias_scale.double()
    lo = b + torch.minimum(w * xlo, w * xhi).sum(1)
    hi = b + torch.maximum(w * xlo, w * xhi).sum(1)
    return float(lo.min()), float(hi.max())


def _output_qparams(profile: Profile, lo: float, hi: float) -> tuple[np.float32, int, str]:
    container = profile.activations.container
    if profile.activations.symmetric:
        m = max(abs(lo), abs(hi), 1e-8)
        return np.float32(m / 127.0), 0, container
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32(max(hi - lo, 1e-8) / 255.0)
    zp = int(np.clip(np.round(-lo / float(scale)), 0, 255))
    return scale, zp, container


def _add_output_quantizer(model: onnx.ModelProto, scale: np.float32, zp: int, container: str) -> None:
    g = model.graph
    out = g.output[0].name
    pre = f"{out}_float"
    for n in g.node:
        for i, o in enumerate(n.output):
            if o == out:
                n.output[i] = pre
    dt = np.uint8 if container == "uint8" else np.int8
    g.initializer.extend([_init(f"{out}_scale", np.array(scale, dtype=np.float32)),
                          _init(f"{out}_zero_point", np.array(zp, dtype=dt))])
    g.node.extend([
        helper.make_node("QuantizeLinear", [pre, f"{out}_scale", f"{out}_zero_point"], [f"{out}_quantized"],
                         name=f"{out}/QuantizeLinear"),
        helper.make_node("DequantizeLinear", [f"{out}_quantized", f"{out}_scale", f"{out}_zero_point"], [out],
                         name=f"{out}/DequantizeLinear"),
    ])

# --- the public entry point -----------------------------------------------------------


def _input_shape(ckpt: Checkpoint) -> tuple[int, ...]:
    pre = ckpt.meta.preprocessing or {}
    args = ckpt.meta.model_args or {}
    c = int(pre.get("channels", args.get("in_channels", 3)))
    s = int(pre.get("size", args.get("input_size", 32)))
    return (1, c, s, s)


def _metadata(ckpt: Checkpoint, kind: str, profile: Profile | None, spec: SubnetSpec | None, emulated) -> dict:
    meta = {
        onnx_meta.VERSION: deployq.__version__,
        onnx_meta.KIND: kind,
        onnx_meta.CHECKPOINT_SHA256: ckpt.sha256,
        onnx_meta.MODEL: {"name": ckpt.meta.model, "args": ckpt.meta.model_args},
        onnx_meta.PREPROCESSING: ckpt.meta.preprocessing,
        onnx_meta.CLASS_NAMES: list(ckpt.meta.class_names),
    }
    if kind == "qdq":
        meta[onnx_meta.PROFILE] = profile.name
        meta[onnx_meta.SUBNET] = spec.to_dict()
        meta[onnx_meta.EMULATED] = list(emulated)
        meta[onnx_meta.FIXED_LAYERS] = list(ckpt.net.fixed_layers)
    return meta


def build_model(
    ckpt: Checkpoint,
    profile: Profile | None,
    spec: SubnetSpec | None,
    *,
    fp32: bool = False,
    calibration: np.ndarray | None = None,
) -> tuple[onnx.ModelProto, _Lowering | None]:
    """The ONNX graph (not written) and what lowering recorded. Checks first."""
    threads = torch.get_num_threads()
    # One intra-op thread: export is many small tensor ops plus one traced forward, and
    # on a busy 2-core machine torch's thread pool contends (measured 2-4x slower).
    torch.set_num_threads(1)
    try:
        return _build_model(ckpt, profile, spec, fp32=fp32, calibration=calibration)
    finally:
        torch.set_num_threads(threads)


def _build_model(ckpt, profile, spec, *, fp32, calibration):
    net = ckpt.net
    if fp32:
        opset = profile.opset if profile is not None else 17
        module = _export_module(net, None)
        low = None
        kind = "fp32"
    else:
        if profile is None or spec is None:
            raise UserError("a quantized export needs a profile and a subnet")
        profile.check(spec)
        net.check_spec(spec)
        opset = profile.opset
        frozen = net.freeze(spec)
        low = _plan(frozen, profile)
        module = _export_module(net, frozen)
        kind = "qdq"
    was_active = net.active_spec()
    try:
        model = _torch_export(module, _input_shape(ckpt), opset, markers=not fp32)
    finally:
        net.set_active(was_active)
    model = _lower(model, low)
    meta = _metadata(ckpt, kind, profile, spec, low.emulated if low else ())
    if low is not None and needs_output_quantizer(profile):
        lo, hi = _output_range_bound(frozen[net.layer_names[-1]]) if _ends_in_weighted(net) else (None, None)
        source = "weights"
        if calibration is not None:
            logits = _subnet_logits(net, spec, calibration)
            clo, chi = float(logits.min()) * CALIB_MARGIN, float(logits.max()) * CALIB_MARGIN
            lo, hi = (clo, chi) if lo is None else (max(lo, clo), min(hi, chi))
            source = "calibration"
        if lo is None:
            raise UserError(f"profile {profile.name} quantizes the model output: pass calibration data")
        scale, zp, container = _output_qparams(profile, lo, hi)
        _add_output_quantizer(model, scale, zp, container)
        out = model.graph.output[0].name
        low.act_enc.append(enc_mod.TensorEncoding(out, profile.form.act(8), np.array([scale]), np.array([zp])))
        meta[OUTPUT_QUANT_KEY] = {"tensor": out, "scale": float(scale), "zero_point": zp,
                                  "container": container, "range_from": source}
    model = _finish(model, opset, meta)
    return model, low


def _ends_in_weighted(net) -> bool:
    from deployq.elastic import ElasticWeightless

    last = net.layer_names[-1]
    if isinstance(net.layer(last), ElasticWeightless):
        return False
    outs = [n for n in net.gm.graph.nodes if n.op == "output"]
    arg = outs[0].args[0] if outs else None
    return getattr(arg, "op", None) == "call_module" and arg.target == last


def _subnet_logits(net, spec: SubnetSpec, x: np.ndarray) -> np.ndarray:
    was = net.active_spec()
    net.set_active(spec)
    try:
        with torch.no_grad():
            return torch.cat([net(torch.from_numpy(np.asarray(x[i : i + 256], dtype=np.float32)))
                              for i in range(0, len(x), 256)]).numpy()
    finally:
        net.set_active(was)


def export(
    ckpt: Checkpoint,
    profile: Profile | None,
    spec: SubnetSpec | None,
    out: str | Path,
    *,
    fp32: bool = False,
    calibration: np.ndarray | None = None,
) -> ExportResult:
    """Check, build, verify, then write `out` (and the encodings sidecar) atomically.

    `calibration` (float32 NCHW inputs) only matters for profiles that quantize the
    model output (QNN): it tightens the logits' range; without it the range is the
    guaranteed one computed from the last layer's integers."""
    from deployq.check import check_model

    out = check_writable(out)
    model, low = build_model(ckpt, profile, None if fp32 else spec, fp32=fp32, calibration=calibration)
    if fp32:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise RuntimeError(f"deployq bug: the exported graph fails the ONNX checker: {e}") from e
    else:
        # check_model's first rule is onnx.checker with full_check=True: not run twice.
        violations = check_model(model, profile)
        if violations:
            raise RuntimeError(
                "deployq bug: the export violates its own profile: " + "; ".join(map(str, violations[:5]))
            )
    data = model.SerializeToString()
    sidecars: list[Path] = []
    if not fp32 and profile.encodings:
        side = enc_mod.sidecar_path(out)
        check_writable(side)
        write_text(side, enc_mod.dumps(enc_mod.build(low.act_enc, low.param_enc)))
        sidecars.append(side)
    write_bytes(out, data)
    return ExportResult(
        out=out,
        kind="fp32" if fp32 else "qdq",
        profile=profile.name if profile is not None else None,
        spec=None if fp32 else spec,
        sidecars=tuple(sidecars),
        emulated=tuple(low.emulated) if low else (),
        violations=(),
        size_bytes=len(data),
        shared_quantizers=low.shared if low else 0,
    )


def summary(result: ExportResult) -> str:
    lines = [
        f"wrote {result.out} ({result.size_bytes / 1024:.1f} KiB, {result.kind})",
    ]
    if result.kind == "qdq":
        lines.append(f"profile {result.profile}, bits {result.bits}, {len(result.spec.layers)} quantized layers")
        if result.emulated:
            w = sum(1 for e in result.emulated if e["role"] == WEIGHT)
            a = len(result.emulated) - w
            lines.append(f"emulated in 8-bit containers: {w} weight and {a} activation tensors")
        else:
            lines.append("emulated: none (all native)")
        lines.append("checks passed: onnx checker (full), profile conformance")
    for s in result.sidecars:
        lines.append(f"wrote {s}")
    return "\n".join(lines)


__all__ = ["ExportResult", "build_model", "default_output_name", "export", "subnet_from_args", "summary"]

