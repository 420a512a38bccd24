"""deployq report: the HTML is self-contained, shows every section, and renders in a real browser.

The inputs are schema-valid files built here with made-up numbers (the renderer is
under test, not the measurements): Report JSON from the real dataclass, tiny ONNX
files carrying deployq metadata, a SubnetSpec JSON + Pareto CSV, a checkpoint whose
metadata holds the elastic table.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from deployq import cli, onnx_meta
from deployq.checkpoint import CheckpointMeta, save_checkpoint
from deployq.report import SECTIONS, ElasticTable, bits_label, build_report, load_search
from deployq.report_io import (
    Accuracy,
    DataInfo,
    Latency,
    ModelInfo,
    ReferenceResult,
    Report,
    write_json,
)
from deployq.spec import ElasticSpace, Form, LayerSpec, SubnetSpec

CHROMIUM = Path("/usr/bin/chromium")
LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.add", "layer2.0.conv1", "fc"]
SNPE_FORM = Form(weight_per_channel=False, weight_symmetric=False, act_symmetric=False)
CPU_FORM = Form(weight_per_channel=True, weight_symmetric=True, act_symmetric=False)
ENV = {"cpu": "Test CPU @ 2.0GHz", "cores": "2", "python": "3.11.2", "onnxruntime": "1.32.0"}


def _uniform(form: Form, b: int) -> SubnetSpec:
    return SubnetSpec.uniform(LAYERS, form, b, b, weightless=["layer1.0.add"], fixed={"conv1": 8, "fc": 8})


def _mixed() -> SubnetSpec:
    spec = _uniform(SNPE_FORM, 4)
    return spec.with_layers({
        "layer1.0.conv2": LayerSpec(SNPE_FORM.weight(2), SNPE_FORM.act(6)),
        "layer2.0.conv1": LayerSpec(SNPE_FORM.weight(3), SNPE_FORM.act(5)),
    })


def _onnx(path: Path, kind: str, profile: str | None, spec: SubnetSpec | None) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 8, 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    meta = {onnx_meta.KIND: kind}
    if spec is not None:
        meta.update({onnx_meta.PROFILE: profile, onnx_meta.SUBNET: spec.to_dict()})
    onnx_meta.write(model, meta)
    onnx.save(model, str(path))


def _report(model: str, kind: str, profile, backend: str, top1: float, agree, p50: float,
            simulated: bool = False, env: dict | None = None) -> Report:
    ref = None if agree is None else ReferenceResult("fp32.onnx", "onnxruntime", "CPUExecutionProvider",
                                                     0.99, agree, 0.1, 0.01)
    return Report(
        model=ModelInfo(model, "0" * 64, (None, 3, 8, 8), 10, kind, profile),
        data=DataInfo("digits", "val", 360, 10, "1" * 64, {"size": 8, "channels": 3}, "model"),
        backend=backend,
        provider="QNNExecutionProvider" if backend == "qnn" else "CPUExecutionProvider",
        simulated=simulated,
        accuracy=Accuracy(top1, None, 360),
        reference=ref,
        latency=(Latency(1, p50, p50 * 1.1, p50 * 1.3, p50, 1000 / p50, 5, 20, simulated),),
        environment=env or ENV,
        created="2026-01-01T00:00:00+00:00",
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("inputs")
    (d / "models").mkdir()
    (d / "reports").mkdir()
    models = [
        ("fp32.onnx", "fp32", None, None, "onnxruntime", 0.992, None, 0.21, False),
        ("tensorrt-w8a8.onnx", "qdq", "tensorrt", _uniform(CPU_FORM, 8), "onnxruntime", 0.989, 0.994, 0.30, False),
        ("cpu-w2a2.onnx", "qdq", "cpu", _uniform(CPU_FORM, 2), "onnxruntime", 0.93, 0.935, 0.12, False),
        ("snpe-mixed.onnx", "qdq", "snpe", _mixed(), "onnxruntime", 0.975, 0.98, 0.15, False),
        ("snpe-mixed.onnx", "qdq", "snpe", _mixed(), "qnn", 0.972, 0.978, 40.0, True),
    ]
    paths = []
    for i, (name, kind, prof, spec, backend, top1, agree, p50, sim) in enumerate(models):
        _onnx(d / "models" / name, kind, prof, spec)
        env = dict(ENV, provider="QNNExecutionProvider" if backend == "qnn" else "CPUExecutionProvider",
                   **({"onnxruntime-qnn": "2.7.0"} if backend == "qnn" else {}))
        r = _report(f"../models/{name}", kind, prof, backend, top1, agree, p50, sim, env)
        paths.append(d / "reports" / f"{i}-{backend}.json")
        write_json(r, paths[-1])
    subnet = d / "subnet.json"
    subnet.write_text(_mixed().to_json())
    (d / "subnet.pareto.csv").write_text(
        "kind,spec_id,cost_avg-bits,predicted_acc,measured_acc,chosen\n"
        "front,a1,3.2,0.90,,0\nfront,a2,3.6,0.95,,0\nfront,a3,4.0,0.97,,0\nfront,a4,4.6,0.98,,0\n"
        "candidate,a3,4.0,0.97,0.965,1\ncandidate,b7,3.9,0.968,0.955,0\n"
        "uniform,uniform-w3a3,3.9,0.93,0.94,0\nuniform,uniform-w4a4,4.6,0.96,0.97,0\n"
    )
    metrics = {
        "val_fp32_folded": 0.992,
        "val_uniform": {
            "pc-sym/a-asym": {str(b): 0.99 - 0.01 * (8 - b) ** 1.5 / 4 for b in range(2, 9)},
            "pt-asym/a-asym": {str(b): 0.99 - 0.02 * (8 - b) ** 1.5 / 4 for b in range(2, 9)},
        },
    }
    meta = CheckpointMeta("resnet20", {"width": 8, "input_size": 8}, ElasticSpace(),
                          {"size": 8, "channels": 3}, tuple(map(str, range(10))),
                          {"data": "digits", "warmup_epochs": 2, "batch_size": 64}, metrics, epoch=2)
    ckpt = d / "ckpt.pt"
    save_checkpoint(ckpt, torch.nn.Linear(2, 2), meta)
    return {"dir": d, "reports": paths, "subnet": subnet, "ckpt": ckpt}


class _Parser(HTMLParser):
    """Collects what a self-contained page must (not) have."""

    def __init__(self):
        super().__init__()
        self.sections: list[str] = []
        self.h2: list[str] = []
        self.imgs: list[str] = []
        self.external: list[str] = []
        self.missing_notes = 0
        self.cells: list[str] = []
        self._tag = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tag = tag
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("script", "link", "iframe", "object", "embed", "video", "audio", "source"):
            self.external.append(f"<{tag}>")
        for k in ("src", "href", "srcset", "data", "action"):
            v = a.get(k)
            if v is not None and tag != "img" and not v.startswith("#"):
                self.external.append(f"{tag} {k}={v[:40]}")
        if "style" in a and "url(" in a["style"]:
            self.external.append("style url()")
        if a.get("class") == "missing":
            self.missing_notes += 1

    def handle_data(self, data):
        if self._tag == "h2":
            self.h2.append(data)
        if self._tag in ("td", "span", "code"):
            self.cells.append(data.strip())

    def handle_endtag(self, tag):
        self._tag = None


def _parse(path: Path) -> _Parser:
    p = _Parser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_report_is_self_contained_and_complete(inputs, tmp_path):
    out = build_report(inputs["ckpt"], inputs["reports"], inputs["subnet"], out=tmp_path / "r.html", budget=4.0)
    p = _parse(out)
    assert p.sections == [sid for sid, _ in SECTIONS]
    assert p.h2 == [title for _, title in SECTIONS]
    assert p.missing_notes == 0  # every section had its input
    assert p.external == []
    assert "url(" not in out.read_text()  # no CSS fetches either
    assert len(p.imgs) == 4  # elastic, pareto, subnet bits, accuracy vs latency
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_shows_the_numbers(inputs, tmp_path):
    out = build_report(inputs["ckpt"], inputs["reports"], inputs["subnet"], out=tmp_path / "r.html")
    p = _parse(out)
    cells = set(p.cells)
    # summary rows: bits from the ONNX metadata, agreement, size from the file
    for want in ("w8a8", "w2a2", "fp32", "98.90%", "93.50%", "97.80%", "0.300 ms", "40.000 ms (sim.)",
                 "qnn", "snpe-mixed.onnx"):
        assert want in cells, want
    assert any(c.startswith("mixed (avg w") for c in cells)
    # the elastic table from the checkpoint's metrics: pc-sym at 8 bits is 99.00%
    assert "pc-sym/a-asym" in cells and "99.00%" in cells
    # environment merged: shared values once, differing ones per backend
    assert "Test CPU @ 2.0GHz" in cells and "2.7.0" in cells
    assert "onnxruntime: CPUExecutionProvider; qnn: QNNExecutionProvider" in cells


def test_missing_inputs_say_so(tmp_path, inputs):
    out = build_report(validate_reports=inputs["reports"][:1], out=tmp_path / "r.html")
    p = _parse(out)
    assert p.sections == [sid for sid, _ in SECTIONS]
    assert p.missing_notes == 4  # elastic, pareto, subnet, checkpoint
    assert len(p.imgs) == 1


def test_elastic_json_round_trip_and_override(inputs, tmp_path):
    t = ElasticTable({"pt-sym/a-asym": {2: 0.5, 8: 0.97}}, fp32=0.98, split="val")
    path = tmp_path / "elastic.json"
    path.write_text(t.to_json())
    back = ElasticTable.from_dict(json.loads(path.read_text()))
    assert back.rows == t.rows and back.fp32 == t.fp32
    out = build_report(inputs["ckpt"], elastic=path, out=tmp_path / "r.html")
    cells = set(_parse(out).cells)
    assert "pt-sym/a-asym" in cells and "50.00%" in cells
    assert "pc-sym/a-asym" not in cells  # the given table wins over the checkpoint's


def test_bits_label():
    assert bits_label(_uniform(SNPE_FORM, 3)) == "w3a3"
    assert bits_label(_uniform(SNPE_FORM, 8)) == "w8a8"
    # weighted layers (the add is the residual stream): (8+4+2+3+8)/5, (8+4+6+5+8)/5
    assert bits_label(_mixed()) == "mixed (avg w5.0 a6.2)"
    # knowing the fixed layers, the averages are the search budget's: chosen weighted layers
    fixed = {"conv1", "fc"}
    assert bits_label(_mixed(), fixed) == "mixed (avg w3.0 a5.0)"  # (4+2+3)/3, (4+6+5)/3
    assert bits_label(_uniform(SNPE_FORM, 3), fixed) == "w3a3"


def test_search_inputs_read_the_csv(inputs):
    s = load_search(inputs["subnet"])
    assert s.cost_kind == "avg-bits"
    assert [r.spec_id for r in s.rows if r.chosen] == ["a3"]
    assert s.spec == _mixed()


@pytest.mark.parametrize("bad", ["elastic", "report", "subnet", "csv", "outdir"])
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, bad, capsys):
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"schema": "something.else", "version": 1}))
    out = tmp_path / "r.html"
    args = ["report", "-o", str(out)]
    if bad == "elastic":
        args += ["--elastic", str(wrong)]
    elif bad == "report":
        args += ["--validate", str(wrong)]
    elif bad == "subnet":
        args += ["--search", str(wrong)]
    elif bad == "csv":
        lone = tmp_path / "lone.json"
        shutil.copy(inputs["subnet"], lone)
        args += ["--search", str(lone)]
    else:
        out = tmp_path / "nope" / "r.html"
        args = ["report", "-o", str(out), "--validate", str(inputs["reports"][0])]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("deployq: error: ") and err.count("\n") == 1, err
    assert not out.exists()
    assert list(tmp_path.glob(".r.html.*")) == []


def test_render_failure_leaves_no_file(inputs, tmp_path, monkeypatch):
    import deployq.report as rep

    def boom(_inp):
        raise RuntimeError("render failed")

    monkeypatch.setattr(rep, "render_html", boom)
    out = tmp_path / "r.html"
    with pytest.raises(RuntimeError):
        build_report(validate_reports=inputs["reports"], out=out)
    assert list(tmp_path.iterdir()) == []


def test_cli_report(inputs, tmp_path, capsys):
    out = tmp_path / "r.html"
    args = ["report", "-c", str(inputs["ckpt"]), "-s", str(inputs["subnet"]), "--budget", "4", "-o", str(out)]
    for r in inputs["reports"]:
        args += ["-v", str(r)]
    assert cli.main(args) == 0
    assert _parse(out).missing_notes == 0
    assert cli.main(["report", "-o", str(out)]) == 2  # nothing to report
    assert "nothing to report" in capsys.readouterr().err


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}"]
    return subprocess.run(base + args, check=False, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)")
def test_renders_in_a_real_browser(inputs, tmp_path):
    from PIL import Image

    out = build_report(inputs["ckpt"], inputs["reports"], inputs["subnet"], out=tmp_path / "r.html", budget=4.0)
    dom = _chromium(["--dump-dom", out.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for _, title in SECTIONS:
        assert f"<h2>{title}</h2>" in dom.stdout
    # every embedded image decoded: the browser knows its natural size
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text().replace(
        "</body>",
        "<script>window.onload=()=>{const bad=[...document.images].filter(i=>!i.complete||i.naturalWidth<100);"
        "document.title='IMAGES '+document.images.length+' BROKEN '+bad.length;}</script></body>"))
    dom = _chromium(["--dump-dom", "--virtual-time-budget=5000", probe.as_uri()], tmp_path)
    assert "<title>IMAGES 4 BROKEN 0</title>" in dom.stdout, dom.stdout[:300]
    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1200,3000", "--hide-scrollbars", out.as_uri()], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 3000)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not blank
    colors = img.getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 50  # text, plots and tables, not a flat page
