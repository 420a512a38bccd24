"""The fused training path (quant.fake_quant_learned, the elastic layers' cached cells,
the per-forward memo of tied quantizers, the one-node int32 bias) against the composite
autograd definitions it replaces: forward bit for bit, gradients to float rounding."""

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from same_math import assert_same_forward_and_grads, bits, grads

from deployq.elastic import MIN_SCALE, ElasticConv2d, convert
from deployq.models import build_model
from deployq.quant import (
    channel_view,
    fake_quant,
    fake_quant_learned,
    fake_quant_reference,
    lsq_grad_factor,
    round_ste,
)
from deployq.spec import ElasticSpace, QuantSpec, act_spec, weight_spec

SPECS = [weight_spec(b, pc, sym) for b in (2, 3, 8) for pc in (False, True) for sym in (False, True)] + [
    act_spec(b, sym, signed) for b in (2, 8) for sym, signed in ((False, False), (True, True))
]




def _raw(spec: QuantSpec, c: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = c if spec.per_channel else 1
    raw_s = (torch.rand(n, generator=g) * 0.4 + 0.01) * torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0)
    raw_s[torch.rand(n, generator=g) < 0.15] = 1e-9  # below MIN_SCALE: clamped, no gradient
    raw_z = torch.randint(spec.qmin - 1, spec.qmax + 2, (n,), generator=g).float() + 0.3  # some off-grid
    return raw_s, raw_z


def _reference_sums_in_double(x0, sv, zarg, spec: QuantSpec, gf: float, gout, s0):
    """The composite's step-size and zero-point gradients with its per-element terms (float32,
    rounded as its forward rounds) summed in double. Its own float32 sum of terms up to
    qmax * |gout| that cancel can be off by 1e-3 relative (8 bits, seed 762: 0.27380 against
    0.27403 in float64), more than the fused op, which sums in double."""
    se = sv.detach().expand(x0.shape).clone().requires_grad_()
    ze = zarg.detach().expand(x0.shape).clone().requires_grad_()
    (fake_quant_reference(x0, se, ze, spec.qmin, spec.qmax, gf) * gout).sum().backward()
    dims = (1, 2, 3) if spec.per_channel else (0, 1, 2, 3)
    g_sv, g_z = se.grad.double().sum(dims), ze.grad.double().sum(dims)
    # through |s|.clamp(min=MIN_SCALE): the sign of s where it is above the floor, else 0
    chain = torch.sign(s0).double() * (s0.abs() > MIN_SCALE).double()
    return (g_sv * chain).float(), g_z.float().reshape(s0.shape)


@settings(max_examples=40)
@given(seed=st.integers(0, 10_000), k=st.integers(0, len(SPECS) - 1), gf=st.sampled_from([1.0, 0.3]),
       zero_offset=st.booleans())
@example(seed=762, k=15, gf=1.0, zero_offset=False)  # the float32 composite's sum was off by 2e-4 here
def test_learned_fake_quant_matches_the_composite_through_abs_and_clamp(seed, k, gf, zero_offset):
    spec = SPECS[k]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 5, 3, 3, generator=g) * 2.0
    gout = torch.randn(x0.shape, generator=g)
    s0, z0 = _raw(spec, x0.shape[0], seed)
    learned_z = not spec.symmetric and not zero_offset

    x, s, z = (t.clone().requires_grad_() for t in (x0, s0, z0))
    out, scale = fake_quant_learned(x, s, z if learned_z else None, spec.qmin, spec.qmax, gf, MIN_SCALE,
                                    axis=0 if spec.per_channel else None,
                                    zero_offset=zero_offset and not spec.symmetric)
    out.backward(gout)

    xr, sr, zr = (t.clone().requires_grad_() for t in (x0, s0, z0))
    sv = sr.abs().clamp(min=MIN_SCALE)
    assert torch.equal(bits(scale), bits(sv.detach())) and not scale.requires_grad
    zarg = zr if learned_z else torch.zeros_like(z0)
    if spec.per_channel:
        sv, zarg = channel_view(sv, 4, 0), channel_view(zarg, 4, 0)
    ref = fake_quant_reference(xr, sv, zarg, spec.qmin, spec.qmax, gf)
    ref.backward(gout)

    assert torch.equal(out, ref)
    # bit for bit (signs of zeros included) with the plain fused op the layers used before,
    # which skips the zero-point of symmetric grids
    plain = fake_quant(x0, sv.detach(), None if spec.symmetric else zarg.detach(), spec.qmin, spec.qmax)
    assert torch.equal(bits(out), bits(plain))
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    g_s, g_z = _reference_sums_in_double(x0, sv, zarg, spec, gf, gout, s0)
    torch.testing.assert_close(s.grad, g_s, rtol=1e-4, atol=1e-4)
    if learned_z:
        torch.testing.assert_close(z.grad, g_z, rtol=1e-4, atol=1e-4)
    else:
        assert z.grad is None


