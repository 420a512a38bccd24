"""Qualcomm QNN HTP backend through the onnxruntime-qnn plugin execution provider.

On x86-64 Linux the wheel's libQnnHtp.so is the HTP *simulator*: numerics are the
device's, timings are not, so latency is marked simulated. CPU fallback is disabled:
a node HTP cannot take is an error naming the node, never a silent CPU run.
The simulator needs static shapes, so the batch dimension is fixed at load time.
"""

from __future__ import annotations

import platform

from deployq.backends._ort_common import OrtSession, first_line

from deployq.errors import UserError

EP = "QNNExecutionProvider"
_INSTALL = "backend qnn needs onnxruntime-qnn: pip install 'deployq[qnn]'"
_registered = False


def _import():
    try:
        import onnxruntime as ort
        import onnxruntime_qnn
    except ImportError:
        raise UserError(_INSTALL) from None
    return ort, onnxruntime_qnn


def _qnn_device(ort, oq):
    """Register the plugin EP once per process and return its device."""
    global _registered
    if not _registered:
        if not any(d.ep_name == EP for d in ort.get_ep_devices()):
            try:
                ort.register_execution_provider_library(EP, oq.get_library_path())
            except Exception as e:  # noqa: BLE001 - onnxruntime errors derive from Exception only
                raise UserError(f"cannot register the QNN execution provider: {first_line(e)}") \
                    from None
        _registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not devices:
        raise UserError("onnxruntime-qnn is installed but offers no QNN device on this machine")
    return devices[0]


def fix_batch(model, batch_size: int) -> int:
    """Give the model's free batch dimension a value (in place); return the batch it runs."""
    dim = model.graph.input[0].type.tensor_type.shape.dim
    if dim and dim[0].HasField("dim_value") and dim[0].dim_value > 0:
        return dim[0].dim_value  # already static: the data is padded to it
    dim[0].dim_value = batch_size  # also clears dim_param (a oneof)
    for out in model.graph.output:
        odim = out.type.tensor_type.shape.dim
        if odim and not (odim[0].HasField("dim_value") and odim[0].dim_value > 0):
            odim[0].dim_value = batch_size
    # Stale symbolic value_info would fight shape inference; onnxruntime recomputes it.
    del model.graph.value_info[:]
    return batch_size


class QnnBackend:
    name = "qnn"

    def _options(self, ort, oq, fallback: bool):
        so = ort.SessionOptions()
        so.log_severity_level = 4  # the EP logs unsupported nodes itself; we report them below
        so.add_provider_for_devices([_qnn_device(ort, oq)], {"backend_path": oq.get_qnn_htp_path()})
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if not fallback:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        return so

    def _unsupported_nodes(self, ort, oq, data: bytes) -> list[str]:
        """Nodes HTP leaves to the CPU: rebuild with fallback allowed and read the assignment."""
        try:
            sess = ort.InferenceSession(data, self._options(ort, oq, fallback=True))
            groups = sess.get_provider_graph_assignment_info()
        except Exception:  # noqa: BLE001 - best effort: only to name the nodes
            return []
        nodes = [n for g in groups if g.ep_name != EP for n in g.get_nodes()]
        # Q/DQ pushed to CPU next to an unsupported op are a consequence, not the cause.
        main = [n for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
        return [f"{n.name or '(unnamed)'} ({n.op_type})" for n in (main or nodes)]

    def load(self, model_path: str, batch_size: int | None = None):
        import onnx

        ort, oq = _import()
        try:
            model = onnx.load(model_path)
        except Exception as e:  # noqa: BLE001 - onnxruntime errors derive from Exception only
            raise UserError(f"{model_path} is not a readable ONNX model: {first_line(e)}") from None
        batch = fix_batch(model, batch_size or 1)
        data = model.SerializeToString()
        try:
            sess = ort.InferenceSession(data, self._options(ort, oq, fallback=False))
        except Exception as e:  # noqa: BLE001 - onnxruntime errors derive from Exception only
            msg = first_line(e)
            if "fallback to CPU EP has been explicitly disabled" in msg:
                nodes = self._unsupported_nodes(ort, oq, data)
                shown = ", ".join(nodes[:8]) + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else "")
                raise UserError(
                    f"QNN HTP cannot run {len(nodes)} node(s) of {model_path}: {shown} "
                    "(CPU fallback is disabled; quantize them or export for the snpe profile)"
                    if nodes else f"QNN HTP cannot run some nodes of {model_path} "
                    "(CPU fallback is disabled)"
                ) from None
            raise UserError(f"QNN HTP cannot load {model_path}: {msg}") from None
        return OrtSession(sess, model_path, EP, simulated=_is_simulator(), batch_size=batch)

    def versions(self) -> dict[str, str]:
        ort, oq = _import()
        out = {"onnxruntime": ort.__version__, "onnxruntime-qnn": oq.__version__}
        try:
            from onnxruntime_qnn import build_and_package_info as info

            out["qnn-sdk"] = info.qnn_version
        except (ImportError, AttributeError):
            pass
        return out


def _is_simulator() -> bool:
    # The HTP library runs on the real DSP only on Snapdragon (arm64); elsewhere it simulates.
    return platform.machine().lower() in ("x86_64", "amd64", "i686")
