"""One self-contained HTML report from a checkpoint and the search / validate JSON files.

    build_report(checkpoint="ckpt.pt", validate_reports=["r1.json", ...],
                 search="subnet.json", out="report.html")

Sections (always present, with a note when their input was not given):
summary of the validated models, the elastic table (top-1 of every uniform subnet per
form), the search's Pareto front, the chosen subnet's per-layer bit-widths, accuracy vs
latency per profile, the environment, and the checkpoint's facts. Plots are PNGs
embedded as data: URIs and the CSS is inline: the file opens offline, alone.

The elastic table comes from the checkpoint's metadata (`metrics["val_uniform"]`, what
`deployq train` records), or from an `elastic.json` (schema `deployq.ElasticTable`)
for checkpoints that lack it.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deployq.errors import UserError
from deployq.fileio import check_writable, read_user_text, write_text
from deployq.spec import counted_layers

ELASTIC_SCHEMA = "deployq.ElasticTable"
ELASTIC_VERSION = 1
MAX_CANDIDATES = 6  # re-measured search candidates listed in the Pareto table
SECTIONS = (
    ("summary", "Validated models"),
    ("elastic", "Elastic table: every uniform subnet"),
    ("pareto", "Mixed-precision search: Pareto front"),
    ("subnet", "Chosen subnet: per-layer bit-widths"),
    ("accuracy-latency", "Accuracy vs latency per profile"),
    ("environment", "Environment"),
    ("checkpoint", "Checkpoint"),
)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ElasticTable:
    """Top-1 (0..1) of uniform subnets: rows[form_key][bits]."""

    rows: Mapping[str, Mapping[int, float]]
    fp32: float | None = None
    split: str = "val"
    source: str = ""

    def to_dict(self) -> dict:
        return {
            "schema": ELASTIC_SCHEMA,
            "version": ELASTIC_VERSION,
            "split": self.split,
            "fp32": self.fp32,
            "rows": {k: {str(b): v for b, v in sorted(r.items())} for k, r in self.rows.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "") -> ElasticTable:
        if not isinstance(d, Mapping) or d.get("schema") != ELASTIC_SCHEMA:
            raise UserError(f"{source or 'input'} is not a deployq elastic table (schema {ELASTIC_SCHEMA!r})")
        if d.get("version") != ELASTIC_VERSION:
            raise UserError(f"elastic table version {d.get('version')!r} is not supported")
        return cls(_rows(d.get("rows"), source), _opt_float(d.get("fp32")), str(d.get("split", "val")), source)

    @classmethod
    def from_metrics(cls, metrics: Mapping, source: str = "checkpoint") -> ElasticTable | None:
        """What `deployq train` records: metrics["val_uniform"] = {form_key: {"2": top1}}."""
        rows = metrics.get("val_uniform")
        if not rows:
            return None
        return cls(_rows(rows, source), _opt_float(metrics.get("val_fp32_folded")), "val", source)


def _rows(rows, source: str) -> dict[str, dict[int, float]]:
    try:
        return {str(k): {int(b): float(v) for b, v in r.items()} for k, r in rows.items()}
    except (AttributeError, TypeError, ValueError):
        raise UserError(f"{source}: elastic table rows must map form -> bits -> top-1") from None


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


def load_elastic(path: str | os.PathLike) -> ElasticTable:
    return ElasticTable.from_dict(_read_json(path), Path(path).name)


@dataclass(frozen=True)
class SearchInputs:
    """A search's outputs: the chosen SubnetSpec and its Pareto CSV rows."""

    spec: object  # deployq.spec.SubnetSpec
    cost_kind: str
    rows: tuple[ParetoPoint, ...]
    budget: float | None = None
    source: str = ""


@dataclass(frozen=True)
class ParetoPoint:
    """One row of the search's Pareto CSV (columns: kind, spec_id, cost_<kind>,
    predicted_acc, measured_acc, chosen)."""

    kind: str  # "front" (predicted, non-dominated), "candidate" (re-measured), "uniform"
    spec_id: str
    cost: float
    predicted: float
    measured: float | None = None
    chosen: bool = False


