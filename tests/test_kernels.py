"""The compiled fake-quant kernel (deployq.kernels) against the torch path of
deployq.quant: same forward bits, gradients to float rounding, and the loader's
fallback and cache. The kernel is built once per session into a temporary directory
(a fresh machine needs no warm cache in $HOME)."""

import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from same_math import assert_same_forward_and_grads, bits, grads

from deployq import kernels
from deployq.elastic import convert
from deployq.kernels import fq
from deployq.models import build_model
from deployq.quant import (
    LearnedFQ,
    _fq_backward,
    _fq_forward,
    fake_quant,
    fake_quant_learned,
    fake_quant_reference,
)
from deployq.spec import ElasticSpace

GRIDS = [(-128, 127), (0, 255), (-2, 1), (0, 3), (-8, 7)]


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="session")
def lib(kernel_dir):
    """The kernel built into a session tmp dir, whatever DEPLOYQ_KERNELS the run has."""
    if shutil.which((kernels._compiler() or ["cc"])[0]) is None:
        # deployq runs without one (the torch path; see test_no_compiler_falls_back_to_torch)
        pytest.skip("no C compiler ($CC / cc) to build the kernel with")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEPLOYQ_KERNELS", "1")
        lib = kernels.load(kernel_dir)
    assert lib is not None, "the kernel did not build"
    return lib


@pytest.fixture
def use(lib, monkeypatch):
    """use(True): the kernel; use(False): the torch path (get() returns None)."""

    def set_(on: bool):
        monkeypatch.setattr(kernels, "_lib", lib if on else None)

    yield set_




@st.composite
def cases(draw):
    """(x, s, z, qmin, qmax, zero_offset): per-tensor or per-channel along axis 0; powers of
    two for s half the time so that x = (k + 0.5) * s are exact ties; -0.0, values far
    outside the grid (saturation), z = -0.0."""
    qmin, qmax = draw(st.sampled_from(GRIDS))
    per_channel = draw(st.booleans())
    c = draw(st.integers(1, 5)) if per_channel else 1
    k = draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        s = 2.0 ** rng.integers(-6, 3, size=c)
    else:
        s = rng.uniform(1e-3, 2.0, size=c)
    s = torch.tensor(s, dtype=torch.float32)
    kind = rng.integers(0, 4, size=(c, k))
    x = torch.tensor(rng.normal(0, 1, size=(c, k)) * (qmax - qmin) / 2, dtype=torch.float32) * s[:, None]
    ties = (torch.tensor(rng.integers(2 * qmin - 4, 2 * qmax + 4, size=(c, k)), dtype=torch.float32) + 0.5)
    x = torch.where(torch.tensor(kind == 1), ties * s[:, None], x)
    x = torch.where(torch.tensor(kind == 2), torch.tensor(-0.0), x)
    x = torch.where(torch.tensor(kind == 3), x * 1e3, x)  # saturates
    mode = draw(st.sampled_from(["sym", "offset", "z"]))
    z = None
    if mode == "z":
        z = torch.tensor(rng.integers(qmin, qmax + 1, size=c), dtype=torch.float32)
        z[z == 0] = -0.0 if draw(st.booleans()) else 0.0  # round() of a small negative zero-point
    shape = (c, k) if per_channel else (k * c,)
    x = x.reshape(shape)
    sv = s.view(c, 1) if per_channel else s[:1]
    zv = None if z is None else (z.view(c, 1) if per_channel else z[:1])
    return x, sv, zv, qmin, qmax, mode == "offset"


# `use` only switches a module attribute, idempotently: safe to share across examples
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), gf=st.sampled_from([1.0, 0.01]), flags=st.sampled_from(
    [(True, True, True), (True, False, False), (False, True, False), (True, True, False), (True, False, True)]),
       with_z=st.booleans())
