"""`deployq profiles` lists targets; `deployq profiles show NAME_OR_PATH` prints one."""

from __future__ import annotations

from typing import Annotated

import typer

profiles_app = typer.Typer(help="Hardware target profiles.", add_completion=False)


@profiles_app.callback(invoke_without_command=True)
def _list(ctx: typer.Context) -> None:
    """List the shipped target profiles."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from deployq.profile import list_profiles, load_profile

    table = Table(title="deployq profiles")
    table.add_column("name")
    table.add_column("backend")
    table.add_column("description", overflow="fold")
    for name in list_profiles():
        p = load_profile(name)
        table.add_row(p.name, p.backend, p.description)
    Console(soft_wrap=True).print(table)


@profiles_app.command("show")
def show(
    name_or_path: Annotated[str, typer.Argument(help="Profile name or .toml path.")],
) -> None:
    """Print one profile: form, bits, containers, graph rules."""
    from rich.console import Console
    from rich.table import Table

    from deployq.profile import load_profile

    p = load_profile(name_or_path)
    d = p.to_dict()
    table = Table(title=f"profile {p.name}", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for k, v in d.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                table.add_row(f"{k}.{kk}", _fmt(vv))
        else:
            table.add_row(k, _fmt(v))
    table.add_row("form", _fmt(p.form.to_dict()))
    Console(soft_wrap=True).print(table)


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def register(app: typer.Typer) -> None:
    app.add_typer(profiles_app, name="profiles")
