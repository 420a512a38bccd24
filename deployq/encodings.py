"""AIMET-style encodings JSON for Qualcomm QNN / SNPE (`--quantization_overrides`).

Layout (AIMET's legacy "encodings" format that qnn-onnx-converter reads):

    {"version": "0.6.1",
     "activation_encodings": {tensor: [{"bitwidth", "dtype": "int", "is_symmetric": "True"|"False",
                                        "scale", "offset", "min", "max"}]},
     "param_encodings":      {tensor: [one entry per output channel, or one]}}

`offset` is -zero_point in the unsigned b-bit grid (signed symmetric codes sit at
offset -2^(b-1)); `bitwidth` is the subnet's b, not the container's, so a 4-bit
quantizer emulated in uint8 is declared 4-bit. min / max are the clamp range
(qmin - z) * s .. (qmax - z) * s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deployq.errors import UserError
from deployq.qdq import unsigned_offset
from deployq.spec import QuantSpec

FORMAT_VERSION = "0.6.1"


@dataclass(frozen=True)
class TensorEncoding:
    tensor: str
    spec: QuantSpec
    scale: np.ndarray  # float32, [C] or [1]
    zero_point: np.ndarray  # canonical integers, same shape


def _entries(e: TensorEncoding) -> list[dict]:
    scale = np.asarray(e.scale, dtype=np.float32).reshape(-1)
    zp = np.broadcast_to(np.asarray(e.zero_point, dtype=np.int64).reshape(-1), scale.shape)
    offsets = unsigned_offset(e.spec, zp)
    out = []
    for s, z, off in zip(scale, zp, offsets):
        out.append(
            {
                "bitwidth": e.spec.bits,
                "dtype": "int",
                "is_symmetric": "True" if e.spec.symmetric else "False",
                "scale": float(s),
                "offset": int(off),
                "min": float(np.float32(e.spec.qmin - int(z)) * s),
                "max": float(np.float32(e.spec.qmax - int(z)) * s),
            }
        )
    return out


def build(activations: list[TensorEncoding], params: list[TensorEncoding]) -> dict:
    return {
        "version": FORMAT_VERSION,
        "activation_encodings": {e.tensor: _entries(e) for e in activations},
        "param_encodings": {e.tensor: _entries(e) for e in params},
    }


def dumps(enc: dict) -> str:
    return json.dumps(enc, indent=2, sort_keys=True) + "\n"


def load(path: str | Path) -> dict:
    """Read an encodings file back (what a test or a converter wrapper needs)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read encodings {str(path)!r}: {e}") from None
    if not isinstance(d, dict) or not {"activation_encodings", "param_encodings"} <= set(d):
        raise UserError(f"{str(path)!r} is not an AIMET-style encodings file")
    return d


def sidecar_path(onnx_path: str | Path) -> Path:
    p = Path(onnx_path)
    return p.with_suffix(".encodings") if p.suffix == ".onnx" else p.with_name(p.name + ".encodings")
