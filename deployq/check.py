"""Profile conformance rules over a QDQ ONNX graph, however it was produced.

`check_model(model, profile)` runs every rule in `RULES` and returns the
violations; each names the rule, the node, what is wrong and why the target
needs it. The rules only read the graph (and deployq metadata when present),
so they check deployq's own exports and third-party QDQ models alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from deployq import onnx_meta
from deployq.profile import Profile

QUANTIZE, DEQUANTIZE = "QuantizeLinear", "DequantizeLinear"
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm")  # input 1 is a weight, input 2 a bias
MATMUL = "MatMul"
INT_TYPES = {"int8", "uint8", "int4", "uint4", "int16", "uint16", "int32"}
BIAS_REL_TOL = 1e-6


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str
    why: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message} ({self.why})"


@dataclass(frozen=True)
class Rule:
    id: str
    summary: str
    why: Callable[[Profile], str]
    run: Callable[[_Graph, Profile], Iterable[tuple[str, str]]]  # yields (node, message)


# --- graph index -----------------------------------------------------------------
class _Graph:
    """Producers, consumers and constant values of one ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.consts: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, str] = {}
        for t in g.initializer:
            self.dtypes[t.name] = _dtype_name(t.data_type)
            self.consts[t.name] = _to_array(t)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in self.nodes:
            for o in n.output:
                self.producer[o] = n
            for i, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, i))
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.dtypes[n.output[0]] = _dtype_name(a.t.data_type)
                        self.consts[n.output[0]] = _to_array(a.t)
        for vi in (*g.value_info, *g.input, *g.output):
            if vi.type.HasField("tensor_type") and vi.name not in self.dtypes:
                self.dtypes[vi.name] = _dtype_name(vi.type.tensor_type.elem_type)

    def name(self, node: onnx.NodeProto) -> str:
        return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"

    def from_op(self, tensor: str, op: str) -> onnx.NodeProto | None:
        p = self.producer.get(tensor)
        return p if p is not None and p.op_type == op else None

    def is_const(self, tensor: str) -> bool:
        return tensor in self.consts

    def qdq_nodes(self) -> Iterator[onnx.NodeProto]:
        return (n for n in self.nodes if n.op_type in (QUANTIZE, DEQUANTIZE))

    def container(self, node: onnx.NodeProto) -> str:
        """Integer type a Q/DQ node quantizes to / from."""
        if len(node.input) > 2 and node.input[2] in self.dtypes:
            return self.dtypes[node.input[2]]
        if node.op_type == QUANTIZE:
            return "uint8"  # ONNX default when the zero-point is omitted
        x = node.input[0]
        q = self.from_op(x, QUANTIZE)
        if q is not None:
            return self.container(q)
        return self.dtypes.get(x, "unknown")

    def role(self, node: onnx.NodeProto) -> str:
        """'weight', 'bias' or 'act' for a Q/DQ node."""
        x = node.input[0]
        if node.op_type == DEQUANTIZE:
            q = self.from_op(x, QUANTIZE)
            if q is not None:
                x = q.input[0]
        if not self.is_const(x):
            return "act"
        out = node.output[0]
        if node.op_type == QUANTIZE:  # Q(const) -> DQ -> consumer
            dqs = [c for c, _ in self.consumers.get(out, []) if c.op_type == DEQUANTIZE]
            out = dqs[0].output[0] if dqs else out
        if self.container(node) == "int32" or any(
            c.op_type in WEIGHTED_OPS and i == 2 for c, i in self.consumers.get(out, [])
        ):
            return "bias"
        return "weight"

    def scale(self, node: onnx.NodeProto) -> np.ndarray | None:
        return self.consts.get(node.input[1]) if len(node.input) > 1 else None

    def zero_point(self, node: onnx.NodeProto) -> np.ndarray | None:
        return self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None

    def weight_consumers(self, dq: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
        return [
            (c, i)
            for c, i in self.consumers.get(dq.output[0], [])
            if i == 1 and c.op_type in (*WEIGHTED_OPS, MATMUL)
        ]


def _dtype_name(dt: int) -> str:
    return onnx.TensorProto.DataType.Name(dt).lower()


def _to_array(t: onnx.TensorProto) -> np.ndarray:
    a = numpy_helper.to_array(t)
    # int4/uint4 arrive as ml_dtypes; plain int64 is all the rules need.
    return a.astype(np.int64) if _dtype_name(t.data_type) in ("int4", "uint4") else a


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _opset(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return None


def _is_trt(p: Profile) -> bool:
    return p.backend == "tensorrt"


# --- rules -----------------------------------------------------------------------
def _onnx_checker(g: _Graph, p: Profile):
    try:
        onnx.checker.check_model(g.model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        yield "model", f"onnx.checker failed: {str(e).strip().splitlines()[0][:300]}"


def _opset_range(g: _Graph, p: Profile):
    v = _opset(g.model)
    lo, hi = p.opset_range
    if v is None or not lo <= v <= hi:
        yield "model", f"opset {v} is outside {lo}..{hi}"


def _no_float_bn(g: _Graph, p: Profile):
    for n in g.nodes:
        if n.op_type == "BatchNormalization":
            yield g.name(n), "float BatchNormalization left in the graph"


def _quantized_input(g: _Graph, p: Profile):
    for n in g.nodes:
        if n.op_type not in p.graph.qdq_ops or n.op_type not in (*WEIGHTED_OPS, MATMUL):
            continue
        for i in (0, 1):
            if i >= len(n.input):
                continue
            dq = g.from_op(n.input[i], DEQUANTIZE)
            what = "input" if i == 0 else "weight"
            if dq is None:
                yield g.name(n), f"{what} '{n.input[i]}' does not come from DequantizeLinear"
            elif i == 1 and n.op_type in WEIGHTED_OPS:
                x = dq.input[0]
                if not g.is_const(x) or g.dtypes.get(x) not in INT_TYPES:
                    yield (
                        g.name(n),
                        f"weight '{n.input[i]}' is not a DequantizeLinear of an integer initializer",
                    )


def _residual_add(g: _Graph, p: Profile):
    if "Add" not in p.graph.qdq_ops:
        return
    for n in g.nodes:
        if n.op_type != "Add" or any(g.is_const(x) for x in n.input):
            continue  # a constant operand is a bias add, not a residual
        for x in n.input:
            if g.from_op(x, DEQUANTIZE) is None:
                yield g.name(n), f"residual input '{x}' does not come from DequantizeLinear"


def _allowed_containers(p: Profile, role: str) -> set[str]:
    if role == "act":
        return {p.activations.container}
    allowed = {p.weights.container}
    if p.native_int4:
        allowed.add("int4" if p.weights.container == "int8" else "uint4")
    return allowed


def _qdq_dtype(g: _Graph, p: Profile):
    for n in g.qdq_nodes():
        role = g.role(n)
        if role == "bias":
            continue  # the bias rule owns int32 / float bias
        got = g.container(n)
        allowed = _allowed_containers(p, role)
        if got not in allowed:
            yield (
                g.name(n),
                f"{role} Q/DQ type is {got}; profile {p.name} allows {', '.join(sorted(allowed))}",
            )


def _zero_point(g: _Graph, p: Profile):
    for n in g.qdq_nodes():
        role = g.role(n)
        if role == "bias":
            continue
        symmetric = p.activations.symmetric if role == "act" else p.weights.symmetric
        if not symmetric and not _is_trt(p):
            continue
        zp = g.zero_point(n)
        if zp is not None and np.any(zp != 0):
            yield g.name(n), f"{role} zero-point is {np.unique(zp)[:4].tolist()}; must be 0"
        if len(n.input) > 2 and n.input[2] and zp is None:
            yield g.name(n), f"{role} zero-point '{n.input[2]}' is not a constant"


def _scale(g: _Graph, p: Profile):
    for n in g.qdq_nodes():
        s = g.scale(n)
        if s is None:
            yield g.name(n), f"scale '{n.input[1]}' is not a constant"
        elif not np.all(np.isfinite(s)) or not np.all(s > 0):
            yield g.name(n), f"scale has non-positive or non-finite values (min {np.min(s):g})"


def _expected_axis(consumer: onnx.NodeProto, rank: int) -> int:
    op = consumer.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    return rank - 1  # MatMul weight [.., K, N]: per output column


def _per_axis(g: _Graph, p: Profile):
    for n in g.qdq_nodes():
        s = g.scale(n)
        if s is None or s.size <= 1:
            continue
        role = g.role(n)
        if role == "act":
            yield g.name(n), f"activation quantized per-axis ({s.size} scales); must be per-tensor"
            continue
        if role != "weight" or n.op_type != DEQUANTIZE:
            continue
        w = g.consts.get(n.input[0])
        rank = w.ndim if w is not None else 1
        axis = _attr(n, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        for c, _ in g.weight_consumers(n):
            want = _expected_axis(c, rank)
            if axis != want:
                yield (
                    g.name(n),
                    f"weight per-axis on axis {axis}; {c.op_type} '{g.name(c)}' needs axis {want}",
                )


def _weight_granularity(g: _Graph, p: Profile):
    for n in g.nodes:
        if n.op_type != DEQUANTIZE or g.role(n) != "weight":
            continue
        s = g.scale(n)
        for c, _ in g.weight_consumers(n):
            per_channel = (
                p.weights.granularity == "per-channel" and c.op_type not in p.weights.per_tensor_ops
            )
            if s is None:
                continue
            if per_channel and s.size <= 1 and _out_channels(g, n, c) > 1:
                yield (
                    g.name(n),
                    f"weight of {c.op_type} '{g.name(c)}' is per-tensor; profile {p.name} needs per-channel",
                )
            if not per_channel and s.size > 1:
                yield (
                    g.name(n),
                    f"weight of {c.op_type} '{g.name(c)}' is per-channel; profile {p.name} needs per-tensor",
                )


def _out_channels(g: _Graph, dq: onnx.NodeProto, consumer: onnx.NodeProto) -> int:
    w = g.consts.get(dq.input[0])
    if w is None:
        return 2
    return int(w.shape[_expected_axis(consumer, w.ndim)]) if w.ndim else 1


def _bias(g: _Graph, p: Profile):
    for n in g.nodes:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 3 or not n.input[2]:
            continue
        dq = g.from_op(n.input[2], DEQUANTIZE)
        if p.graph.bias == "float":
            if dq is not None:
                yield (
                    g.name(n),
                    f"bias '{n.input[2]}' is a {g.container(dq)} DequantizeLinear; must stay float",
                )
            continue
        if dq is None or g.container(dq) != "int32" or not g.is_const(dq.input[0]):
            yield (
                g.name(n),
                f"bias '{n.input[2]}' is not a DequantizeLinear of an int32 initializer",
            )
            continue
        zp = g.zero_point(dq)
        if zp is not None and np.any(zp != 0):
            yield g.name(n), "bias zero-point must be 0"
        in_dq, w_dq = g.from_op(n.input[0], DEQUANTIZE), g.from_op(n.input[1], DEQUANTIZE)
        sb = g.scale(dq)
        if in_dq is None or w_dq is None or sb is None:
            continue
        si, sw = g.scale(in_dq), g.scale(w_dq)
        if si is None or sw is None:
            continue
        want = si.astype(np.float64).reshape(-1)[0] * sw.astype(np.float64).reshape(-1)
        got = sb.astype(np.float64).reshape(-1)
        if got.size not in (1, want.size) and want.size != 1:
            yield g.name(n), f"bias has {got.size} scales; weight has {want.size}"
        elif not np.allclose(got, want, rtol=BIAS_REL_TOL, atol=0):
            yield g.name(n), "bias scale is not input_scale * weight_scale"


def _shape_op_qdq(g: _Graph, p: Profile):
    for n in g.nodes:
        if n.op_type not in p.graph.no_qdq_ops:
            continue
        for x in n.input:
            if x and g.from_op(x, DEQUANTIZE) is not None:
                yield g.name(n), f"{n.op_type} consumes DequantizeLinear output '{x}'"


def _weight_range(g: _Graph, p: Profile):
    if not (p.weights.symmetric and p.weights.narrow):
        return
    for n in g.nodes:
        if n.op_type != DEQUANTIZE or g.role(n) != "weight":
            continue
        w = g.consts.get(n.input[0])
        cont = g.container(n)
        if w is None or cont not in ("int8", "int4"):
            continue
        lo = -(2 ** (8 if cont == "int8" else 4) // 2 - 1)
        if w.size and int(w.min()) < lo:
            yield (
                g.name(n),
                f"weight '{n.input[0]}' holds {int(w.min())}; narrow range starts at {lo}",
            )


def _emulated_range(g: _Graph, p: Profile):
    entries = onnx_meta.read(g.model).get(onnx_meta.EMULATED) or []
    for e in entries:
        if not isinstance(e, dict):
            continue
        t, bits, cont = e.get("tensor"), e.get("bits"), str(e.get("container", ""))
        if t not in g.consts or not isinstance(bits, int) or g.dtypes.get(t) not in INT_TYPES:
            continue
        v = g.consts[t]
        if cont.startswith("u"):
            lo, hi = 0, 2**bits - 1
        else:
            lo = -(2 ** (bits - 1)) + (1 if p.weights.narrow else 0)
            hi = 2 ** (bits - 1) - 1
        if v.size and (int(v.min()) < lo or int(v.max()) > hi):
            yield (
                t,
                f"emulated {bits}-bit tensor holds [{int(v.min())}, {int(v.max())}]; outside [{lo}, {hi}]",
            )


def _why_dtype(p: Profile) -> str:
    if _is_trt(p):
        return (
            "TensorRT's ONNX parser accepts only int8/fp8/int4 Q/DQ; uint8 zero-points are rejected"
        )
    return f"{p.name} runs weights in {p.weights.container} and activations in {p.activations.container}; other types fall back or fail"


def _why_bias(p: Profile) -> str:
    if p.graph.bias == "float":
        return "TensorRT's parser rejects int32 bias Q/DQ; it quantizes the float bias itself"
    return "the integer kernel adds an int32 bias on the accumulator scale (input_scale * weight_scale, zero-point 0)"


RULES: tuple[Rule, ...] = (
    Rule(
        "onnx-checker",
        "onnx.checker full check passes",
        lambda p: "a graph the ONNX checker rejects will not load on any runtime",
        _onnx_checker,
    ),
    Rule(
        "opset-range",
        "opset within the profile's range",
        lambda p: f"{p.name}'s parser supports opsets {p.opset_range[0]}..{p.opset_range[1]}",
        _opset_range,
    ),
    Rule(
        "no-float-batchnorm",
        "no BatchNormalization left",
        lambda p: (
            "BN must be folded before weight quantization or the integers differ from the trained subnet"
        ),
        _no_float_bn,
    ),
    Rule(
        "quantized-input",
        "Conv/Gemm/MatMul inputs come from DequantizeLinear",
        lambda p: "an op without Q/DQ on its inputs runs in float (or breaks the int8 fusion)",
        _quantized_input,
    ),
    Rule(
        "residual-add",
        "residual Add inputs come from DequantizeLinear",
        lambda p: (
            "without Q/DQ on both residual inputs the Add (and the next layer) falls back to float"
        ),
        _residual_add,
    ),
    Rule("qdq-dtype", "Q/DQ types match the profile's containers", _why_dtype, _qdq_dtype),
    Rule(
        "zero-point",
        "symmetric quantizers have zero-point 0",
        lambda p: (
            "TensorRT supports only symmetric quantization (zero-point 0)"
            if _is_trt(p)
            else f"{p.name} declares these tensors symmetric"
        ),
        _zero_point,
    ),
    Rule(
        "scale",
        "scales are positive finite constants",
        lambda p: "scales must be known at build time and positive to define a quantization grid",
        _scale,
    ),
    Rule(
        "per-axis",
        "per-axis only on weights, on the consumer's output-channel axis",
        lambda p: (
            "per-axis scales must run along output channels (Conv 0, ConvTranspose 1, Gemm 0/1 by transB, MatMul last); activations are per-tensor"
        ),
        _per_axis,
    ),
    Rule(
        "weight-granularity",
        "weight granularity as the profile says",
        lambda p: (
            f"{p.name} runs {p.weights.granularity} weights"
            + (
                f" ({', '.join(p.weights.per_tensor_ops)} per-tensor)"
                if p.weights.per_tensor_ops
                else ""
            )
        ),
        _weight_granularity,
    ),
    Rule("bias", "bias carried as the profile says", _why_bias, _bias),
    Rule(
        "shape-op-qdq",
        "no DequantizeLinear feeding shape ops",
        lambda p: (
            "TensorRT cannot place Q/DQ on shape ops; quantized data must not flow into Reshape/Transpose/Concat/Gather/..."
        ),
        _shape_op_qdq,
    ),
    Rule(
        "weight-range",
        "symmetric weights stay in the narrow range",
        lambda p: (
            "narrow range [-127, 127] keeps +w and -w equally representable (TensorRT requires it)"
        ),
        _weight_range,
    ),
    Rule(
        "emulated-range",
        "emulated sub-8-bit initializers stay within their b-bit range",
        lambda p: (
            "emulation is exact only if the container holds nothing outside the b-bit grid the subnet was trained with"
        ),
        _emulated_range,
    ),
)
RULE_IDS: tuple[str, ...] = tuple(r.id for r in RULES)


def check_model(model: onnx.ModelProto, profile: Profile) -> list[Violation]:
    """Every violation of `profile` in `model` (empty list = conforms)."""
    g = _Graph(model)
    out: list[Violation] = []
    for rule in RULES:
        why = rule.why(profile)
        for node, message in rule.run(g, profile):
            out.append(Violation(rule.id, node, message, why))
    return out
