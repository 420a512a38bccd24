"""ReLUs the fake-quantizers after them take over, forward and backward.

In a quantized forward every reader of a ReLU's output fake-quantizes it first. The
quantizer can as well read the ReLU's input and quantize relu(x) in the same pass (the
compiled kernel applies the ReLU in a register), and its backward, which recomputes the
integer grid from the tensor it read anyway, masks its input gradient where x <= 0: that
is the ReLU's backward (threshold_backward(g, relu(x), 0): relu(x) <= 0 exactly where
x <= 0). The ReLU node then does nothing: its output is never written and its gradient
never passed over, which saves a training step one read and one write of every such
activation in the forward and one pass over its gradient in the backward. The
fake-quant's own step-size and zero-point gradients are taken before the mask, as
before, so training is bit for bit what it was.

convert() (deployq.elastic) swaps a ReLU for `AbsorbedReLU` only when every reader of
its output is an elastic layer's activation quantizer, and marks those quantizers. The
hand-over is on only inside a quantized, differentiable ElasticNet forward that is not
collecting activations for grad-l1 (whose dL/dy must stay the ReLU output's own
gradient); there AbsorbedReLU returns its input unchanged. Everywhere else (float
subnets, no_grad, export) it is torch.relu. A marked quantizer applies the ReLU while
the hand-over is on whether or not its input went through it: relu(relu(x)) = relu(x).
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


class AbsorbedReLU(nn.ReLU):
    """nn.ReLU that, while `absorbing()`, hands its input on: the quantizers reading it
    apply the ReLU (forward and backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ON.get():
            return x
        return torch.relu(x)


__all__ = ["AbsorbedReLU", "absorb", "absorbing"]
