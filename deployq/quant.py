"""Pure quantization math: fake-quant with straight-through rounding, integer
quantize / dequantize, LSQ gradient scaling, and clipping-range initialisation.

The forward is written to be bit-exact with ONNX QuantizeLinear /
DequantizeLinear: q = saturate(round_half_even(x / s) + z), x_hat = (q - z) * s,
with s float32 and z an integer. That is why the zero-point is rounded on its
own (never folded into x / s before rounding) and why we divide by s instead of
multiplying by 1 / s.
"""

from __future__ import annotations

import math

import torch

from deployq.spec import QuantSpec

# Exponent of the calibration error |x - Q(x)|^p (EQ-Net reference).
CALIB_P = 2.4
CALIB_STEPS = 100  # candidate clipping ranges: 100%, 99%, ..., 1% of min/max
CALIB_MAX_ELEMS = 1 << 14  # activations are subsampled for the range search
CALIB_COARSE = 5  # coarse stride of the 1% grid; then the 1% steps around the coarse best
CALIB_CHUNK_ELEMS = 1 << 22  # bound on candidate x elements evaluated at once


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _GradScale(torch.autograd.Function):
    # A Function rather than the usual (x - x*g).detach() + x*g trick: that trick
    # perturbs the forward value by a rounding error, and the exported integers
    # must be exactly the ones training saw.
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward (as ONNX QuantizeLinear), identity backward."""
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Identity forward (bit-exact), gradient multiplied by g (LSQ)."""
    if g == 1.0 or not x.requires_grad:
        return x
    return _GradScale.apply(x, g)


def lsq_grad_factor(qmax: int, numel: int) -> float:
    return 1.0 / math.sqrt(max(qmax, 1) * max(numel, 1))


def channel_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along `axis` of an ndim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def fake_quant_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """The composite (autograd-traced) definition `fake_quant` must equal: forward
    bit for bit, gradients to float rounding. Kept for tests and as documentation."""
    s = grad_scale(scale, grad_factor)
    z = round_ste(grad_scale(zero_point, grad_factor)).clamp(qmin, qmax)
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def _fq_forward(x, s, z, qmin: int, qmax: int, zero_offset: bool):
    """(t, out): t the unclamped integer code round(x / s) + z, out the dequantized
    value. The float ops of `fake_quant_reference` in the same order (so the same bits),
    two buffers, the rest in place: at training sizes the passes are memory-bound, and a
    fresh buffer per op also evicts the conv's working set. z is the rounded, clamped
    zero-point or None; zero_offset adds a zero-point of 0 as the reference does (it turns
    round()'s -0.0 into +0.0), and then q - 0 is q bit for bit and is skipped."""
    t = torch.div(x, s).round_()
    if z is not None:
        t.add_(z)
    elif zero_offset:
        t.add_(0.0)
    out = t.clamp(qmin, qmax)
    if z is not None:
        out.sub_(z)
    return t, out.mul_(s)


def _fq_backward(ctx, g, t, out, x, s, z_mask):
    """Straight-through / LSQ gradients (see _FakeQuant) w.r.t. x, s (shape of s) and z
    (shape of s; None unless z_mask is given: 1 where round(z) lies inside the grid).
    The s term sum(g * (q - z) - inside * g * x/s) is taken as
    (sum(g * out) - sum(inside * g * x)) / s: equal up to float rounding, and neither
    x / s nor q - z has to be kept from the forward."""
    need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = gs = gz = None
    # g restricted to the unclamped elements: x's gradient, and the -x/s term of s's
    gin = None
    if need_x or need_s or z_mask is not None:
        gin = torch.ops.aten.hardtanh_backward(g, t, *ctx.bounds)
    if need_x:
        gx = gin
    per_tensor = s.numel() == 1
    if need_s:
        if per_tensor:
            gs = torch.dot(g.reshape(-1), out.reshape(-1)) - torch.dot(gin.reshape(-1), x.reshape(-1))
            gs = gs.reshape(s.shape)
        else:
            gs = (g * out - gin * x).sum_to_size(s.shape)
        gs = gs / s * ctx.grad_factor
    if z_mask is not None:
        if per_tensor:
            gz = (gin.sum() - g.sum()).reshape(s.shape) * s
        else:
            gz = (gin - g).sum_to_size(s.shape) * s
        gz = gz * z_mask * ctx.grad_factor
    return gx, gs, gz