def _net(seed: int = 0, size: int = 8):
    with torch.random.fork_rng():  # leave the global RNG as other tests expect it
        torch.manual_seed(seed)
        model = build_model("resnet20", num_classes=10, input_size=size, width=4).eval()
    net = convert(model, ElasticSpace())
    g = torch.Generator().manual_seed(seed)
    net.calibrate([torch.randn(16, 3, size, size, generator=g)])
    with torch.no_grad():  # off-grid zero-points, negative step sizes
        for n, p in net.named_parameters():
            if ".zero_point." in n:
                p.add_(torch.rand(p.shape, generator=g) - 0.5)
            elif ".scale." in n:
                p.mul_(torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0))
    return net




def test_memo_of_tied_quantizers_changes_no_value():
    """ElasticNet.forward quantizes a tensor several layers read once; the bare graph
    module (no memo) quantizes it per reader. Same outputs, same gradients."""
    net = _net()
    net.train()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    for i in range(4):
        spec = net.sample(random.Random(i)) if i else net.lowest(net.space.forms[0])
        net.set_active(spec)
        res = []
        for f in (net, net.gm):
            net.zero_grad(set_to_none=True)
            out = f(x)
            F.cross_entropy(out, y).backward()
            res.append((out.detach(), grads(net)))
        assert_same_forward_and_grads(*res)


