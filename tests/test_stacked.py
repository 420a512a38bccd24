"""The stacked sandwich (deployq.stacked): the row kernel against LearnedFQ slice by
slice, a stacked step against the sequential one, and when train() uses it."""

import contextlib
import random
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployq import kernels
from deployq.elastic import MIN_SCALE, convert
from deployq.kernels import fq
from deployq.models import build_model
from deployq.quant import LearnedFQ, lsq_grad_factor
from deployq.stacked import AUTO_MAX_FLOATS, make_plan, max_conv_floats
from deployq.train import (
    TrainConfig,
    choose_subnets,
    sandwich_step,
    stacked_sandwich_step,
    use_stacked,
)

pytestmark = pytest.mark.skipif(kernels.get() is None, reason="needs the compiled kernel (no C compiler here)")

GRIDS = [(0, 255), (0, 3), (-128, 127), (-2, 1), (0, 15), (-7, 7)]


@contextlib.contextmanager
def _poisoned_empty_like():
    """torch.empty_like returns NaN-filled tensors: a kernel output the kernel does not
    write stays NaN instead of holding whatever the allocator's memory held (often 0)."""
    real = torch.empty_like
    with mock.patch.object(torch, "empty_like", lambda t, **kw: real(t, **kw).fill_(float("nan"))):
        yield


