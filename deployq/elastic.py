"""The elastic quantization supernet: quantizers, layers, conversion, verbs.

`convert(model, space)` traces any nn.Module with torch.fx, folds every
BatchNorm into the conv before it (so what is trained is what a target runs:
per-tensor weight scales do not survive folding BN afterwards), swaps Conv2d /
Linear for elastic layers that quantize their weight and their input, and
replaces residual adds and average pools by weightless elastic ops that quantize
their inputs (the Q/DQ a target places there; learning them beats calibrating).

One tensor, one quantizer: layers that read the same tensor share its quantizer,
the tensor is stored once at the fixed width (the residual stream), and a reader
that wants fewer bits requantizes it. Weightless ops stay at the fixed width.

Every quantizer keeps one learned step size (and, when asymmetric, one learned
zero-point) per cell: weights per (bits, granularity, symmetry), activations per
(bits, kind) with kind one of asymmetric / symmetric unsigned / symmetric signed.
Switching subnets selects cells; no weight changes.

The verbs take typed specs: `set_active(SubnetSpec | None)` (None = float),
`sample(rng)`, `uniform_spec(form, wbits, abits)`, `freeze(spec)`.
"""

from __future__ import annotations

import contextvars
import copy
import operator
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

from deployq.errors import UserError
from deployq.quant import (
    LearnedFQ,
    can_add_fused,
    channel_view,
    dequantize,
    fake_quant_add,
    fake_quant_learned,
    init_qparams,
    lsq_grad_factor,
    quantize,
)
from deployq.relu_absorb import AbsorbedReLU, absorb, absorbing
from deployq.spec import ElasticSpace, Form, LayerSpec, QuantSpec, SubnetSpec, act_spec

WEIGHT_CELLS = ("pt_sym", "pt_asym", "pc_sym", "pc_asym")
ACT_KINDS = ("asym", "sym_u", "sym_s")
MIN_SCALE = 1e-8


def weight_cell(spec: QuantSpec) -> str:
    return ("pc_" if spec.per_channel else "pt_") + ("sym" if spec.symmetric else "asym")


def act_kind(spec: QuantSpec) -> str:
    if not spec.symmetric:
        return "asym"
    return "sym_s" if spec.signed else "sym_u"


def _cell_list(n: int, shape: tuple[int, ...], fill: float) -> nn.ParameterList:
    # One Parameter per bit-width, so a cell that a step did not use gets grad None
    # and Adam leaves it alone (a zero grad would still move it through momentum).
    return nn.ParameterList([nn.Parameter(torch.full(shape, fill)) for _ in range(n)])


def _drop_caches(module: nn.Module) -> None:
    for k in ("_cells", "_cell_cache", "_stack_cells"):
        module.__dict__.pop(k, None)


class _CachingQuantizer(nn.Module):
    """A quantizer that caches its per-spec cell lookups (Parameters by identity): the
    caches are dropped whenever parameters may be replaced (load_state_dict with
    assign=True, .to() with the overwrite flag)."""

    def _load_from_state_dict(self, *args, **kwargs):
        _drop_caches(self)
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, *args, **kwargs):
        _drop_caches(self)
        return super()._apply(*args, **kwargs)


class WeightQuantizer(_CachingQuantizer):
    """Holds the step sizes / zero-points of one weight tensor for every cell."""

    def __init__(self, channels: int, bits: Iterable[int]):
        super().__init__()
        self.bits = tuple(bits)
        self.channels = channels
        n = len(self.bits)
        self.scale = nn.ModuleDict(
            {c: _cell_list(n, (channels,) if c.startswith("pc") else (1,), 1.0) for c in WEIGHT_CELLS}
        )
        self.zero_point = nn.ModuleDict(
            {c: _cell_list(n, (channels,) if c.startswith("pc") else (1,), 0.0) for c in WEIGHT_CELLS if "asym" in c}
        )

    def _index(self, spec: QuantSpec) -> int:
        try:
            return self.bits.index(spec.bits)
        except ValueError:
            raise UserError(f"weight bits {spec.bits} are not in this supernet's space {self.bits}") from None

    def qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) as trained: shape [C] per-channel, [1] per-tensor."""
        i = self._index(spec)
        cell = weight_cell(spec)
        scale = self.scale[cell][i].abs().clamp(min=MIN_SCALE)
        zp = self.zero_point[cell][i] if cell in self.zero_point else torch.zeros_like(scale)
        return scale, zp

    def forward(self, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return self.quantize_with_scale(w, spec)[0]

    def _cell(self, spec: QuantSpec, numel: int):
        # The per-spec lookups (ModuleDict, ParameterList, bits index) cost more than the
        # quantization of a small weight; they are resolved once (see _CachingQuantizer).
        key = (spec, numel)
        hit = self.__dict__.setdefault("_cells", {}).get(key)
        if hit is None:
            i = self._index(spec)
            cell = weight_cell(spec)
            raw_s = self.scale[cell][i]
            raw_z = None if spec.symmetric else self.zero_point[cell][i]  # None: skip all z work
            g = lsq_grad_factor(spec.qmax, numel // raw_s.numel())
            hit = self._cells[key] = (raw_s, raw_z, g)
        return hit

    def quantize_with_scale(self, w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake-quantized w, its scale [C] or [1]): the layer needs the scale for the bias.
        The scale is detached (the bias uses it as a constant)."""
        raw_s, raw_z, g = self._cell(spec, w.numel())
        return fake_quant_learned(w, raw_s, raw_z, spec.qmin, spec.qmax, g, MIN_SCALE, axis=0)

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor, forms: Iterable[tuple[bool, bool]], method: str = "search") -> None:
        from deployq.spec import weight_spec

        for per_channel, symmetric in forms:
            for i, b in enumerate(self.bits):
                spec = weight_spec(b, per_channel, symmetric)
                s, z = init_qparams(w, spec, axis=0 if per_channel else None, method=method)
                cell = weight_cell(spec)
                self.scale[cell][i].copy_(s.reshape(self.scale[cell][i].shape))
                if cell in self.zero_point:
                    self.zero_point[cell][i].copy_(z.reshape(self.zero_point[cell][i].shape))


