"""Validate an ONNX classifier on a real runtime: accuracy, agreement, latency, gates.

`validate(config)` is the library entry point (the CLI is a thin wrapper). It never
raises for a failing gate: the Report carries GateResults, and `raise_for_gates`
turns failures into GateFailed for callers that want an exception (the CLI, after
writing the report files).

Costs are kept at the runtime's: batches are zero-copy slices of one contiguous
array, logits go into one preallocated array, metrics are vectorised at the end.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deployq import backends, onnx_meta
from deployq.errors import GateFailed, UserError
from deployq.report_io import (
    Accuracy,
    DataInfo,
    GateResult,
    Latency,
    ModelInfo,
    ReferenceResult,
    Report,
    load_report,
)

LATENCY_STATS = ("p50", "p90", "p99")
SAME_BACKEND = "same"


@dataclass(frozen=True)
class ValidateConfig:
    """Everything one validation run needs. Accuracy thresholds are in percent.

    min_top1: minimum top-1 in percent (98.5 means 98.5 %).
    max_drop: maximum top-1 drop in percentage points against the baseline report's
        top-1, or, without a baseline, against the reference model's top-1.
    max_latency_ms: maximum `latency_stat` latency at every batch in latency_batches.
    size/channels/mean/std: preprocessing when the model does not record its own.
    reference_backend: backend that runs the reference model; "same" = `backend`.
    """

    model: str
    data: str = "digits"
    split: str | None = None  # None: "val" where the source has one (digits: the reported split)
    backend: str = backends.DEFAULT
    batch_size: int = 64
    latency_batches: tuple[int, ...] = (1,)
    warmup: int = 10
    iters: int = 50
    reference: str | None = None
    reference_backend: str = "onnxruntime"
    baseline: str | None = None
    min_top1: float | None = None
    max_drop: float | None = None
    max_latency_ms: float | None = None
    latency_stat: str = "p50"
    size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    providers: tuple[str, ...] | None = None  # onnxruntime backend only

    def resolved_split(self) -> str:
        """Explicit split, else "val" where the source has one (digits, train/ + val/ trees)."""
        if self.split is not None:
            return self.split
        if self.data == "digits":
            return "val"
        root = Path(self.data)
        return "val" if (root / "val").is_dir() and (root / "train").is_dir() else "all"

    def check(self) -> None:
        """Refuse a config that cannot run, before anything is loaded."""
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1; got {self.batch_size}")
        if any(b < 1 for b in self.latency_batches):
            raise UserError(f"--latency-batch values must be >= 1; got {list(self.latency_batches)}")
        if self.warmup < 0 or self.iters < 1:
            raise UserError(f"need --warmup >= 0 and --iters >= 1; got {self.warmup}, {self.iters}")
        if self.latency_stat not in LATENCY_STATS:
            raise UserError(f"latency statistic must be one of {', '.join(LATENCY_STATS)}")
        if self.min_top1 is not None:
            if not 0 <= self.min_top1 <= 100:
                raise UserError(f"--min-top1 is a percentage in [0, 100]; got {self.min_top1:g}")
            if 0 < self.min_top1 <= 1:
                raise UserError(f"--min-top1 is a percentage: {self.min_top1:g} looks like a "
                                f"fraction; write {self.min_top1 * 100:g} for {self.min_top1:.1%}")
        if self.max_drop is not None:
            if self.max_drop < 0:
                raise UserError(f"--max-drop is in percentage points, >= 0; got {self.max_drop:g}")
            if self.baseline is None and self.reference is None:
                raise UserError("--max-drop needs --baseline report.json or --reference model.onnx")
        if self.max_latency_ms is not None:
            if self.max_latency_ms <= 0:
                raise UserError(f"--max-latency-ms must be > 0; got {self.max_latency_ms:g}")
            if not self.latency_batches:
                raise UserError("--max-latency-ms needs at least one --latency-batch")
        if self.providers and self.backend != "onnxruntime":
            raise UserError("--providers applies to the onnxruntime backend only")


# --------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class ModelFacts:
    path: str
    sha256: str
    input_shape: tuple  # ints, None for free dims
    n_classes: int | None  # None when the output's class dim is symbolic
    meta: dict


def _dims(value_info) -> tuple:
    t = value_info.type.tensor_type
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in t.shape.dim)


def read_model(path: str) -> ModelFacts:
    """Metadata and I/O shapes of an ONNX file, or a one-line UserError."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"model {path!r} does not exist" if not p.exists()
                        else f"model {path!r} is not a file")
    data = p.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise UserError(f"{path} is not an ONNX model (no graph)")
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"{path}: expected one image input, the model has {len(inputs)}")
    in_shape = _dims(inputs[0])
    out_shape = _dims(model.graph.output[0])
    try:
        meta = onnx_meta.read(model)
    except ValueError as e:  # malformed JSON in a deployq.* key
        raise UserError(f"{path}: unreadable deployq metadata: {e}") from None
    n_classes = out_shape[-1] if len(out_shape) == 2 else None
    return ModelFacts(path, hashlib.sha256(data).hexdigest(), in_shape, n_classes, meta)