def pareto_csv_path(subnet_json: str | os.PathLike) -> Path:
    """`subnet.json` -> `subnet.pareto.csv` (the search writes it there)."""
    p = Path(subnet_json)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + ".pareto.csv")


def load_search(path: str | os.PathLike, budget: float | None = None) -> SearchInputs:
    """`subnet.json` plus the `subnet.pareto.csv` the search wrote beside it."""
    from deployq.spec import SubnetSpec

    spec = SubnetSpec.from_dict(_read_json(path))
    csv_path = pareto_csv_path(path)
    if not csv_path.is_file():
        raise UserError(f"no Pareto CSV beside {str(path)!r} (expected {str(csv_path)!r})")
    try:
        with open(csv_path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            cost_col = next((c for c in reader.fieldnames or () if c.startswith("cost_")), None)
            if cost_col is None:
                raise UserError(f"{csv_path}: no cost_<kind> column")
            rows = tuple(
                ParetoPoint(
                    kind=r["kind"],
                    spec_id=r["spec_id"],
                    cost=float(r[cost_col]),
                    predicted=float(r["predicted_acc"]),
                    measured=float(r["measured_acc"]) if r["measured_acc"] else None,
                    chosen=r["chosen"] == "1",
                )
                for r in reader
            )
    except (KeyError, ValueError) as e:
        raise UserError(f"{csv_path}: not a deployq Pareto CSV ({e})") from None
    return SearchInputs(spec, cost_col[len("cost_"):], rows, budget, Path(path).name)


@dataclass(frozen=True)
class ModelRow:
    """One validated model, as the summary table and the accuracy/latency plot show it."""

    name: str  # file name of the model
    profile: str | None  # None for the FP32 reference
    bits: str  # "w8a8", "mixed (avg w4.1 a5.0)", "fp32", "?"
    backend: str
    provider: str
    simulated: bool
    size_bytes: int | None
    top1: float
    agreement: float | None
    p50_ms: float | None
    report: str = ""

    @property
    def label(self) -> str:
        return f"{self.profile or 'fp32'} {self.bits}" + (" (qnn)" if self.backend == "qnn" else "")


def bits_label(spec, fixed: Iterable[str] = ()) -> str:
    """'w4a4' for a uniform body (fixed 8-bit first/last layers aside), else 'mixed (avg
    w.. a..)'. With the names of the fixed layers, the averages are the search budget's
    (deployq.search.cost): weights and inputs of the weighted layers that are not fixed;
    without them, of every weighted layer."""
    fixed = set(fixed)
    w = spec.weight_bits()
    a = spec.act_bits()
    chosen = counted_layers(w, fixed)
    if fixed:
        body_w = sorted({w[n] for n in chosen})
        body_a = sorted({a[n] for n in chosen})
    else:
        body_w = sorted(set(w.values()) - {8}) or [8]
        body_a = sorted(set(a.values()) - {8}) or [8]
    if len(body_w) == 1 and len(body_a) == 1:
        return f"w{body_w[0]}a{body_a[0]}"
    avg_w = sum(w[n] for n in chosen) / len(chosen)
    avg_a = sum(a[n] for n in chosen) / len(chosen)
    return f"mixed (avg w{avg_w:.1f} a{avg_a:.1f})"


def _resolve_model(report_path: Path | None, model_path: str) -> Path | None:
    """The model a report measured: absolute, or relative to the report's directory."""
    p = Path(model_path)
    cands = [p] if p.is_absolute() else ([report_path.parent / p] if report_path else []) + [p]
    return next((c for c in cands if c.is_file()), None)


def model_row(report, report_path: str | os.PathLike | None = None) -> ModelRow:
    """Summarise a Report; bits and size come from the ONNX file when it can be found."""
    rp = Path(report_path) if report_path is not None else None
    onnx_path = _resolve_model(rp, report.model.path)
    bits, size = ("fp32" if report.model.kind == "fp32" else "?"), None
    if onnx_path is not None:
        size = onnx_path.stat().st_size
        bits = _bits_from_onnx(onnx_path) or bits
    lat = next((x for x in report.latency if x.batch_size == 1), report.latency[0] if report.latency else None)
    return ModelRow(
        name=Path(report.model.path).name,
        profile=report.model.profile,
        bits=bits,
        backend=report.backend,
        provider=report.provider,
        simulated=report.simulated,
        size_bytes=size,
        top1=report.accuracy.top1,
        agreement=report.reference.agreement if report.reference else None,
        p50_ms=lat.p50_ms if lat else None,
        report=str(report_path or ""),
    )


def _bits_from_onnx(path: Path) -> str | None:
    import onnx

    from deployq import onnx_meta
    from deployq.spec import SubnetSpec

    try:
        meta = onnx_meta.read(onnx.load(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 - an unreadable model only loses its bits label
        return None
    if meta.get(onnx_meta.KIND) == "fp32":
        return "fp32"
    sub = meta.get(onnx_meta.SUBNET)
    if not sub:
        return None
    try:
        return bits_label(SubnetSpec.from_dict(sub), meta.get(onnx_meta.FIXED_LAYERS) or ())
    except UserError:
        return None


def _read_json(path: str | os.PathLike) -> dict:
    text = read_user_text(path, "file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{str(path)!r} is not JSON: {e}") from None


@dataclass(frozen=True)
class ReportInputs:
    """Everything the renderer shows; all optional."""

    title: str = "deployq report"
    checkpoint: dict | None = None  # CheckpointMeta.to_dict() (+ "path", "sha256")
    elastic: ElasticTable | None = None
    search: SearchInputs | None = None
    models: tuple[ModelRow, ...] = ()
    environment: dict = field(default_factory=dict)  # key -> value, or -> {backend: value}
    notes: tuple[str, ...] = ()
    created: str = ""


# --------------------------------------------------------------------------- rendering


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif;
 margin:0;background:#f6f7f9;color:#1d232b;line-height:1.45}
main{max-width:1080px;margin:0 auto;padding:24px 28px 48px}
header{background:#1d232b;color:#fff;padding:20px 28px}
header h1{margin:0;font-size:24px;font-weight:600}
header p{margin:4px 0 0;color:#b9c2cc;font-size:13px}
section{background:#fff;border:1px solid #e1e5ea;border-radius:8px;padding:16px 20px;margin:18px 0}
h2{font-size:18px;margin:0 0 10px;font-weight:600}
p.note{color:#5b6673;font-size:13px;margin:6px 0}
p.missing{color:#8a5a00;background:#fff6e0;border-radius:4px;padding:6px 10px;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{padding:4px 10px;border-bottom:1px solid #e8ebef;text-align:left}
th{background:#f0f2f5;font-weight:600}
td.num,th.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums;font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace}
img{max-width:100%;height:auto;display:block;margin:8px 0}
nav a{color:#9cc7ff;margin-right:14px;font-size:13px;text-decoration:none}
code{font-size:12px;background:#f0f2f5;padding:1px 4px;border-radius:3px}
.notes{background:#fff6e0;border:1px solid #f0d48a;border-radius:8px;padding:10px 16px;margin:18px 0;font-size:13px}
.notes ul{margin:6px 0 0;padding-left:20px}
"""


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _pct(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 2**20:.2f} MiB"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], num: Iterable[int] = ()) -> str:
    num = set(num)
    h = "".join(f'<th{" class=num" if i in num else ""}>{_e(c)}</th>' for i, c in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in num else ""}>{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _shade(acc: float, lo: float, hi: float) -> str:
    """Cell background from red (worst) to green (best) of the table."""
    t = 1.0 if hi <= lo else (acc - lo) / (hi - lo)
    r, g = int(250 - 60 * t), int(215 + 30 * t)
    return f"background:rgb({r},{g},{int(210 - 10 * t)})"


def _missing(what: str) -> str:
    return f'<p class="missing">{_e(what)}</p>'


def _section_summary(inp: ReportInputs) -> str:
    if not inp.models:
        return _missing("No validate reports were given (deployq report --validate report.json ...).")
    rows = []
    for m in inp.models:
        lat = "n/a" if m.p50_ms is None else f"{m.p50_ms:.3f} ms" + (" (sim.)" if m.simulated else "")
        rows.append([
            _e(m.profile or "fp32"), _e(m.bits), _e(m.backend), _e(m.provider), _e(_size(m.size_bytes)),
            _e(_pct(m.top1)), _e(_pct(m.agreement)), _e(lat), f"<code>{_e(m.name)}</code>",
        ])
    note = ('<p class="note">top-1 on the validation split; agreement = share of images whose top-1 '
            "prediction equals the FP32 reference's; latency p50 at batch 1. "
            "QNN HTP latencies come from the x86-64 simulator and are not device timings.</p>")
    return _table(["profile", "bits", "backend", "provider", "size", "top-1", "agreement", "latency p50", "model"],
                  rows, num=(4, 5, 6, 7)) + note


def _section_elastic(inp: ReportInputs) -> str:
    from deployq.plots import elastic_plot

    t = inp.elastic
    if t is None or not t.rows:
        return _missing("No elastic table: the checkpoint records no uniform-subnet metrics and no elastic.json was given.")
    bits = sorted({b for r in t.rows.values() for b in r})
    vals = [v for r in t.rows.values() for v in r.values()]
    lo, hi = min(vals), max(vals)
    rows = []
    for form, r in t.rows.items():
        cells = [f'<span style="{_shade(r[b], lo, hi)};padding:2px 4px;border-radius:3px">{_e(_pct(r[b]))}</span>'
                 if b in r else "" for b in bits]
        rows.append([f"<code>{_e(form)}</code>", *cells])
    fp = f" Float (BN-folded) network: {_pct(t.fp32)}." if t.fp32 is not None else ""
    note = (f'<p class="note">One set of weights; each cell switches every quantized layer to that '
            f"bit-width (first/last layers stay at their fixed bits). Split: {_e(t.split)}.{_e(fp)} "
            f"Form key: pc/pt = per-channel/per-tensor weights, sym/asym weights; a-asym = asymmetric activations. "
            f"Source: {_e(t.source or 'n/a')}.</p>")
    return (_table(["form", *[f"w{b}a{b}" for b in bits]], rows, num=range(1, len(bits) + 1)) + note
            + _img(elastic_plot(t.rows, t.fp32), "top-1 of every uniform subnet per form"))


def _section_pareto(inp: ReportInputs) -> str:
    from deployq.plots import pareto_plot

    s = inp.search
    if s is None:
        return _missing("No search result was given (deployq report --search subnet.json).")
    front = [(r.cost, r.predicted) for r in s.rows if r.kind == "front"]
    cands = [(r.cost, r.predicted, r.measured, r.chosen) for r in s.rows if r.kind == "candidate"]
    uni = [(r.spec_id.replace("uniform-", ""), r.cost, r.measured) for r in s.rows if r.kind == "uniform"]
    png = pareto_plot(front, cands, uni, s.cost_kind, s.budget)
    # The chosen subnet, the best few other re-measured candidates, every uniform subnet.
    cand = sorted((r for r in s.rows if r.kind == "candidate"), key=lambda r: (not r.chosen, -(r.measured or 0)))
    shown = cand[:MAX_CANDIDATES] + [r for r in s.rows if r.kind == "uniform"]
    rows = []
    for r in shown:
        rows.append([_e(r.kind + (" (chosen)" if r.chosen else "")), f"<code>{_e(r.spec_id)}</code>",
                     _e(f"{r.cost:g}"), _e(_pct(r.predicted)), _e(_pct(r.measured))])
    budget = f" Budget: {s.cost_kind} &le; {s.budget:g}." if s.budget is not None else ""
    more = f" ({len(cand) - MAX_CANDIDATES} more candidates in the CSV)" if len(cand) > MAX_CANDIDATES else ""
    note = (f'<p class="note">{len(front)} configurations on the predictor\'s front; top candidates{more} and '
            f"uniform subnets re-measured on the held-out training split (never the reported validation "
            f"split).{budget} Source: <code>{_e(s.source)}</code>.</p>")
    return _img(png, "Pareto front of the search") + note + _table(
        ["kind", "subnet", f"cost ({s.cost_kind})", "predicted top-1", "measured top-1"], rows, num=(2, 3, 4))


def _section_subnet(inp: ReportInputs) -> str:
    from deployq.plots import bits_plot

    s = inp.search
    if s is None:
        return _missing("No searched subnet was given.")
    spec = s.spec
    layers = [(n, ls.weight.bits if ls.weight is not None else None, ls.act.bits) for n, ls in spec.layers.items()]
    any_w = next((ls.weight for ls in spec.layers.values() if ls.weight is not None), None)
    any_a = next(iter(spec.layers.values())).act
    form = ""
    if any_w is not None:
        form = (f" Form: {any_w.granularity} {'symmetric' if any_w.symmetric else 'asymmetric'} weights, "
                f"{'symmetric' if any_a.symmetric else 'asymmetric'} activations.")
    note = (f'<p class="note">{len(layers)} quantized layers ({bits_label(spec)}); "-" marks residual-add '
            f"quantizers, which have no weight.{_e(form)}</p>")
    return _img(bits_plot(layers), "per-layer bit-widths of the chosen subnet") + note


def _section_acc_lat(inp: ReportInputs) -> str:
    from deployq.plots import accuracy_latency_plot

    pts = [{"label": (m.bits.split(" (")[0]) if m.profile else "fp32", "profile": m.profile, "backend": m.backend,
                "latency_ms": m.p50_ms, "top1": m.top1, "simulated": m.simulated} for m in inp.models]
    if not any(p["latency_ms"] is not None for p in pts):
        return _missing("No latency measurements in the validate reports.")
    note = ('<p class="note">Circles: onnxruntime CPU; squares: QNN HTP (hollow = simulated latency, '
            "not a device timing). Colours: target profile.</p>")
    return _img(accuracy_latency_plot(pts), "accuracy vs latency per profile") + note


def _section_env(inp: ReportInputs) -> str:
    if not inp.environment:
        return _missing("No environment recorded (it comes from the validate reports).")
    rows = []
    for k, v in inp.environment.items():
        if isinstance(v, Mapping):
            v = "; ".join(f"{b}: {x}" for b, x in v.items())
        rows.append([_e(k), _e(v)])
    return _table(["what", "value"], rows)


def _section_checkpoint(inp: ReportInputs) -> str:
    c = inp.checkpoint
    if not c:
        return _missing("No checkpoint was given.")
    pre = c.get("preprocessing", {})
    tc = c.get("train_config", {})
    space = c.get("space", {})
    rows = [
        ("file", c.get("path", "")),
        ("sha256", c.get("sha256", "")),
        ("model", f"{c.get('model')} {json.dumps(c.get('model_args', {}), sort_keys=True)}"),
        ("input", f"{pre.get('channels')}x{pre.get('size')}x{pre.get('size')}"),
        ("classes", ", ".join(map(str, c.get("class_names", [])))),
        ("elastic space", (f"weight bits {space.get('wbits')}, act bits {space.get('abits')}, "
                          f"{len(space.get('forms', []))} forms, first/last fixed at {space.get('fixed_bits')}")),
        ("training", (f"data {tc.get('data')}, {tc.get('warmup_epochs')} FP32 warm-up + {c.get('epochs', c.get('epoch'))} "
                     f"supernet epochs, batch {tc.get('batch_size')}, WDR {tc.get('wdr')}, GPG {tc.get('gpg')}")),
    ]
    return _table(["what", "value"], [[_e(k), _e(v)] for k, v in rows])


_RENDER = {
    "summary": _section_summary,
    "elastic": _section_elastic,
    "pareto": _section_pareto,
    "subnet": _section_subnet,
    "accuracy-latency": _section_acc_lat,
    "environment": _section_env,
    "checkpoint": _section_checkpoint,
}


def render_html(inp: ReportInputs) -> str:
    """The whole report as one HTML string (no external resources)."""
    nav = "".join(f'<a href="#{sid}">{_e(title.split(":")[0])}</a>' for sid, title in SECTIONS)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{_RENDER[sid](inp)}</section>' for sid, title in SECTIONS
    )
    notes = ""
    if inp.notes:
        notes = '<div class="notes"><b>Notes</b><ul>' + "".join(f"<li>{_e(n)}</li>" for n in inp.notes) + "</ul></div>"
    sub = f"generated {_e(inp.created)}" if inp.created else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(inp.title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(inp.title)}</h1><p>{sub}</p><nav>{nav}</nav></header>"
        f"<main>{notes}{body}</main></body></html>\n"
    )


# --------------------------------------------------------------------------- assembling


def merge_environments(reports: Sequence) -> dict:
    """Keys every report agrees on map to the value; others map to {backend: value}."""
    out: dict = {}
    keys: list[str] = []
    for r in reports:
        keys += [k for k in r.environment if k not in keys]
    for k in keys:
        per = {}
        for r in reports:
            if k in r.environment:
                per.setdefault(r.backend, r.environment[k])
        vals = {r.environment.get(k) for r in reports if k in r.environment}
        out[k] = vals.pop() if len(vals) == 1 else per
    return out


def checkpoint_facts(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata (no model is built)."""
    from deployq.checkpoint import CheckpointMeta, file_sha256, read_payload

    payload = read_payload(path)
    try:
        meta = CheckpointMeta.from_dict(json.loads(payload["meta_json"]))
    except (KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{str(path)!r}: checkpoint metadata unreadable ({e})") from None
    d = meta.to_dict()
    d["path"] = Path(path).name  # the report may travel; the name is what identifies it
    d["sha256"] = file_sha256(path)
    return d


def collect(
    checkpoint: str | os.PathLike | None = None,
    validate_reports: Sequence[str | os.PathLike] = (),
    search: str | os.PathLike | SearchInputs | None = None,
    elastic: str | os.PathLike | ElasticTable | None = None,
    *,
    budget: float | None = None,
    title: str = "deployq report",
    notes: Sequence[str] = (),
) -> ReportInputs:
    """Read every input (UserError on the first bad one) into ReportInputs."""
    from deployq.report_io import load_report

    ck = checkpoint_facts(checkpoint) if checkpoint is not None else None
    if isinstance(elastic, ElasticTable) or elastic is None:
        table = elastic
    else:
        table = load_elastic(elastic)
    if table is None and ck is not None:
        table = ElasticTable.from_metrics(ck.get("metrics", {}), f"checkpoint {Path(str(checkpoint)).name}")
    if isinstance(search, SearchInputs) or search is None:
        s = search
    else:
        s = load_search(search, budget)
    reports = [(p, load_report(p)) for p in validate_reports]
    return ReportInputs(
        title=title,
        checkpoint=ck,
        elastic=table,
        search=s,
        models=tuple(model_row(r, p) for p, r in reports),
        environment=merge_environments([r for _, r in reports]),
        notes=tuple(notes),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def build_report(
    checkpoint: str | os.PathLike | None = None,
    validate_reports: Sequence[str | os.PathLike] = (),
    search: str | os.PathLike | SearchInputs | None = None,
    elastic: str | os.PathLike | ElasticTable | None = None,
    out: str | os.PathLike = "report.html",
    *,
    budget: float | None = None,
    title: str = "deployq report",
    notes: Sequence[str] = (),
) -> Path:
    """Read the inputs, render, write `out` atomically; returns its path."""
    out = check_writable(out)
    inputs = collect(checkpoint, validate_reports, search, elastic, budget=budget, title=title, notes=notes)
    write_text(out, render_html(inputs))
    return out


__all__ = [
    "SECTIONS",
    "ElasticTable",
    "ModelRow",
    "ParetoPoint",
    "ReportInputs",
    "SearchInputs",
    "bits_label",
    "build_report",
    "collect",
    "load_elastic",
    "load_search",
    "model_row",
    "pareto_csv_path",
    "render_html",
]