class ActQuantizer(_CachingQuantizer):
    """Per-tensor activation quantizer with a cell per (bits, kind)."""

    def __init__(self, bits: Iterable[int]):
        super().__init__()
        self.bits = tuple(bits)
        n = len(self.bits)
        self.scale = nn.ModuleDict({k: _cell_list(n, (1,), 1.0) for k in ACT_KINDS})
        self.zero_point = _cell_list(n, (1,), 0.0)
        # Whether calibration saw negative inputs: decides which symmetric kind fits.
        self.register_buffer("signed_input", torch.tensor(True))
        self.register_buffer("calibrated", torch.tensor(False))
        self.after_relu = False  # reads an AbsorbedReLU (set by convert)

    def relu_mask(self) -> bool:
        """Whether this quantizer applies the absorbed ReLU it reads (forward and backward)."""
        return self.after_relu and absorbing()

    def _index(self, spec: QuantSpec) -> int:
        try:
            return self.bits.index(spec.bits)
        except ValueError:
            raise UserError(f"activation bits {spec.bits} are not in this supernet's space {self.bits}") from None

    def qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index(spec)
        kind = act_kind(spec)
        scale = self.scale[kind][i].abs().clamp(min=MIN_SCALE)
        # Non-negative inputs (post-ReLU) keep zero-point 0 even when asymmetric:
        # codes below it would encode values that never occur, and zero-point == qmin
        # is what lets runtimes fuse the ReLU into the preceding integer conv.
        if kind == "asym" and bool(self.signed_input):
            zp = self.zero_point[i]
        else:
            zp = torch.zeros_like(scale)
        return scale, zp

    def forward(self, x: torch.Tensor, spec: QuantSpec, relu: bool = False) -> torch.Tensor:
        return self.quantize_with_scale(x, spec, relu)[0]

    def is_signed(self) -> bool:
        return self._cells()[0]

    def _cells(self) -> tuple[bool, dict]:
        # (signed_input as a bool, per-spec cache), rebuilt whenever the buffer is written
        # (calibrate, load_state_dict): keyed by the buffer's identity and version counter,
        # so a forward reads no tensor value (no host sync) and does no per-spec lookups.
        buf = self.signed_input
        key = (id(buf), buf._version)
        c = self.__dict__.get("_cell_cache")
        if c is None or c[0] != key:
            c = self.__dict__["_cell_cache"] = (key, bool(buf), {})
        return c[1], c[2]

    def _cell(self, spec: QuantSpec):
        signed, cache = self._cells()
        hit = cache.get(spec)
        if hit is None:
            i = self._index(spec)
            kind = act_kind(spec)
            raw_z, zero_offset = None, False
            if kind == "asym":
                # as qparams: the learned zero-point only for signed inputs, else a fixed 0
                if signed:
                    raw_z = self.zero_point[i]
                else:
                    zero_offset = True
            hit = cache[spec] = (self.scale[kind][i], raw_z, zero_offset)
        return hit

    def quantize_with_scale(self, x: torch.Tensor, spec: QuantSpec,
                            relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(fake-quantized x, its scale [1], detached). Within one ElasticNet forward, a
        tensor this quantizer already quantized at this spec (a tensor several layers
        read) is not quantized again: the same output is returned, so autograd sums the
        readers' gradients and runs one backward. relu: see fake_quant_learned."""
        def compute():
            raw_s, raw_z, zero_offset = self._cell(spec)
            g = lsq_grad_factor(spec.qmax, x.numel())
            return fake_quant_learned(x, raw_s, raw_z, spec.qmin, spec.qmax, g, MIN_SCALE, None, zero_offset, relu)

        return memoised(self, x, spec, compute)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, method: str = "search") -> None:
        from deployq.spec import act_spec

        signed = bool((x < 0).any())
        self.signed_input.fill_(signed)
        self.calibrated.fill_(True)
        for i, b in enumerate(self.bits):
            s, z = init_qparams(x, act_spec(b, symmetric=False, signed=False), method=method)
            self.scale["asym"][i].copy_(s.reshape(1))
            self.zero_point[i].copy_(z.reshape(1))
            # Non-negative input: the asymmetric search clamps its range at 0 and so is the
            # symmetric unsigned one (zero-point 0). Signed input: the symmetric unsigned grid
            # is never used (check_spec refuses it), keep the same values as a placeholder.
            self.scale["sym_u"][i].copy_(s.reshape(1))
            s, _ = init_qparams(x, act_spec(b, symmetric=True, signed=True), method=method)
            self.scale["sym_s"][i].copy_(s.reshape(1))


def _with_fixed(bits: tuple[int, ...], space: ElasticSpace) -> tuple[int, ...]:
    if space.fixed_bits is None:
        return tuple(bits)
    return tuple(sorted(set(bits) | {space.fixed_bits}))


