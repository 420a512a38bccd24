"""`deployq demo`: the whole pipeline on the built-in digits data, in one directory.

train the elastic supernet -> elastic table (every uniform subnet per target form) ->
mixed-precision search for `snpe` -> export for tensorrt / snpe / cpu at 8 bits and at
the lowest bit-width, the searched subnet and the FP32 reference -> validate every
export on onnxruntime CPU (agreement against the FP32 export) and on QNN HTP where
the profile's backend is qnn -> summary table, summary.json, report.html.

Nothing that looks finished is left by a run that fails or is interrupted: everything
is written into a sibling `.<out>.partial/` directory, `summary.json` is written last,
and only then is the directory renamed to `<out>`. A failed run removes its partial
directory; one killed outright leaves only the hidden `.partial`, which the next run
clears. `deployq report --demo DIR` refuses a directory without `summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from deployq.errors import UserError
from deployq.fileio import write_text

SUMMARY = "summary.json"
SUMMARY_SCHEMA = "deployq.DemoSummary"
SUMMARY_VERSION = 1
PARTIAL_MARK = ".deployq-demo-partial"  # proves a .partial directory is ours to delete
PROFILES = ("tensorrt", "snpe", "cpu")
SEARCH_PROFILE = "snpe"
DEFAULT_BUDGET = "avg-bits=3.5"  # between uniform w3a3 and w4a4: the pick is mixed


@dataclass(frozen=True)
class DemoSettings:
    """How much work a demo run does (training, search, timing)."""

    input_size: int
    width: int
    warmup_epochs: int
    epochs: int
    bits: tuple[int, ...]
    search_samples: int
    generations: int
    population: int
    parents: int
    top_k: int
    latency_warmup: int
    latency_iters: int


# digits up-sampled to 16x16 (FP32 ~99% in seconds); the supernet's training defaults
# (learning rates, losses) are deployq train's own.
DEFAULT = DemoSettings(
    input_size=16, width=8, warmup_epochs=20, epochs=10, bits=(2, 3, 4, 5, 6, 7, 8),
    search_samples=300, generations=30, population=100, parents=25, top_k=5,
    latency_warmup=10, latency_iters=100,
)
# Must finish in under 2 minutes on 2 cores (a test runs it). Six FP32 epochs, not three:
# after three the float net sat at 75-88% on val depending on the seed and the CPU (one
# supernet epoch then moves it by several points), too close to the 80% its test asks for.
FAST = DemoSettings(
    input_size=8, width=8, warmup_epochs=6, epochs=1, bits=(2, 4, 8),
    search_samples=24, generations=4, population=16, parents=4, top_k=2,
    latency_warmup=3, latency_iters=20,
)


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("deployq-demo")
    fast: bool = False
    force: bool = False
    budget: str = DEFAULT_BUDGET
    seed: int = 0

    @property
    def settings(self) -> DemoSettings:
        return FAST if self.fast else DEFAULT


@dataclass(frozen=True)
class DemoRow:
    """One line of the summary table: a model validated on one backend."""

    profile: str | None  # None for the FP32 reference
    bits: str  # "w8a8", "w2a2", "mixed (avg w.. a..)", "fp32"
    backend: str
    provider: str
    simulated: bool
    onnx_bytes: int
    weight_bytes: int  # weights at their bit-width (fp32: 4 bytes each), biases not counted
    top1: float | None
    agreement: float | None  # top-1 agreement with the FP32 export
    p50_ms: float | None  # batch 1
    model: str  # relative to the demo directory
    report: str | None  # relative to the demo directory
    status: str = "ok"  # "ok", "not run: ...", "failed: ..."

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class DemoResult:
    out: Path
    rows: tuple[DemoRow, ...]
    wall_s: float
    timings: dict
    qnn_available: bool
    search: dict  # budget, cost, measured / predicted accuracy, predictor metrics
    fast: bool

    @property
    def report_html(self) -> Path:
        return self.out / "report.html"

    @property
    def summary_json(self) -> Path:
        return self.out / SUMMARY


# --------------------------------------------------------------------------- directories


def _is_demo_dir(path: Path) -> bool:
    try:
        return json.loads((path / SUMMARY).read_text(encoding="utf-8")).get("schema") == SUMMARY_SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an output that cannot (or must not) be replaced, before any work."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"the parent directory of {str(out)!r} does not exist")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"output directory {str(out)!r} exists and is not empty; pass --force to "
                            "replace it or choose another --out")
        if not _is_demo_dir(out):
            # --force replaces a previous demo, never a directory of someone's files.
            raise UserError(f"--force only replaces an earlier `deployq demo` output; {str(out)!r} has no "
                            f"demo {SUMMARY}: choose another --out")


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _fresh_partial(out: Path) -> Path:
    p = partial_dir(out)
    if p.exists():
        if not (p / PARTIAL_MARK).exists():
            raise UserError(f"{str(p)!r} exists and was not made by deployq demo; remove it or choose another --out")
        shutil.rmtree(p)  # left by a run that was killed outright
    p.mkdir()
    (p / PARTIAL_MARK).write_text("deployq demo in progress; this directory is removed or renamed when it ends\n")
    for sub in ("models", "reports"):
        (p / sub).mkdir()
    return p


def _publish(partial: Path, out: Path) -> None:
    """Swap the finished partial directory in as `out` (replacing an empty dir or an old demo)."""
    (partial / PARTIAL_MARK).unlink()
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_summary(out: str | os.PathLike) -> dict:
    """summary.json of a finished demo, or a UserError saying the run did not finish."""
    d = Path(out)
    if not d.is_dir():
        raise UserError(f"demo directory {str(d)!r} does not exist")
    path = d / SUMMARY
    if not path.is_file():
        raise UserError(f"{str(d)!r} is not a finished deployq demo (no {SUMMARY}): the run failed or was "
                        "interrupted; run `deployq demo` again")
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable demo summary ({e})") from None
    if not isinstance(s, dict) or s.get("schema") != SUMMARY_SCHEMA or s.get("version") != SUMMARY_VERSION:
        raise UserError(f"{path} is not a deployq demo summary (schema {SUMMARY_SCHEMA} v{SUMMARY_VERSION})")
    return s


def report_from_demo(out: str | os.PathLike, html: str | os.PathLike) -> Path:
    """Rebuild report.html (or another file) from a finished demo directory."""
    from deployq.report import build_report

    d = Path(out)
    s = load_summary(d)
    f = s["files"]
    return build_report(
        d / f["checkpoint"],
        [d / r for r in f["reports"]],
        d / f["subnet"],
        d / f["elastic"],
        html,
        budget=s["search"]["budget_value"],
        title="deployq demo" + (" (--fast)" if s.get("fast") else ""),
        notes=tuple(s.get("notes", ())),
    )


# --------------------------------------------------------------------------- steps


class _Stages:
    """Stage headers on stderr and wall time per stage."""

    def __init__(self, progress: bool, total: int):
        self.progress, self.total, self.n = progress, total, 0
        self.timings: dict[str, float] = {}
        self.console = None
        if progress:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextlib.contextmanager
    def __call__(self, key: str, what: str):
        self.n += 1
        if self.console is not None:
            self.console.print(f"[bold cyan]deployq demo[/] [{self.n}/{self.total}] {what}")
        t0 = time.perf_counter()
        yield
        self.timings[key] = round(time.perf_counter() - t0, 2)

    def say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(f"  {msg}", highlight=False)


def _lowest_bits(profile, bits: tuple[int, ...]) -> int:
    ok = [b for b in bits if b in profile.weight_bits and b in profile.act_bits]
    if not ok:
        raise UserError(f"profile {profile.name} accepts none of the demo's bit-widths {list(bits)}")
    return min(ok)


def _weight_bytes(net, spec) -> int:
    """Bytes of the weights at their bit-width (what a native b-bit container would hold)."""
    from deployq.elastic import ElasticWeightless

    total = 0.0
    for name, m in net.layers():
        if isinstance(m, ElasticWeightless):
            continue
        bits = 32 if spec is None else spec.layers[name].weight.bits
        total += m.weight.numel() * bits / 8
    return round(total)


def _relative_report(report, model_rel: str, ref_rel: str | None):
    """The Report with model paths relative to the reports/ directory (the demo directory moves)."""
    model = dataclasses.replace(report.model, path=model_rel)
    ref = dataclasses.replace(report.reference, path=ref_rel) if report.reference is not None else None
    return dataclasses.replace(report, model=model, reference=ref)


def _elastic_table(net, meta, profiles, bits):
    from deployq.data import Preprocessing, load_data
    from deployq.evaluate import evaluate, form_key, uniform_table
    from deployq.report import ElasticTable

    val = load_data("digits", Preprocessing.from_dict(meta.preprocessing), split="val")
    rows = {}
    for p in profiles:
        table = uniform_table(net, val, [p.form], bits)
        rows[f"{p.name} ({form_key(p.form)})"] = next(iter(table.values()))
    return ElasticTable(rows, fp32=evaluate(net, val, None), split="val", source="deployq demo (val split)")


@contextlib.contextmanager
def _one_thread():
    """torch on one intra-op thread: these nets are tiny, and on a busy 2-core machine
    two spinning OpenMP threads made a supernet step ~10x slower (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A `kill` cleans up like Ctrl-C does (only the main thread can install handlers)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(config: DemoConfig, progress: bool = True) -> DemoResult:
    """Run the whole pipeline into `config.out` (see the module doc for the guarantees)."""
    t_start = time.perf_counter()
    out = Path(config.out)
    check_out_dir(out, config.force)
    from deployq.search.cost import parse_budget

    budget = parse_budget(config.budget)  # a bad budget fails before any work
    partial = _fresh_partial(out)
    try:
        with _one_thread(), _sigterm_as_interrupt():
            result = _run(config, out, partial, budget, progress, t_start)
            _publish(partial, out)
    except OSError as e:  # disk full, permissions: the user's to fix, and nothing is left behind
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"demo failed writing its outputs ({e.strerror or e}); nothing was published "
                        f"to {str(out)!r}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result


def _run(config: DemoConfig, out: Path, work: Path, budget, progress: bool, t_start: float) -> DemoResult:
    from deployq.checkpoint import load_checkpoint
    from deployq.export import export, subnet_from_args
    from deployq.profile import load_profile
    from deployq.report import bits_label, build_report
    from deployq.report_io import write_json
    from deployq.search.api import SearchConfig, search
    from deployq.train import TrainConfig, train
    from deployq.validate import ValidateConfig, validate

    s = config.settings
    stage = _Stages(progress, 7)
    profiles = [load_profile(n) for n in PROFILES]
    forms = tuple(dict.fromkeys(p.form for p in profiles))
    ckpt_path = work / "ckpt.pt"

    with stage("train", f"training the elastic supernet on digits ({s.input_size}x{s.input_size}, "
                        f"resnet20 width {s.width}, {s.warmup_epochs} FP32 + {s.epochs} supernet epochs, "
                        f"bits {','.join(map(str, s.bits))}, {len(forms)} target forms)"):
        train(TrainConfig(
            model="resnet20", data="digits", out=str(ckpt_path), epochs=s.epochs,
            warmup_epochs=s.warmup_epochs, input_size=s.input_size, width=s.width, wbits=s.bits,
            abits=s.bits, forms=forms, seed=config.seed, final_eval=False, threads=1,
        ), progress=progress)
        ckpt = load_checkpoint(ckpt_path)
        net = ckpt.net

    with stage("elastic", "elastic table: every uniform subnet in each target's form (val split)"):
        elastic = _elastic_table(net, ckpt.meta, profiles, s.bits)
        write_text(work / "elastic.json", elastic.to_json())
        for k, row in elastic.rows.items():
            stage.say(f"{k:<28} " + "  ".join(f"w{b}a{b} {100 * v:5.1f}%" for b, v in sorted(row.items())))

    with stage("search", f"mixed-precision search for {SEARCH_PROFILE}, budget {config.budget}"):
        sr = search(SearchConfig(
            checkpoint=ckpt_path, profile=SEARCH_PROFILE, budget=budget, n_samples=s.search_samples,
            generations=s.generations, population=s.population, parents=s.parents, top_k=s.top_k,
            seed=config.seed, out=work / "subnet.json",
        ), progress=progress)
        stage.say(f"chosen: {bits_label(sr.spec, net.fixed_layers)}, cost {sr.cost:.3g} (budget {sr.budget.value:g}), measured "
                  f"{100 * sr.measured_acc:.2f}% on the search's held-out training images, "
                  f"{100 * sr.final_measured:.2f}% on {sr.final_holdout} it never measured; predictor Kendall tau "
                  f"{sr.metrics.kendall_tau:.3f} vs {sr.metrics.target} accuracy, "
                  f"{sr.metrics.kendall_tau_top1:.3f} vs top-1")

    # name, profile, spec (None = fp32)
    jobs: list[tuple[str, object, object]] = [("fp32", None, None)]
    for p in profiles:
        for b in (max(s.bits), _lowest_bits(p, s.bits)):
            jobs.append((f"{p.name}-w{b}a{b}", p, subnet_from_args(net, p, bits=b)))
    snpe = next(p for p in profiles if p.name == SEARCH_PROFILE)
    jobs.append((f"{SEARCH_PROFILE}-mixed", snpe, sr.spec))

    exported: list[tuple[str, object, object, Path]] = []
    with stage("export", f"exporting {len(jobs)} models (QDQ ONNX per profile + FP32 reference)"):
        from deployq.data import Preprocessing, load_data

        # Targets that quantize the logits (QNN) take their range from real inputs.
        calib = load_data("digits", Preprocessing.from_dict(ckpt.meta.preprocessing), split="train").x[:512]
        for name, prof, spec in jobs:
            path = work / "models" / f"{name}.onnx"
            export(ckpt, prof, spec, path, fp32=prof is None, calibration=calib)
            exported.append((name, prof, spec, path))
        stage.say(", ".join(f"{n}.onnx" for n, *_ in exported))

    qnn_ok = importlib.util.find_spec("onnxruntime_qnn") is not None
    fp32_path = work / "models" / "fp32.onnx"
    rows: list[DemoRow] = []
    report_files: list[str] = []

    def run_validate(name, prof, spec, path, backend) -> None:
        rel_model = f"models/{path.name}"
        base = {
            "profile": prof.name if prof else None,
            "bits": "fp32" if spec is None else bits_label(spec, net.fixed_layers),
            "backend": backend,
            "onnx_bytes": path.stat().st_size,
            "weight_bytes": _weight_bytes(net, spec),
            "model": rel_model,
        }
        if backend == "qnn" and not qnn_ok:
            rows.append(DemoRow(**base, provider="", simulated=False, top1=None, agreement=None, p50_ms=None,
                                report=None, status="not run: onnxruntime-qnn is not installed"))
            return
        cfg = ValidateConfig(
            model=str(path), data="digits", backend=backend,
            reference=None if prof is None else str(fp32_path), reference_backend="onnxruntime",
            latency_batches=(1,), warmup=s.latency_warmup, iters=s.latency_iters,
        )
        try:
            rep = validate(cfg, progress=False)
        except UserError as e:
            if backend != "qnn":
                raise
            # QNN HTP refusing a graph is a finding of the demo, not a reason to stop it.
            rows.append(DemoRow(**base, provider="QNNExecutionProvider", simulated=True, top1=None,
                                agreement=None, p50_ms=None, report=None, status=f"failed: {str(e).replace(str(work), str(out))}"))
            return
        rel_report = f"reports/{name}.{backend}.json"
        write_json(_relative_report(rep, f"../{rel_model}", None if prof is None else "../models/fp32.onnx"),
                   work / rel_report)
        report_files.append(rel_report)
        lat = rep.latency[0] if rep.latency else None
        rows.append(DemoRow(
            **base, provider=rep.provider, simulated=rep.simulated, top1=rep.accuracy.top1,
            agreement=rep.reference.agreement if rep.reference else None,
            p50_ms=lat.p50_ms if lat else None, report=rel_report,
        ))

    n_val = len(exported) + sum(1 for _, p, _, _ in exported if p is not None and p.backend == "qnn")
    with stage("validate", f"validating {n_val} (model, runtime) pairs on onnxruntime CPU"
                           + (" and QNN HTP (simulator)" if qnn_ok else "; QNN HTP skipped: onnxruntime-qnn not installed")):
        for name, prof, spec, path in exported:
            run_validate(name, prof, spec, path, "onnxruntime")
            if prof is not None and prof.backend == "qnn":
                run_validate(name, prof, spec, path, "qnn")

    search_info = {
        "profile": SEARCH_PROFILE,
        "budget": str(sr.budget),
        "budget_kind": sr.budget.kind,
        "budget_value": sr.budget.value,
        "cost": sr.cost,
        "measured_acc": sr.measured_acc,
        "predicted_acc": sr.predicted_acc,
        "kendall_tau": sr.metrics.kendall_tau,
        "kendall_tau_target": sr.metrics.target,
        "kendall_tau_top1": sr.metrics.kendall_tau_top1,
        "rmse": sr.metrics.rmse,
        "bits": bits_label(sr.spec, net.fixed_layers),
    }
    notes = []
    if not qnn_ok:
        notes.append("QNN HTP was not run: onnxruntime-qnn is not installed (pip install 'deployq[qnn]').")
    notes += [f"{r.profile} {r.bits} on QNN HTP {r.status}" for r in rows if r.status.startswith("failed")]
    files = {"checkpoint": "ckpt.pt", "subnet": "subnet.json", "elastic": "elastic.json",
             "reports": report_files, "report_html": "report.html"}

    with stage("report", "writing report.html"):
        build_report(ckpt_path, [work / r for r in report_files], work / "subnet.json", work / "elastic.json",
                     work / "report.html", budget=sr.budget.value,
                     title="deployq demo" + (" (--fast)" if config.fast else ""), notes=notes)

    wall = time.perf_counter() - t_start
    with stage("summary", f"writing {SUMMARY} and publishing {out}"):
        summary = {
            "schema": SUMMARY_SCHEMA,
            "version": SUMMARY_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "fast": config.fast,
            "settings": dataclasses.asdict(s),
            "wall_s": round(wall, 1),
            "timings": stage.timings,
            "qnn_available": qnn_ok,
            "search": search_info,
            "elastic": elastic.to_dict(),
            "rows": [dataclasses.asdict(r) for r in rows],
            "files": files,
            "notes": notes,
        }
        write_text(work / SUMMARY, json.dumps(summary, indent=2) + "\n")  # last: marks the run done
    return DemoResult(out=out, rows=tuple(rows), wall_s=wall, timings=dict(stage.timings), qnn_available=qnn_ok,
                      search=search_info, fast=config.fast)


# --------------------------------------------------------------------------- table


def summary_table(result: DemoResult):
    """The demo's one table (rich); rows that did not run say why in a footnote."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"deployq demo{' --fast' if result.fast else ''}: digits, resnet20, "
                    f"{result.wall_s:.0f} s", title_justify="left")
    for col in ("profile", "bits", "backend", "ONNX size", "weights", "top-1", "agree FP32", "p50 b=1"):
        t.add_column(col, justify="left" if col in ("profile", "bits", "backend") else "right", no_wrap=True)
    notes: list[str] = []
    for r in result.rows:
        backend = {"onnxruntime": "ORT CPU", "qnn": "QNN HTP"}.get(r.backend, r.backend)
        cells = [r.profile or "fp32", r.bits, backend, f"{r.onnx_bytes / 1024:.0f} KiB",
                 f"{r.weight_bytes / 1024:.1f} KiB"]
        if r.ok:
            lat = "n/a" if r.p50_ms is None else f"{r.p50_ms:.3f} ms" + (" (sim)" if r.simulated else "")
            agree = "(ref)" if r.profile is None else f"{100 * r.agreement:.1f}%"
            t.add_row(*cells, f"{100 * r.top1:.1f}%", agree, lat)
        else:
            notes.append(r.status)
            word = "not run" if r.status.startswith("not run") else "failed"
            t.add_row(*cells, f"[yellow]{word} [{len(notes)}][/]", "", "")
    caption = []
    if any(r.simulated and r.ok for r in result.rows):
        caption.append("(sim): QNN HTP simulator on x86-64, not a device timing.")
    caption += [f"[{i}] {escape(n)}" for i, n in enumerate(notes, 1)]
    if caption:
        t.caption = "\n".join(caption)
        t.caption_justify = "left"
    return t


__all__ = [
    "DEFAULT",
    "FAST",
    "DemoConfig",
    "DemoResult",
    "DemoRow",
    "DemoSettings",
    "check_out_dir",
    "load_summary",
    "report_from_demo",
    "run_demo",
    "summary_table",
]
