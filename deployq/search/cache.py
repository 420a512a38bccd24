"""Samples and predictor cached next to the checkpoint, reused when still valid.

Layout: `<checkpoint>.cqap/<form tag>/` holding
  meta.json     what the cache is valid for (checkpoint sha256, form, data source,
                held-out split and copies, gene choices, net layout) + predictor info
  samples.npz   genes [N, G] int64, encodings [N, D] float32, top-1 accuracies [N]
                float32 (y), soft accuracies and NLL at every sampling.TEMPERATURES
                [N, T] float32 (soft_t, nll_t; soft = mean true-class probability)
  predictor.pt  the trained predictor (tensors and numbers: loads with weights_only=True)
A directory whose meta.json does not match the current key is ignored and rewritten.
Measuring is what costs; the cache lets a second search with another budget or seed
skip it. A cache that cannot be written (read-only checkpoint dir) is not an error.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deployq.errors import UserError
from deployq.fileio import atomic_path, write_bytes, write_text
from deployq.search.predictor import Predictor, PredictorConfig, PredictorMetrics
from deployq.search.sampling import TEMPERATURES
from deployq.spec import Form

# 2: soft accuracies, predictor target; 3: samples distinct; 4: the predictor reads
# ordinal bit features (its state holds the encoder's one-hot groups); 5: samples
# measured on the held-out images x `copies` shifted copies; 6: soft accuracy and NLL
# on a grid of temperatures (the predictor learns the calibrated one); 7: measured on
# the held-out images less the share kept apart for the final choice
CACHE_VERSION = 7


@dataclass(frozen=True)
class CacheKey:
    checkpoint_sha256: str
    form: dict
    data: str
    holdout: float
    holdout_seed: int
    n_measure: int  # held-out images the samples are measured on
    final_share: float  # of the held-out images, kept apart for the final choice
    copies: int  # each measured as this many shifted copies
    wchoices: tuple[int, ...]
    achoices: tuple[int, ...]
    layout: str  # NetLayout.fingerprint()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["wchoices"], d["achoices"] = list(self.wchoices), list(self.achoices)
        return d


def form_tag(form: Form) -> str:
    w = ("pc" if form.weight_per_channel else "pt") + ("-sym" if form.weight_symmetric else "-asym")
    a = ("sym-s" if form.act_signed else "sym-u") if form.act_symmetric else "asym"
    return f"w-{w}_a-{a}"


def cache_dir(checkpoint: str | Path, form: Form) -> Path:
    return Path(str(checkpoint) + ".cqap") / form_tag(form)


class SearchCache:
    def __init__(self, directory: Path, key: CacheKey, enabled: bool = True):
        self.dir = directory
        self.key = key
        self.enabled = enabled
        self._meta = self._read_meta() if enabled else None

    # --- meta ---------------------------------------------------------------
    def _read_meta(self) -> dict | None:
        try:
            meta = json.loads((self.dir / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("version") != CACHE_VERSION or meta.get("key") != self.key.to_dict():
            return None
        return meta

    def _write_meta(self, meta: dict) -> None:
        write_text(self.dir / "meta.json", json.dumps(meta, indent=2, sort_keys=True))
        self._meta = meta

    def _writable(self) -> bool:
        if not self.enabled:
            return False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            return True
        except OSError as e:
            print(
                f"deployq: warning: cannot write the search cache {self.dir} ({e})", file=sys.stderr
            )
            return False

    # --- samples ------------------------------------------------------------
    def load_samples(self) -> tuple[np.ndarray, ...] | None:
        """(genes, encodings, top-1, soft_t, nll_t) or None."""
        if not self._meta:
            return None
        try:
            with np.load(self.dir / "samples.npz") as z:
                genes, x, y = z["genes"], z["x"], z["y"]
                soft_t, nll_t = z["soft_t"], z["nll_t"]
        except (OSError, KeyError, ValueError):
            return None
        if len(genes) != self._meta.get("n_samples") or not (
            len(genes) == len(x) == len(y) == len(soft_t) == len(nll_t)
        ) or soft_t.shape[1:] != (len(TEMPERATURES),) or nll_t.shape != soft_t.shape:
            return None
        return genes, x, y, soft_t, nll_t

    def save_samples(
        self, genes: np.ndarray, x: np.ndarray, y: np.ndarray, soft_t: np.ndarray, nll_t: np.ndarray
    ) -> None:
        if not self._writable():
            return
        buf = io.BytesIO()
        np.savez(
            buf,
            genes=genes.astype(np.int64),
            x=x.astype(np.float32),
            y=y.astype(np.float32),
            soft_t=soft_t.astype(np.float32),
            nll_t=nll_t.astype(np.float32),
        )
        try:
            write_bytes(self.dir / "samples.npz", buf.getvalue())
            # New samples invalidate any predictor trained on fewer.
            self._write_meta(
                {"version": CACHE_VERSION, "key": self.key.to_dict(), "n_samples": len(y)}
            )
        except (OSError, UserError) as e:
            print(f"deployq: warning: cannot write the search cache ({e})", file=sys.stderr)

    # --- predictor ----------------------------------------------------------
    def load_predictor(
        self, config: PredictorConfig, n_samples: int, target: str
    ) -> tuple[Predictor, PredictorMetrics] | None:
        info = (self._meta or {}).get("predictor")
        if (
            not info
            or info.get("config") != config.to_dict()
            or info.get("n_samples") != n_samples
            or info.get("target") != target
        ):
            return None
        try:
            state = torch.load(self.dir / "predictor.pt", map_location="cpu", weights_only=True)
            return Predictor.from_state(state), PredictorMetrics(**info["metrics"])
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError):
            # a damaged cache is rebuilt, never fatal
            return None

    def save_predictor(
        self, predictor: Predictor, metrics: PredictorMetrics, n_samples: int, target: str
    ) -> None:
        if not self._meta or not self._writable():
            return
        try:
            with atomic_path(self.dir / "predictor.pt") as tmp:
                torch.save(predictor.state(), tmp)
            meta = dict(self._meta)
            meta["predictor"] = {
                "config": predictor.config.to_dict(),
                "n_samples": n_samples,
                "target": target,
                "metrics": metrics.to_dict(),
            }
            self._write_meta(meta)
        except (OSError, UserError) as e:
            print(f"deployq: warning: cannot write the search cache ({e})", file=sys.stderr)
