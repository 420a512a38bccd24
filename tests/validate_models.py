"""Tiny digit classifiers (FP32 and uint8 QDQ ONNX) built in code for the validate tests.

A two-conv net trained for a few hundred steps on the digits train split at 8x8x3
(so accuracy means something), exported with torch.onnx (dynamic batch) and
quantized by onnxruntime's quantize_static into the QNN HTP form (uint8
activations and weights, per tensor). Built once per process and cached.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

SIZE, CHANNELS = 8, 3


def preprocessing():
    from deployq.data import Preprocessing

    return Preprocessing.uniform(SIZE, CHANNELS)


def _net():
    import torch
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(CHANNELS, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).to(torch.float32)


def add_meta(path: Path, class_names=tuple(str(i) for i in range(10)), kind="fp32",
             pre=None) -> None:
    import onnx

    from deployq import onnx_meta

    m = onnx.load(str(path))
    values = {onnx_meta.KIND: kind, onnx_meta.CLASS_NAMES: list(class_names)}
    if pre is not False:
        values[onnx_meta.PREPROCESSING] = (pre or preprocessing()).to_dict()
    onnx_meta.write(m, values)
    onnx.save(m, str(path))


@functools.lru_cache(maxsize=1)
def models() -> dict[str, Path]:
    """{"fp32": ..., "qdq": ..., "fp32_nometa": ..., "random": ...} ONNX paths in a temp dir."""
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from deployq.data import load_data

    d = Path(tempfile.mkdtemp(prefix="deployq-validate-"))
    train = load_data("digits", preprocessing(), "train")
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    g = torch.Generator().manual_seed(0)
    torch.set_num_threads(1)  # tiny net: threads only add overhead on 2 shared cores
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()

    def export(module, path):
        with warnings.catch_warnings():  # the legacy exporter is chosen on purpose (dynamo=False)
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x[:1],), str(path), dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})

    out = {"fp32": d / "fp32.onnx", "qdq": d / "qdq.onnx", "fp32_nometa": d / "nometa.onnx",
           "random": d / "random.onnx"}
    export(net, out["fp32_nometa"])
    export(net, out["fp32"])
    add_meta(out["fp32"])
    torch.manual_seed(1)
    export(_net().eval(), out["random"])
    add_meta(out["random"])

    calib = train.x[:128]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calib[i:i + 16] for i in range(0, len(calib), 16))

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {"x": b}

    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" advice, not needed here
    quantize_static(str(out["fp32_nometa"]), str(out["qdq"]), Reader(),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QUInt8, per_channel=False)
    add_meta(out["qdq"], kind="qdq")
    return out


def write_npz(path: Path, n: int = 10_000, seed: int = 0) -> Path:
    """n digit images (uint8 8x8 grey, repeated with +-1 pixel shifts) and labels."""
    from sklearn.datasets import load_digits

    dg = load_digits()
    img = np.clip(dg.images * 16, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(img), n)
    shifts = rng.integers(-1, 2, (n, 2))
    x = np.empty((n, 8, 8), np.uint8)
    for s in (-1, 0, 1):
        for t in (-1, 0, 1):
            sel = (shifts[:, 0] == s) & (shifts[:, 1] == t)
            x[sel] = np.roll(img[idx[sel]], (s, t), axis=(1, 2))
    np.savez(path, x=x, y=dg.target[idx].astype(np.int64))
    return path
