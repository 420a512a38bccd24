"""Conformance rules on small QDQ graphs built in code, one mutation per rule."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployq import onnx_meta
from deployq.check import RULE_IDS, check_model
from deployq.cli import main
from deployq.profile import list_profiles, load_profile

NP = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32}


class Net:
    """x -> Conv1 -> Relu -> Conv2 -> Add(residual) -> Relu -> GAP -> Flatten -> Gemm,
    every quantized input a Q/DQ in the profile's containers."""

    def __init__(self, profile, opset=None, seed=0):
        self.p = profile
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.opset = opset or profile.opset
        self.scales = {}

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def act_qdq(self, x, name, scale=0.05):
        a = self.p.activations
        zp = 0 if a.symmetric else 128
        s = self.init(f"{name}_s", np.float32(scale))
        z = self.init(f"{name}_zp", np.array(zp, dtype=NP[a.container]))
        self.nodes.append(
            helper.make_node("QuantizeLinear", [x, s, z], [f"{name}_q"], name=f"{name}_Q")
        )
        self.nodes.append(
            helper.make_node(
                "DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"], name=f"{name}_DQ"
            )
        )
        self.scales[f"{name}_dq"] = np.float32(scale)
        return f"{name}_dq"

    def weight_dq(self, name, shape, axis):
        w = self.p.weights
        per_channel = w.granularity == "per-channel"
        n_ch = shape[axis]
        if w.symmetric:
            q = self.rng.integers(-127, 128, size=shape).astype(np.int8)
            zp = np.zeros(n_ch if per_channel else (), np.int8)
        else:
            q = self.rng.integers(0, 256, size=shape).astype(np.uint8)
            zp = np.full(n_ch if per_channel else (), 120, np.uint8)
        scale = (np.linspace(0.01, 0.02, n_ch) if per_channel else np.array(0.015)).astype(
            np.float32
        )
        self.init(f"{name}_w", q)
        self.init(f"{name}_ws", scale)
        self.init(f"{name}_wzp", zp)
        attrs = {"axis": axis} if per_channel else {}
        self.nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{name}_w", f"{name}_ws", f"{name}_wzp"],
                [f"{name}_wdq"],
                name=f"{name}_wDQ",
                **attrs,
            )
        )
        return f"{name}_wdq", scale

    def bias(self, name, n, in_scale, w_scale):
        b = np.linspace(-0.1, 0.1, n).astype(np.float32)
        if self.p.graph.bias == "float":
            return self.init(f"{name}_b", b)
        s = (np.float32(in_scale) * w_scale).astype(np.float32) * np.ones(n, np.float32)
        self.init(f"{name}_bq", np.round(b / s).astype(np.int32))
        self.init(f"{name}_bs", s)
        self.init(f"{name}_bzp", np.zeros(n, np.int32))
        self.nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{name}_bq", f"{name}_bs", f"{name}_bzp"],
                [f"{name}_bdq"],
                name=f"{name}_bDQ",
                axis=0,
            )
        )
        return f"{name}_bdq"

    def conv(self, x, name, cin, cout):
        w, ws = self.weight_dq(name, (cout, cin, 3, 3), 0)
        b = self.bias(name, cout, self.scales[x], ws)
        self.nodes.append(
            helper.make_node("Conv", [x, w, b], [f"{name}_y"], name=name, pads=[1, 1, 1, 1])
        )
        return f"{name}_y"

    def build(self):
        x = self.act_qdq("x", "in")
        y1 = self.conv(x, "conv1", 3, 4)
        self.nodes.append(helper.make_node("Relu", [y1], ["r1"], name="relu1"))
        r1 = self.act_qdq("r1", "a1")
        y2 = self.conv(r1, "conv2", 4, 4)
        y2q = self.act_qdq(y2, "a2")
        r1b = self.act_qdq("r1", "a1b")
        self.nodes.append(helper.make_node("Add", [y2q, r1b], ["s"], name="residual"))
        self.nodes.append(helper.make_node("Relu", ["s"], ["r2"], name="relu2"))
        self.nodes.append(helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"))
        self.nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
        f = self.act_qdq("flat", "a3")
        w, ws = self.weight_dq("fc", (10, 4), 0)
        b = self.bias("fc", 10, self.scales[f], ws)
        self.nodes.append(helper.make_node("Gemm", [f, w, b], ["logits"], name="fc", transB=1))
        g = helper.make_graph(
            self.nodes,
            "net",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
            self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 10
        return m


def net(name, **kw):
    return Net(load_profile(name), **kw).build()


def rules(model, profile):
    return {v.rule for v in check_model(model, load_profile(profile))}


def node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def init(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def set_init(m, name, arr):
    init(m, name).CopyFrom(numpy_helper.from_array(np.asarray(arr), name))


@pytest.mark.parametrize("profile", list_profiles())
def test_conforming_net_has_no_violations(profile):
    m = net(profile)
    assert check_model(m, load_profile(profile)) == []


@pytest.mark.parametrize("profile", ["cpu", "snpe"])
def test_conforming_net_runs_on_onnxruntime(profile):
    # An independent second opinion that the builder makes a real, runnable QDQ graph.
    import onnxruntime as ort

    m = net(profile, opset=17)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8), np.float32)})[
        0
    ]
    assert out.shape == (1, 10) and np.all(np.isfinite(out))