def _fmt_shape(shape: Sequence) -> str:
    return "(" + ", ".join("N" if i == 0 and d is None else ("?" if d is None else str(d))
                           for i, d in enumerate(shape)) + ")"


# --------------------------------------------------------------------------- preprocessing


def resolve_preprocessing(config: ValidateConfig, facts: ModelFacts):
    """(Preprocessing, where it came from): model metadata, else flags, else the data."""
    from deployq.data import Preprocessing, infer_preprocessing

    flags = {k: v for k, v in (("size", config.size), ("channels", config.channels),
                               ("mean", config.mean), ("std", config.std)) if v is not None}
    recorded = facts.meta.get(onnx_meta.PREPROCESSING)
    if recorded is not None:
        pre = Preprocessing.from_dict(recorded)
        for k, v in flags.items():
            have = getattr(pre, k)
            if (tuple(v) if isinstance(v, (list, tuple)) else v) != have:
                raise UserError(f"--{k} {v} contradicts the preprocessing recorded in the model "
                                f"({k}={have}); drop the flag")
        return pre, "model"
    if not flags:
        return infer_preprocessing(config.data), "data"
    base = infer_preprocessing(config.data)
    channels = flags.get("channels", base.channels)
    d = base.to_dict()
    d["channels"] = channels
    d["size"] = flags.get("size", base.size)
    # mean/std must have one value per channel: a single value is broadcast
    for k in ("mean", "std"):
        v = tuple(flags.get(k, (d[k][0],)))
        d[k] = list(v * channels if len(v) == 1 else v)
    return Preprocessing.from_dict(d), "flags"


def check_fit(facts: ModelFacts, pre, source: str) -> None:
    """The model's input must take (N, channels, size, size)."""
    want = (None, pre.channels, pre.size, pre.size)
    shape = facts.input_shape
    fits = len(shape) == 4 and all(m is None or m == w for m, w in zip(shape[1:], want[1:]))
    if not fits:
        raise UserError(
            f"model input shape {_fmt_shape(shape)} does not fit the data {_fmt_shape(want)} "
            f"from {source} (channels={pre.channels}, size={pre.size}); pass --size/--channels "
            "or use a model that records its preprocessing"
        )


def check_classes(facts: ModelFacts, class_names: tuple[str, ...], n_outputs: int | None) -> None:
    recorded = facts.meta.get(onnx_meta.CLASS_NAMES)
    if recorded is not None and tuple(recorded) != tuple(class_names):
        recorded = tuple(recorded)
        diff = next((i for i, (a, b) in enumerate(zip(recorded, class_names)) if a != b),
                    min(len(recorded), len(class_names)))
        def show(names):
            return repr(names[diff]) if diff < len(names) else "(none)"
        raise UserError(
            f"the model's classes differ from the data's: {len(recorded)} vs {len(class_names)} "
            f"classes, first difference at index {diff}: model {show(recorded)}, data "
            f"{show(class_names)}"
        )
    if n_outputs is not None and n_outputs != len(class_names):
        raise UserError(f"the model outputs {n_outputs} classes but the data has "
                        f"{len(class_names)} ({', '.join(class_names[:5])}"
                        f"{', ...' if len(class_names) > 5 else ''})")


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as p:
        yield p


def run_logits(session, x: np.ndarray, batch_size: int, progress=None,
               label: str = "inference") -> np.ndarray:
    """Logits for all of x, in batches. A session with a fixed batch gets a padded last batch."""
    n = len(x)
    fixed = session.batch_size
    b = fixed or batch_size
    task = progress.add_task(label, total=n) if progress is not None else None
    out = None
    pad = None
    for start in range(0, n, b):
        xb = x[start:start + b]
        m = len(xb)
        if fixed and m < fixed:  # static-shape runtimes: pad once, at the end
            pad = np.zeros((fixed, *x.shape[1:]), dtype=x.dtype)
            pad[:m] = xb
            xb = pad
        y = session.run(xb)
        if out is None:
            if y.ndim != 2 or y.shape[0] != len(xb):
                raise UserError(f"model output shape {tuple(y.shape)} is not (batch, classes) "
                                f"for a batch of {len(xb)}")
            out = np.empty((n, y.shape[1]), dtype=np.float32)
        out[start:start + m] = y[:m]
        if task is not None:
            progress.advance(task, m)
    if out is None:
        raise UserError("the data set is empty")
    return out


