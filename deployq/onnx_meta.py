"""The deployq metadata carried in an exported ONNX model's metadata_props.

Export writes it; validate and check read it. Values are strings (JSON where
structured) because ONNX metadata_props are string pairs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import onnx

PREFIX = "deployq."
VERSION = "deployq.version"  # deployq version that wrote the file
KIND = "deployq.kind"  # "qdq" or "fp32"
PROFILE = "deployq.profile"  # profile name (qdq only)
SUBNET = "deployq.subnet"  # SubnetSpec JSON (qdq only)
CHECKPOINT_SHA256 = "deployq.checkpoint_sha256"
MODEL = "deployq.model"  # JSON: {"name": ..., "args": {...}}
PREPROCESSING = "deployq.preprocessing"  # JSON: deployq.data.Preprocessing.to_dict()
CLASS_NAMES = "deployq.class_names"  # JSON list of str
EMULATED = "deployq.emulated"  # JSON list of {"tensor", "bits", "container"} emulated in 8-bit
FIXED_LAYERS = "deployq.fixed_layers"  # JSON list: layers the checkpoint pins (first/last)
# JSON: how the logits were quantized for targets that refuse a float output (QNN HTP).
OUTPUT_QUANTIZER = "deployq.output_quantizer"

JSON_KEYS = (SUBNET, MODEL, PREPROCESSING, CLASS_NAMES, EMULATED, OUTPUT_QUANTIZER, FIXED_LAYERS)


def write(model: onnx.ModelProto, values: Mapping[str, object]) -> None:
    """Set deployq metadata (JSON-encoding structured values), keeping other props."""
    keep = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key in sorted(values):
        v = values[key]
        text = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        model.metadata_props.add(key=key, value=text)


def read(model: onnx.ModelProto) -> dict[str, object]:
    """deployq metadata as Python values ({} for a model deployq did not write)."""
    out: dict[str, object] = {}
    for p in model.metadata_props:
        if not p.key.startswith(PREFIX):
            continue
        out[p.key] = json.loads(p.value) if p.key in JSON_KEYS else p.value
    return out