def test_every_rule_is_named_once():
    assert len(RULE_IDS) == len(set(RULE_IDS)) >= 12


def test_uint8_activation_for_tensorrt():
    m = net("tensorrt")
    set_init(m, "a1_zp", np.array(0, np.uint8))
    assert "qdq-dtype" in rules(m, "tensorrt")


def test_missing_zero_point_means_uint8_for_tensorrt():
    m = net("tensorrt")
    q = node(m, "a1_Q")
    del q.input[2]
    assert "qdq-dtype" in rules(m, "tensorrt")


def test_nonzero_zero_point():
    m = net("tensorrt")
    set_init(m, "a1_zp", np.array(3, np.int8))
    assert "zero-point" in rules(m, "tensorrt")
    m = net("cpu")
    set_init(m, "conv1_wzp", np.ones(4, np.int8))
    assert "zero-point" in rules(m, "cpu")


def test_per_axis_activation():
    m = net("cpu")
    for n in ("a1_Q", "a1_DQ"):
        node(m, n).attribute.append(helper.make_attribute("axis", 1))
    set_init(m, "a1_s", np.full(4, 0.05, np.float32))
    set_init(m, "a1_zp", np.full(4, 128, np.uint8))
    assert "per-axis" in rules(m, "cpu")


def test_wrong_weight_axis():
    m = net("tensorrt")
    dq = node(m, "fc_wDQ")
    dq.attribute[0].i = 1
    set_init(m, "fc_ws", np.full(4, 0.01, np.float32))
    set_init(m, "fc_wzp", np.zeros(4, np.int8))
    found = {v.rule: v for v in check_model(m, load_profile("tensorrt"))}
    assert "per-axis" in found and "needs axis 0" in found["per-axis"].message


def test_int32_bias_for_tensorrt():
    m = net("cpu", opset=17)  # cpu quantizes bias to int32, otherwise tensorrt-like containers
    found = [v for v in check_model(m, load_profile("tensorrt")) if v.rule == "bias"]
    assert found and "must stay float" in found[0].message
    assert "rejects int32 bias" in found[0].why


def test_float_bias_for_snpe_and_bad_bias_scale():
    m = net("tensorrt", opset=17)
    assert "bias" in rules(m, "cpu")
    m = net("snpe")
    set_init(m, "conv2_bs", np.full(4, 1e-3, np.float32))
    assert "bias" in rules(m, "snpe")


def test_float_conv_input_without_dq():
    m = net("cpu")
    conv = node(m, "conv2")
    conv.input[0] = "r1"
    found = [v for v in check_model(m, load_profile("cpu")) if v.rule == "quantized-input"]
    assert [v.node for v in found] == ["conv2"]


def test_residual_add_without_dq():
    m = net("tensorrt")
    node(m, "residual").input[1] = "r1"
    assert "residual-add" in rules(m, "tensorrt")


def test_batchnorm_left():
    m = net("cpu")
    conv = node(m, "conv1")
    conv.output[0] = "c1_raw"
    c = 4
    for k, v in {"g": 1.0, "b": 0.0, "m": 0.0, "v": 1.0}.items():
        m.graph.initializer.append(numpy_helper.from_array(np.full(c, v, np.float32), f"bn_{k}"))
    m.graph.node.insert(
        list(m.graph.node).index(conv) + 1,
        helper.make_node(
            "BatchNormalization",
            ["c1_raw", "bn_g", "bn_b", "bn_m", "bn_v"],
            ["conv1_y"],
            name="bn1",
        ),
    )
    assert "no-float-batchnorm" in rules(m, "cpu")


def test_opset_21_for_tensorrt():
    m = net("tensorrt", opset=21)
    assert rules(m, "tensorrt") == {"opset-range"}