def test_kernel_equals_the_torch_path(use, case, gf, flags, with_z):
    x, s, z, qmin, qmax, zero_offset = case
    use(False)
    t_ref, out_ref = _fq_forward(x, s, z, qmin, qmax, zero_offset)
    use(True)
    assert fq.forward(x, s, z, qmin, qmax, zero_offset) is not None  # the kernel ran
    t, out = _fq_forward(x, s, z, qmin, qmax, zero_offset)
    assert torch.equal(bits(out), bits(out_ref))  # signs of zeros included
    assert torch.equal(bits(t), bits(t_ref))

    need_x, need_s, reuse = flags
    zmask = None if z is None or not with_z else (z.abs() < qmax).float()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(x.numel())))
    bounds = (qmin - 0.5, qmax + 0.5)
    with torch.no_grad():  # as in an autograd backward (without create_graph)
        use(False)
        ref = _fq_backward(g.clone(), t, out, x, s, zmask, bounds, gf, need_x, need_s, reuse)
        use(True)
        g_own = g.clone()
        got = _fq_backward(g_own, t, out, x, s, zmask, bounds, gf, need_x, need_s, reuse)
    # s's sum cancels (sum g*out - sum g*x over unclamped x): float32 (torch) against double
    # (kernel) rounding, relative to the size of the summed terms
    inside = (t > bounds[0]) & (t < bounds[1])
    terms = g.abs() * (out.abs() + torch.where(inside, x.abs(), 0.0))
    tol = 1e-6 * gf * float(terms.sum()) / float(s.min()) + 1e-6 * gf * float(g.abs().sum())
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=tol)
    if need_x:
        assert torch.equal(got[0], ref[0])  # a mask of g: exact
        assert (got[0].data_ptr() == g_own.data_ptr()) == reuse


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), grid=st.sampled_from(GRIDS), per_channel=st.booleans(),
       mode=st.sampled_from(["sym", "offset", "z"]), need=st.sampled_from([(True, True), (True, False), (False, True)]),
       reuse=st.booleans())
def test_learned_kernel_equals_the_torch_path(use, seed, grid, per_channel, mode, need, reuse):
    """LearnedFQ in one kernel call each way: raw step sizes negative or below MIN_SCALE,
    off-grid and out-of-grid zero-points."""
    qmin, qmax = grid
    gen = torch.Generator().manual_seed(seed)
    c = 5 if per_channel else 1
    x = torch.randn(5, 3, 2, 2, generator=gen) * 2
    x[0, 0] = -0.0
    raw_s = (torch.rand(c, generator=gen) * 0.4 + 0.01) * torch.where(torch.rand(c, generator=gen) < 0.4, -1.0, 1.0)
    raw_s[torch.rand(c, generator=gen) < 0.2] = 1e-9
    raw_z = torch.randint(qmin - 2, qmax + 3, (c,), generator=gen).float() + torch.rand(c, generator=gen) - 0.5
    raw_z = raw_z if mode == "z" else None
    g = torch.randn(x.shape, generator=gen)
    need_x, need_s = need
    res = []
    for on in (False, True):
        use(on)
        fq = LearnedFQ()
        with torch.no_grad():
            out, scale = fq.forward(x, raw_s, raw_z, qmin, qmax, 0.03, 1e-8, 0 if per_channel else None,
                                    mode == "offset", True)
            grad = fq.backward(g.clone(), out, x, raw_s, need_x, need_s, reuse)
        assert (fq.a is None) == on  # which path ran
        res.append((out, scale, grad))
    (o1, s1, g1), (o2, s2, g2) = res
    assert torch.equal(bits(o1), bits(o2)) and torch.equal(bits(s1), bits(s2))
    assert s1.shape == s2.shape == raw_s.shape
    if need_x:
        assert torch.equal(bits(g1[0]), bits(g2[0]))  # a mask of g: exact
    # the step size's sum cancels (sum g*out - sum g*x): float32 (torch) against double
    # (kernel) rounding, relative to the size of the summed terms
    tol = 1e-6 * float((g.abs() * (x.abs() + o1.abs())).sum()) * 0.03 / float(s1.min())
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=tol)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), grid=st.sampled_from(GRIDS), per_channel=st.booleans(),
       mode=st.sampled_from(["sym", "offset", "z"]), k=st.integers(1, 80))
