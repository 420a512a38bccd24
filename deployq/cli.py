"""The `deployq` command: a thin typer app over the library.

Each command lives in `deployq/commands/<name>.py` and exposes
`register(app)`; commands build the library's dataclasses and call one
library function. Errors a user can cause end in one line and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

from deployq.errors import GateFailed, UserError

COMMAND_MODULES = ("train", "profiles", "export", "check", "validate", "search", "demo", "report")

app = typer.Typer(
    name="deployq",
    help="Train one elastic quantization supernet; export any subnet to TensorRT, QNN/SNPE or "
    "CPU as QDQ ONNX; validate it on the real runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        spec = importlib.util.find_spec(f"deployq.commands.{name}")
        if spec is None:  # command not written yet
            continue
        importlib.import_module(f"deployq.commands.{name}").register(app)


@app.callback()
def _root() -> None:
    """deployq."""


_register_all()


def _usage_exit_code(e: Exception) -> int | None:
    """Exit code for typer/click's own exceptions (usage errors, --help exits), else None.

    typer >= 0.20 bundles its own click; older ones use the click package: accept both."""
    import typer.exceptions as texc

    if isinstance(e, texc.Exit):
        return getattr(e, "exit_code", 0)
    if isinstance(e, texc.Abort):
        print("deployq: aborted", file=sys.stderr)
        return 130
    bases = []
    try:
        from typer._click.exceptions import ClickException as TClickException

        bases.append(TClickException)
    except ImportError:
        pass
    try:
        import click

        bases.append(click.ClickException)
        if isinstance(e, click.exceptions.Exit):
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 130
    except ImportError:
        pass
    if bases and isinstance(e, tuple(bases)):
        e.show()
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps UserError -> exit 2 and GateFailed -> exit 1 with one line."""
    try:
        rc = app(args=argv, prog_name="deployq", standalone_mode=False)
        if isinstance(rc, int) and rc:  # non-standalone typer returns 130 on Ctrl-C
            return rc
    except UserError as e:
        print(f"deployq: error: {e}", file=sys.stderr)
        return 2
    except GateFailed as e:
        print(f"deployq: gate failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deployq: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help and friends
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:
        code = _usage_exit_code(e)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
