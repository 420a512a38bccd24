"""Keep freed memory in the process (glibc malloc) for training loops.

PyTorch's CPU tensors come straight from malloc. With glibc's defaults, a loop that
allocates and frees activation-sized buffers (hundreds of KB to MB) keeps giving the
top of the heap back to the kernel and asking for it again, so every fresh buffer
page-faults and is zeroed by the kernel. Measured on the supernet's training step
(width-16 ResNet-20, 16x16 input): one elastic conv's backward 2.5 ms with the defaults,
1.2 ms with the heap kept. The cost is memory the process holds on to after its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for this setting on 64-bit
_TRIM_THRESHOLD = 1 << 30

_done = False


def keep_freed_memory() -> bool:
    """Tell glibc malloc to serve buffers up to 32 MB from the heap and not to trim it.
    Idempotent; returns whether the settings are in force (False off glibc/Linux)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done


__all__ = ["keep_freed_memory"]