@pytest.mark.parametrize("form", [0, 3])
@pytest.mark.parametrize("shared", [False, True])
def test_elastic_conv_equals_the_composite_layer(form, shared):
    """One elastic conv (one autograd node) against quantize(input), quantize(weight) and
    the int32 bias written with autograd ops on the quantizers' qparams. A conv reading a
    shared tensor first requantizes it from the stored 8 bits."""
    net = _net(seed=2)
    name, m = next(
        (n, m)
        for n, m in net.layers()
        if isinstance(m, ElasticConv2d) and n not in net.fixed_layers and (m.stored_bits is not None) == shared
    )
    f = net.space.forms[form]
    spec = net.layer_spec(name, f, 3, 4)
    x0 = torch.randn(4, m.weight.shape[1], 8, 8, generator=torch.Generator().manual_seed(3))
    gout = None
    res = []
    for composite in (False, True):
        net.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        if composite:
            xin = x
            if shared:
                s8, z8 = m.aq.qparams(spec.act.with_bits(8))
                st = spec.act.with_bits(8)
                xin = fake_quant_reference(x, s8, z8, st.qmin, st.qmax, lsq_grad_factor(st.qmax, x.numel()))
            s_a, z_a = m.aq.qparams(spec.act)
            s_w, z_w = m.wq.qparams(spec.weight)
            g_a = lsq_grad_factor(spec.act.qmax, x.numel())
            g_w = lsq_grad_factor(spec.weight.qmax, m.weight.numel() // s_w.numel())
            xq = fake_quant_reference(xin, s_a, z_a, spec.act.qmin, spec.act.qmax, g_a)
            wq = fake_quant_reference(
                m.weight, channel_view(s_w, 4, 0), channel_view(z_w, 4, 0), spec.weight.qmin, spec.weight.qmax, g_w
            )
            s = (s_a * s_w).detach()
            out = F.conv2d(xq, wq, round_ste(m.bias / s) * s, m.stride, m.padding)
        else:
            m.active = spec
            out = m(x)
        if gout is None:
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        out.backward(gout)
        cells = [p.grad for p in m.aq.parameters()] + [p.grad for p in m.wq.parameters()]
        res.append((out.detach(), x.grad, m.weight.grad, m.bias.grad, cells))
    m.active = None
    (o1, *g1, c1), (o2, *g2, c2) = res
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sum(c is not None for c in c1) >= 2
    for a, b in zip(c1, c2):  # step sizes and zero-points of every cell
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cached_cells_follow_a_loaded_state_dict():
    """The layers cache which zero-point an activation uses (signed inputs only); loading
    another supernet's calibration must not reuse the stale choice."""
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    a, b = _net(seed=0), _net(seed=0)
    for q in (m.aq for _, m in b.layers() if hasattr(m.aq, "signed_input")):
        q.signed_input.fill_(False)  # b believes every input is non-negative
    b.set_active(b.uniform_spec(b.space.forms[1], 4))  # asymmetric activations
    with torch.no_grad():
        b(x)  # fills the caches
        b.load_state_dict(a.state_dict())
        spec = a.uniform_spec(a.space.forms[1], 4)
        a.set_active(spec)
        b.set_active(spec)
        assert torch.equal(bits(a(x)), bits(b(x)))
        # assign=True replaces the Parameters themselves: the cached cells must follow
        c = _net(seed=1)
        c.set_active(spec)
        b.load_state_dict(c.state_dict(), assign=True)
        assert torch.equal(bits(c(x)), bits(b(x)))


@pytest.mark.parametrize("mode", ["sym", "offset", "z"])
@pytest.mark.parametrize("relu", [False, True])
def test_fake_quant_add_is_fake_quant_then_add_to_the_bit(mode, relu):
    """fake_quant_add(x, y): one kernel pass for a residual add's private input, against
    fake_quant_learned(x) + y (and the ReLU's backward after it when relu): the output and
    the gradients of x, y, the step size and the zero-point equal to the bit."""
    from deployq.quant import can_add_fused, fake_quant_add

    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(4, 6, 9, 9, generator=gen) * 2
    if relu:
        x0 = x0.relu()
    y0 = torch.randn(4, 6, 9, 9, generator=gen)
    g = torch.randn(4, 6, 9, 9, generator=gen)
    qmin, qmax = (0, 15) if mode != "sym" else (-8, 7)
    gf = lsq_grad_factor(qmax, x0.numel())
    assert can_add_fused(x0, y0)
    res = []
    for fused in (True, False):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        raw_s = torch.tensor([0.13], requires_grad=True)
        raw_z = torch.tensor([3.4], requires_grad=True) if mode == "z" else None
        if fused:
            out = fake_quant_add(x, y, raw_s, raw_z, qmin, qmax, gf, MIN_SCALE, mode == "offset", relu)
        else:
            xin = x.relu() if relu else x  # x >= 0: the same values, and the ReLU's backward
            out = fake_quant_learned(xin, raw_s, raw_z, qmin, qmax, gf, MIN_SCALE, None, mode == "offset")[0] + y
        out.backward(g)
        res.append([out.detach(), x.grad, y.grad, raw_s.grad] + ([raw_z.grad] if raw_z is not None else []))
    for a, b in zip(*res):
        assert torch.equal(bits(a), bits(b))


def test_fused_residual_adds_change_no_gradient(monkeypatch):
    """A GPG sandwich step on a ResNet-20 with the residual adds fused
    (elastic.FUSE_ADD) and without: the same losses and gradients to the bit, also in a
    grad-l1 step (its double backward takes the traced path)."""
    from dataclasses import replace

    from deployq import elastic, quant
    from deployq.train import TrainConfig, choose_subnets, sandwich_step

    fused_calls = []
    apply = quant._FakeQuantAdd.apply
    monkeypatch.setattr(quant._FakeQuantAdd, "apply", lambda *a: fused_calls.append(1) or apply(*a))

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, input_size=8, width=4)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, 8, 8))
    cfg = TrainConfig(input_size=8, width=4)
    net = convert(model.eval(), cfg.space)
    net.calibrate([torch.randn(16, 3, 8, 8).abs() for _ in range(2)])
    net.train()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    for c, l1 in ((cfg, False), (replace(cfg, grad_l1_a=1e-3, grad_l1_w=1e-3), True)):
        specs = choose_subnets(net, random.Random(2), c)
        out = []
        for fuse in (True, False):
            elastic.FUSE_ADD = fuse
            try:
                net.zero_grad(set_to_none=True)
                loss = sandwich_step(net, net, x, y, specs, c, grad_l1_on=l1)
            finally:
                elastic.FUSE_ADD = True
            out.append((loss, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
        (la, ga), (lb, gb) = out
        assert len(fused_calls) == 27  # 9 adds a subnet, 3 subnets: all fused, and only when asked
        fused_calls.clear()
        assert la == lb and ga.keys() == gb.keys()
        for n in ga:
            assert torch.equal(bits(ga[n]), bits(gb[n])), n
