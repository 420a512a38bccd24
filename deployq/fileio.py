"""Atomic file writes: a failure (exception, kill, full disk) never leaves a partial file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deployq.errors import UserError


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse an output path whose directory does not exist, before any work is done."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"output directory {str(parent)!r} does not exist (for {str(p)!r})")
    if p.is_dir():
        raise UserError(f"output path {str(p)!r} is a directory")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it over `path` only on success."""
    p = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """A text file the user named (config, profile, report), or one clear UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {str(p)!r}: {e}") from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())