def test_learned_kernel_recomputes_the_grid_bit_for_bit(use, seed, grid, per_channel, mode, k):
    """LearnedFQ's kernel keeps no integer grid t: its backward recomputes t and out from
    x. The gradients are those of the kernel that reads a stored t and out
    (deployq_fq_backward) bit for bit, the same sums in the same order, so training does
    not move by a bit. k: row lengths around the 16-float blocks."""
    qmin, qmax = grid
    gen = torch.Generator().manual_seed(seed)
    c = 3 if per_channel else 1
    x = torch.randn(c, k, generator=gen) * 3
    raw_s = torch.rand(c, generator=gen) * 0.4 + 0.01  # positive, above MIN_SCALE: scale == raw
    raw_z = (torch.randint(qmin, qmax + 1, (c,), generator=gen).float() + 0.3) if mode == "z" else None
    g = torch.randn(c, k, generator=gen)
    use(True)
    with torch.no_grad():
        out, scale, zq, zmask = fq.learned_forward(x, raw_s, raw_z, qmin, qmax, 1e-8, 0, mode == "offset", True)
        gx, gs, gz = fq.learned_backward(g.clone(), x, scale, zq, zmask, qmin, qmax, mode == "offset", 0.03, raw_s,
                                         1e-8, True, True, False)
        s = scale.view(c, 1)
        z = None if zq is None else zq.view(c, 1)
        t, ref_out = fq.forward(x, s, z, qmin, qmax, mode == "offset")
        rx, rs, rz = fq.backward(g.clone(), t, ref_out, x, s, None if zmask is None else zmask.view(c, 1),
                                 (qmin - 0.5, qmax + 0.5), 0.03, True, True, False)
    assert torch.equal(bits(out), bits(ref_out))
    assert torch.equal(bits(gx), bits(rx))
    assert torch.equal(bits(gs), bits(rs.view(c)))
    if mode == "z":
        assert torch.equal(bits(gz), bits(rz.view(c)))
    else:
        assert gz is None and rz is None


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), grid=st.sampled_from(GRIDS), per_channel=st.booleans(),
       mode=st.sampled_from(["sym", "offset", "z"]), k=st.sampled_from([1, 15, 16, 17, 80, 70_001]),
       need=st.sampled_from([(True, True), (True, False), (False, True)]), threads=st.sampled_from([1, 2]))
def test_learned_kernel_applies_an_absorbed_relu_bit_for_bit(use, seed, grid, per_channel, mode, k, need, threads):
    """relu=True: the kernel reads a ReLU's input x and does the ReLU (deployq/relu_absorb.py).
    Forward: what it gives on torch.relu(x), also as a residual add's input; backward: the
    gradients it gives on relu(x) with the ReLU's backward (threshold_backward) after
    them, to the bit, -0.0 and NaN passing the ReLU as torch's does. k: around the
    16-float blocks, and past the threading threshold."""
    qmin, qmax = grid
    gen = torch.Generator().manual_seed(seed)
    c = 3 if per_channel and k < 1000 else 1
    x = torch.randn(c, k, generator=gen) * 3
    x.view(-1)[:: 7] = -0.0
    x.view(-1)[3 :: 11] = float("nan")
    raw_s = torch.rand(c, generator=gen) * 0.4 + 0.01
    raw_z = (torch.randint(qmin, qmax + 1, (c,), generator=gen).float() + 0.3) if mode == "z" else None
    g = torch.randn(c, k, generator=gen)
    y = torch.randn(c, k, generator=gen)
    need_x, need_s = need
    xr = torch.relu(x)
    use(True)
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got, ref = [
                fq.learned_forward(xin, raw_s, raw_z, qmin, qmax, 1e-8, 0, mode == "offset", True, relu)
                for xin, relu in ((x, True), (xr, False))
            ]
            grads = [
                fq.learned_backward(g.clone(), xin, got[1], got[2], got[3], qmin, qmax, mode == "offset", 0.03, raw_s,
                                    1e-8, need_x, need_s, False, relu)
                for xin, relu in ((x, True), (xr, False))
            ]
            if c == 1:
                add, add_ref = [fq.learned_forward_add(xin, y, raw_s, raw_z, qmin, qmax, 1e-8, mode == "offset", True,
                                                       relu)[0] for xin, relu in ((x, True), (xr, False))]
                assert torch.equal(bits(add), bits(add_ref))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(bits(got[0]), bits(ref[0]))
    (gx, gs, gz), (rx, rs, rz) = grads
    if need_x:
        assert torch.equal(bits(gx), bits(torch.ops.aten.threshold_backward(rx, xr, 0.0)))
    else:
        assert gx is None
    for a, b in ((gs, rs), (gz, rz)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(bits(a), bits(b))


def test_an_expanded_gradient_runs_the_kernel_on_a_copy(use):
    """A gradient that is not dense (a mean's backward expands it) is copied for the
    kernel rather than sending the whole backward down the torch path."""
    use(True)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, 5, generator=gen)
    raw_s, raw_z = torch.tensor([0.07]), torch.tensor([1.3])
    g = torch.randn(4, 3, 1, 1, generator=gen).expand(4, 3, 5, 5)
    res = []
    for grad in (g, g.contiguous()):
        fq = LearnedFQ()
        with torch.no_grad():
            out, _ = fq.forward(x, raw_s, raw_z, -8, 7, 0.1, 1e-8, None, False, True)
            res.append(fq.backward(grad, out, x, raw_s, True, True, reuse_g=True))
        assert fq.t is None  # the kernel ran both ways (the torch path would have kept t)
    for a, b in zip(*res):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("mode", ["sym", "z"])
