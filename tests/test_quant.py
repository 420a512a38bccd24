import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from deployq.quant import (
    CALIB_P,
    dequantize,
    fake_quant,
    fake_quant_reference,
    init_qparams,
    quantize,
)
from deployq.spec import QuantSpec, act_spec, weight_spec

SPECS = [
    weight_spec(b, pc, sym) for b in (2, 3, 4, 8) for pc in (False, True) for sym in (False, True)
] + [act_spec(b, sym, signed) for b in (2, 4, 8) for sym, signed in ((False, False), (True, False), (True, True))]


def _data(seed: int, shape=(6, 5, 3, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2.0


def _qparams(spec: QuantSpec, x: torch.Tensor, seed: int):
    """Random but valid qparams; per-channel along axis 0."""
    g = torch.Generator().manual_seed(seed + 1)
    c = x.shape[0] if spec.per_channel else 1
    scale = torch.rand(c, generator=g) * 0.5 + 0.01
    if spec.symmetric:
        zp = torch.zeros(c)
    else:
        zp = torch.randint(spec.qmin, spec.qmax + 1, (c,), generator=g).float()
    if spec.per_channel:
        view = (-1,) + (1,) * (x.ndim - 1)
        return scale.reshape(view), zp.reshape(view)
    return scale, zp


@settings(max_examples=60)
@given(seed=st.integers(0, 10_000), k=st.integers(0, len(SPECS) - 1))
def test_codes_in_range_and_fake_quant_is_dequantize_of_quantize(seed, k):
    spec = SPECS[k]
    x = _data(seed)
    s, z = _qparams(spec, x, seed)
    q = quantize(x, s, z, spec.qmin, spec.qmax)
    assert q.dtype == torch.int32
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    fq = fake_quant(x, s, None if spec.symmetric else z, spec.qmin, spec.qmax)
    assert torch.equal(dequantize(q, s, z), fq)  # bit for bit
    assert torch.equal(fq, fake_quant_reference(x, s, z, spec.qmin, spec.qmax))
    # idempotent: a quantized tensor is on the grid already
    assert torch.equal(fake_quant(fq, s, None if spec.symmetric else z, spec.qmin, spec.qmax), fq)


@settings(max_examples=30)
@given(seed=st.integers(0, 10_000), k=st.integers(0, len(SPECS) - 1), gf=st.sampled_from([1.0, 0.3]))
def test_fused_gradients_match_composite(seed, k, gf):
    spec = SPECS[k]
    x0 = _data(seed)
    s0, z0 = _qparams(spec, x0, seed)
    g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 2))
    grads = []
    for fn in (fake_quant, fake_quant_reference):
        x = x0.clone().requires_grad_()
        s = s0.clone().requires_grad_()
        z = (z0 + 0.3).clone().requires_grad_()  # non-integer: rounding inside
        zarg = None if (spec.symmetric and fn is fake_quant) else (torch.zeros_like(z) if spec.symmetric else z)
        fn(x, s, zarg, spec.qmin, spec.qmax, gf).backward(g)
        grads.append((x.grad, s.grad, z.grad if not spec.symmetric else None))
    (gx1, gs1, gz1), (gx2, gs2, gz2) = grads
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs1, gs2, rtol=1e-4, atol=1e-4)
    if gz1 is not None:
        torch.testing.assert_close(gz1, gz2, rtol=1e-4, atol=1e-4)


