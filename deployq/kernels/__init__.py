"""Optional compiled CPU kernels (fused fake-quant forward / backward).

The C source ships as package data and is compiled on first use with the system C
compiler ($CC, else `cc`; -O3, -march=native and OpenMP when the compiler takes
them) into a per-user cache (DEPLOYQ_KERNEL_CACHE, else
$XDG_CACHE_HOME/deployq/kernels, else ~/.cache/deployq/kernels), keyed by the source,
the compiler command, the flags and the machine, so a shared home never loads a binary
built for another CPU. The file is written under a temporary name and renamed: two DDP
ranks compiling at once both end with one complete file. No compiler, a failed build
or DEPLOYQ_KERNELS=0: `get()` returns None and callers use their torch code (a
debug-level log line, no error). No Python build step, no new dependency.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = "fakequant.c"
ABI = 9  # deployq_fq_abi() of a binary this loader can call
# Never -ffast-math: the forward must be IEEE bit for bit (ONNX parity). -ffp-contract=off:
# no fused multiply-adds (GCC contracts by default in GNU C mode).
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off")
NATIVE_FLAGS = ("-march=native",)
# Threads over one large tensor. The binary links libgomp.so.1, which resolves to the copy
# torch has already loaded (torch is imported first): one OpenMP runtime in the process.
OPENMP_FLAGS = ("-fopenmp",)
# Tried in this order; the first that compiles and loads is used.
FLAG_SETS = (
    BASE_FLAGS + NATIVE_FLAGS + OPENMP_FLAGS,
    BASE_FLAGS + NATIVE_FLAGS,
    BASE_FLAGS,
)

_UNSET = object()
_lib = _UNSET


def enabled() -> bool:
    return os.environ.get("DEPLOYQ_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    explicit = os.environ.get("DEPLOYQ_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deployq" / "kernels"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def _machine_id() -> str:
    """What -march=native depends on: architecture plus the CPU's model and features."""
    parts = [platform.system(), platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU implementer", "CPU part", "cpu model"):
                    parts.append(line.strip())
                if line.strip() == "" and len(parts) > 2:
                    break  # the first processor's block is enough
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _key(source: bytes, cc: list[str], flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (source, "\0".join(cc).encode(), "\0".join(flags).encode(), _machine_id().encode()):
        h.update(part)
        h.update(b"\1")
    return h.hexdigest()[:20]


def _compile(cc: list[str], flags: tuple[str, ...], src: Path, dst: Path) -> bool:
    """Build src into dst atomically; False (and nothing at dst) if the compiler fails."""
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        cmd = [*cc, *flags, "-o", tmp, str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if r.returncode != 0:
            log.debug("kernel build failed (%s): %s", " ".join([*cc, *flags]), r.stderr.strip()[-500:])
            return False
        os.replace(tmp, dst)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("kernel build failed (%s): %s", " ".join(cc), e)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(directory: Path | None = None, flag_sets=FLAG_SETS) -> tuple[Path, bool] | None:
    """(path of the compiled library, whether this call compiled it) for the first of
    flag_sets the compiler accepts, or None when it cannot be built."""
    for path, compiled in _builds(directory, flag_sets):
        return path, compiled
    return None


def _builds(directory: Path | None, flag_sets):
    """Yield (path, compiled) for each flag set that builds (cached or compiled now)."""
    directory = cache_dir() if directory is None else Path(directory)
    cc = _compiler()
    source = resources.files(__name__).joinpath(SOURCE).read_bytes()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.debug("kernel cache %s not usable: %s", directory, e)
        return
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / SOURCE
        src.write_bytes(source)
        for flags in flag_sets:
            dst = directory / f"fakequant-{_key(source, cc, flags)}.so"
            if dst.exists():
                _touch(dst)
                yield dst, False
            elif _compile(cc, flags, src, dst):
                prune(directory, keep=dst)
                yield dst, True


PRUNE_AFTER_S = 30 * 24 * 3600


def _touch(path: Path) -> None:
    # the mtime marks the last use: prune() removes builds no deployq has loaded for a month
    with contextlib.suppress(OSError):
        os.utime(path)


def prune(directory: Path, keep: Path | None = None, older_than_s: float = PRUNE_AFTER_S) -> list[Path]:
    """Remove cached builds unused for `older_than_s` (other source versions, compilers,
    machines sharing a home). A build removed while still wanted is recompiled in about a
    second. Returns what was removed."""
    import time

    cutoff = time.time() - older_than_s
    removed = []
    for f in Path(directory).glob("fakequant-*.so"):
        try:
            if f != keep and f.stat().st_mtime < cutoff:
                f.unlink()
                removed.append(f)
        except OSError:
            continue
    return removed


def _bind(path: Path) -> ctypes.CDLL | None:
    lib = ctypes.CDLL(str(path))
    lib.deployq_fq_abi.restype = ctypes.c_int
    if lib.deployq_fq_abi() != ABI:
        return None
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.deployq_fq_forward.argtypes = [p, p, p, i64, i64, p, p, i32, f32, f32]
    lib.deployq_fq_forward.restype = None
    lib.deployq_fq_backward.argtypes = [p, p, p, p, p, i64, i64, f32, f32, p, p, f32, p, p]
    lib.deployq_fq_backward.restype = None
    lib.deployq_lfq_forward.argtypes = [p, p, i64, i64, p, p, i32, f32, f32, f32, p, p, p, i32, i32]
    lib.deployq_lfq_forward.restype = None
    lib.deployq_lfq_forward_add.argtypes = [p, p, p, i64, p, p, i32, f32, f32, f32, p, p, p, i32, i32]
    lib.deployq_lfq_forward_add.restype = None
    lib.deployq_lfq_backward.argtypes = [p, p, p, i64, i64, p, p, i32, f32, f32, p, f32, p, f32, p, p, i32, i32]
    lib.deployq_lfq_backward.restype = None
    lib.deployq_rows_forward.argtypes = [p, i64, p, i64, i64, p, i64, p, p, p, p, p, f32, p, p, p, i32]
    lib.deployq_rows_forward.restype = None
    lib.deployq_rows_backward.argtypes = [p, p, i64, p, i64, i64, p, i64, p, p, p, p, p, p, p, p, f32, p, p, p, i32]
    lib.deployq_rows_backward.restype = None
    f64 = ctypes.c_double
    lib.deployq_wdr_stats.argtypes = [p, p, i64, f64, p]
    lib.deployq_wdr_stats.restype = None
    lib.deployq_wdr_grad.argtypes = [p, p, i64, f64, p, p, p]
    lib.deployq_wdr_grad.restype = None
    return lib


def load(directory: Path | None = None, flag_sets=FLAG_SETS) -> ctypes.CDLL | None:
    """Build (or reuse) and load the library; None if it is disabled or cannot be built."""
    if not enabled():
        return None
    import torch  # noqa: F401  (its libgomp first: the OpenMP build must bind to that one)

    try:
        for path, _ in _builds(directory, flag_sets):
            try:
                lib = _bind(path)
            except OSError as e:  # e.g. an OpenMP runtime that does not load
                log.debug("kernel %s does not load: %s", path.name, e)
                continue
            if lib is not None:
                return lib
    except OSError as e:  # unreadable cache
        log.debug("kernel load failed: %s", e)
    return None


def get() -> ctypes.CDLL | None:
    """The process-wide library (built on the first call), or None: use the torch path."""
    global _lib
    if _lib is _UNSET:
        _lib = load()
        if _lib is None:
            log.debug("deployq kernels unavailable; using the torch path")
    return _lib


def reset() -> None:
    """Forget the loaded library (tests; after changing DEPLOYQ_KERNELS or CC)."""
    global _lib
    _lib = _UNSET


@contextlib.contextmanager
def disabled():
    """The torch path inside the block (benchmarks and comparisons in one process)."""
    global _lib
    saved, _lib = _lib, None
    try:
        yield
    finally:
        _lib = saved
