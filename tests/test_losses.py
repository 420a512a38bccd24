import pytest
import torch
import torch.nn.functional as F

from deployq.losses import distill_kl, gpg_loss, grad_l1, standardized_moments, wdr_loss


def test_wdr_near_zero_for_uniform_and_positive_for_skewed():
    g = torch.Generator().manual_seed(0)
    uniform = [torch.rand(50000, generator=g) * 2 - 1 for _ in range(3)]
    skewed = [torch.empty(4000).exponential_(generator=g) for _ in range(3)]
    gauss = [torch.randn(4000, generator=g) for _ in range(3)]
    lu, ls, lg = wdr_loss(uniform), wdr_loss(skewed), wdr_loss(gauss)
    assert float(lu) < 1e-3
    assert float(ls) > 1.0  # exponential: skew 2, kurtosis 9
    assert float(lu) < float(lg) < float(ls)  # gaussian: kurtosis 3 -> 0.015 * 1.2^2


def test_wdr_matches_the_formula_and_has_gradients():
    w = torch.randn(5, 3, 3, 3).pow(3).requires_grad_()
    skew, kurt = standardized_moments(w)
    z = (w - w.mean()) / w.std(unbiased=False)
    torch.testing.assert_close(skew, (z**3).mean())
    torch.testing.assert_close(kurt, (z**4).mean())
    loss = wdr_loss([w])
    torch.testing.assert_close(loss, skew**2 + 0.015 * (kurt - 1.8) ** 2)
    loss.backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_distill_kl_is_kl_of_teacher_to_student_and_does_not_train_the_teacher():
    s = torch.randn(8, 5, requires_grad=True)
    t = torch.randn(8, 5, requires_grad=True)
    kl = distill_kl(s, t)
    p_t = F.softmax(t, 1)
    manual = (p_t * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()
    torch.testing.assert_close(kl, manual)
    kl.backward()
    assert t.grad is None and s.grad is not None
    assert float(distill_kl(s.detach(), s.detach())) == pytest.approx(0.0, abs=1e-6)


def test_gpg_loss_chains_half_kl_half_ce():
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    torch.testing.assert_close(gpg_loss(s, y, t), 0.5 * distill_kl(s, t) + 0.5 * F.cross_entropy(s, y))
    torch.testing.assert_close(gpg_loss(s, y, None), F.cross_entropy(s, y))


def test_grad_l1_equals_manual_and_its_gradient_matches_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(16, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (16,))
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def reg(wt):
        wt = wt.to(torch.float64)
        loss = F.cross_entropy(torch.tanh(x @ wt.t()) @ torch.ones(3, 4, dtype=torch.float64), y)
        return grad_l1(loss, [wt], 0.7)

    r = reg(w)
    loss = F.cross_entropy(torch.tanh(x @ w.t()) @ torch.ones(3, 4, dtype=torch.float64), y)
    (g,) = torch.autograd.grad(loss, [w])
    torch.testing.assert_close(r, 0.7 * g.abs().sum())
    # d reg / d w (double back-prop) against central finite differences
    (analytic,) = torch.autograd.grad(r, [w])
    eps = 1e-6
    numeric = torch.zeros_like(w)
    with torch.no_grad():
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                wp, wm = w.detach().clone(), w.detach().clone()
                wp[i, j] += eps
                wm[i, j] -= eps
                wp.requires_grad_()
                wm.requires_grad_()
                with torch.enable_grad():
                    numeric[i, j] = (reg(wp) - reg(wm)) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-6)


def test_grad_l1_zero_lambda_and_unused_tensors():
    w = torch.randn(3, requires_grad=True)
    unused = torch.randn(3, requires_grad=True)
    loss = (w**2).sum()
    assert float(grad_l1(loss, [w], 0.0)) == 0.0
    torch.testing.assert_close(grad_l1(loss, [w, unused], 1.0), (2 * w).abs().sum())


@pytest.mark.parametrize("kernel", [True, False])
def test_wdr_kernel_and_torch_path_agree_with_the_double_precision_formula(kernel):
    """The fused kernel (one node, moments in double) and the per-layer torch graph give
    the loss and every layer's gradient of the per-layer formula taken in float64."""
    from deployq import kernels
    from deployq.losses import _WDR

    if kernel and kernels.get() is None:
        pytest.skip("no compiled kernel here")
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 3, 3, 3, generator=g).exp(), torch.randn(16, 8, 3, 3, generator=g),
          torch.rand(10, 64, generator=g) ** 3, torch.randn(7, generator=g)]
    ws = [w.requires_grad_() for w in ws]
    ctx = kernels.disabled() if not kernel else torch.enable_grad()
    with ctx:
        assert _WDR.applies(ws) == kernel
        loss = wdr_loss(ws)
        got = torch.autograd.grad(loss, ws)
    ref_ws = [w.detach().double().requires_grad_() for w in ws]
    moments = [standardized_moments(w) for w in ref_ws]
    skew = torch.stack([m[0] for m in moments])
    kurt = torch.stack([m[1] for m in moments])
    ref = skew.pow(2).mean() + 0.015 * (kurt - 1.8).pow(2).mean()
    want = torch.autograd.grad(ref, ref_ws)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_wdr_kernel_passes_gradcheck_in_its_own_precision():
    from deployq import kernels

    if kernels.get() is None:
        pytest.skip("no compiled kernel here")
    ws = [torch.randn(4, 3, 3, 3).pow(3).requires_grad_(), torch.randn(6, 4).requires_grad_()]
    # float32 inputs: the moments are double inside, the gradient is rounded to float
    eps = 1e-2
    loss = wdr_loss(ws)
    grads = torch.autograd.grad(loss, ws)
    for w, gw in zip(ws, grads):
        for idx in [(0,) * w.dim(), tuple(s - 1 for s in w.shape)]:
            with torch.no_grad():
                w[idx] += eps
                up = float(wdr_loss(ws))
                w[idx] -= 2 * eps
                down = float(wdr_loss(ws))
                w[idx] += eps
            assert float(gw[idx]) == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=1e-4)
