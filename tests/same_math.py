"""Shared checks for tests that compare two implementations of the same math (the fused
autograd nodes against the composite, the compiled kernel against torch ops): the
forward bit for bit, the gradients to float rounding."""

from __future__ import annotations

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 tensor's bit patterns (torch.equal on them tells -0.0 from 0.0)."""
    return t.contiguous().view(torch.int32)


def grads(net: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()}


def assert_same_forward_and_grads(a, b) -> None:
    """a, b: (output, {parameter name: gradient or None}) of the same step."""
    (o1, g1), (o2, g2) = a, b
    assert torch.equal(bits(o1), bits(o2))
    for n in g1:
        assert (g1[n] is None) == (g2[n] is None), n
        if g1[n] is not None:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6)