def _subsample(x: torch.Tensor, n: int = 1 << 14) -> torch.Tensor:
    """At most n elements of x for the calibration search: random positions plus the
    tensor's min and max (the search shrinks the range from those). Not a stride: a
    stride that divides a row samples one image column (on 16x16 inputs, every 16th
    element is column 0, a digit's blank border), and the search then fits the border:
    MobileNetV2's 8-bit ReLU6 inputs came out clipped at a third of their range."""
    flat = x.detach().reshape(-1)
    if flat.numel() <= n:
        return flat.clone()
    # seeded by size, so every rank of a distributed run draws the same positions
    gen = torch.Generator().manual_seed(flat.numel())
    idx = torch.randint(flat.numel(), (n - 2,), generator=gen, device="cpu").to(flat.device)
    return torch.cat([flat[idx], flat.min().reshape(1), flat.max().reshape(1)])


# Set by ElasticNet.forward: quantizer outputs of the running forward (see quantize_with_scale).
_FORWARD_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("deployq_forward_memo", default=None)


def memoised(quantizer, x: torch.Tensor, specs, compute):
    """compute() for (quantizer, x, specs), once per ElasticNet forward (see
    ActQuantizer.quantize_with_scale; deployq.stacked quantizes k slices the same way)."""
    memo = _FORWARD_MEMO.get()
    if memo is None:
        return compute()
    key = (id(quantizer), id(x), x._version, specs, torch.is_grad_enabled())
    hit = memo.get(key)
    if hit is not None and hit[0] is x:
        return hit[1]
    out = compute()
    memo[key] = (x, out)  # x kept alive: its id stays unique during the forward
    return out


class _Int32Bias(torch.autograd.Function):
    # round_ste(bias / s) * s as one autograd node; backward is what autograd takes
    # through the composite: (g * s) / s.
    @staticmethod
    def forward(ctx, bias, s):
        ctx.save_for_backward(s)
        return torch.round(bias / s) * s

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        return g * s / s, None


def _quant_conv_composite(x, weight, bias, a_s, a_z, w_s, w_z, s_a, act, wcfg, conv):
    """_QuantConv's forward with one autograd node per step (its double backward)."""
    if act is not None:
        x, s_a = fake_quant_learned(x, a_s, a_z, act[0], act[1], act[2], MIN_SCALE, None, act[3], act[4])
    w, s_w = fake_quant_learned(weight, w_s, w_z, wcfg[0], wcfg[1], wcfg[2], MIN_SCALE, axis=0)
    return F.conv2d(x, w, _int32_bias(bias, s_a * s_w), *conv)


class _QuantConv(torch.autograd.Function):
    """An elastic conv as one autograd node: fake-quantize the input (unless `act` is
    None: x is quantized already and s_a is its scale), fake-quantize the weight, the
    int32 bias, the conv. The same float ops as the composite (_quant_conv_composite), so
    the same forward bits; backward calls the conv's own backward op and the hand-written
    fake-quant gradients. At the supernet's sizes the Python and autograd bookkeeping of
    the ~10 separate nodes cost as much as the conv.

    act: (qmin, qmax, LSQ factor, zero_offset, relu); wcfg: (qmin, qmax, LSQ factor);
    conv: (stride, padding, dilation, groups)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a_s, a_z, w_s, w_z, s_a, act, wcfg, conv):
        nig = ctx.needs_input_grad
        afq = None
        xq = x
        if act is not None:
            afq = LearnedFQ()
            xq, s_a = afq.forward(x, a_s, a_z, act[0], act[1], act[2], MIN_SCALE, None, act[3], nig[4], act[4])
        wfq = LearnedFQ()
        wq, s_w = wfq.forward(weight, w_s, w_z, wcfg[0], wcfg[1], wcfg[2], MIN_SCALE, 0, False, nig[6])
        sb = s_a * s_w
        y = F.conv2d(xq, wq, torch.round(bias / sb) * sb, *conv)
        ctx.save_for_backward(x, weight, bias, a_s, a_z, w_s, w_z, s_a)
        ctx.afq, ctx.wfq, ctx.xq, ctx.wq, ctx.sb = afq, wfq, xq, wq, sb
        ctx.cfg = (act, wcfg, conv)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, a_s, a_z, w_s, w_z, s_a = ctx.saved_tensors
        nig = ctx.needs_input_grad
        act, wcfg, conv = ctx.cfg
        if torch.is_grad_enabled():
            # create_graph (grad-l1): differentiate the composite so that second-order
            # terms (through the quantized input and weight) are kept exactly as before.
            ins = (x, weight, bias, a_s, a_z, w_s, w_z)
            idx = [i for i in range(7) if nig[i]]
            with torch.enable_grad():
                y = _quant_conv_composite(x, weight, bias, a_s, a_z, w_s, w_z, s_a, act, wcfg, conv)
            got = torch.autograd.grad(y, [ins[i] for i in idx], gy, create_graph=True, allow_unused=True)
            grads = [None] * 7
            for i, g in zip(idx, got):
                grads[i] = g
            return (*grads, None, None, None, None)
        afq, wfq, xq, wq, sb = ctx.afq, ctx.wfq, ctx.xq, ctx.wq, ctx.sb
        need_xq = nig[0] or (act is not None and (nig[3] or nig[4]))
        need_wq = nig[1] or nig[5] or nig[6]
        stride, padding, dilation, groups = conv
        gxq, gwq, gb = torch.ops.aten.convolution_backward(
            gy, xq, wq, [wq.shape[0]], stride, padding, dilation, False, [0] * len(padding), groups,
            [need_xq, need_wq, nig[2]],
        )
        gbias = gb * sb / sb if nig[2] else None  # autograd's order through round_ste(b/s)*s
        gx = g_as = g_az = None
        if act is None:
            gx = gxq
        elif need_xq:
            # gxq is convolution_backward's fresh buffer: masked in place
            gx, g_as, g_az = afq.backward(gxq, xq, x, a_s, nig[0], nig[3], reuse_g=True)
        gw = g_ws = g_wz = None
        if need_wq:
            gw, g_ws, g_wz = wfq.backward(gwq, wq, weight, w_s, nig[1], nig[5])
        return gx, gw, gbias, g_as, g_az, g_ws, g_wz, None, None, None, None


def _int32_bias(bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bias as the int32 accumulator sees it (scale = s_act * s_weight, a constant)."""
    return _Int32Bias.apply(bias, scale.detach())


