"""deployq validate: real runtimes, the Report, gates (fake backend), JUnit, CLI exit codes, bad input."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployq import backends, cli
from deployq.data import load_data
from deployq.errors import GateFailed, UserError
from deployq.report_io import Report, junit_xml, load_report
from deployq.validate import ValidateConfig, evaluate_gates, raise_for_gates, validate

sys.path.insert(0, str(Path(__file__).parent))
import validate_models as vm

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None


@pytest.fixture(scope="module")
def models():
    return vm.models()


@pytest.fixture(scope="module")
def val_y():
    return load_data("digits", vm.preprocessing(), "val").y


# --------------------------------------------------------------------------- fake backend


class FakeSession:
    """Returns preset predictions in data order (the one mock these tests allow)."""

    provider = "FakeProvider"
    simulated = False
    input_shape = (None, 3, 8, 8)
    batch_size = None

    def __init__(self, preds: np.ndarray, sleep_s: float):
        self._preds, self._sleep, self._pos = preds, sleep_s, 0

    def run(self, x):
        n = len(x)
        p = self._preds[self._pos:self._pos + n]
        self._pos += n
        if len(p) < n:  # latency runs after the data: any answer will do
            p = np.zeros(n, dtype=np.int64)
            time.sleep(self._sleep)
        return np.eye(10, dtype=np.float32)[p]


class FakeBackend:
    name = "fake"

    def __init__(self, preds, sleep_s=0.0):
        self.preds, self.sleep_s = preds, sleep_s

    def load(self, model_path, batch_size=None):
        return FakeSession(self.preds, self.sleep_s)

    def versions(self):
        return {"fake": "1"}


@pytest.fixture
def fake(val_y):
    """Register backend "fake"; set(correct_fraction, sleep_s) chooses its accuracy and latency."""

    def set_(correct: float, sleep_s: float = 0.0):
        preds = val_y.copy()
        k = round((1 - correct) * len(preds))
        preds[:k] = (preds[:k] + 1) % 10
        backends.register("fake", FakeBackend(preds, sleep_s))

    set_(1.0)
    yield set_
    backends.unregister("fake")


def run_cli(*args: str) -> int:
    return cli.main(["validate", *args, "--no-progress"])


# --------------------------------------------------------------------------- real runtimes


def test_onnxruntime_accuracy_and_latency(models):
    r = validate(ValidateConfig(model=str(models["fp32"]), latency_batches=(1, 16), iters=20,
                                warmup=2), progress=False)
    assert r.data.split == "val" and r.accuracy.n == 360 and r.data.preprocessing_from == "model"
    assert 0.9 <= r.accuracy.top1 <= r.accuracy.top5 <= 1.0
    assert r.provider == "CPUExecutionProvider" and not r.simulated
    assert [lat.batch_size for lat in r.latency] == [1, 16]
    for lat in r.latency:
        assert 0 < lat.p50_ms <= lat.p90_ms <= lat.p99_ms and lat.iters == 20
        assert lat.throughput == pytest.approx(lat.batch_size / lat.p50_ms * 1e3)
    env = r.environment
    assert env["onnxruntime"] and env["provider"] == "CPUExecutionProvider" and env["cores"]
    assert env["cpu"] and env["deployq"]


def test_random_model_is_near_chance(models):
    r = validate(ValidateConfig(model=str(models["random"]), latency_batches=()), progress=False)
    assert r.accuracy.top1 < 0.4  # the trained model's >= 0.9 is not a harness artefact


def test_reference_agreement_on_cpu(models):
    r = validate(ValidateConfig(model=str(models["qdq"]), reference=str(models["fp32"]),
                                latency_batches=()), progress=False)
    ref = r.reference
    assert ref is not None and ref.backend == "onnxruntime"
    assert ref.agreement >= 0.95 and ref.top1 >= 0.9
    assert 0 < ref.mean_abs_err <= ref.max_abs_err < 2.0
    same = validate(ValidateConfig(model=str(models["fp32"]), reference=str(models["fp32"]),
                                   latency_batches=()), progress=False)
    assert same.reference.agreement == 1.0 and same.reference.max_abs_err == 0.0


@pytest.mark.qnn
@pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn not installed")
def test_qnn_htp_validate(models):
    cpu = validate(ValidateConfig(model=str(models["qdq"]), latency_batches=()), progress=False)
    # batch 64 does not divide 360: the padded last batch must not leak into the numbers
    r = validate(ValidateConfig(model=str(models["qdq"]), backend="qnn", batch_size=64,
                                reference=str(models["qdq"]), latency_batches=(1, 8),
                                warmup=1, iters=5), progress=False)
    assert r.provider == "QNNExecutionProvider" and r.simulated
    assert r.accuracy.n == 360 and r.accuracy.top1 >= 0.9
    assert abs(r.accuracy.top1 - cpu.accuracy.top1) <= 0.02
    assert r.reference.agreement >= 0.95  # same QDQ graph on onnxruntime CPU
    assert [lat.batch_size for lat in r.latency] == [1, 8]
    assert all(lat.simulated for lat in r.latency)
    assert r.environment["onnxruntime-qnn"]


def test_static_batch_model_is_padded(models, tmp_path):
    import onnx

    m = onnx.load(str(models["fp32"]))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 7  # 360 = 51 * 7 + 3
    p = tmp_path / "static.onnx"
    onnx.save(m, str(p))
    ref = validate(ValidateConfig(model=str(models["fp32"]), latency_batches=()), progress=False)
    r = validate(ValidateConfig(model=str(p), latency_batches=(7,), iters=2, warmup=0),
                 progress=False)
    assert r.accuracy == ref.accuracy and r.model.input_shape == (7, 3, 8, 8)


def test_image_folder_defaults_to_val_split(models, tmp_path):
    from PIL import Image

    digits = load_data("digits", split="all")  # 16x16 default; the model's metadata says 8x8
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c in range(10):
            d = tmp_path / "tree" / split / str(c)
            d.mkdir(parents=True)
            for i, k in enumerate(rng.choice(np.flatnonzero(digits.y == c), n, replace=False)):
                grey = np.clip(digits.x[k, 0] * 0.25 + 0.5, 0, 1) * 255
                Image.fromarray(grey.astype(np.uint8)).save(d / f"{i}.png")
    r = validate(ValidateConfig(model=str(models["fp32"]), data=str(tmp_path / "tree"),
                                latency_batches=()), progress=False)
    assert r.data.split == "val" and r.accuracy.n == 20 and r.accuracy.top1 >= 0.6


# --------------------------------------------------------------------------- report JSON


def test_report_json_round_trip(models, tmp_path):
    r = validate(ValidateConfig(model=str(models["qdq"]), reference=str(models["fp32"]),
                                latency_batches=(2,), iters=3, min_top1=50), progress=False)
    assert Report.from_json(r.to_json()) == r
    d = json.loads(r.to_json())
    assert d["schema"] == "deployq.Report" and d["version"] == 1
    assert list(d)[:2] == ["schema", "version"]


@pytest.mark.parametrize("change, match", [
    ({"schema": "other.Report"}, "not a deployq validation report"),
    ({"version": 2}, "version 2 is not supported"),
])
def test_report_refuses_other_schema(models, change, match):
    r = validate(ValidateConfig(model=str(models["fp32"]), latency_batches=()), progress=False)
    d = {**r.to_dict(), **change}
    with pytest.raises(UserError, match=match):
        Report.from_json(json.dumps(d))


# --------------------------------------------------------------------------- gates


@given(top1=st.floats(0, 1), threshold=st.floats(0, 100))
def test_min_top1_gate_passes_iff_at_or_above(top1, threshold):
    (g,) = evaluate_gates(top1, (), min_top1=threshold)
    assert g.passed == (top1 * 100 >= threshold - 1e-9)
    assert g.name == "min_top1" and ("below" in g.message) != g.passed


@given(top1=st.floats(0, 1), base=st.floats(0, 1), allowed=st.floats(0, 100))
def test_max_drop_gate_in_points(top1, base, allowed):
    (g,) = evaluate_gates(top1, (), max_drop=allowed, drop_base_top1=base)
    assert g.measured == pytest.approx((base - top1) * 100)
    assert g.passed == ((base - top1) * 100 <= allowed + 1e-9)


def test_gates_with_fake_backend(models, fake):
    fake(0.95)
    cfg = ValidateConfig(model=str(models["fp32"]), backend="fake", latency_batches=(1,),
                         iters=3, warmup=0)
    ok = validate(dataclasses.replace(cfg, min_top1=95.0), progress=False)
    assert ok.accuracy.top1 == pytest.approx(0.95, abs=1 / 360)
    assert ok.provider == "FakeProvider" and ok.passed
    bad = validate(dataclasses.replace(cfg, min_top1=97.0), progress=False)
    (g,) = bad.gates
    assert not g.passed and g.threshold == 97.0 and "points below" in g.message
    with pytest.raises(GateFailed, match="min_top1"):
        raise_for_gates(bad)


def test_latency_gate_with_fake_backend(models, fake):
    fake(1.0, sleep_s=0.01)
    cfg = ValidateConfig(model=str(models["fp32"]), backend="fake", latency_batches=(1, 4),
                         iters=3, warmup=0)
    slow = validate(dataclasses.replace(cfg, max_latency_ms=2.0), progress=False)
    assert [g.name for g in slow.gates] == ["max_latency_ms[batch=1]", "max_latency_ms[batch=4]"]
    assert not any(g.passed for g in slow.gates) and all(g.measured >= 10 for g in slow.gates)
    fast = validate(dataclasses.replace(cfg, max_latency_ms=5000.0), progress=False)
    assert fast.passed


def test_max_drop_against_baseline_and_reference(models, fake, tmp_path):
    base = tmp_path / "base.json"
    fake(1.0)
    assert run_cli(str(models["fp32"]), "--backend", "fake", "--no-latency",
                   "--json", str(base)) == 0
    fake(0.97)  # ~3 points worse than the baseline
    args = [str(models["fp32"]), "--backend", "fake", "--no-latency", "--baseline", str(base)]
    assert run_cli(*args, "--max-drop", "2") == 1
    assert run_cli(*args, "--max-drop", "3.5") == 0
    # no baseline: the reference model's accuracy (real fp32 on onnxruntime) is the base
    r = validate(ValidateConfig(model=str(models["fp32"]), backend="fake", latency_batches=(),
                                reference=str(models["fp32"]), max_drop=10.0), progress=False)
    (g,) = r.gates
    assert g.measured == pytest.approx((r.reference.top1 - r.accuracy.top1) * 100)
    assert "reference" in g.message


# --------------------------------------------------------------------------- JUnit and CLI


def test_cli_gate_failure_writes_reports_and_exits_1(models, fake, tmp_path, capsys):
    fake(0.9)
    js, xml = tmp_path / "r.json", tmp_path / "r.xml"
    code = run_cli(str(models["fp32"]), "--backend", "fake", "--no-latency",
                   "--min-top1", "95", "--json", str(js), "--junit", str(xml))
    assert code == 1
    assert "min_top1" in capsys.readouterr().err
    assert load_report(js).accuracy.top1 == pytest.approx(0.9, abs=1 / 360)
    root = ET.parse(xml).getroot()
    (suite,) = root.findall("testsuite")
    assert suite.get("failures") == "1" and suite.get("tests") == "1"
    (case,) = suite.findall("testcase")
    fail = case.find("failure")
    assert case.get("name") == "min_top1" and fail is not None
    assert "5.00 points below" in fail.get("message")


def test_cli_pass_exit_0_and_junit_per_gate(models, tmp_path, capsys):
    xml = tmp_path / "r.xml"
    code = run_cli(str(models["fp32"]), "--min-top1", "80", "--max-latency-ms", "10000",
                   "--latency-batch", "1", "--latency-batch", "8", "--iters", "3",
                   "--junit", str(xml))
    assert code == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "PASS" in out and "max_latency_ms[batch=8]" in out
    cases = ET.parse(xml).getroot().find("testsuite").findall("testcase")
    assert [c.get("name") for c in cases] == [
        "min_top1", "max_latency_ms[batch=1]", "max_latency_ms[batch=8]"]
    assert all(c.find("failure") is None for c in cases)


def test_junit_without_gates_has_accuracy_case(models):
    r = validate(ValidateConfig(model=str(models["fp32"]), latency_batches=()), progress=False)
    root = ET.fromstring(junit_xml(r))
    (case,) = root.iter("testcase")
    assert case.get("name") == "accuracy" and case.find("failure") is None


def test_preprocessing_from_flags(models, tmp_path):
    js = tmp_path / "r.json"
    assert run_cli(str(models["fp32_nometa"]), "--size", "8", "--channels", "3", "--mean", "0.5",
                   "--std", "0.25", "--no-latency", "--json", str(js)) == 0
    r = load_report(js)
    assert r.data.preprocessing_from == "flags" and r.accuracy.top1 >= 0.9


# --------------------------------------------------------------------------- bad input


def _bad_cases(models, tmp_path):
    notonnx = tmp_path / "notonnx.onnx"
    notonnx.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    (corrupt / "0").mkdir(parents=True)
    (corrupt / "0" / "a.png").write_bytes(b"\x89PNG not really")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something.Else", "version": 1}))
    three = tmp_path / "three.npz"
    np.savez(three, x=np.zeros((6, 8, 8, 3), np.uint8), y=np.array([0, 1, 2, 0, 1, 2]))
    wrong_names = tmp_path / "names.onnx"
    wrong_names.write_bytes(models["fp32"].read_bytes())
    vm.add_meta(wrong_names, class_names=tuple("abcdefghij"))
    m = str(models["fp32"])
    return {
        "not onnx": ([str(notonnx)], "is not an ONNX model"),
        "missing model": ([str(tmp_path / "nope.onnx")], "does not exist"),
        "shape": ([str(models["fp32_nometa"])],
                  r"model input shape \(N, 3, 8, 8\) does not fit the data \(N, 3, 16, 16\)"),
        "empty dir": ([m, "--data", str(empty)], "is empty"),
        "corrupt image": ([m, "--data", str(corrupt)], "cannot read image"),
        "unknown backend": ([m, "--backend", "nope"], "unknown backend 'nope'"),
        "other schema": ([m, "--baseline", str(other), "--max-drop", "1"],
                         "not a deployq validation report"),
        "class names": ([str(wrong_names)], "classes differ from the data's"),
        "class count": ([str(models["fp32_nometa"]), "--data", str(three), "--size", "8",
                         "--channels", "3"], "outputs 10 classes but the data has 3"),
        "fraction min-top1": ([m, "--min-top1", "0.98"], "write 98 for"),
        "max-drop alone": ([m, "--max-drop", "1"], "--max-drop needs --baseline"),
        "bad split": ([m, "--split", "test"], "unknown split"),
    }


def test_bad_input_exit_2_one_line_no_report(models, tmp_path, capsys):
    cases = _bad_cases(models, tmp_path)
    for name, (args, match) in cases.items():
        js, xml = tmp_path / f"{name}.json", tmp_path / f"{name}.xml"
        code = run_cli(*args, "--no-latency", "--json", str(js), "--junit", str(xml))
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert err.startswith("deployq: error: ") and "\n" not in err, (name, err)
        assert re.search(match, err), (name, err)
        assert not js.exists() and not xml.exists(), name
        assert not list(tmp_path.glob(".*.tmp")), name


def test_backend_not_installed_exit_2(models, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    assert run_cli(str(models["qdq"]), "--backend", "qnn") == 2
    assert "pip install 'deployq[qnn]'" in capsys.readouterr().err
    if importlib.util.find_spec("tensorrt") is None:
        assert run_cli(str(models["qdq"]), "--backend", "tensorrt") == 2
        assert "needs TensorRT and an NVIDIA GPU" in capsys.readouterr().err


def test_missing_output_dir_fails_before_work(models, tmp_path, capsys):
    assert run_cli(str(models["fp32"]), "--json", str(tmp_path / "no" / "r.json")) == 2
    assert "does not exist" in capsys.readouterr().err
