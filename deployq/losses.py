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
    """1.0 * mean_l(skew_l^2) + 0.015 * mean_l((kurt_l - 1.8)^2)."""
    if not weights:
        raise ValueError("wdr_loss needs at least one weight tensor")
    moments = [standardized_moments(w) for w in weights]
    skew = torch.stack([m[0] for m in moments])
    kurt = torch.stack([m[1] for m in moments])
    return WDR_SKEW_WEIGHT * skew.pow(2).mean() + WDR_KURT_WEIGHT * (kurt - WDR_KURT_TARGET).pow(2).mean()


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