def _quant_input(q: ActQuantizer, x: torch.Tensor, act: QuantSpec, stored_bits: int | None):
    """Quantize a layer input. A tensor several layers read is stored once at
    `stored_bits` (one Q on the producer, which keeps it fusable and keeps the
    residual stream at 8 bits); a reader that wants fewer bits requantizes it. Only the
    Q on x itself takes over an absorbed ReLU."""
    relu = q.relu_mask()
    if stored_bits is not None and act.bits != stored_bits:
        x = q(x, act.with_bits(stored_bits), relu)
        relu = False
    return q.quantize_with_scale(x, act, relu)


def _stored_params(q: ActQuantizer, act: QuantSpec, stored_bits: int | None):
    if stored_bits is None or act.bits == stored_bits:
        return None
    spec = act.with_bits(stored_bits)
    s, z = q.qparams(spec)
    return spec, s.clone(), torch.round(z).clamp(spec.qmin, spec.qmax).clone()


class _ElasticWeighted(nn.Module):
    """Shared behaviour of elastic Conv2d / Linear: quantize input and weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, space: ElasticSpace):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        out = weight.shape[0]
        b = bias.detach().clone() if bias is not None else torch.zeros(out)
        self.bias = nn.Parameter(b)
        # The fixed first/last bit-width gets its own cell even when it is outside the
        # elastic range (e.g. a dedicated 2-bit space with 8-bit first/last layers).
        self.wq = WeightQuantizer(out, _with_fixed(space.wbits, space))
        self.aq = ActQuantizer(_with_fixed(space.abits, space))
        self.stored_bits: int | None = None  # set when the input tensor is shared (convert)
        self.active: LayerSpec | None = None
        self.stack: tuple[LayerSpec, ...] | None = None  # several subnets at once (deployq.stacked)
        self.stack_spans: tuple[int, ...] | None = None  # slices per subnet (set_active_stack)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fused_args(self) -> tuple | None:
        """(stride, padding, dilation, groups) when the layer runs as one _QuantConv node."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stack is not None:
            from deployq.stacked import weighted_forward

            return weighted_forward(self, x)
        spec = self.active
        if spec is None:
            return self._op(x, self.weight, self.bias)
        return self._quantized(x, spec)

    def _quantized(self, x: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        conv = self._fused_args()
        if conv is None:
            xq, s_a = _quant_input(self.aq, x, spec.act, self.stored_bits)
            wq, s_w = self.wq.quantize_with_scale(self.weight, spec.weight)
            return self._op(xq, wq, _int32_bias(self.bias, s_a * s_w))
        if self.stored_bits is not None:
            # a shared tensor: quantized outside, once per forward for all its readers
            x, s_a = _quant_input(self.aq, x, spec.act, self.stored_bits)
            a_s = a_z = act = None
        else:
            a_s, a_z, zero_offset = self.aq._cell(spec.act)
            act = (spec.act.qmin, spec.act.qmax, lsq_grad_factor(spec.act.qmax, x.numel()), zero_offset,
                   self.aq.relu_mask())
            s_a = None
        w_s, w_z, g_w = self.wq._cell(spec.weight, self.weight.numel())
        wcfg = (spec.weight.qmin, spec.weight.qmax, g_w)
        return _QuantConv.apply(x, self.weight, self.bias, a_s, a_z, w_s, w_z, s_a, act, wcfg, conv)

    @torch.no_grad()
    def frozen_params(self, spec: LayerSpec) -> FrozenParams:
        s_a, z_a = self.aq.qparams(spec.act)
        s_w, z_w = self.wq.qparams(spec.weight)
        w_int = quantize(
            self.weight,
            channel_view(s_w, self.weight.ndim, 0),
            channel_view(z_w, self.weight.ndim, 0),
            spec.weight.qmin,
            spec.weight.qmax,
        )
        bias_scale = (s_a * s_w).expand(self.weight.shape[0]).clone()
        bias_int = torch.round(self.bias / bias_scale).to(torch.int64)
        if bias_int.abs().max() >= 2**31:
            raise UserError(f"bias does not fit int32 at this scale (layer {self!r})")
        return FrozenParams(
            spec=spec,
            act_scale=s_a.clone(),
            act_zero_point=torch.round(z_a).clamp(spec.act.qmin, spec.act.qmax).clone(),
            weight_int=w_int,
            weight_scale=s_w.clone(),
            weight_zero_point=torch.round(z_w).clamp(spec.weight.qmin, spec.weight.qmax).clone(),
            bias_int=bias_int.to(torch.int32),
            bias_scale=bias_scale,
            stored=_stored_params(self.aq, spec.act, self.stored_bits),
        )


class ElasticConv2d(_ElasticWeighted):
    def __init__(self, conv: nn.Conv2d, space: ElasticSpace):
        super().__init__(conv.weight, conv.bias, space)
        if conv.padding_mode != "zeros":
            raise UserError(f"Conv2d padding_mode {conv.padding_mode!r} is not supported (zeros only)")
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def _op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _fused_args(self) -> tuple | None:
        if isinstance(self.padding, str):  # 'same' / 'valid': let autograd handle it
            return None
        return (self.stride, self.padding, self.dilation, self.groups)


class ElasticLinear(_ElasticWeighted):
    def __init__(self, linear: nn.Linear, space: ElasticSpace):
        super().__init__(linear.weight, linear.bias, space)

    def _op(self, x, w, b):
        return F.linear(x, w, b)


# Residual adds in training fuse a private input's fake-quant with the add (ElasticWeightless._fused_add);
# False runs Q, DQ and the add as separate ops (A/B comparisons).
FUSE_ADD = True


class _AddOp(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class ElasticWeightless(nn.Module):
    """An op without weights whose inputs a target runs in integer (residual add,
    average pooling): each input is quantized (one spec, own step sizes), then
    `op` runs in float on the dequantized values, as QDQ runtimes define it."""

    def __init__(self, space: ElasticSpace, op: nn.Module, n_inputs: int):
        super().__init__()
        self.op = op
        self.aq = nn.ModuleList([ActQuantizer(_with_fixed(space.abits, space)) for _ in range(n_inputs)])
        self.stored_bits: list[int | None] = [None] * n_inputs
        self.active: LayerSpec | None = None
        self.stack: tuple[LayerSpec, ...] | None = None
        self.stack_spans: tuple[int, ...] | None = None

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.stack is not None:
            from deployq.stacked import weightless_forward

            return weightless_forward(self, xs)
        spec = self.active
        if spec is None:
            return self.op(*xs)
        if type(self.op) is _AddOp and FUSE_ADD and torch.is_grad_enabled() and not torch.jit.is_tracing():
            fused = self._fused_add(xs, spec.act)
            if fused is not None:
                return fused
        return self.op(
            *(_quant_input(q, x, spec.act, sb)[0] for q, x, sb in zip(self.aq, xs, self.stored_bits))
        )

    def _fused_add(self, xs, act: QuantSpec) -> torch.Tensor | None:
        """A residual add in training: an input whose quantizer is its own (no other layer
        reads that tensor) is fake-quantized and added to the other, quantized input in one
        kernel pass (quant.fake_quant_add), bit for bit what Q, DQ and the add give."""
        j = next((i for i in (1, 0) if self.stored_bits[i] is None), None)
        if j is None:
            return None
        x = xs[j]
        y = _quant_input(self.aq[1 - j], xs[1 - j], act, self.stored_bits[1 - j])[0]  # memoised: not redone
        if not can_add_fused(x, y):
            return None
        q = self.aq[j]
        raw_s, raw_z, zero_offset = q._cell(act)
        g = lsq_grad_factor(act.qmax, x.numel())
        return fake_quant_add(x, y, raw_s, raw_z, act.qmin, act.qmax, g, MIN_SCALE, zero_offset, q.relu_mask())

    @torch.no_grad()
    def frozen_params(self, spec: LayerSpec) -> FrozenAddParams:
        out = []
        for q in self.aq:
            s, z = q.qparams(spec.act)
            out.append((s.clone(), torch.round(z).clamp(spec.act.qmin, spec.act.qmax).clone()))
        stored = tuple(_stored_params(q, spec.act, sb) for q, sb in zip(self.aq, self.stored_bits))
        return FrozenAddParams(spec=spec, act=tuple(out), stored=stored)


class ElasticAdd(ElasticWeightless):
    """A residual add whose two inputs are quantized."""

    def __init__(self, space: ElasticSpace):
        super().__init__(space, _AddOp(), 2)


class ElasticAvgPool(ElasticWeightless):
    """Average pooling with a quantized input, so the tail of a network (last add ->
    pool -> classifier) stays integer on targets (QLinearGlobalAveragePool and kin)."""

    def __init__(self, space: ElasticSpace, pool: nn.Module):
        super().__init__(space, pool, 1)


@dataclass(frozen=True)
class FrozenParams:
    """Everything a target needs for one weighted layer, in canonical integers."""

    spec: LayerSpec
    act_scale: torch.Tensor  # [1]
    act_zero_point: torch.Tensor  # [1], integer-valued float
    weight_int: torch.Tensor  # int32, weight shape, within spec.weight.qmin..qmax
    weight_scale: torch.Tensor  # [C] or [1]
    weight_zero_point: torch.Tensor  # [C] or [1], integer-valued float
    bias_int: torch.Tensor  # int32 [C]
    bias_scale: torch.Tensor  # [C] = act_scale * weight_scale
    # (spec, scale, zero_point) of the shared tensor's stored form when this layer
    # requantizes it to fewer bits; None when the input is quantized once.
    stored: tuple | None = None


@dataclass(frozen=True)
class FrozenAddParams:
    spec: LayerSpec
    act: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (scale, zero_point) per input
    stored: tuple = ()  # per input: as FrozenParams.stored


ELASTIC_TYPES = (ElasticConv2d, ElasticLinear, ElasticWeightless)


class ElasticNet(nn.Module):
    """A converted model: the fx GraphModule plus the supernet verbs."""

    def __init__(self, gm: torch.fx.GraphModule, space: ElasticSpace):
        super().__init__()
        self.gm = gm
        self.space = space
        self.layer_names: tuple[str, ...] = tuple(
            n for n, m in gm.named_modules() if isinstance(m, ELASTIC_TYPES)
        )
        order = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in self.layer_names]
        self.layer_names = tuple(dict.fromkeys(order))
        weighted = [n for n in self.layer_names if not isinstance(self.layer(n), ElasticWeightless)]
        fixed: tuple[str, ...] = ()
        if space.fixed_bits and weighted:
            # First and last layer (EQ-Net), and the weightless ops (residual adds,
            # pooling): the residual stream stays at the fixed width, low-bit readers
            # requantize it. Quantizing it at 2-3 bits costs several points of accuracy.
            weightless = [n for n in self.layer_names if isinstance(self.layer(n), ElasticWeightless)]
            fixed = tuple(dict.fromkeys([weighted[0], *weightless, weighted[-1]]))
        self.fixed_layers: tuple[str, ...] = fixed
        # False: every ReLU does its own backward (A/B comparisons; see _absorbs_relus)
        self.relu_absorb = any(isinstance(m, AbsorbedReLU) for m in gm.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = _FORWARD_MEMO.set({})
        try:
            with absorb(self._absorbs_relus()):
                return self.gm(x)
        finally:
            _FORWARD_MEMO.reset(token)

    def _absorbs_relus(self) -> bool:
        """Quantizers take over the ReLU backwards (deployq/relu_absorb.py) in a quantized,
        differentiable forward that collects no activations (train.py's grad-l1 capture
        sets _capturing) and is not being traced for export."""
        d = self.__dict__
        if not d.get("relu_absorb") or d.get("_capturing") or not torch.is_grad_enabled():
            return False
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return False
        m = next(iter(self._layer_map().values()))
        return m.active is not None or m.stack is not None

    # --- structure -------------------------------------------------------
    def _layer_map(self) -> dict[str, nn.Module]:
        # Cached: get_submodule walks the dotted path through nn.Module.__getattr__, and the
        # spec builders ask for every layer several times per training step. (A deepcopy
        # copies the cache consistently with the modules it points to.)
        cache = self.__dict__.get("_layer_cache")
        if cache is None:
            cache = {n: self.gm.get_submodule(n) for n in self.layer_names}
            self.__dict__["_layer_cache"] = cache
            self.__dict__["_weightless"] = tuple(n for n, m in cache.items() if isinstance(m, ElasticWeightless))
        return cache

    def layer(self, name: str) -> nn.Module:
        m = self._layer_map().get(name)
        return m if m is not None else self.gm.get_submodule(name)

    def layers(self) -> Iterator[tuple[str, nn.Module]]:
        yield from self._layer_map().items()

    @property
    def weightless(self) -> tuple[str, ...]:
        self._layer_map()
        return self.__dict__["_weightless"]

    def input_signed(self, name: str) -> bool:
        m = self.layer(name)
        qs = list(m.aq) if isinstance(m, ElasticWeightless) else [m.aq]
        return any(q.is_signed() for q in qs)

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in self.layers() if not isinstance(m, ElasticWeightless) for p in (m.weight, m.bias)]

    def quant_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.weight_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    # --- specs -----------------------------------------------------------
    def _act(self, name: str, form: Form, bits: int) -> QuantSpec:
        spec = form.act(bits)
        # A symmetric unsigned grid cannot hold negative inputs: use the signed one there.
        if spec.symmetric and not spec.signed and self.input_signed(name):
            spec = act_spec(bits, symmetric=True, signed=True)
        return spec

    def layer_spec(self, name: str, form: Form, wbits: int, abits: int) -> LayerSpec:
        if name in self.fixed_layers:
            wbits = abits = self.space.fixed_bits
        weight = None if name in self.weightless else form.weight(wbits)
        return LayerSpec(weight, self._act(name, form, abits))

    def uniform_spec(self, form: Form, wbits: int, abits: int | None = None) -> SubnetSpec:
        abits = wbits if abits is None else abits
        return SubnetSpec({n: self.layer_spec(n, form, wbits, abits) for n in self.layer_names})

    def sample(
        self,
        rng: random.Random,
        form: Form | None = None,
        wbits: Iterable[int] | None = None,
        abits: Iterable[int] | None = None,
    ) -> SubnetSpec:
        """A random subnet: a form of the space (unless given), random bits per layer,
        drawn from the space's bits (or from the given subset of them, e.g. what a
        target profile accepts)."""
        form = form or rng.choice(self.space.forms)
        wpool = tuple(sorted(set(wbits or self.space.wbits) & set(self.space.wbits)))
        apool = tuple(sorted(set(abits or self.space.abits) & set(self.space.abits)))
        if not wpool or not apool:
            raise UserError(f"no bit-width in common with the supernet's space {self.space.wbits}")
        return SubnetSpec(
            {n: self.layer_spec(n, form, rng.choice(wpool), rng.choice(apool)) for n in self.layer_names}
        )

    def highest(self, form: Form) -> SubnetSpec:
        return self.uniform_spec(form, max(self.space.wbits), max(self.space.abits))

    def lowest(self, form: Form) -> SubnetSpec:
        return self.uniform_spec(form, min(self.space.wbits), min(self.space.abits))

    def check_spec(self, spec: SubnetSpec) -> None:
        missing = [n for n in self.layer_names if n not in spec.layers]
        extra = [n for n in spec.layers if n not in self.layer_names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing layers {missing[:3]}{'...' if len(missing) > 3 else ''}")
            if extra:
                parts.append(f"unknown layers {extra[:3]}{'...' if len(extra) > 3 else ''}")
            raise UserError("the SubnetSpec does not fit this model: " + "; ".join(parts))
        for n, m in self.layers():
            ls = spec.layers[n]
            if (ls.weight is None) != isinstance(m, ElasticWeightless):
                raise UserError(f"layer {n!r}: weight spec {'missing' if ls.weight is None else 'unexpected'}")
            if ls.act.symmetric and not ls.act.signed and self.input_signed(n):
                raise UserError(f"layer {n!r} has signed inputs; a symmetric unsigned activation grid cannot hold them")
            for q in [ls.act] + ([ls.weight] if ls.weight else []):
                pool = self.space.wbits if q is ls.weight else self.space.abits
                if n in self.fixed_layers:
                    pool = _with_fixed(pool, self.space)
                if q.bits not in pool:
                    raise UserError(f"layer {n!r}: {q.bits} bits are not in the supernet's space {pool}")

    def set_active(self, spec: SubnetSpec | None) -> None:
        """Select a subnet (None = the float network, quantization off)."""
        if spec is not None:
            self.check_spec(spec)
        # __dict__: nn.Module.__setattr__ costs ~3 us a call, ~60 per training step
        for n, m in self.layers():
            d = m.__dict__
            d["active"] = None if spec is None else spec.layers[n]
            d["stack"] = None

    def set_active_stack(self, specs: list[SubnetSpec], spans: tuple[int, ...] | None = None) -> None:
        """Select k subnets at once: a forward then takes k stacked copies of a batch
        ([k * B, ...], subnet j on rows j*B .. (j+1)*B) and returns their outputs the same
        way (see deployq.stacked). spans: when one subnet's pass is laid out as several
        consecutive slices (equal specs), spans[j] = how many its slice j belongs to, so
        that each slice is quantized as a part of that pass (None: one slice each)."""
        for spec in specs:
            self.check_spec(spec)
        spans = None if spans is None or all(s == 1 for s in spans) else tuple(spans)
        if spans is not None and len(spans) != len(specs):
            raise ValueError(f"{len(spans)} spans for {len(specs)} slices")
        for n, m in self.layers():
            d = m.__dict__
            d["active"] = None
            d["stack"] = tuple(spec.layers[n] for spec in specs)
            d["stack_spans"] = spans

    def active_spec(self) -> SubnetSpec | None:
        specs = {n: m.active for n, m in self.layers()}
        if any(s is None for s in specs.values()):
            return None
        return SubnetSpec(specs)

    # --- calibration -----------------------------------------------------
    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor], method: str = "search") -> None:
        """One pass over calibration data: initialise every cell of every quantizer
        (clipping-range search; method="minmax": plain min/max ranges, the PTQ
        baseline), and record which activations are signed."""
        was_training = self.training
        self.eval()
        self.set_active(None)
        act_qs = [m for m in self.modules() if isinstance(m, ActQuantizer)]
        # Record each activation quantizer's input in the float network.
        hooks = []
        records: dict[int, list[torch.Tensor]] = {id(q): [] for q in act_qs}
        for n, m in self.layers():
            if isinstance(m, ElasticWeightless):
                hooks.append(m.register_forward_pre_hook(_record_weightless(records, m)))
            else:
                hooks.append(m.register_forward_pre_hook(_record_input(records, m.aq)))
        try:
            for x in batches:
                self(x)
        finally:
            for h in hooks:
                h.remove()
        for q in act_qs:
            if records[id(q)]:
                q.calibrate(torch.cat(records[id(q)]), method)
        wforms = {(f.weight_per_channel, f.weight_symmetric) for f in self.space.forms}
        for _, m in self.layers():
            if not isinstance(m, ElasticWeightless):
                m.wq.calibrate(m.weight, sorted(wforms), method)
        self.train(was_training)

    # --- deployment ------------------------------------------------------
    @torch.no_grad()
    def freeze(self, spec: SubnetSpec) -> dict[str, FrozenParams | FrozenAddParams]:
        """The integers and scales of one subnet, per layer, in canonical ranges."""
        self.check_spec(spec)
        return {n: m.frozen_params(spec.layers[n]) for n, m in self.layers()}


