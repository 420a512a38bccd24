"""Runtime backends, registered by name and imported lazily.

`import deployq.backends` must stay cheap: the registry maps a name to a
"module:attribute" string and the module is imported only on `get(name)`, so
onnxruntime-qnn and tensorrt load only when a user asks for them.
"""

from __future__ import annotations

import importlib

from deployq.backends.base import Backend, Session, measure_latency

from deployq.errors import UserError

__all__ = ["Backend", "Session", "get", "measure_latency", "names", "register", "unregister"]

# name -> "module:attr" (lazy) or a Backend instance (registered at runtime, e.g. by tests)
_REGISTRY: dict[str, str | Backend] = {
    "onnxruntime": "deployq.backends.onnxruntime:OnnxRuntimeBackend",
    "qnn": "deployq.backends.qnn:QnnBackend",
    "tensorrt": "deployq.backends.tensorrt:TensorRTBackend",
}
DEFAULT = "onnxruntime"


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def register(name: str, backend: str | Backend) -> None:
    """Add a backend: an object with the Backend protocol, or a lazy "module:attr" path."""
    _REGISTRY[name] = backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Backend:
    """The backend called `name` (instantiated on first use)."""
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}; choose from: {', '.join(names())}") from None
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)()
        _REGISTRY[name] = entry
    return entry