def _slice_case(draw_mode, lo, hi, n):
    """(plan slice, raw scale [n], raw zero-point [n] or None, zero_offset, mode)."""
    raw_s = torch.rand(n) * 0.5 + 0.01
    raw_s[0] = -raw_s[0]  # the kernel takes |raw| as LearnedFQ does
    raw_z = torch.rand(n) * (hi - lo) + lo - 0.4 if draw_mode == 2 else None
    return raw_s, raw_z, draw_mode == 1


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(
    slices=st.lists(st.tuples(st.sampled_from(GRIDS), st.sampled_from([0, 1, 2, 3])), min_size=1, max_size=4),
    k=st.integers(1, 700),
    seed=st.integers(0, 2**16),
)
def test_rows_match_learned_fq_slice_by_slice(slices, k, seed):
    """k slices of a stacked tensor, each with its own per-tensor cell: the forward bits
    of LearnedFQ on that slice alone, the input gradient bit for bit, the step-size and
    zero-point gradients to float rounding; a passing slice (mode 3) is copied."""
    torch.manual_seed(seed)
    r = len(slices)
    x = torch.randn(r, k) * 2
    cases, plan_slices = [], []
    for (lo, hi), mode in slices:
        raw_s, raw_z, zo = _slice_case(mode, lo, hi, 1)
        gf = lsq_grad_factor(hi, k)
        cases.append((mode, lo, hi, raw_s, raw_z, zo, gf))
        plan_slices.append(None if mode == 3 else (1, mode, float(lo), float(hi), gf))
    plan = make_plan(tuple(plan_slices), 1)
    flat_s = torch.cat([c[3] for c in cases])
    flat_z = torch.cat([c[4] if c[4] is not None else torch.zeros(1) for c in cases])
    with _poisoned_empty_like():  # the outputs start as NaN, so "written" is not luck
        out, scale, zq, zmask = fq.rows_forward(x, r, r, plan, flat_s, flat_z, MIN_SCALE, True)
    g = torch.randn(r, k)
    with torch.no_grad():
        gx, gs, gz = fq.rows_backward(g, x, r, plan, scale, zq, zmask, flat_s, MIN_SCALE, True, True)
    for j, (mode, lo, hi, raw_s, raw_z, zo, gf) in enumerate(cases):
        if mode != 2:  # every scalar has its zero-point and mask written, not only mode 2's
            assert zq[j] == 0 and zmask[j] == 1, f"slice {j} (mode {mode}): zq {zq[j]}, zmask {zmask[j]}"
        if mode == 3:
            assert torch.equal(out[j], x[j]) and torch.equal(gx[j], g[j])
            continue
        ref = LearnedFQ()
        with torch.no_grad():
            o, s = ref.forward(x[j].clone(), raw_s, raw_z, lo, hi, gf, MIN_SCALE, None, zo, True)
            rx, rs, rz = ref.backward(g[j].clone(), o, x[j].clone(), raw_s, True, True)
        assert torch.equal(out[j], o), f"slice {j}: forward bits differ"
        assert torch.equal(scale[j : j + 1], s)
        assert torch.equal(gx[j], rx)
        torch.testing.assert_close(gs[j : j + 1], rs, rtol=1e-5, atol=1e-7)
        if raw_z is not None:
            torch.testing.assert_close(gz[j : j + 1], rz, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("forms", [(True, False, True), (False, False, True), (True, True, True)])
def test_weight_rows_quantize_one_weight_with_several_cells(forms):
    """xr < r: the same weight rows quantized by k cells (per channel or per tensor,
    symmetric or with a zero-point), as k LearnedFQ calls on the weight; a per-tensor
    cell's gradient sums its rows."""
    torch.manual_seed(0)
    o, kk = 6, 27
    w = torch.randn(o, kk)
    specs = []
    for per_channel in forms:
        n = o if per_channel else 1
        asym = not per_channel
        lo, hi = (0, 15) if asym else (-7, 7)
        raw_s = torch.rand(n) * 0.3 + 0.05
        raw_z = torch.rand(n) * 10 if asym else None
        specs.append((n, 2 if asym else 0, lo, hi, raw_s, raw_z, lsq_grad_factor(hi, w.numel() // n)))
    plan = make_plan(tuple((n, m, float(lo), float(hi), gf) for n, m, lo, hi, _, _, gf in specs), o)
    flat_s = torch.cat([s[4] for s in specs])
    flat_z = torch.cat([s[5] if s[5] is not None else torch.zeros(s[0]) for s in specs])
    out, scale, zq, zmask = fq.rows_forward(w, o, len(specs) * o, plan, flat_s, flat_z, MIN_SCALE, True)
    g = torch.randn(len(specs) * o, kk)
    with torch.no_grad():
        gx, gs, gz = fq.rows_backward(g, w, o, plan, scale, zq, zmask, flat_s, MIN_SCALE, True, True)
    off = 0
    for j, (n, _m, lo, hi, raw_s, raw_z, gf) in enumerate(specs):
        ref = LearnedFQ()
        rows = slice(j * o, (j + 1) * o)
        with torch.no_grad():
            o_ref, _ = ref.forward(w.clone(), raw_s, raw_z, lo, hi, gf, MIN_SCALE, 0, False, True)
            rx, rs, rz = ref.backward(g[rows].clone(), o_ref, w.clone(), raw_s, True, True)
        assert torch.equal(out[rows], o_ref)
        assert torch.equal(gx[rows], rx)
        torch.testing.assert_close(gs[off : off + n], rs, rtol=1e-5, atol=1e-7)
        if raw_z is not None:
            torch.testing.assert_close(gz[off : off + n], rz, rtol=1e-5, atol=1e-7)
        off += n


def _tiny_net(size=8, width=4, seed=0, model="resnet20"):
    torch.manual_seed(seed)
    kw = {"width": width} if model == "resnet20" else {}
    float_model = build_model(model, num_classes=10, input_size=size, **kw)
    float_model.train()
    with torch.no_grad():
        float_model(torch.randn(32, 3, size, size))  # BN statistics to fold
    float_model.eval()
    cfg = TrainConfig(model=model, input_size=size, width=width if model == "resnet20" else None)
    net = convert(float_model, cfg.space)
    net.calibrate([torch.randn(16, 3, size, size).abs() for _ in range(2)])
    return net, cfg


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _both_ways(net, cfg, x, y, seed):
    """(loss, gradients) of one sandwich step run one subnet after the other, then stacked."""
    net.train()
    specs = choose_subnets(net, random.Random(seed), cfg)
    out = []
    for step in (sandwich_step, stacked_sandwich_step):
        net.zero_grad(set_to_none=True)
        out.append((step(net, net, x, y, specs, cfg), _grads(net)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stacked_step_takes_the_sequential_steps_gradients(seed):
    """One GPG step (highest -> random -> lowest, KL chain, WDR) run stacked: the same
    losses and, up to float summation order, the same gradient on every parameter; no
    cell gets a gradient the sequential sandwich would not give it."""
    net, cfg = _tiny_net()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(12, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (12,), generator=gen)
    (seq_loss, seq), (stk_loss, stk) = _both_ways(net, cfg, x, y, seed)
    assert stk_loss == pytest.approx(seq_loss, rel=1e-6)
    assert seq.keys() == stk.keys()
    rel = {n: float((seq[n] - stk[n]).norm() / seq[n].norm().clamp_min(1e-12)) for n in seq}
    assert max(rel.values()) < 2e-2, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
    assert sorted(rel.values())[len(rel) // 2] < 1e-5  # most gradients agree to float rounding
    assert all(m.stack is None for _, m in net.layers())  # the stack is cleared afterwards


def test_stacked_forward_is_the_k_subnets_forwards():
    net, cfg = _tiny_net(seed=3)
    net.eval()
    x = torch.rand(5, 3, 8, 8)
    specs = choose_subnets(net, random.Random(7), cfg)
    with torch.no_grad():
        ref = torch.cat([_forward(net, s, x) for s in specs])
        net.set_active_stack(specs)
        got = net(x.repeat(3, 1, 1, 1))
        net.set_active(None)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()


def _forward(net, spec, x):
    net.set_active(spec)
    return net(x)


def test_a_batch_that_does_not_split_is_refused():
    net, cfg = _tiny_net()
    net.set_active_stack(choose_subnets(net, random.Random(0), cfg))
    with pytest.raises(ValueError, match="does not split into 3"):
        net(torch.rand(4, 3, 8, 8))
    net.set_active(None)


def test_use_stacked_follows_the_setting_the_size_and_the_kernel(monkeypatch):
    from dataclasses import replace

    small, cfg = _tiny_net(size=8, width=4)
    x = torch.rand(1, 3, 8, 8)
    assert max_conv_floats(small, x) == 4 * 8 * 8
    heard = []
    assert use_stacked(small, cfg, x, say=heard.append)
    assert "one stacked batch" in heard[-1]
    assert not use_stacked(small, replace(cfg, stacked="off"), x)
    assert not use_stacked(small, cfg, x, single=True)  # one subnet: nothing to stack
    big, cfg_big = _tiny_net(size=32, width=4)
    xb = torch.rand(1, 3, 32, 32)
    assert max_conv_floats(big, xb) > AUTO_MAX_FLOATS
    assert not use_stacked(big, cfg_big, xb)
    assert use_stacked(big, replace(cfg_big, stacked="on"), xb)
    with kernels.disabled():
        heard.clear()
        assert not use_stacked(small, replace(cfg, stacked="on"), x, say=heard.append)
        assert "kernel is unavailable" in heard[-1]
        assert not use_stacked(small, cfg, x)


def test_stacked_setting_is_validated():
    from deployq.errors import UserError

    with pytest.raises(UserError, match="stacked must be one of auto, on, off"):
        TrainConfig(stacked="yes")


def test_depthwise_convs_stack_too():
    """MobileNetV2 (depthwise and 1x1 convs, ReLU6, residual adds) stacked vs one after
    the other. Deeper nets flip the odd 8-bit rounding on ulp-level differences of the
    grouped convolution, so its gradients agree closely, not to float rounding."""
    net, cfg = _tiny_net(model="mobilenetv2")
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    (seq_loss, seq), (stk_loss, stk) = _both_ways(net, cfg, x, y, 0)
    assert stk_loss == pytest.approx(seq_loss, rel=1e-4)
    assert seq.keys() == stk.keys()
    rel = sorted(float((seq[n] - stk[n]).norm() / seq[n].norm()) for n in seq if n.endswith(".weight"))
    assert rel[-1] < 0.2 and rel[len(rel) // 2] < 1e-3