class _FakeQuant(torch.autograd.Function):
    """Fused fake-quant: the same float ops as `fake_quant_reference` forward, and its
    straight-through / LSQ gradients written out by hand. Autograd through the composite
    costs ~12 activation-sized passes in backward; this costs ~4 (the sandwich step runs
    ~190 of these per step, so this is most of the gap to an FP32 step).

    d out/dx = inside;  d out/ds = (q - z) - inside * x/s;  d out/dz = -s * (1 - inside),
    where inside = the unclamped code round(x/s) + z lies within [qmin, qmax]."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor):
        z = zmask = None
        if zero_point is not None:
            zr = torch.round(zero_point)
            z = zr.clamp(qmin, qmax)
            if ctx.needs_input_grad[2]:
                zmask = (z == zr).to(z.dtype)  # round(z) inside the grid: z moves
        t, out = _fq_forward(x, scale, z, qmin, qmax, False)
        needs_s = ctx.needs_input_grad[1]
        # t (the unclamped integer code) is kept instead of a clamp mask: backward gets
        # the mask from hardtanh_backward in one fused pass (bool-mask ops are ~30x slower
        # than float ops on this CPU build).
        ctx.save_for_backward(t, out if needs_s else None, x if needs_s else None, scale, zmask)
        ctx.bounds = (qmin - 0.5, qmax + 0.5)  # t is integer-valued: inclusive clamp range
        ctx.grad_factor = grad_factor
        return out

    @staticmethod
    def backward(ctx, g):
        t, out, x, scale, zmask = ctx.saved_tensors
        gx, gs, gz = _fq_backward(ctx, g, t, out, x, scale, zmask)
        return gx, gs, gz, None, None, None


class _FakeQuantLearned(torch.autograd.Function):
    """`_FakeQuant` on a quantizer's raw parameters: the step size is |raw| clamped to
    min_scale, and both it and the zero-point are reshaped to broadcast along `axis`,
    inside the one autograd node (the separate abs / clamp / view nodes cost more than
    the math at the supernet's sizes). Returns (out, scale), scale shaped as raw_scale
    and not differentiable (the int32 bias uses it detached)."""

    @staticmethod
    def forward(ctx, x, raw_scale, raw_zero_point, qmin, qmax, grad_factor, min_scale, axis, zero_offset):
        a = raw_scale.abs()
        scale = a.clamp(min=min_scale)
        shape = None
        if axis is not None and scale.numel() > 1:
            shape = [1] * x.ndim
            shape[axis] = -1
        s = scale if shape is None else scale.view(shape)
        z = zmask = None
        if raw_zero_point is not None:
            zr = torch.round(raw_zero_point if shape is None else raw_zero_point.view(shape))
            z = zr.clamp(qmin, qmax)
            if ctx.needs_input_grad[2]:
                zmask = (z == zr).to(z.dtype)  # round(z) inside the grid: z moves
        t, out = _fq_forward(x, s, z, qmin, qmax, zero_offset)
        needs_s = ctx.needs_input_grad[1]
        ctx.save_for_backward(t, out if needs_s else None, x if needs_s else None, s, zmask,
                              raw_scale if needs_s else None, a if needs_s else None)
        ctx.bounds = (qmin - 0.5, qmax + 0.5)
        ctx.grad_factor = grad_factor
        ctx.min_scale = min_scale
        ctx.z_shape = None if raw_zero_point is None else raw_zero_point.shape
        ctx.mark_non_differentiable(scale)
        return out, scale

    @staticmethod
    def backward(ctx, g, _g_scale):
        t, out, x, s, zmask, raw, a = ctx.saved_tensors
        gx, gs, gz = _fq_backward(ctx, g, t, out, x, s, zmask)
        if gs is not None:
            # through scale = clamp(|raw|, min_scale), as autograd differentiates it
            gs = torch.where(a >= ctx.min_scale, gs.reshape(raw.shape), 0.0) * raw.sgn()
        if gz is not None:
            gz = gz.reshape(ctx.z_shape)
        return gx, gs, gz, None, None, None, None, None, None


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """x_hat = (clamp(round(x / s) + round(z), qmin, qmax) - round(z)) * s.

    `scale` and `zero_point` broadcast against x (use `channel_view` for
    per-channel); `zero_point=None` means symmetric (z = 0, no z gradient).
    Gradients: STE through both roundings, LSQ-scaled (grad_factor) for s and z.
    Forward is bit-identical to `fake_quant_reference`.
    """
    return _FakeQuant.apply(x, scale, zero_point, qmin, qmax, grad_factor)


def fake_quant_learned(
    x: torch.Tensor,
    raw_scale: torch.Tensor,
    raw_zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_factor: float,
    min_scale: float,
    axis: int | None = None,
    zero_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fake_quant` with step size s = clamp(|raw_scale|, min_scale) and zero-point
    raw_zero_point, both shaped [C] (per channel along `axis` of x) or [1]; gradients
    reach raw_scale through abs and clamp exactly as autograd would take them.
    zero_offset: asymmetric with a fixed zero-point of 0 (raw_zero_point None).
    Returns (x_hat, s) with s shaped as raw_scale and detached."""
    return _FakeQuantLearned.apply(x, raw_scale, raw_zero_point, qmin, qmax, grad_factor, min_scale, axis, zero_offset)


@torch.no_grad()
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
    """Integer codes (as int32) exactly as ONNX QuantizeLinear computes them."""
    z = torch.round(zero_point).clamp(qmin, qmax)
    return torch.clamp(torch.round(x / scale) + z, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q.to(torch.float32) - torch.round(zero_point)) * scale


# --- initialisation ---------------------------------------------------------


def _candidate_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Scale / zero-point for clipping ranges lo..hi (broadcast tensors)."""
    eps = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        if spec.signed:
            m = torch.maximum(hi.abs(), lo.abs())
            scale = m / spec.qmax
        else:
            scale = hi.clamp(min=0) / spec.qmax
        zp = torch.zeros_like(scale)
    else:
        lo = lo.clamp(max=0)  # the grid must hold 0 exactly (padding, ReLU zeros)
        hi = hi.clamp(min=0)
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        scale = scale.clamp(min=eps)
        zp = torch.round(spec.qmin - lo / scale).clamp(spec.qmin, spec.qmax)
    return scale.clamp(min=1e-8), zp


def _candidate_errors(flat: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Errors mean|x - Q(x)|^p of candidate ranges lo/hi [A, C] on rows flat [C, K].
    Chunked over A so the [A, C, K] temporaries stay small."""
    per = max(1, CALIB_CHUNK_ELEMS // max(flat.numel(), 1))
    errs, scales, zps = [], [], []
    for i in range(0, lo.shape[0], per):
        s, z = _candidate_qparams(lo[i : i + per], hi[i : i + per], spec)  # [a, C]
        q = torch.round(flat / s[..., None]).add_(z[..., None]).clamp_(spec.qmin, spec.qmax)
        err = q.sub_(z[..., None]).mul_(s[..., None]).sub_(flat).abs_().pow_(CALIB_P).mean(dim=-1)
        errs.append(err)
        scales.append(s)
        zps.append(z)
    return torch.cat(errs), torch.cat(scales), torch.cat(zps)


CALIB_METHODS = ("search", "minmax", "hybrid")
HYBRID_SEARCH_BITS = 2  # "hybrid": clipping search up to this bit-width, min/max above


@torch.no_grad()
def init_qparams(x: torch.Tensor, spec: QuantSpec, axis: int | None = None, method: str = "search"):
    """Search the clipping range (shrinking min/max in 1% steps) that minimises
    mean |x - Q(x)|^2.4, per channel along `axis` if given. Returns (scale, zp)
    shaped [C] (per-channel) or [] (per-tensor), float32.

    The 1% grid is searched coarse to fine (every 5th candidate, then the 1% steps
    around the best), vectorised over candidates: calibration initialises ~20 cells of
    ~40 quantizers, and the exhaustive loop took half a minute on a small ResNet.
    Min/max come from the whole tensor; the error is measured on a subsample.
    method="minmax" skips the search: the plain min/max range (the PTQ baseline);
    method="hybrid" searches at 2 bits and uses min/max above."""
    if method not in CALIB_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose from {CALIB_METHODS}")
    if method == "hybrid":
        # Measured on digits ResNet-20s: the |x - Q(x)|^2.4 search over-clips at >= 3 bits
        # (8-bit PTQ 96.4% vs 99.4% min/max), while 2-bit grids need the clipping.
        method = "search" if spec.bits <= HYBRID_SEARCH_BITS else "minmax"
    x = x.detach().float()
    if axis is None:
        full = x.reshape(1, -1)
        lo0, hi0 = full.min(dim=1).values, full.max(dim=1).values
        flat = full
        if flat.shape[1] > CALIB_MAX_ELEMS:
            idx = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))
            flat = flat[:, idx[:CALIB_MAX_ELEMS]]
    else:
        flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
        lo0, hi0 = flat.min(dim=1).values, flat.max(dim=1).values
    channels = flat.shape[0]
    if method == "minmax":
        s, z = _candidate_qparams(lo0, hi0, spec)
        return (s[0].clone(), z[0].clone()) if axis is None else (s, z)
    grid = torch.linspace(1.0, 1.0 / CALIB_STEPS, CALIB_STEPS)  # alpha per grid index
    coarse = torch.arange(0, CALIB_STEPS, CALIB_COARSE)
    a = grid[coarse][:, None].expand(-1, channels)
    err, _, _ = _candidate_errors(flat, lo0 * a, hi0 * a, spec)
    best = coarse[err.argmin(dim=0)]  # [C] grid index of the best coarse candidate
    offsets = torch.arange(-CALIB_COARSE + 1, CALIB_COARSE)
    idx = (best[None, :] + offsets[:, None]).clamp(0, CALIB_STEPS - 1)  # [O, C], ascending
    a = grid[idx]
    err, s, z = _candidate_errors(flat, lo0 * a, hi0 * a, spec)
    pick = err.argmin(dim=0)  # first minimum = the widest range among equals
    cols = torch.arange(channels)
    best_s, best_z = s[pick, cols], z[pick, cols]
    if axis is None:
        return best_s[0].clone(), best_z[0].clone()
    return best_s, best_z
