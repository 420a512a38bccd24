"""Latency of deployq's `cpu` export vs onnxruntime's own quantizer vs FP32 (issue 3, "Speed").

ResNet-20-shaped nets (random weights, calibrated on random data), width 16 and 64, batch
1 and 32, input 3x32x32, on onnxruntime CPU with identical session options. The three
models of one size run interleaved (one run of each in turn) and the medians are reported.

- deployq: `export(ckpt, cpu, w8a8)` of the calibrated supernet.
- ort: `quant_pre_process` + `quantize_static` (QDQ, QUInt8 activations, QInt8 per-channel
  weights) of deployq's FP32 export of the same (BN-folded) model.
- fp32: deployq's `--fp32` export.

Also times the export itself on ResNet-18 at 224x224 against quant_pre_process +
quantize_static with its calibration.

Run: python benchmarks/export_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from deployq.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from deployq.elastic import convert
from deployq.export import export
from deployq.models import build_model
from deployq.profile import load_profile
from deployq.spec import ElasticSpace

THREADS = 2


def make_ckpt(path: Path, name: str, width: int | None, size: int, calib: np.ndarray) -> Path:
    torch.manual_seed(0)
    args = {"num_classes": 10, "in_channels": 3, "input_size": size, "width": width}
    model = build_model(name, **args).eval()
    cpu = load_profile("cpu")
    net = convert(model, ElasticSpace(wbits=(8,), abits=(8,), forms=(cpu.form,)))
    net.calibrate([torch.from_numpy(calib)])
    meta = CheckpointMeta(
        model=name,
        model_args=args,
        space=net.space,
        preprocessing={"size": size, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                       "channel_order": "RGB"},
        class_names=tuple(str(i) for i in range(10)),
    )
    save_checkpoint(path, net, meta)
    return path


def ort_quantize(fp32: Path, out: Path, calib: np.ndarray) -> float:
    """quant_pre_process + quantize_static; returns seconds."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    t = time.perf_counter()
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
    )
    return time.perf_counter() - t


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench(paths: dict[str, Path], batch: int, reps: int) -> dict[str, float]:
    """Median ms per run, the models interleaved run by run."""
    x = np.random.default_rng(1).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    sessions = {k: session(p) for k, p in paths.items()}
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, {"input": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"input": x})
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def latency_table(tmp: Path, quick: bool) -> str:
    cpu = load_profile("cpu")
    rows = [("| width | batch | FP32 ms | ORT quantize_static ms | deployq cpu w8a8 ms | "
            "deployq vs ORT | deployq vs FP32 |"), "|---:|---:|---:|---:|---:|---:|---:|"]
    calib = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    for width in (16, 64):
        ck_path = make_ckpt(tmp / f"r20w{width}.pt", "resnet20", width, 32, calib)
        ck = load_checkpoint(ck_path)
        spec = ck.net.uniform_spec(cpu.form, 8, 8)
        paths = {
            "fp32": export(ck, None, None, tmp / f"w{width}.fp32.onnx", fp32=True).out,
            "deployq": export(ck, cpu, spec, tmp / f"w{width}.cpu.onnx").out,
        }
        ort_quantize(paths["fp32"], tmp / f"w{width}.ortq.onnx", calib[:8])
        paths["ort"] = tmp / f"w{width}.ortq.onnx"
        for batch in (1, 32):
            reps = (20 if quick else 60) if batch == 32 else (100 if quick else 300)
            m = bench(paths, batch, reps)
            rows.append(
                f"| {width} | {batch} | {m['fp32']:.3f} | {m['ort']:.3f} | {m['deployq']:.3f} | "
                f"{m['ort'] / m['deployq']:.2f}x | {m['fp32'] / m['deployq']:.2f}x |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def export_time_table(tmp: Path) -> str:
    cpu = load_profile("cpu")
    calib = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    ck_path = make_ckpt(tmp / "r18.pt", "resnet18", None, 224, calib)
    t = time.perf_counter()
    ck = load_checkpoint(ck_path)
    t_load = time.perf_counter() - t
    spec = ck.net.uniform_spec(cpu.form, 8, 8)
    t_export, t_fp32, t_ort = [], [], []
    for _ in range(3):  # medians of 3: the first call in a process also pays warm-up
        t = time.perf_counter()
        export(ck, cpu, spec, tmp / "r18.cpu.onnx")
        t_export.append(time.perf_counter() - t)
        t = time.perf_counter()
        fp32 = export(ck, None, None, tmp / "r18.fp32.onnx", fp32=True).out
        t_fp32.append(time.perf_counter() - t)
        t_ort.append(ort_quantize(fp32, tmp / "r18.ortq.onnx", calib))
    t_export, t_fp32, t_ort = (statistics.median(v) for v in (t_export, t_fp32, t_ort))
    return "\n".join([
        "| ResNet-18 224x224 | seconds |",
        "|---|---:|",
        f"| deployq export cpu w8a8 (freeze + torch.onnx.export + lowering + checker + check_model + write) | {t_export:.2f} |",
        f"| (checkpoint load, not included) | {t_load:.2f} |",
        f"| FP32 export (input of ORT's quantizer, not included below) | {t_fp32:.2f} |",
        f"| ORT quant_pre_process + quantize_static (8 calibration images) | {t_ort:.2f} |",
        f"| ORT path from the same PyTorch model (FP32 export + the above) | {t_fp32 + t_ort:.2f} |",
    ])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--export-only", action="store_true", help="only the export-time table")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lat = latency_table(tmp, args.quick) if not args.export_only else ""
        exp = export_time_table(tmp)
    print(f"onnxruntime {ort.__version__}, {THREADS} intra-op threads, ORT_ENABLE_ALL, medians of interleaved runs\n")
    print(lat)
    print()
    print(exp)


if __name__ == "__main__":
    main()
