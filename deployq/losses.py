"""The training losses of the supernet, as pure functions of tensors.

- `wdr_loss`: weight distribution regularisation (EQ-Net): pushes each layer's weights
  towards a symmetric, light-tailed (uniform-like) distribution, which every quantization
  form represents well.
- `distill_kl`: KL(teacher || student) on logits, the GPG chaining term.
- `grad_l1`: lambda * sum_l ||dL/dT_l||_1 by double back-propagation (Alizadeh et al.):
  quantization is a perturbation with |delta|_inf <= step/2, so the first-order loss
  increase is bounded by (step/2) * ||grad||_1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

WDR_SKEW_WEIGHT = 1.0
WDR_KURT_WEIGHT = 0.015
WDR_KURT_TARGET = 1.8  # kurtosis of a uniform distribution
_EPS = 1e-8


def standardized_moments(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(skewness, kurtosis) of the flattened tensor (population moments)."""
    flat = w.reshape(-1)
    mean = flat.mean()
    std = flat.std(unbiased=False)
    z = (flat - mean) / (std + _EPS)
    z2 = z * z
    return (z2 * z).mean(), (z2 * z2).mean()


def wdr_loss(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """1.0 * mean_l(skew_l^2) + 0.015 * mean_l((kurt_l - 1.8)^2), the moments as
    standardized_moments takes them. On CPU float32 with the compiled kernel
    (deployq.kernels) all layers run in one autograd node, moments in double (_WDR):
    the per-layer graph costs ~2 ms of an 8x8 digits training step."""
    if not weights:
        raise ValueError("wdr_loss needs at least one weight tensor")
    if _WDR.applies(weights):
        return _WDR.apply(*weights)
    return _wdr_from_moments([standardized_moments(w) for w in weights])


def _wdr_from_moments(moments) -> torch.Tensor:
    skew = torch.stack([m[0] for m in moments])
    kurt = torch.stack([m[1] for m in moments])
    return WDR_SKEW_WEIGHT * skew.pow(2).mean() + WDR_KURT_WEIGHT * (kurt - WDR_KURT_TARGET).pow(2).mean()


class _WDR(torch.autograd.Function):
    """wdr_loss by the kernel (deployq_wdr_stats / deployq_wdr_grad) with the closed-form
    gradient: with z = (w - mean) / (std + eps), m2 = mean(z^2), S the skewness and K the
    kurtosis of a layer of n weights,
    dS/dw = (3/n) ((z^2 - m2) / (std + eps) - S z / std),
    dK/dw = (4/n) ((z^3 - S) / (std + eps) - K z / std)."""

    @staticmethod
    def applies(ws) -> bool:
        from deployq.kernels import get

        if get() is None:
            return False
        return all(w.dtype is torch.float32 and w.is_cpu and w.is_contiguous() and w.numel() > 0 for w in ws)

    @staticmethod
    def forward(ctx, *ws):
        import ctypes

        from deployq.kernels import get

        n_layers = len(ws)
        ptrs = (ctypes.c_void_p * n_layers)(*[w.data_ptr() for w in ws])
        n = torch.tensor([w.numel() for w in ws], dtype=torch.int64)
        stats = torch.empty(n_layers, 5, dtype=torch.float64)
        get().deployq_wdr_stats(ptrs, n.data_ptr(), n_layers, _EPS, stats.data_ptr())
        skew, kurt = stats[:, 3], stats[:, 4]
        loss = WDR_SKEW_WEIGHT * skew.pow(2).mean() + WDR_KURT_WEIGHT * (kurt - WDR_KURT_TARGET).pow(2).mean()
        ctx.save_for_backward(*ws)
        ctx.state = (ptrs, n, stats)
        return loss.to(ws[0].dtype)

    @staticmethod
    def backward(ctx, g):
        import ctypes

        from deployq.kernels import get

        ws = ctx.saved_tensors
        ptrs, n, stats = ctx.state
        n_layers = len(ws)
        nf = n.to(torch.float64)
        std, m2, skew, kurt = stats[:, 1], stats[:, 2], stats[:, 3], stats[:, 4]
        g = g.to(torch.float64)
        d_skew = g * (2 * WDR_SKEW_WEIGHT / n_layers) * skew
        d_kurt = g * (2 * WDR_KURT_WEIGHT / n_layers) * (kurt - WDR_KURT_TARGET)
        a = 3 * d_skew / (nf * (std + _EPS))
        b = 4 * d_kurt / (nf * (std + _EPS))
        lin = (3 * d_skew * skew + 4 * d_kurt * kurt) / (nf * std.clamp_min(1e-300))
        coef = torch.stack([a, b, -lin, -(a * m2 + b * skew)], dim=1).contiguous()
        grads = [torch.empty_like(w) for w in ws]
        gptrs = (ctypes.c_void_p * n_layers)(*[t.data_ptr() for t in grads])
        get().deployq_wdr_grad(ptrs, n.data_ptr(), n_layers, _EPS, stats.data_ptr(), coef.data_ptr(), gptrs)
        return tuple(grads)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), mean over the batch. The teacher is
    detached: in the sandwich each subnet learns from the one above it, never the reverse."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=1),
        F.log_softmax(teacher_logits.detach(), dim=1),
        reduction="batchmean",
        log_target=True,
    )


def gpg_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
    """0.5 * KL(teacher || logits) + 0.5 * CE; plain CE when there is no teacher."""
    ce = F.cross_entropy(logits, labels)
    if teacher is None:
        return ce
    return 0.5 * distill_kl(logits, teacher) + 0.5 * ce


def grad_l1(loss: torch.Tensor, tensors: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    """lam * sum_t ||d loss / d t||_1, differentiable (create_graph=True) so that its own
    gradient reaches the weights. Tensors the loss does not depend on contribute 0."""
    tensors = [t for t in tensors if t.requires_grad]  # e.g. the network input
    if lam == 0.0 or not tensors:
        return loss.new_zeros(())
    grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    total = loss.new_zeros(())
    for g in grads:
        if g is not None:
            total = total + g.abs().sum()
    return lam * total


__all__ = ["distill_kl", "gpg_loss", "grad_l1", "standardized_moments", "wdr_loss"]
