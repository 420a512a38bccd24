"""`deployq report`: one self-contained HTML file from a checkpoint and search/validate JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report_cmd(
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", "-c", help="Supernet checkpoint (.pt): facts and elastic table.")
    ] = None,
    validate: Annotated[
        list[Path] | None,
        typer.Option("--validate", "-v", help="Report JSON from `deployq validate --json` (repeatable)."),
    ] = None,
    search: Annotated[
        Path | None, typer.Option("--search", "-s", help="subnet.json from `deployq search` (its .pareto.csv beside it).")
    ] = None,
    elastic: Annotated[
        Path | None,
        typer.Option("--elastic", help="elastic.json (deployq.ElasticTable) when the checkpoint records no table."),
    ] = None,
    budget: Annotated[float | None, typer.Option("--budget", help="Search budget value to mark on the Pareto plot.")] = None,
    demo: Annotated[
        Path | None, typer.Option("--demo", help="A finished `deployq demo` directory: use all of its outputs.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("report.html"),
    title: Annotated[str, typer.Option("--title", help="Report title.")] = "deployq report",
) -> None:
    """Write one self-contained HTML report (plots embedded; opens offline)."""
    from deployq.errors import UserError
    from deployq.fileio import check_writable
    from deployq.report import build_report

    check_writable(out)
    if demo is not None:
        if any(v is not None for v in (checkpoint, validate, search, elastic, budget)):
            raise UserError("--demo takes its inputs from the demo directory; drop the other input options")
        from deployq.demo import report_from_demo

        path = report_from_demo(demo, out)
    else:
        if checkpoint is None and not validate and search is None and elastic is None:
            raise UserError("nothing to report: give --checkpoint, --validate, --search, --elastic or --demo")
        path = build_report(checkpoint, list(validate or ()), search, elastic, out, budget=budget, title=title)
    print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
