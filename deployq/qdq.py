"""Canonical integers -> a target's container: the conventions export converts.

The supernet stores every quantizer in its canonical range (spec.py): symmetric
signed codes in [-(2^(b-1)) (+1 narrow), 2^(b-1)-1] with zero-point 0, everything
else unsigned in [0, 2^b-1] with an integer zero-point. A target stores the same
integers in its container (int8, uint8, int4, uint4); a container of the other
signedness holds them shifted by 2^(b-1) (codes and zero-point together, so
(q - z) and therefore every dequantized value is unchanged).

Pure functions only: numpy in, numpy out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deployq.spec import QuantSpec

CONTAINER_RANGE = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
}
NUMPY_DTYPE = {"int8": np.int8, "uint8": np.uint8, "int4": np.int8, "uint4": np.uint8}


def shift_for(spec: QuantSpec, container: str) -> int:
    """The offset d added to codes and zero-point so [qmin+d, qmax+d] fits `container`."""
    if container not in CONTAINER_RANGE:
        raise ValueError(f"unknown container {container!r}")
    lo, hi = CONTAINER_RANGE[container]
    if lo <= spec.qmin and spec.qmax <= hi:
        return 0
    d = 2 ** (spec.bits - 1) * (1 if lo == 0 else -1)
    if not (lo <= spec.qmin + d and spec.qmax + d <= hi):
        raise ValueError(f"{spec.bits}-bit codes do not fit container {container}")
    return d


def to_container(codes: np.ndarray, zero_point: np.ndarray, spec: QuantSpec, container: str):
    """(codes, zero_point) in canonical integers -> the same grid in `container`,
    as numpy arrays of the container's numpy dtype (int4/uint4 carried in int8/uint8)."""
    d = shift_for(spec, container)
    dt = NUMPY_DTYPE[container]
    c = np.asarray(codes, dtype=np.int64) + d
    z = np.asarray(zero_point, dtype=np.int64) + d
    lo, hi = CONTAINER_RANGE[container]
    if c.size and (c.min() < lo or c.max() > hi) or z.size and (z.min() < lo or z.max() > hi):
        raise ValueError(f"codes outside container {container} after shift {d}")
    return c.astype(dt), z.astype(dt)


def is_emulated(spec: QuantSpec, container: str) -> bool:
    """b-bit quantization carried inside a wider container (narrow range is not emulation)."""
    lo, hi = CONTAINER_RANGE[container]
    return 2**spec.bits < hi - lo + 1


@dataclass(frozen=True)
class ActClamp:
    """The float range a b-bit activation quantizer clamps to: [(qmin-z)*s, (qmax-z)*s].

    Clip(x, lo, hi) followed by QuantizeLinear into the wider container gives exactly
    clamp(round(x / s) + z, qmin, qmax): round(lo / s) recovers qmin - z because
    lo / s is within a few ulps of that integer.
    """

    lo: np.float32
    hi: np.float32


def act_clamp(spec: QuantSpec, scale: float, zero_point: int) -> ActClamp:
    s = np.float32(scale)
    return ActClamp(np.float32(spec.qmin - zero_point) * s, np.float32(spec.qmax - zero_point) * s)


def unsigned_offset(spec: QuantSpec, zero_point: np.ndarray) -> np.ndarray:
    """AIMET/QNN 'offset' = -(zero-point in the unsigned b-bit grid).

    Signed codes map to the unsigned grid by +2^(b-1) (QNN's convention for
    symmetric encodings: offset -2^(b-1))."""
    z = np.asarray(zero_point, dtype=np.int64)
    u = z + (2 ** (spec.bits - 1) if spec.signed else 0)
    return -u