def _record_input(records, aq):
    def hook(_module, args):
        records[id(aq)].append(_subsample(args[0]))

    return hook


def _record_weightless(records, m):
    def hook(_module, args):
        for q, x in zip(m.aq, args):
            records[id(q)].append(_subsample(x))

    return hook


_ADD_FUNCS = (operator.add, operator.iadd, torch.add)


def _is_tensor_node(a) -> bool:
    return isinstance(a, torch.fx.Node)


_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def convert(model: nn.Module, space: ElasticSpace | None = None) -> ElasticNet:
    """Fold BN, swap Conv2d/Linear for elastic layers, quantize residual adds and
    average pools, and tie quantizers that read the same tensor.

    The model must be torch.fx traceable. The result is uncalibrated: call
    `calibrate()` (or load a checkpoint's state_dict) before using a subnet.
    """
    space = space or ElasticSpace()
    model = copy.deepcopy(model).eval()
    try:
        gm = fuse(model)  # symbolic trace + fold Conv2d->BatchNorm2d (eval statistics)
    except Exception as e:  # noqa: BLE001 - fx raises many types for untraceable code
        raise UserError(f"cannot trace the model with torch.fx ({type(e).__name__}: {e})") from None
    leftover = [n for n, m in gm.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if leftover:
        raise UserError(
            f"batch-norm layers {leftover[:3]} do not directly follow a Conv2d: they cannot be folded"
        )
    modules = dict(gm.named_modules())
    n_weighted = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            m = modules[node.target]
            if type(m) is nn.Conv2d:
                _set_module(gm, node.target, ElasticConv2d(m, space))
                n_weighted += 1
            elif type(m) is nn.Linear:
                _set_module(gm, node.target, ElasticLinear(m, space))
                n_weighted += 1
            elif type(m) in _POOL_MODULES:
                _set_module(gm, node.target, ElasticAvgPool(space, m))
        elif node.op == "call_function" and node.target in _ADD_FUNCS:
            args = node.args
            if len(args) == 2 and all(_is_tensor_node(a) for a in args) and not node.kwargs:
                _replace_with_module(gm, node, f"qadd_{node.name}", ElasticAdd(space), args)
        elif (
            node.op == "call_function"
            and node.target is F.adaptive_avg_pool2d
            and _is_tensor_node(node.args[0])
            and len(node.args) == 2
            and not node.kwargs
        ):
            pool = nn.AdaptiveAvgPool2d(node.args[1])
            _replace_with_module(gm, node, f"qpool_{node.name}", ElasticAvgPool(space, pool), node.args[:1])
    if n_weighted == 0:
        raise UserError("the model has no Conv2d or Linear layer to quantize")
    _tie_shared_inputs(gm, space.fixed_bits or max(space.abits))
    _absorb_relus(gm)
    gm.graph.lint()
    gm.recompile()
    return ElasticNet(gm, space)


def _replace_with_module(gm: torch.fx.GraphModule, node, name: str, module: nn.Module, args) -> None:
    gm.add_module(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args=tuple(args))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _tie_shared_inputs(gm: torch.fx.GraphModule, stored_bits: int) -> None:
    """One tensor, one quantizer: when several elastic layers read the same tensor
    (a block output feeding the next conv and the residual add), they share one
    ActQuantizer. A target then quantizes that tensor once, so the producer keeps a
    single Q after it and still fuses into an integer kernel; untied quantizers
    drift apart in training and force a float op there."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        slots = []  # (module, input index or None for a weighted layer's input)
        for user in node.users:
            if user.op != "call_module":
                continue
            m = modules.get(user.target)
            if isinstance(m, ElasticWeightless):
                slots += [(m, i) for i, a in enumerate(user.args) if a is node]
            elif isinstance(m, _ElasticWeighted) and user.args and user.args[0] is node:
                slots.append((m, None))
        if len(slots) < 2:
            continue
        first, idx = slots[0]
        shared = first.aq if idx is None else first.aq[idx]
        for m, i in slots:
            if i is None:
                m.aq = shared
                m.stored_bits = stored_bits
            else:
                m.aq[i] = shared
                m.stored_bits[i] = stored_bits


def _is_relu(node, modules: dict) -> bool:
    """A ReLU node that an out-of-place ReLU may replace: not in place, or in place on a
    tensor nothing else reads (where the two are the same)."""
    if len(node.args) != 1 or not _is_tensor_node(node.args[0]):
        return False
    if node.op == "call_module":
        m = modules.get(node.target)
        ok, inplace = type(m) is nn.ReLU and not node.kwargs, getattr(m, "inplace", False)
    elif node.op == "call_function" and node.target in (F.relu, torch.relu):
        ok, inplace = set(node.kwargs) <= {"inplace"}, bool(node.kwargs.get("inplace", False))
    else:
        ok, inplace = node.op == "call_method" and node.target == "relu" and not node.kwargs, False
    return ok and (not inplace or len(node.args[0].users) == 1)


def _absorb_relus(gm: torch.fx.GraphModule) -> None:
    """Each ReLU whose output only elastic layers' activation quantizers read becomes an
    AbsorbedReLU, and those quantizers take over its backward (deployq/relu_absorb.py).
    A ReLU with any other reader (a max-pool, a float op, a weighted layer's weight or
    bias slot) stays as it is."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules) or not node.users:
            continue
        quantizers = []
        for user in node.users:
            m = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(m, ElasticWeightless) and not user.kwargs:
                quantizers += [m.aq[i] for i, a in enumerate(user.args) if a is node]
            elif (isinstance(m, _ElasticWeighted) and len(user.args) == 1 and user.args[0] is node
                  and not user.kwargs):
                quantizers.append(m.aq)
            else:
                break
        else:
            for q in quantizers:
                q.after_relu = True
            _replace_with_module(gm, node, f"absorbed_{node.name}", AbsorbedReLU(), node.args[:1])
            if node.op == "call_module" and not any(n.target == node.target for n in gm.graph.nodes):
                gm.delete_submodule(node.target)


def _set_module(gm: torch.fx.GraphModule, target: str, new: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, new)


def dequantized_weight(p: FrozenParams) -> torch.Tensor:
    w = p.weight_int
    return dequantize(w, channel_view(p.weight_scale, w.ndim, 0), channel_view(p.weight_zero_point, w.ndim, 0))


__all__ = [
    "ActQuantizer",
    "ElasticAdd",
    "ElasticAvgPool",
    "ElasticConv2d",
    "ElasticLinear",
    "ElasticNet",
    "ElasticWeightless",
    "FrozenAddParams",
    "FrozenParams",
    "WeightQuantizer",
    "convert",
    "dequantized_weight",
]
