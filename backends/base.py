"""The backend protocol and the helpers every backend shares.

A backend turns an ONNX file into a Session that runs float32 NCHW batches and
returns logits. Kept deliberately small: load, run, a few facts about what ran.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Session(Protocol):
    provider: str  # what actually executes the graph, e.g. "CPUExecutionProvider"
    simulated: bool  # True when latency comes from a simulator, not the device
    input_shape: tuple  # model input shape as loaded (ints, or None/str for free dims)
    batch_size: int | None  # fixed batch the session needs, None when any batch runs

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for one batch (x: float32 NCHW, C-contiguous)."""
        ...


@runtime_checkable
class Backend(Protocol):
    name: str

    def load(self, model_path: str, batch_size: int | None = None) -> Session:
        """Load the model; a backend that needs static shapes fixes the batch to batch_size."""
        ...

    def versions(self) -> dict[str, str]:
        """Runtime versions to record in a report (import errors surface here as UserError)."""
        ...


def measure_latency(session: Session, x: np.ndarray, warmup: int, iters: int) -> list[float]:
    """Wall time in ms of `iters` session.run calls on one batch, after `warmup` calls.

    The same batch every time: the point is the runtime's cost, not data movement.
    """
    for _ in range(warmup):
        session.run(x)
    times = []
    clock = time.perf_counter
    for _ in range(iters):
        t0 = clock()
        session.run(x)
        times.append((clock() - t0) * 1e3)
    return times


def free_batch_dim(shape: Sequence) -> bool:
    """True when the first dimension is symbolic / unknown (any batch size fits)."""
    return len(shape) > 0 and not (isinstance(shape[0], int) and shape[0] > 0)
