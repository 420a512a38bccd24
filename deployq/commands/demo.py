"""`deployq demo`: train, search, export, validate and report on the built-in digits data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (must not exist or be empty).")] = Path(
        "deployq-demo"
    ),
    fast: Annotated[bool, typer.Option("--fast", help="Tiny run (under 2 minutes): for smoke tests.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier demo output in --out.")] = False,
    budget: Annotated[str, typer.Option("--budget", help="Search budget for the snpe subnet, KIND=VALUE.")] = "avg-bits=3.5",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the final table.")] = False,
) -> None:
    """The whole pipeline on digits: supernet, search, exports for every profile, validation, report."""
    from rich.console import Console

    from deployq.demo import DemoConfig, run_demo, summary_table

    result = run_demo(DemoConfig(out=out, fast=fast, force=force, budget=budget, seed=seed), progress=not quiet)
    console = Console()
    if not console.is_terminal:  # piped / CI logs: rich would squeeze the table into 80 columns
        console = Console(width=130)
    console.print(summary_table(result))
    console.print(f"wrote {result.out}/ (report: {result.report_html}, summary: {result.summary_json})",
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
