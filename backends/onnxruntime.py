"""onnxruntime backend (the default): CPU, or CUDA / TensorRT EPs when this onnxruntime has them."""

from __future__ import annotations

from collections.abc import Sequence

from deployq.backends._ort_common import OrtSession, assigned_providers, first_line

from deployq.errors import UserError

# Preferred order; only the ones the installed onnxruntime offers are used.
_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, providers: Sequence[str] | None = None):
        self.providers = tuple(providers) if providers else None

    def _providers(self, ort) -> list[str]:
        available = ort.get_available_providers()
        if self.providers:
            missing = [p for p in self.providers if p not in available]
            if missing:
                raise UserError(
                    f"onnxruntime {ort.__version__} has no {', '.join(missing)}; "
                    f"available: {', '.join(available)}"
                )
            return list(self.providers)
        return [p for p in _PREFERRED if p in available]

    def load(self, model_path: str, batch_size: int | None = None) -> OrtSession:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        try:
            sess = ort.InferenceSession(model_path, so, providers=self._providers(ort))
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime errors derive from Exception only
            raise UserError(f"onnxruntime cannot load {model_path}: {first_line(e)}") from None
        return OrtSession(sess, model_path, assigned_providers(sess), simulated=False,
                          batch_size=None)

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}
