"""What does `deployq validate` cost beyond the runtime itself?

Requirement (issue 4): validating 10,000 images costs at most 10% more wall time than
bare onnxruntime `run` calls on the same batches.

Setup: a ResNet-20-shaped net (deployq.models, random weights: speed does not depend on
them) exported to ONNX with its deployq preprocessing metadata, and 10,000 digit images
(up-sampled to the model's size, +-1 pixel shifts) saved as uint8 in an .npz.

Timed, interleaved (alternating order), `--repeats` times each; medians reported, and the
median of the per-repeat ratios (robust to load from other processes):
  bare      `sess.run` over the already-preprocessed batches (batch 64), one
            InferenceSession created beforehand (ORT_ENABLE_ALL, CPU) - nothing else.
  validate  `deployq.validate.validate(config)` end to end with no latency pass:
            reading the ONNX and its metadata, hashing the file, loading + preprocessing
            the .npz, creating the session, the batched inference with the progress bar,
            top-1/top-5, the environment record and the Report. Nothing is excluded.
Also timed once each, to show where the difference goes: loading the data alone and
creating the session alone.

Run:  python benchmarks/validate_overhead.py [--n 10000] [--size 16] [--width 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_npz(path: Path, n: int, size: int, seed: int = 0) -> Path:
    from sklearn.datasets import load_digits

    dg = load_digits()
    img = np.clip(dg.images * 16, 0, 255).astype(np.uint8)
    rep = -(-size // 8)
    img = np.kron(img, np.ones((1, rep, rep), np.uint8))[:, :size, :size]  # nearest up-sampling
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(img), n)
    x = img[idx]
    shifts = rng.integers(-1, 2, (n, 2))
    for s in (-1, 1):
        x[shifts[:, 0] == s] = np.roll(x[shifts[:, 0] == s], s, axis=1)
        x[shifts[:, 1] == s] = np.roll(x[shifts[:, 1] == s], s, axis=2)
    np.savez(path, x=x, y=dg.target[idx].astype(np.int64))
    return path


def make_model(path: Path, size: int, width: int) -> Path:
    import warnings

    import onnx
    import torch

    from deployq import onnx_meta
    from deployq.data import Preprocessing
    from deployq.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet20", num_classes=10, in_channels=1, input_size=size,
                      width=width).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, size, size),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    m = onnx.load(str(path))
    onnx_meta.write(m, {onnx_meta.PREPROCESSING: Preprocessing.uniform(size, 1).to_dict(),
                        onnx_meta.CLASS_NAMES: [str(i) for i in range(10)]})
    onnx.save(m, str(path))
    return path


def bare(sess, x: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        sess.run(None, {"x": x[i:i + batch]})
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-progress", action="store_true", help="validate without the bar")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from deployq.data import load_data
    from deployq.validate import ValidateConfig, read_model, resolve_preprocessing, validate

    d = Path(tempfile.mkdtemp(prefix="deployq-bench-"))
    npz = make_npz(d / "data.npz", args.n, args.size)
    model = make_model(d / "resnet20.onnx", args.size, args.width)
    config = ValidateConfig(model=str(model), data=str(npz), split="all",
                            batch_size=args.batch, latency_batches=())
    pre, _ = resolve_preprocessing(config, read_model(str(model)))

    t0 = time.perf_counter()
    x = load_data(str(npz), pre, "all").x
    t_load = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    t_sess = time.perf_counter() - t0

    bare(sess, x[: args.batch * 4], args.batch)  # warm both paths once
    validate(config, progress=False)
    t_bare, t_val, t_inside = [], [], []

    # Time spent inside the runtime during validate(): validate's own cost is the rest.
    # This split does not depend on how busy the machine is, unlike two separate runs.
    from deployq.backends import _ort_common

    inner_run = _ort_common.OrtSession.run
    acc = [0.0]

    def timed_run(self, xb):
        t0 = time.perf_counter()
        try:
            return inner_run(self, xb)
        finally:
            acc[0] += time.perf_counter() - t0

    _ort_common.OrtSession.run = timed_run

    def run_validate():
        acc[0] = 0.0
        t0 = time.perf_counter()
        r = validate(config, progress=not args.no_progress)
        t_val.append(time.perf_counter() - t0)
        t_inside.append(acc[0])
        return r

    for i in range(args.repeats):
        # Interleaved, alternating which goes first: load from other processes on a shared
        # machine then hits both alike instead of biasing one.
        if i % 2 == 0:
            t_bare.append(bare(sess, x, args.batch))
            report = run_validate()
        else:
            report = run_validate()
            t_bare.append(bare(sess, x, args.batch))
    mb, mv = statistics.median(t_bare), statistics.median(t_val)
    paired = statistics.median(v / b for v, b in zip(t_val, t_bare))

    print(f"\nvalidate overhead: {args.n} images, ResNet-20 width {args.width} at "
          f"1x{args.size}x{args.size}, batch {args.batch}, {args.repeats} interleaved repeats, "
          f"onnxruntime {ort.__version__} CPU, {report.environment['cores']} cores "
          f"({report.environment['cpu']})")
    print(f"{'what':<44} {'median s':>9} {'min s':>7} {'max s':>7}")
    rows = [("bare sess.run over the batches", t_bare),
            ("validate() end to end (progress bar " + ("off)" if args.no_progress else "on)"),
             t_val)]
    for name, ts in rows:
        print(f"{name:<44} {statistics.median(ts):9.3f} {min(ts):7.3f} {max(ts):7.3f}")
    own = [v - i for v, i in zip(t_val, t_inside)]
    print(f"{'  inside sess.run during validate()':<44} {statistics.median(t_inside):9.3f} "
          f"{min(t_inside):7.3f} {max(t_inside):7.3f}")
    print(f"{'  validate() own work (the rest)':<44} {statistics.median(own):9.3f} "
          f"{min(own):7.3f} {max(own):7.3f}")
    print(f"{'load + preprocess the .npz alone':<44} {t_load:9.3f}   (once)")
    print(f"{'create the InferenceSession alone':<44} {t_sess:9.3f}   (once)")
    ratio = mv / mb
    own_ratio = statistics.median(v / i for v, i in zip(t_val, t_inside))
    print(f"ratio of medians validate / bare = {ratio:.3f}; median of paired ratios = "
          f"{paired:.3f}; validate / its own sess.run time = {own_ratio:.3f}  (limit 1.10)  "
          f"-> {'OK' if paired <= 1.10 else 'OVER'} (verdict on the paired ratio)")
    return 0 if paired <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
