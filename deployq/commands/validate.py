"""`deployq validate MODEL.onnx --data PATH`: accuracy, agreement, latency and CI gates."""

from __future__ import annotations

from pathlib import Path

import typer

from deployq import backends
from deployq.errors import UserError


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes numbers separated by commas, e.g. 0.5 or 0.485,0.456,0.406; "
                        f"got {text!r}") from None


def print_report(report, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"deployq validate: {Path(report.model.path).name}", show_header=False,
              title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    d, a = report.data, report.accuracy

    def row(what: str, value: str, style: str = "") -> None:  # values are text, never markup
        t.add_row(escape(what), (style + " " if style else "") + escape(value))

    pre = d.preprocessing
    row("data", f"{d.source} [{d.split}]: {d.n_images} images, {d.n_classes} classes, "
                f"{pre['channels']}x{pre['size']}x{pre['size']} "
                f"(preprocessing from {d.preprocessing_from})")
    row("backend", f"{report.backend} ({report.provider})"
                   + (" [simulated latency]" if report.simulated else ""))
    row("top-1", f"{a.top1:.2%}")
    if a.top5 is not None:
        row("top-5", f"{a.top5:.2%}")
    r = report.reference
    if r is not None:
        row("reference", f"{r.path} on {r.backend} ({r.provider}): top-1 {r.top1:.2%}")
        row("agreement", f"{r.agreement:.2%} top-1 agreement; logits max |err| "
                         f"{r.max_abs_err:.4g}, mean |err| {r.mean_abs_err:.4g}")
    for lat in report.latency:
        sim = " (simulated)" if lat.simulated else ""
        row(f"latency b={lat.batch_size}",
            f"p50 {lat.p50_ms:.3f} ms  p90 {lat.p90_ms:.3f}  p99 {lat.p99_ms:.3f}  "
            f"{lat.throughput:,.0f} img/s{sim}")
    for g in report.gates:
        row(f"gate {g.name}", g.message, "[green]PASS[/]" if g.passed else "[red]FAIL[/]")
    console.print(t)


def register(app: typer.Typer) -> None:
    names = ", ".join(backends.names())

    @app.command("validate")
    def validate_cmd(
        model: str = typer.Argument(..., help="ONNX model to validate."),
        data: str = typer.Option("digits", "--data", "-d",
                                 help="digits, an ImageFolder directory or an .npz (x, y)."),
        split: str = typer.Option(None, "--split",
                                  help="train, val or all (default: val where the data has one: digits, train/+val/ trees)."),
        backend: str = typer.Option(backends.DEFAULT, "--backend", "-b",
                                    help=f"Runtime to validate on: {names}."),
        batch_size: int = typer.Option(64, "--batch-size", help="Batch size for accuracy."),
        latency_batch: list[int] | None = typer.Option(  # noqa: B008
            None, "--latency-batch", help="Batch size to time (repeatable; default 1)."),
        no_latency: bool = typer.Option(False, "--no-latency", help="Skip latency measurement."),
        warmup: int = typer.Option(10, "--warmup", help="Untimed runs before timing."),
        iters: int = typer.Option(50, "--iters", help="Timed runs per latency batch size."),
        reference: str = typer.Option(None, "--reference",
                                      help="Reference model (e.g. fp32.onnx) for agreement."),
        reference_backend: str = typer.Option(
            "onnxruntime", "--reference-backend",
            help="Backend for the reference model, or 'same' for --backend."),
        baseline: str = typer.Option(None, "--baseline", help="Earlier report.json for --max-drop."),
        min_top1: float = typer.Option(None, "--min-top1", help="Gate: minimum top-1, percent."),
        max_drop: float = typer.Option(
            None, "--max-drop",
            help="Gate: max top-1 drop in percentage points vs --baseline (else --reference)."),
        max_latency_ms: float = typer.Option(
            None, "--max-latency-ms", help="Gate: max latency (ms) at every --latency-batch."),
        latency_stat: str = typer.Option("p50", "--latency-stat",
                                         help="Statistic --max-latency-ms gates: p50, p90, p99."),
        size: int = typer.Option(None, "--size", help="Input size when the model records none."),
        channels: int = typer.Option(None, "--channels", help="Input channels (1 or 3)."),
        mean: str = typer.Option(None, "--mean", help="Normalisation mean(s), comma-separated."),
        std: str = typer.Option(None, "--std", help="Normalisation std(s), comma-separated."),
        providers: str = typer.Option(
            None, "--providers", help="onnxruntime EPs in order, comma-separated."),
        json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON."),  # noqa: B008
        junit_out: Path | None = typer.Option(None, "--junit", help="Write JUnit XML (one case per gate)."),  # noqa: B008
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Validate a model on a runtime: accuracy, agreement, latency; exit 1 if a gate fails."""
        from rich.console import Console

        from deployq.fileio import check_writable
        from deployq.report_io import write_json, write_junit
        from deployq.validate import ValidateConfig, raise_for_gates, validate

        for out in (json_out, junit_out):
            if out is not None:
                check_writable(out)  # fail before minutes of work, not after
        config = ValidateConfig(
            model=model, data=data, split=split, backend=backend, batch_size=batch_size,
            latency_batches=() if no_latency else tuple(latency_batch or [1]), warmup=warmup,
            iters=iters, reference=reference, reference_backend=reference_backend,
            baseline=baseline, min_top1=min_top1, max_drop=max_drop,
            max_latency_ms=max_latency_ms, latency_stat=latency_stat, size=size,
            channels=channels, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
            providers=tuple(p.strip() for p in providers.split(",")) if providers else None,
        )
        report = validate(config, progress=not no_progress)
        # Reports are written before the gates raise: CI needs them most when a gate fails.
        if json_out is not None:
            write_json(report, json_out)
        if junit_out is not None:
            write_junit(report, junit_out)
        print_report(report, Console(soft_wrap=True))
        raise_for_gates(report)
