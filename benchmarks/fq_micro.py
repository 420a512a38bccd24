"""One per-tensor fake-quant forward + backward (LearnedFQ, as the elastic conv runs it:
asymmetric with a learned zero-point, gradients for x, s and z, g masked in place) at
activation sizes and one weight size: torch path vs the compiled kernel
(deployq.kernels), median us of forward + backward, two ways:

- in cache: the same x and g every call, the backward right after its forward;
- as in training: the forwards of --buffers tensors first, then their backwards in
  reverse order, so that by its backward a tensor and what its forward kept have left
  the core's caches, as in a training step (forward through the net, then backward).

keep_freed_memory() first, as train() does.

Run:  python benchmarks/fq_micro.py [--threads 1] [--repeats 200] [--buffers 48]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from deployq import kernels
from deployq.quant import LearnedFQ, lsq_grad_factor

SIZES = [("16x16 act 64x16x16x16", (64, 16, 16, 16)), ("8x8 act 64x8x8x8", (64, 8, 8, 8)),
         ("weight 64x64x3x3 per-channel", (64, 64, 3, 3))]


@torch.no_grad()  # as inside autograd Functions (forward, and backward without create_graph)
def forward(x, raw_s, raw_z, axis):
    fq = LearnedFQ()
    out, _ = fq.forward(x, raw_s, raw_z, 0, 255, lsq_grad_factor(255, x.numel()), 1e-8, axis, False, True)
    return fq, out


@torch.no_grad()
def backward(fq, out, x, raw_s, g):
    fq.backward(g, out, x, raw_s, True, True, reuse_g=True)


def timed(f, *a):
    t0 = time.perf_counter()
    r = f(*a)
    return r, time.perf_counter() - t0


def in_cache(x, g, raw_s, raw_z, axis) -> float:
    (fq, out), tf = timed(forward, x, raw_s, raw_z, axis)
    _, tb = timed(backward, fq, out, x, raw_s, g)
    return tf + tb


def as_in_training(xs, gs, raw_s, raw_z, axis) -> list[float]:
    kept, times = [], []
    for x in xs:
        r, t = timed(forward, x, raw_s, raw_z, axis)
        kept.append(r)
        times.append(t)
    for i in reversed(range(len(xs))):
        fq, out = kept[i]
        _, t = timed(backward, fq, out, xs[i], raw_s, gs[i])
        times[i] += t
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--buffers", type=int, default=48, help="tensors per forward-then-backward round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from deployq.alloc import keep_freed_memory

    keep_freed_memory()  # as train() and step_time.py: no page faults on every fresh buffer
    lib = kernels.get()
    assert lib is not None, "kernel unavailable"
    print(f"fake-quant forward + backward, {args.threads} torch thread(s), median us:")
    print()
    print(f"| tensor | floats | torch path, in cache | kernel, in cache | speed-up | torch path, as in training "
          f"({args.buffers} forwards, then backwards) | kernel, as in training | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for title, shape in SIZES:
        torch.manual_seed(0)
        c = shape[0] if "channel" in title else 1
        axis = 0 if c > 1 else None
        raw_s = torch.full((c,), 0.02)
        raw_z = torch.full((c,), 3.0)
        xs = [torch.randn(shape).relu() for _ in range(args.buffers)]
        gs = [torch.randn(shape) for _ in range(args.buffers)]
        hot = {True: [], False: []}
        cold = {True: [], False: []}
        for i in range(args.repeats + 10):  # interleaved: machine load hits both paths alike
            for on in (False, True):
                with contextlib.nullcontext() if on else kernels.disabled():
                    t = in_cache(xs[0], gs[0], raw_s, raw_z, axis)
                    if i >= 10:
                        hot[on].append(t)
        rounds = max(3, args.repeats // args.buffers)
        for i in range(rounds + 1):
            for on in (False, True):
                with contextlib.nullcontext() if on else kernels.disabled():
                    t = as_in_training(xs, gs, raw_s, raw_z, axis)
                    if i >= 1:
                        cold[on] += t
        row = []
        for d in (hot, cold):
            tt, tk = (1e6 * statistics.median(d[k]) for k in (False, True))
            row += [f"{tt:.0f}", f"{tk:.0f}", f"{tt / tk:.1f}x"]
        print(f"| {title} | {xs[0].numel()} | {' | '.join(row)} |")


if __name__ == "__main__":
    main()
