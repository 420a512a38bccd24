"""`deployq check MODEL.onnx --profile NAME`: profile conformance of a QDQ graph."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deployq.errors import GateFailed, UserError


def load_onnx(path: Path):
    """Read an ONNX model or raise UserError (missing file, not ONNX)."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path))
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        raise UserError(
            f"{path} is not an ONNX model: {str(e).splitlines()[0] if str(e) else e}"
        ) from None
    if not model.graph.node:
        raise UserError(f"{path} is not an ONNX model (no graph nodes)")
    return model


def register(app: typer.Typer) -> None:
    @app.command("check")
    def check(
        model: Annotated[Path, typer.Argument(help="QDQ ONNX model to check.")],
        profile: Annotated[
            str, typer.Option("--profile", "-p", help="Target profile name or .toml path.")
        ],
    ) -> None:
        """Check an ONNX graph against a target profile's rules (exit 1 on violations)."""
        from rich.console import Console
        from rich.table import Table

        from deployq.check import RULE_IDS, check_model
        from deployq.profile import load_profile

        prof = load_profile(profile)
        violations = check_model(load_onnx(model), prof)
        console = Console(soft_wrap=True)
        if not violations:
            console.print(f"OK: {len(RULE_IDS)} rules passed ({prof.name})")
            return
        table = Table(title=f"{model.name}: {len(violations)} violation(s) of profile {prof.name}")
        for col in ("rule", "node", "problem", "why the target needs it"):
            table.add_column(col, overflow="fold")
        for v in violations:
            table.add_row(v.rule, v.node, v.message, v.why)
        console.print(table)
        failed = sorted({v.rule for v in violations})
        console.print(f"{len(RULE_IDS) - len(failed)} of {len(RULE_IDS)} rules passed")
        raise GateFailed(
            f"{len(violations)} violation(s) of profile {prof.name} in {model}: {', '.join(failed)}"
        )