def topk_accuracy(logits: np.ndarray, y: np.ndarray, k: int) -> float:
    if k == 1:
        return float(np.count_nonzero(logits.argmax(1) == y) / len(y))
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float(np.count_nonzero((top == y[:, None]).any(1)) / len(y))


def latency_stats(times_ms: Sequence[float], batch_size: int, warmup: int,
                  simulated: bool) -> Latency:
    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, (50, 90, 99))
    return Latency(batch_size=batch_size, p50_ms=float(p50), p90_ms=float(p90),
                   p99_ms=float(p99), mean_ms=float(t.mean()),
                   throughput=float(batch_size / (p50 / 1e3)) if p50 > 0 else float("inf"),
                   warmup=warmup, iters=len(t), simulated=simulated)


def _latency_input(x: np.ndarray, b: int) -> np.ndarray:
    if len(x) >= b:
        return x[:b]
    return np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))


# --------------------------------------------------------------------------- gates (pure)


def evaluate_gates(
    top1: float,
    latency: Sequence[Latency],
    *,
    min_top1: float | None = None,
    max_drop: float | None = None,
    drop_base_top1: float | None = None,
    drop_base_name: str = "baseline",
    max_latency_ms: float | None = None,
    latency_stat: str = "p50",
) -> tuple[GateResult, ...]:
    """Gate results. Accuracies are fractions; thresholds in percent / points / ms."""
    eps = 1e-9
    gates: list[GateResult] = []
    top1_pct = top1 * 100
    if min_top1 is not None:
        margin = top1_pct - min_top1
        ok = margin >= -eps
        gates.append(GateResult(
            "min_top1", ok, top1_pct, min_top1,
            f"min_top1: top-1 {top1_pct:.2f}% {'>=' if ok else '<'} {min_top1:.2f}% "
            + (f"(margin {margin:+.2f} points)" if ok else f"({-margin:.2f} points below)")))
    if max_drop is not None:
        if drop_base_top1 is None:
            raise UserError("--max-drop needs a baseline or reference top-1")
        drop = (drop_base_top1 - top1) * 100
        ok = drop <= max_drop + eps
        base = drop_base_top1 * 100
        gates.append(GateResult(
            "max_drop", ok, drop, max_drop,
            f"max_drop: top-1 {top1_pct:.2f}% vs {drop_base_name} {base:.2f}%: drop "
            f"{drop:+.2f} points {'<=' if ok else '>'} {max_drop:.2f} "
            + ("allowed" if ok else f"allowed ({drop - max_drop:.2f} points over)")))
    if max_latency_ms is not None:
        for lat in latency:
            v = getattr(lat, f"{latency_stat}_ms")
            ok = v <= max_latency_ms
            sim = " (simulated)" if lat.simulated else ""
            gates.append(GateResult(
                f"max_latency_ms[batch={lat.batch_size}]", ok, v, max_latency_ms,
                f"max_latency_ms: {latency_stat} {v:.3f} ms at batch {lat.batch_size}{sim} "
                + (f"<= {max_latency_ms:g} ms" if ok
                   else f"> {max_latency_ms:g} ms ({v - max_latency_ms:.3f} ms over)")))
    return tuple(gates)


def raise_for_gates(report: Report) -> None:
    failed = report.failed_gates()
    if failed:
        raise GateFailed("; ".join(g.message for g in failed))


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8",
                                            errors="replace") as f:
        for line in f:
            if line.startswith(("model name", "Hardware", "Processor")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(versions: dict[str, str], provider: str) -> dict[str, str]:
    import deployq

    env = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "deployq": deployq.__version__,
        "provider": provider,
    }
    env.update(versions)
    return env


# --------------------------------------------------------------------------- validate


def _backend(name: str, providers: tuple[str, ...] | None):
    if name == "onnxruntime" and providers:
        from deployq.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(providers)
    return backends.get(name)


