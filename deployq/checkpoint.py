"""The supernet checkpoint: one .pt of tensors plus plain metadata.

It loads with `torch.load(weights_only=True)`: no pickled objects, so a
checkpoint from the internet cannot run code. The metadata is one JSON string
(model name and args, elastic space, preprocessing, class names, training
config, per-subnet metrics); the model is rebuilt from the zoo (or from a
module the caller passes) and the state_dict loaded strictly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deployq.errors import UserError
from deployq.fileio import atomic_path
from deployq.spec import ElasticSpace

SCHEMA = "deployq.checkpoint"
VERSION = 1


@dataclass(frozen=True)
class CheckpointMeta:
    model: str  # zoo name, or "custom" for a user module
    model_args: dict[str, Any]
    space: ElasticSpace
    preprocessing: dict[str, Any]  # deployq.data.Preprocessing.to_dict()
    class_names: tuple[str, ...]
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. {"val_top1": {"w8a8/pc-sym": 0.99}}
    epoch: int = 0
    calibrated: bool = True

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "model_args": self.model_args,
            "space": self.space.to_dict(),
            "preprocessing": self.preprocessing,
            "class_names": list(self.class_names),
            "train_config": self.train_config,
            "metrics": self.metrics,
            "epoch": self.epoch,
            "calibrated": self.calibrated,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointMeta:
        try:
            return cls(
                model=d["model"],
                model_args=dict(d["model_args"]),
                space=ElasticSpace.from_dict(d["space"]),
                preprocessing=dict(d["preprocessing"]),
                class_names=tuple(d["class_names"]),
                train_config=dict(d.get("train_config", {})),
                metrics=dict(d.get("metrics", {})),
                epoch=int(d.get("epoch", 0)),
                calibrated=bool(d.get("calibrated", True)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"checkpoint metadata is incomplete or malformed ({e})") from None

    def with_(self, **changes) -> CheckpointMeta:
        return replace(self, **changes)


@dataclass
class Checkpoint:
    net: Any  # deployq.elastic.ElasticNet
    meta: CheckpointMeta
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # optimizer / scheduler / rng state

    @property
    def sha256(self) -> str:
        return file_sha256(self.path) if self.path else ""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | Path, net: nn.Module, meta: CheckpointMeta, extra: dict | None = None) -> None:
    """Atomically write the checkpoint (a crash mid-write leaves the old file intact)."""
    payload = {
        "schema": SCHEMA,
        "version": VERSION,
        "meta_json": json.dumps(meta.to_dict(), sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_payload(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {str(p)!r} does not exist")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises anything on garbage (KeyError on text)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{str(p)!r} is not a loadable deployq checkpoint ({first[:160]})") from None
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        raise UserError(f"{str(p)!r} is not a deployq checkpoint (no '{SCHEMA}' schema; another tool's file?)")
    if payload.get("version") != VERSION:
        raise UserError(
            f"{str(p)!r} has checkpoint version {payload.get('version')!r}; this deployq reads {VERSION}"
        )
    return payload


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> Checkpoint:
    """Rebuild the supernet and load its weights. `model` is the float module for
    checkpoints of user models (meta.model == "custom"); zoo models rebuild by name."""
    from deployq.elastic import convert
    from deployq.models import build_model

    payload = read_payload(path)
    try:
        meta = CheckpointMeta.from_dict(json.loads(payload["meta_json"]))
    except (KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{str(path)!r}: checkpoint metadata unreadable ({e})") from None
    if model is None:
        if meta.model == "custom":
            raise UserError("this checkpoint holds a custom model: load it from Python with load_checkpoint(path, model=...)")
        model = build_model(meta.model, **meta.model_args)
    net = convert(model, meta.space)
    try:
        net.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{str(path)!r}: weights do not fit model {meta.model!r} ({first[:160]})") from None
    net.eval()
    return Checkpoint(net=net, meta=meta, path=Path(path), extra=payload.get("extra", {}))
