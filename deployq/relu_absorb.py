"""ReLUs whose backward the fake-quantizers after them take over.

In a quantized forward every reader of a ReLU's output fake-quantizes it first, and
that fake-quant's backward reads the ReLU's output anyway (it recomputes the integer
grid from it). Masking its input gradient where that output is 0 is then free, and it
is exactly the ReLU's backward (threshold_backward(g, y, 0)): the ReLU node can pass its
gradient through untouched, and a training step saves one pass over every such
activation gradient. The fake-quant's own step-size and zero-point gradients are taken
before the mask, as before, so training is bit for bit what it was.

convert() (deployq.elastic) swaps a ReLU for `AbsorbedReLU` only when every reader of
its output is an elastic layer's activation quantizer, and marks those quantizers. The
hand-over is on only inside a quantized, differentiable ElasticNet forward that is not
collecting activations for grad-l1 (whose dL/dy must stay the ReLU output's own
gradient); everywhere else (float subnets, no_grad, export) AbsorbedReLU is torch.relu.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("deployq_relu_absorb", default=False)


def absorbing() -> bool:
    """Whether the running forward hands ReLU backwards to the quantizers after them."""
    return _ON.get()


@contextlib.contextmanager
def absorb(on: bool):
    token = _ON.set(on)
    try:
        yield
    finally:
        _ON.reset(token)


class _PassGradient(torch.autograd.Function):
    """relu forward; backward hands the gradient on as it came (the readers masked it)."""

    @staticmethod
    def forward(ctx, x):
        return torch.relu(x)

    @staticmethod
    def backward(ctx, g):
        return g


class AbsorbedReLU(nn.ReLU):
    """nn.ReLU whose backward, while `absorbing()`, is done by the quantizers reading it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ON.get() and torch.is_grad_enabled() and x.requires_grad:
            return _PassGradient.apply(x)
        return torch.relu(x)


__all__ = ["AbsorbedReLU", "absorb", "absorbing"]