def test_qdq_on_reshape_for_tensorrt_only():
    m = net("tensorrt")
    gemm = node(m, "fc")
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 4], np.int64), "shp"))
    m.graph.node.insert(
        list(m.graph.node).index(gemm),
        helper.make_node("Reshape", ["a3_dq", "shp"], ["flat2"], name="reshape"),
    )
    gemm.input[0] = "flat2"
    got = rules(m, "tensorrt")
    assert "shape-op-qdq" in got
    # cpu (onnxruntime) propagates Q/DQ through shape ops itself: not a violation there.
    m2 = net("cpu")
    gemm = node(m2, "fc")
    m2.graph.initializer.append(numpy_helper.from_array(np.array([1, 4], np.int64), "shp"))
    m2.graph.node.insert(
        list(m2.graph.node).index(gemm),
        helper.make_node("Reshape", ["a3_dq", "shp"], ["flat2"], name="reshape"),
    )
    assert "shape-op-qdq" not in rules(m2, "cpu")


def test_negative_and_nonconstant_scale():
    m = net("snpe")
    set_init(m, "a1_s", np.float32(-0.05))
    assert "scale" in rules(m, "snpe")
    m = net("snpe")
    set_init(m, "a2_s", np.float32(np.inf))
    assert "scale" in rules(m, "snpe")


def test_weight_minus_128_for_tensorrt():
    m = net("tensorrt")
    w = numpy_helper.to_array(init(m, "conv1_w")).copy()
    w.flat[0] = -128
    set_init(m, "conv1_w", w)
    found = [v for v in check_model(m, load_profile("tensorrt")) if v.rule == "weight-range"]
    assert found and found[0].node == "conv1_wDQ"


def test_weight_granularity_mismatch():
    m = net("snpe")  # per-tensor uint8 weights
    got = rules(m, "snpe-pc")
    assert {"qdq-dtype", "weight-granularity"} <= got
    m = net("cpu")
    assert "weight-granularity" in rules(m, "snpe")


def test_checker_failure_is_a_violation():
    m = net("cpu")
    node(m, "relu1").input[0] = "does_not_exist"
    assert "onnx-checker" in rules(m, "cpu")


def test_emulated_range_from_metadata():
    m = net("tensorrt")
    onnx_meta.write(
        m, {onnx_meta.EMULATED: [{"tensor": "conv2_w", "bits": 4, "container": "int8"}]}
    )
    assert "emulated-range" in rules(m, "tensorrt")  # random int8 weights exceed [-7, 7]
    w = np.clip(numpy_helper.to_array(init(m, "conv2_w")), -7, 7)
    set_init(m, "conv2_w", w)
    assert "emulated-range" not in rules(m, "tensorrt")


# --- CLI ------------------------------------------------------------------------
def test_cli_check_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.onnx"
    onnx.save(net("tensorrt"), good)
    assert main(["check", str(good), "--profile", "tensorrt"]) == 0
    assert "OK:" in capsys.readouterr().out

    bad = tmp_path / "bad.onnx"
    onnx.save(net("cpu", opset=17), bad)
    assert main(["check", str(bad), "--profile", "tensorrt"]) == 1
    out = capsys.readouterr()
    assert "qdq-dtype" in out.out and "int8" in out.out

    assert main(["check", str(tmp_path / "missing.onnx"), "--profile", "tensorrt"]) == 2
    junk = tmp_path / "junk.onnx"
    junk.write_text("not onnx")
    assert main(["check", str(junk), "--profile", "tensorrt"]) == 2
    assert main(["check", str(good), "--profile", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err


# --- a second opinion: onnxruntime's own quantizer --------------------------------
def fp32_net():
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["y2", "r1"], ["s"], name="residual"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [
        w("w1", 8, 3, 3, 3),
        w("b1", 8),
        w("w2", 8, 8, 3, 3),
        w("b2", 8),
        w("wf", 10, 8),
        w("bf", 10),
    ]
    g = helper.make_graph(
        nodes,
        "fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def ort_quantize(tmp_path, per_channel, weight_type):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.it = iter([{"x": rng.standard_normal((1, 3, 8, 8), np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp_path / "fp32.onnx", tmp_path / "q.onnx"
    onnx.save(fp32_net(), src)
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=getattr(QuantType, weight_type),
        per_channel=per_channel,
    )
    return onnx.load(dst)


def test_onnxruntime_quantizer_output(tmp_path):
    # ORT's default QDQ output (u8 activations, s8 per-channel weights, int32 bias) is
    # exactly the cpu form; for TensorRT it breaks the known rules (uint8, int32 bias).
    m = ort_quantize(tmp_path, per_channel=True, weight_type="QInt8")
    assert check_model(m, load_profile("cpu")) == []
    got = rules(m, "tensorrt")
    assert {"qdq-dtype", "bias", "zero-point"} <= got
    m = ort_quantize(tmp_path, per_channel=False, weight_type="QUInt8")
    assert check_model(m, load_profile("snpe")) == []
    assert "weight-granularity" in rules(m, "cpu")