def _onnx_qdq(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None):
    elem = TensorProto.UINT8 if zp.dtype == np.uint8 else TensorProto.INT8
    kw = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **kw),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **kw),
    ]
    shape_s = list(scale.shape)
    graph = helper.make_graph(
        nodes,
        "qdq",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, shape_s),
            helper.make_tensor_value_info("z", elem, shape_s),
        ],
        [
            helper.make_tensor_value_info("q", elem, list(x.shape)),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    q, y = ReferenceEvaluator(model).run(["q", "y"], {"x": x, "s": scale, "z": zp})
    return q, y


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_onnx_reference_quantize_dequantize(per_channel, signed, seed):
    x = _data(seed, (4, 3, 5, 5)) * 3.0
    g = torch.Generator().manual_seed(seed + 10)
    c = 4 if per_channel else 1
    scale = torch.rand(c, generator=g) * 0.1 + 0.005
    spec = QuantSpec(8, symmetric=signed, signed=signed, granularity="per-channel" if per_channel else "per-tensor")
    if signed:
        zp = torch.randint(-20, 21, (c,), generator=g).float()  # int8 with a zero-point
        qmin, qmax = -128, 127
    else:
        zp = torch.randint(0, 256, (c,), generator=g).float()
        qmin, qmax = spec.qmin, spec.qmax
    view = (-1, 1, 1, 1) if per_channel else (1,)
    s_t, z_t = scale.reshape(view), zp.reshape(view)
    q = quantize(x, s_t, z_t, qmin, qmax)
    y = fake_quant(x, s_t, z_t, qmin, qmax)
    np_z = zp.numpy().astype(np.int8 if signed else np.uint8)
    np_s = scale.numpy().astype(np.float32)
    if not per_channel:
        np_s, np_z = np_s.reshape(()), np_z.reshape(())
    oq, oy = _onnx_qdq(x.numpy(), np_s, np_z, 0 if per_channel else None)
    assert np.array_equal(q.numpy(), oq.astype(np.int32))
    assert np.array_equal(y.numpy(), oy)


def _err(x, spec, s, z):
    q = torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax)
    return float(((q - z) * s - x).abs().pow(CALIB_P).mean())


# Not at 7-8 bits: there min/max wastes little on the outliers, and the search measures its
# error on a subsample that may miss them (then it clips them and loses on the full tensor;
# "hybrid" calibration uses min/max above 2 bits for that reason).
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("sym", [False, True])
def test_init_qparams_beats_min_max(bits, sym):
    g = torch.Generator().manual_seed(10 * bits + sym)
    x = torch.cat([torch.randn(20000, generator=g), torch.randn(20, generator=g) * 8])  # outliers
    spec = act_spec(bits, sym, signed=True)
    s, z = init_qparams(x, spec)
    if sym:
        s_mm, z_mm = x.abs().max() / spec.qmax, torch.tensor(0.0)
    else:
        s_mm = (x.max() - x.min()) / (spec.qmax - spec.qmin)
        z_mm = torch.round(spec.qmin - x.min() / s_mm)
    assert _err(x, spec, s, z) < _err(x, spec, s_mm, z_mm)
    assert s.ndim == 0 and z.ndim == 0


def test_init_qparams_per_channel_shapes_and_grid():
    w = torch.randn(8, 4, 3, 3) * torch.linspace(0.1, 2.0, 8).reshape(-1, 1, 1, 1)
    spec = weight_spec(4, per_channel=True, symmetric=False)
    s, z = init_qparams(w, spec, axis=0)
    assert s.shape == (8,) and z.shape == (8,)
    assert torch.all(s > 0)
    assert torch.equal(z, torch.round(z)) and int(z.min()) >= spec.qmin and int(z.max()) <= spec.qmax
    # wider channels get wider steps
    assert s[-1] > s[0] * 5


def test_calibration_methods_minmax_and_hybrid():
    x = torch.cat([torch.randn(5000), torch.randn(10) * 6])
    for bits in (2, 4):
        spec = act_spec(bits, False, False)
        s_mm, z_mm = init_qparams(x, spec, method="minmax")
        torch.testing.assert_close(s_mm, (x.max() - x.min()) / (spec.qmax - spec.qmin))
        s_h, z_h = init_qparams(x, spec, method="hybrid")
        s_s, z_s = init_qparams(x, spec, method="search")
        expected = (s_s, z_s) if bits == 2 else (s_mm, z_mm)
        assert torch.equal(s_h, expected[0]) and torch.equal(z_h, expected[1])
    with pytest.raises(ValueError):
        init_qparams(x, act_spec(4, False, False), method="percentile")
