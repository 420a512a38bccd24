"""One per-tensor fake-quant forward + backward (LearnedFQ, as the elastic conv runs it:
asymmetric with a learned zero-point, gradients for x, s and z, g reused; the time
includes one copy of g) at activation sizes and one weight size: torch path vs the compiled kernel (deployq.kernels), interleaved, median us;
keep_freed_memory() first, as train() does.

Run:  python benchmarks/fq_micro.py [--threads 1] [--repeats 200]
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
def one(x, raw_s, raw_z, axis, g0):
    fq = LearnedFQ()
    g = lsq_grad_factor(255, x.numel())
    out, _ = fq.forward(x, raw_s, raw_z, 0, 255, g, 1e-8, axis, False, True)
    fq.backward(g0.clone(), out, x, raw_s, True, True, reuse_g=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from deployq.alloc import keep_freed_memory

    keep_freed_memory()  # as train() and step_time.py: no page faults on every fresh buffer
    lib = kernels.get()
    assert lib is not None, "kernel unavailable"
    print(f"fake-quant fwd+bwd, {args.threads} torch thread(s), median of {args.repeats} (us):")
    print()
    print("| tensor | floats | torch path | kernel | speed-up |")
    print("|---|---|---|---|---|")
    for title, shape in SIZES:
        torch.manual_seed(0)
        x = torch.randn(shape).relu()
        c = shape[0] if "channel" in title else 1
        axis = 0 if c > 1 else None
        raw_s = torch.full((c,), 0.02)
        raw_z = torch.full((c,), 3.0)
        g0 = torch.randn(shape)
        times = {True: [], False: []}
        for i in range(args.repeats + 10):
            for on in (False, True):
                with contextlib.nullcontext() if on else kernels.disabled():
                    t0 = time.perf_counter()
                    one(x, raw_s, raw_z, axis, g0)
                    if i >= 10:
                        times[on].append(time.perf_counter() - t0)
        tt, tk = (1e6 * statistics.median(times[k]) for k in (False, True))
        print(f"| {title} | {x.numel()} | {tt:.0f} | {tk:.0f} | {tt / tk:.1f}x |")


if __name__ == "__main__":
    main()