def test_threaded_kernel_on_a_large_tensor_equals_the_torch_path(use, mode):
    """Two threads split a tensor above the kernel's threading threshold; the result does
    not depend on it beyond the order of the partial sums."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 100_003, generator=gen) * 3  # not a multiple of the chunking
    g = torch.randn(x.shape, generator=gen)
    raw_s, raw_z = torch.tensor([0.021]), (torch.tensor([2.6]) if mode == "z" else None)
    res = []
    n = torch.get_num_threads()
    try:
        for on, threads in ((False, 1), (True, 1), (True, 2)):
            use(on)
            torch.set_num_threads(threads)
            fq = LearnedFQ()
            with torch.no_grad():
                out, _ = fq.forward(x, raw_s, raw_z, -128, 127, 1e-3, 1e-8, None, False, True)
                res.append((out, *fq.backward(g.clone(), out, x, raw_s, True, True, True)))
            assert (fq.a is None) == on
    finally:
        torch.set_num_threads(n)
    ref = res[0]
    for got in res[1:]:
        assert torch.equal(bits(got[0]), bits(ref[0])) and torch.equal(got[1], ref[1])
        for a, b in zip(got[2:], ref[2:]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_portable_build_equals_the_torch_path(kernel_dir, monkeypatch):
    """The last resort build (no -march=native, no OpenMP) computes the same numbers."""
    monkeypatch.setenv("DEPLOYQ_KERNELS", "1")
    plain = kernels.load(kernel_dir, flag_sets=(kernels.BASE_FLAGS,))
    assert plain is not None
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(70_001, generator=gen) * 40
    s, z = torch.tensor([0.3]), torch.tensor([-3.0])
    monkeypatch.setattr(kernels, "_lib", None)
    ref = _fq_forward(x, s, z, -8, 7, False)
    monkeypatch.setattr(kernels, "_lib", plain)
    got = fq.forward(x, s, z, -8, 7, False)
    for a, b in zip(got, ref):
        assert torch.equal(bits(a), bits(b))


def test_double_backward_after_a_kernel_forward_is_traced(use):
    """create_graph (grad-l1): the kernel's forward layout is handed to the torch backward,
    whose ops autograd records; same second-order gradients as with the kernel off."""
    gen = torch.Generator().manual_seed(3)
    x0, w = torch.randn(4, 3, 3, 3, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    res = []
    for on in (False, True):
        use(on)
        x = x0.clone().requires_grad_()
        raw_s = torch.tensor([0.1, -0.2, 0.05, 0.3], requires_grad=True)
        raw_z = torch.tensor([0.4, -1.6, 2.2, 0.0], requires_grad=True)
        out, _ = fake_quant_learned(x, raw_s, raw_z, -8, 7, 0.1, 1e-8, axis=0)
        (gx,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
        ((gx * w).sum() + out.square().sum()).backward()
        res.append((out.detach(), gx.detach(), x.grad, raw_s.grad, raw_z.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_forward_equals_the_onnx_reference_on_asymmetric_grids(use):
    """Bit for bit against fake_quant_reference (ONNX Q/DQ), ties and -0.0 included."""
    use(True)
    s = torch.tensor([0.25])
    x = torch.tensor([-0.0, 0.0, 0.125, -0.125, 0.375, -0.375, 100.0, -100.0, 0.1, -0.05] * 7)
    for qmin, qmax in GRIDS:
        for zv in (0.0, -0.0, float(qmin + 1)):
            z = torch.tensor([zv])
            assert fq.forward(x, s, torch.round(z).clamp(qmin, qmax), qmin, qmax, False) is not None
            got = fake_quant(x, s, z, qmin, qmax)
            assert torch.equal(bits(got), bits(fake_quant_reference(x, s, z, qmin, qmax)))


def test_tensors_the_kernel_does_not_take_use_the_torch_path(use):
    use(True)
    s = torch.tensor([0.1])
    x = torch.randn(4, 6)
    assert fq.forward(x.t(), s, None, -8, 7, False) is None  # not contiguous
    assert fq.forward(x.double(), s.double(), None, -8, 7, False) is None
    assert fq.forward(x, torch.rand(1, 6) + 0.1, None, -8, 7, False) is None  # per channel on axis 1
    assert fq.forward(x, torch.rand(4, 1) + 0.1, None, -8, 7, False) is not None
    # inside a traced (double) backward: the torch ops, so that autograd records them
    t, out = _fq_forward(x, s, None, -8, 7, False)
    with torch.enable_grad():
        assert fq.backward(x, t, out, x, s, None, (-8.5, 7.5), 1.0, True, True, False) is None
    # and the public op still works on them
    xt = x.t()
    torch.testing.assert_close(fake_quant(xt, s, None, -8, 7), fake_quant(xt.contiguous(), s, None, -8, 7))


def test_supernet_gradients_with_and_without_the_kernel(use):
    """The call sites (elastic conv, residual adds, reuse of g) through a tiny supernet."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=10, input_size=8, width=4).eval()
    net = convert(model, ElasticSpace())
    gen = torch.Generator().manual_seed(0)
    net.calibrate([torch.randn(16, 3, 8, 8, generator=gen)])
    with torch.no_grad():
        for n, p in net.named_parameters():
            if ".zero_point." in n:
                p.add_(torch.rand(p.shape, generator=gen) - 0.5)
    net.train()
    x = torch.randn(8, 3, 8, 8, generator=gen)
    y = torch.arange(8) % 10
    for i in range(3):
        net.set_active(net.sample(random.Random(i)))
        res = []
        for on in (False, True):
            use(on)
            net.zero_grad(set_to_none=True)
            out = net(x)
            F.cross_entropy(out, y).backward()
            res.append((out.detach(), grads(net)))
        assert_same_forward_and_grads(*res)


