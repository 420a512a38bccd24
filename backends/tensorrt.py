"""TensorRT backend through the native TensorRT 10 Python API.

Builds an engine from the QDQ ONNX as a STRONGLY_TYPED network (explicit
quantization: the Q/DQ nodes decide the precisions, no calibrator, no INT8 flag),
then runs it with device buffers owned by torch.cuda tensors. Needs TensorRT and
an NVIDIA GPU; without them every entry point raises one clear UserError.
"""

from __future__ import annotations

import numpy as np

from deployq.errors import UserError

_NEEDS = "backend tensorrt needs TensorRT and an NVIDIA GPU: "


def _import():
    """tensorrt and torch with a visible CUDA device, or a UserError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(_NEEDS + "the tensorrt package is not installed "
                        "(pip install 'deployq[tensorrt]' on a machine with CUDA)") from None
    try:
        import torch
    except ImportError:
        raise UserError(_NEEDS + "torch (CUDA build) is needed for device buffers") from None
    if not torch.cuda.is_available():
        raise UserError(_NEEDS + "no CUDA device is visible (torch.cuda.is_available() is False)")
    return trt, torch


def make_logger(trt):
    """A TensorRT logger that keeps error messages so a UserError can quote them."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)

    return Logger()


def build_engine(trt, model_path: str, batch_size: int, logger) -> bytes:
    """Serialized engine for the model, with an optimization profile around batch_size."""
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(model_path, "rb") as f:
        ok = parser.parse(f.read(), model_path)
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT cannot parse {model_path}: {errs[0] if errs else 'unknown error'}")
    config = builder.create_builder_config()
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if shape and shape[0] == -1:
        # Dynamic batch: an engine tuned for exactly the batch we run (the caller pads the
        # last batch), like the static QNN path; other batch sizes get their own engine.
        profile = builder.create_optimization_profile()
        fixed = shape[1:]
        if any(d < 0 for d in fixed):
            raise UserError(f"{model_path}: input {inp.name!r} has free non-batch dims {shape}")
        full = (batch_size, *fixed)
        profile.set_shape(inp.name, full, full, full)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        errors = getattr(logger, "errors", [])
        raise UserError(f"TensorRT could not build an engine for {model_path}"
                        + (f": {errors[-1]}" if errors else ""))
    return bytes(engine)


class TensorRTSession:
    simulated = False

    def __init__(self, trt, torch, engine_bytes: bytes, logger, batch_size: int):
        # batch_size: the batch the engine was built for (its profile's only shape)
        self._torch = torch
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        self._ctx = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self._in = next(n for n in names if self._engine.get_tensor_mode(n) == mode)
        self._out = next(n for n in names if self._engine.get_tensor_mode(n) != mode)
        self.input_shape = tuple(d if d >= 0 else None for d in self._engine.get_tensor_shape(self._in))
        static = self.input_shape[0]
        self.batch_size = static if static is not None else batch_size
        self.provider = f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"
        self._stream = torch.cuda.Stream()
        self._buffers: dict[tuple, tuple] = {}

    def _io(self, shape: tuple):
        """Device input/output tensors for this input shape (allocated once per shape)."""
        bufs = self._buffers.get(shape)
        if bufs is None:
            torch = self._torch
            if not self._ctx.set_input_shape(self._in, shape):
                raise UserError(f"TensorRT engine does not accept input shape {shape}")
            out_shape = tuple(self._ctx.get_tensor_shape(self._out))
            x = torch.empty(shape, dtype=torch.float32, device="cuda")
            y = torch.empty(out_shape, dtype=torch.float32, device="cuda")
            bufs = self._buffers[shape] = (x, y)
        return bufs

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        shape = tuple(x.shape)
        dx, dy = self._io(shape)
        self._ctx.set_input_shape(self._in, shape)
        self._ctx.set_tensor_address(self._in, dx.data_ptr())
        self._ctx.set_tensor_address(self._out, dy.data_ptr())
        with torch.cuda.stream(self._stream):
            dx.copy_(torch.from_numpy(x), non_blocking=False)
            if not self._ctx.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            out = dy.cpu()  # synchronizes the stream: latency covers copy in, run, copy out
        return out.numpy()


class TensorRTBackend:
    name = "tensorrt"

    def load(self, model_path: str, batch_size: int | None = None) -> TensorRTSession:
        trt, torch = _import()
        logger = make_logger(trt)
        engine = build_engine(trt, model_path, batch_size or 1, logger)
        return TensorRTSession(trt, torch, engine, logger, batch_size or 1)

    def versions(self) -> dict[str, str]:
        trt, torch = _import()
        return {"tensorrt": trt.__version__, "torch": torch.__version__,
                "cuda": str(torch.version.cuda), "gpu": torch.cuda.get_device_name()}
