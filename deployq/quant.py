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
CALIB_MAX_ELEMS = 1 << 16  # activations are subsampled for the range search


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


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """x_hat = (clamp(round(x / s) + round(z), qmin, qmax) - round(z)) * s.

    `scale` and `zero_point` broadcast against x (use `channel_view` for
    per-channel). Gradients: STE through both roundings, LSQ-scaled for s and z.
    """
    s = grad_scale(scale, grad_factor)
    z = round_ste(grad_scale(zero_point, grad_factor)).clamp(qmin, qmax)
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


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


@torch.no_grad()
def init_qparams(x: torch.Tensor, spec: QuantSpec, axis: int | None = None):
    """Search the clipping range (shrinking min/max in 1% steps) that minimises
    mean |x - Q(x)|^2.4, per channel along `axis` if given. Returns (scale, zp)
    shaped [C] (per-channel) or [] (per-tensor), float32."""
    x = x.detach().float()
    if axis is None:
        flat = x.reshape(1, -1)
        if flat.shape[1] > CALIB_MAX_ELEMS:
            idx = torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))
            flat = flat[:, idx[:CALIB_MAX_ELEMS]]
    else:
        flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    lo0 = flat.min(dim=1).values  # [C]
    hi0 = flat.max(dim=1).values
    alphas = torch.linspace(1.0, 1.0 / CALIB_STEPS, CALIB_STEPS)  # [A]
    best_err = torch.full_like(lo0, float("inf"))
    best_s = torch.ones_like(lo0)
    best_z = torch.zeros_like(lo0)
    for a in alphas:
        s, z = _candidate_qparams(lo0 * a, hi0 * a, spec)
        q = torch.clamp(torch.round(flat / s[:, None]) + z[:, None], spec.qmin, spec.qmax)
        err = ((q - z[:, None]) * s[:, None] - flat).abs().pow(CALIB_P).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    if axis is None:
        return best_s[0].clone(), best_z[0].clone()
    return best_s, best_z