def test_no_compiler_falls_back_to_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYQ_KERNELS", "1")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DEPLOYQ_KERNEL_CACHE", str(tmp_path / "cache"))
    kernels.reset()
    monkeypatch.setattr(kernels, "_lib", kernels._UNSET)  # restored after the test
    assert kernels.build() is None
    assert kernels.get() is None
    x, s = torch.randn(50), torch.tensor([0.1])
    assert fq.forward(x, s, None, -8, 7, False) is None
    z = torch.tensor([1.0])
    assert torch.equal(fake_quant(x, s, z, -8, 7), fake_quant_reference(x, s, z, -8, 7))


def test_disabled_kernel_is_not_loaded_even_when_built(kernel_dir, lib, monkeypatch):
    monkeypatch.setenv("DEPLOYQ_KERNELS", "0")
    assert kernels.load(kernel_dir) is None
    monkeypatch.setattr(kernels, "_lib", kernels._UNSET)
    assert kernels.get() is None


def test_second_load_reuses_the_cached_binary(kernel_dir, lib, monkeypatch):
    monkeypatch.setenv("DEPLOYQ_KERNELS", "1")
    path, compiled = kernels.build(kernel_dir)
    assert not compiled and path.exists()

    def no_compiler(*a, **k):
        raise AssertionError("recompiled")

    monkeypatch.setattr(kernels, "_compile", no_compiler)
    assert kernels.load(kernel_dir) is not None
    assert path.name in {p.name for p in kernel_dir.iterdir()}
    assert not [p for p in kernel_dir.iterdir() if p.suffix == ".tmp"]  # no temporary left


def test_cache_key_follows_source_flags_and_compiler():
    src = b"int f(void) { return 1; }"
    k = kernels._key(src, ["cc"], kernels.BASE_FLAGS)
    assert k == kernels._key(src, ["cc"], kernels.BASE_FLAGS)
    assert k != kernels._key(src + b" ", ["cc"], kernels.BASE_FLAGS)
    assert k != kernels._key(src, ["clang"], kernels.BASE_FLAGS)
    assert k != kernels._key(src, ["cc"], kernels.BASE_FLAGS + kernels.NATIVE_FLAGS)


def test_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("DEPLOYQ_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.cache_dir() == tmp_path / "deployq" / "kernels"


def test_a_new_build_prunes_builds_unused_for_a_month(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("DEPLOYQ_KERNELS", "1")
    old = tmp_path / "fakequant-0000.so"
    recent = tmp_path / "fakequant-1111.so"
    other = tmp_path / "notes.txt"
    for f in (old, recent, other):
        f.write_bytes(b"x")
    month_ago = time.time() - kernels.PRUNE_AFTER_S - 60
    os.utime(old, (month_ago, month_ago))
    os.utime(other, (month_ago, month_ago))
    built = kernels.build(tmp_path)
    if built is None:
        pytest.skip("no C compiler on this machine")
    path, compiled = built
    assert compiled and path.exists()
    assert not old.exists() and recent.exists() and other.exists()
    # loading a cached build marks it used, so it survives the next prune
    os.utime(path, (month_ago, month_ago))
    assert kernels.build(tmp_path) == (path, False)
    assert path.stat().st_mtime > month_ago + 3600
    assert kernels.prune(tmp_path, keep=None) == []
