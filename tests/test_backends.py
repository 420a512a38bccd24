"""Backends on real runtimes: onnxruntime CPU, QNN HTP (simulator), TensorRT (GPU only)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from deployq.backends.base import measure_latency
from onnx import helper

from deployq import backends
from deployq.data import load_data
from deployq.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
import validate_models as vm

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None


def _has_gpu_trt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def models():
    return vm.models()


@pytest.fixture(scope="module")
def val_x():
    return load_data("digits", vm.preprocessing(), "val").x


def test_registry_names_and_unknown():
    assert {"onnxruntime", "qnn", "tensorrt"} <= set(backends.names())
    with pytest.raises(UserError, match="unknown backend 'nope'.*onnxruntime"):
        backends.get("nope")


def test_import_is_lazy():
    code = ("import sys, deployq, deployq.backends, deployq.validate, deployq.report_io;"
            "bad = [m for m in ('onnxruntime_qnn', 'tensorrt', 'torch', 'onnxruntime')"
            " if m in sys.modules];"
            "import deployq.cli;"
            "bad += [m for m in ('onnxruntime_qnn', 'tensorrt') if m in sys.modules];"
            "print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_onnxruntime_runs_any_batch(models, val_x):
    s = backends.get("onnxruntime").load(str(models["fp32"]))
    assert s.provider == "CPUExecutionProvider" and not s.simulated
    assert s.batch_size is None and s.input_shape == (None, 3, 8, 8)
    for b in (1, 7, 64):
        y = s.run(val_x[:b])
        assert y.shape == (b, 10) and y.dtype == np.float32


def test_onnxruntime_refuses_garbage(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_bytes(b"not a model")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        backends.get("onnxruntime").load(str(p))


def test_onnxruntime_unknown_provider(models):
    from deployq.backends.onnxruntime import OnnxRuntimeBackend

    with pytest.raises(UserError, match="has no NopeExecutionProvider"):
        OnnxRuntimeBackend(["NopeExecutionProvider"]).load(str(models["fp32"]))


def test_measure_latency_counts_runs():
    class S:
        calls = 0

        def run(self, x):
            S.calls += 1
            return x

    t = measure_latency(S(), np.zeros((1, 3, 8, 8), np.float32), warmup=3, iters=7)
    assert len(t) == 7 and S.calls == 10 and all(v >= 0 for v in t)


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn not installed")
def test_qnn_htp_matches_cpu(models, val_x):
    qnn = backends.get("qnn").load(str(models["qdq"]), batch_size=40)
    assert qnn.provider == "QNNExecutionProvider" and qnn.simulated
    assert qnn.batch_size == 40 and qnn.input_shape == (40, 3, 8, 8)
    cpu = backends.get("onnxruntime").load(str(models["qdq"]))
    x = val_x[:320]
    got = np.concatenate([qnn.run(x[i:i + 40]) for i in range(0, 320, 40)])
    ref = cpu.run(x)
    agree = np.mean(got.argmax(1) == ref.argmax(1))
    assert agree >= 0.95, agree
    # Same integer graph on two runtimes: logits within a few output quantization steps.
    assert np.abs(got - ref).mean() < 0.2
    v = backends.get("qnn").versions()
    assert v["onnxruntime-qnn"] and v["onnxruntime"]


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn not installed")
def test_qnn_unsupported_node_is_named(models, tmp_path):
    m = onnx.load(str(models["qdq"]))
    out = m.graph.output[0]
    m.graph.node.append(helper.make_node("Hardmax", [out.name], ["hm"], name="the_hardmax"))
    new_out = onnx.ValueInfoProto()
    new_out.CopyFrom(out)
    new_out.name = "hm"
    del m.graph.output[:]
    m.graph.output.append(new_out)
    p = tmp_path / "hardmax.onnx"
    onnx.save(m, str(p))
    with pytest.raises(UserError, match=r"QNN HTP cannot run 1 node\(s\).*the_hardmax \(Hardmax\)"):
        backends.get("qnn").load(str(p), batch_size=4)


def test_qnn_fix_batch_keeps_static_batch(models):
    from deployq.backends.qnn import fix_batch

    m = onnx.load(str(models["qdq"]))
    assert fix_batch(m, 16) == 16
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 16
    assert fix_batch(m, 4) == 16  # already static: the data is padded to it


def test_qnn_not_installed_is_one_clear_error(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"backend qnn needs onnxruntime-qnn: pip install 'deployq\[qnn\]'"):
        backends.get("qnn").load(str(models["qdq"]))


@pytest.mark.skipif(_has_gpu_trt(), reason="TensorRT and a GPU are present")
def test_tensorrt_unavailable_is_one_clear_error(models):
    with pytest.raises(UserError, match="backend tensorrt needs TensorRT and an NVIDIA GPU: "):
        backends.get("tensorrt").load(str(models["fp32"]))
    with pytest.raises(UserError, match="needs TensorRT"):
        backends.get("tensorrt").versions()


def test_tensorrt_without_gpu_says_so(monkeypatch):
    """tensorrt importable but no CUDA device: the message names the missing GPU."""
    import types

    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from deployq.backends.tensorrt import _import

    with pytest.raises(UserError, match="no CUDA device is visible"):
        _import()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu_trt(), reason="needs TensorRT and an NVIDIA GPU")
def test_tensorrt_matches_onnxruntime(models, val_x):
    trt = backends.get("tensorrt").load(str(models["fp32"]), batch_size=32)
    assert trt.batch_size == 32 and not trt.simulated
    cpu = backends.get("onnxruntime").load(str(models["fp32"]))
    got, ref = trt.run(val_x[:32]), cpu.run(val_x[:32])
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95
    assert np.abs(got - ref).max() < 1e-2