def _labels_sha256(y: np.ndarray, class_names: tuple[str, ...]) -> str:
    h = hashlib.sha256(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    h.update("\0".join(class_names).encode())
    return h.hexdigest()


def measure_reference(ref_backend, ref_name: str, config: ValidateConfig, x: np.ndarray,
                      y: np.ndarray, logits: np.ndarray, bar=None) -> ReferenceResult:
    """The reference model on the same images: its accuracy, agreement and logit error."""
    session = ref_backend.load(config.reference, config.batch_size)
    ref = run_logits(session, x, config.batch_size, bar, f"reference on {ref_name}")
    if ref.shape != logits.shape:
        raise UserError(f"the reference model outputs {ref.shape[1]} classes, "
                        f"the model {logits.shape[1]}")
    err = np.abs(logits - ref)
    return ReferenceResult(
        path=config.reference, backend=ref_name, provider=session.provider,
        top1=topk_accuracy(ref, y, 1),
        agreement=float(np.count_nonzero(logits.argmax(1) == ref.argmax(1)) / len(y)),
        max_abs_err=float(err.max()), mean_abs_err=float(err.mean()))


def measure_latencies(backend, session, config: ValidateConfig, x: np.ndarray,
                      bar=None) -> tuple[Latency, ...]:
    """Latency per requested batch; a fixed-batch runtime gets a session per batch size."""
    out = []
    for b in config.latency_batches:
        sess_b = session if session.batch_size in (None, b) else backend.load(config.model, b)
        task = bar.add_task(f"latency batch {b}", total=None) if bar is not None else None
        times = backends.measure_latency(sess_b, _latency_input(x, b), config.warmup,
                                         config.iters)
        if task is not None:
            bar.remove_task(task)
        out.append(latency_stats(times, b, config.warmup, sess_b.simulated))
    return tuple(out)


def validate(config: ValidateConfig, progress: bool = True) -> Report:
    """Run `config` and return the Report (gates evaluated, never raised)."""
    from deployq.data import load_data

    config.check()
    backend = _backend(config.backend, config.providers)  # unknown backend: fail before work
    ref_name = config.backend if config.reference_backend == SAME_BACKEND \
        else config.reference_backend
    ref_backend = None
    if config.reference:
        ref_backend = backend if ref_name == config.backend else backends.get(ref_name)
    facts = read_model(config.model)
    ref_facts = read_model(config.reference) if config.reference else None
    baseline = load_report(config.baseline) if config.baseline else None
    pre, pre_from = resolve_preprocessing(config, facts)
    check_fit(facts, pre, config.data)
    if ref_facts is not None:
        check_fit(ref_facts, pre, config.data)
    split = config.resolved_split()
    data = load_data(config.data, pre, split)
    if len(data) == 0:
        raise UserError(f"no images in {config.data} (split {split})")
    check_classes(facts, data.class_names, facts.n_classes)
    if ref_facts is not None and ref_facts.n_classes not in (None, len(data.class_names)):
        raise UserError(f"the reference model outputs {ref_facts.n_classes} classes but the "
                        f"data has {len(data.class_names)}")
    x = np.ascontiguousarray(data.x, dtype=np.float32)  # no-op for data.py's output
    y = data.y
    labels_sha = _labels_sha256(y, data.class_names)
    if baseline is not None and baseline.data.labels_sha256 != labels_sha:
        raise UserError(
            f"baseline {config.baseline} was measured on other data ({baseline.data.n_images} "
            f"images of {baseline.data.source}, split {baseline.data.split}); this run has "
            f"{len(y)} images of {config.data}, split {split}")
    versions = backend.versions()

    with _progress(progress) as bar:
        session = backend.load(config.model, config.batch_size)
        logits = run_logits(session, x, config.batch_size, bar, f"{config.backend}")
        if logits.shape[1] != len(data.class_names):
            check_classes(facts, data.class_names, logits.shape[1])
        n_cls = logits.shape[1]
        acc = Accuracy(top1=topk_accuracy(logits, y, 1),
                       top5=topk_accuracy(logits, y, 5) if n_cls >= 5 else None, n=len(y))

        ref_result = None
        if ref_backend is not None:
            ref_result = measure_reference(ref_backend, ref_name, config, x, y, logits, bar)
        latencies = measure_latencies(backend, session, config, x, bar)

    if baseline is not None:
        base_top1, base_name = baseline.accuracy.top1, f"baseline {config.baseline}"
    elif ref_result is not None:
        base_top1, base_name = ref_result.top1, f"reference {config.reference}"
    else:
        base_top1, base_name = None, ""
    gates = evaluate_gates(
        acc.top1, latencies, min_top1=config.min_top1,
        max_drop=config.max_drop, drop_base_top1=base_top1, drop_base_name=base_name,
        max_latency_ms=config.max_latency_ms, latency_stat=config.latency_stat)

    return Report(
        model=ModelInfo(path=config.model, sha256=facts.sha256, input_shape=facts.input_shape,
                        n_classes=n_cls, kind=facts.meta.get(onnx_meta.KIND),
                        profile=facts.meta.get(onnx_meta.PROFILE)),
        data=DataInfo(source=config.data, split=split, n_images=len(y),
                      n_classes=len(data.class_names), labels_sha256=labels_sha,
                      preprocessing=pre.to_dict(), preprocessing_from=pre_from),
        backend=config.backend,
        provider=session.provider,
        simulated=session.simulated,
        accuracy=acc,
        reference=ref_result,
        latency=latencies,
        environment=environment(versions, session.provider),
        gates=gates,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
