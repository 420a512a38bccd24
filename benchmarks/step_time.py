"""Supernet training step time relative to an FP32 step (issue 2's <= 3.5x target).

Both settings of benchmarks/supernet_accuracy.py, with random weights and data (the
step cost does not depend on what was learned): a plain ResNet-20 (BatchNorm, SGD)
against its converted supernet in the default training space (`TrainConfig().space`),
calibrated on random batches, running the GPG sandwich (highest -> random -> lowest).
Steps are interleaved (FP32, supernet, FP32, ...) so machine load hits both alike;
medians of `--repeats`, one torch thread (`--threads`), batch 64. Uses `step_times` of
benchmarks/supernet_accuracy.py so both benchmarks time the same thing.

"supernet ms" / "ratio" is the step train() runs (`--stacked auto`: the three subnets as
one stacked batch where that is faster, deployq/stacked.py; else one after the other).
The next two columns force each way (`--stacked off` / `on`), the one after runs the
sequential sandwich with the compiled fake-quant kernel off (deployq.kernels; the torch
path), each against its own interleaved FP32 steps. "floor" is the sequential sandwich
with quantization off (three float passes of the BN-folded net, same losses and
optimizer); the last column is one float pass of the three batches stacked into one.
deployq.alloc.keep_freed_memory() runs first, as in train() (--no-keep-freed-memory: glibc defaults).

Run:  python benchmarks/step_time.py [--repeats 21] [--no-keep-freed-memory] [--profile 8]
      [--no-kernel-column]   (DEPLOYQ_KERNELS=0: the supernet column on the torch path too)
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the sibling benchmark; deployq uninstalled

from supernet_accuracy import step_times, supernet_step

from deployq import kernels
from deployq.elastic import convert
from deployq.models import build_model
from deployq.train import TrainConfig, use_stacked

SETTINGS = [("16x16 input, width-16 ResNet-20", 16, 16), ("8x8 input (native), width-8 ResNet-20", 8, 8)]


def build(size: int, width: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = replace(TrainConfig(), input_size=size, width=width)
    model = build_model("resnet20", num_classes=10, input_size=size, width=width)
    # Non-trivial BN statistics, so folding produces ordinary weights and biases.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(64, 3, size, size))
    model.eval()
    net = convert(model, cfg.space)
    net.calibrate([torch.randn(64, 3, size, size) for _ in range(2)])
    return model, net, cfg


def profile(size: int, width: int, steps: int) -> None:
    """cProfile of supernet steps (where Python time goes), sorted by own time."""
    import cProfile
    import pstats

    _, net, cfg = build(size, width)
    x = torch.randn(cfg.batch_size, 3, size, size)
    y = torch.randint(0, 10, (cfg.batch_size,))
    step = supernet_step(net, cfg, x, y)

    for i in range(3):
        step(i)
    pr = cProfile.Profile()
    pr.enable()
    for i in range(steps):
        step(10 + i)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21, help="interleaved step pairs per setting (median)")
    ap.add_argument("--only", choices=["16", "8"], help="run one setting")
    ap.add_argument("--profile", type=int, metavar="SIZE", choices=[16, 8], help="cProfile that setting instead")
    ap.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deployq.alloc.keep_freed_memory() first, as train() does (both steps gain); "
        "--no-keep-freed-memory measures glibc's defaults",
    )
    ap.add_argument(
        "--kernel-column",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the supernet with the fake-quant kernel off (the torch path)",
    )
    ap.add_argument("--lowest-forms", type=int, default=TrainConfig.lowest_forms,
                    help="TrainConfig.lowest_forms of the supernet step (default: the library's)")
    ap.add_argument("--also-lowest-forms", type=int, metavar="N",
                    help="add a column: the step as trained with lowest_forms=N, in the same run")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (training uses torch's default, the core count)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from deployq.alloc import keep_freed_memory

        print(f"keep_freed_memory: {keep_freed_memory()}")
    if args.profile:
        width = {s: w for _, s, w in SETTINGS}[args.profile]
        profile(args.profile, width, 10)
        return
    rows = []
    for title, size, width in SETTINGS:
        if args.only and str(size) != args.only:
            continue
        model, net, cfg = build(size, width)
        cfg = replace(cfg, lowest_forms=args.lowest_forms)
        how = "stacked" if use_stacked(net, cfg, torch.zeros(1, 3, size, size)) else "sequential"
        tf, tq = step_times(model, net, cfg, size, args.repeats)
        ratios = []
        for mode in ("off", "on"):
            f, q = step_times(model, net, replace(cfg, stacked=mode), size, args.repeats)
            ratios.append(q / f)
        kf, kq = float("nan"), float("nan")
        if args.kernel_column and kernels.get() is not None:
            with kernels.disabled():
                kf, kq = step_times(model, net, replace(cfg, stacked="off"), size, args.repeats)
        ff, fq = step_times(model, net, cfg, size, args.repeats, quantized=False)
        sf, sq = step_times(model, net, cfg, size, args.repeats, quantized=False, stacked=True)
        also = float("nan")
        if args.also_lowest_forms is not None:
            af, aq = step_times(model, net, replace(cfg, lowest_forms=args.also_lowest_forms), size, args.repeats)
            also = aq / af
        rows.append((title, how, tf, tq, *ratios, kq / kf, fq / ff, sq / sf, also))
    print(f"Training step, batch {TrainConfig().batch_size}, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} interleaved pairs:")
    print()
    print(f"fake-quant kernel: {'on' if kernels.get() is not None else 'off (torch path)'}; "
          f"lowest subnet in {args.lowest_forms} form(s) a step")
    print()
    extra = f" | ratio, lowest in {args.also_lowest_forms} form(s)" if args.also_lowest_forms is not None else ""
    print("| setting | sandwich as trained (--stacked auto) | FP32 ms | supernet ms | ratio | ratio, sequential "
          "(--stacked off) | ratio, stacked (--stacked on) | ratio, sequential, kernel off | "
          f"floor: sandwich without fake-quant | floor, three batches in one pass{extra} |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for title, how, tf, tq, seq, stk, off, floor, stacked, other in rows:
        print(f"| {title} | {how} | {1000 * tf:.1f} | {1000 * tq:.1f} | {tq / tf:.2f}x | {seq:.2f}x | {stk:.2f}x "
              f"| {_ratio(off)} | {floor:.2f}x | {stacked:.2f}x" + (f" | {other:.2f}x |" if extra else " |"))


def _ratio(r: float) -> str:
    """A ratio cell; blank for a column this run skipped (--no-kernel-column, or no kernel)."""
    return "" if math.isnan(r) else f"{r:.2f}x"


if __name__ == "__main__":
    main()
