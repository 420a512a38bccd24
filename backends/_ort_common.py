"""Helpers shared by the onnxruntime-based backends (onnxruntime, qnn)."""

from __future__ import annotations

import numpy as np

from deployq.errors import UserError


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def input_shape(sess) -> tuple:
    return tuple(d if isinstance(d, int) else None for d in sess.get_inputs()[0].shape)


def check_io(sess, model_path: str) -> tuple[str, str]:
    """The single image input and the logits output of a classifier session."""
    ins, outs = sess.get_inputs(), sess.get_outputs()
    if len(ins) != 1:
        raise UserError(f"{model_path}: expected one image input, the model has {len(ins)}")
    if ins[0].type != "tensor(float)":
        raise UserError(f"{model_path}: input {ins[0].name!r} is {ins[0].type}, expected float")
    return ins[0].name, outs[0].name


def assigned_providers(sess) -> str:
    """Execution providers that actually got nodes, in the session's priority order.

    get_providers() lists what was registered, not what runs; the assignment info
    (recorded when the session option asks for it) says which EP took which node.
    """
    try:
        used = {sg.ep_name for sg in sess.get_provider_graph_assignment_info()}
    except Exception:  # noqa: BLE001 - older onnxruntime or option unset: first EP
        used = set()
    order = [p for p in sess.get_providers() if p in used]
    return "+".join(order) if order else sess.get_providers()[0]


class OrtSession:
    """A Session over an onnxruntime InferenceSession (no per-call allocation besides outputs)."""

    def __init__(self, sess, model_path: str, provider: str, simulated: bool,
                 batch_size: int | None):
        self._sess = sess
        self._in, out = check_io(sess, model_path)
        self._outs = [out]
        self._path = model_path
        self.input_shape = input_shape(sess)
        self.provider = provider
        self.simulated = simulated
        # A graph exported with a static batch only takes that batch: callers pad to it.
        self.batch_size = batch_size or self.input_shape[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self._sess.run(self._outs, {self._in: x})[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime errors derive from Exception only
            raise UserError(f"{self.provider} failed running {self._path} on a batch of shape "
                            f"{tuple(x.shape)}: {first_line(e)}") from None
