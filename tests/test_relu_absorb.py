"""ReLUs whose backward the quantizers after them take over (deployq.relu_absorb): which
ReLUs convert() hands over, and that a training step's gradients are bit for bit those
of plain ReLUs, one subnet after the other or stacked, on the kernel or the torch path."""

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from same_math import bits
from torch import nn

from deployq import kernels, relu_absorb
from deployq.elastic import convert
from deployq.models import build_model
from deployq.relu_absorb import AbsorbedReLU
from deployq.train import TrainConfig, choose_subnets, sandwich_step, stacked_sandwich_step


class _Mixed(nn.Module):
    """A ReLU read by a max-pool (stays), one read by a conv and a residual add (handed
    over, F.relu), one read by a flatten (stays), one read by an average pool (handed over)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * 4 * 4 + 4, 10)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        r = F.relu(self.conv2(x))
        y = self.conv3(r) + r
        flat = torch.flatten(torch.relu(y), 1)
        pooled = torch.flatten(self.gap(y.relu()), 1)
        return self.fc(torch.cat([flat, pooled], 1))


def _calibrated(model, size=8, seed=0):
    torch.manual_seed(seed)
    cfg = TrainConfig(input_size=size, width=4)
    net = convert(model.eval(), cfg.space)
    net.calibrate([torch.randn(16, 3, size, size).abs() for _ in range(2)])
    return net, cfg


def _resnet(seed=0, size=8):
    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes=10, input_size=size, width=4)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 3, size, size))  # BN statistics to fold
    return _calibrated(model, size, seed)


def test_convert_hands_over_only_relus_that_quantizers_alone_read():
    net, _ = _calibrated(_Mixed())
    absorbed = [n for n, m in net.gm.named_modules() if isinstance(m, AbsorbedReLU)]
    assert len(absorbed) == 2 and net.relu_absorb  # F.relu -> conv3 and add; y.relu() -> pool
    assert type(net.gm.relu1) is nn.ReLU  # read by the max-pool
    ops = [n.target for n in net.gm.graph.nodes if n.op != "call_module"]
    assert torch.relu in ops  # read by the flatten
    marked = {n for n, m in net.gm.named_modules() if getattr(m, "after_relu", False)}
    # conv3's input quantizer, which the add's second input shares (one tensor, one
    # quantizer), and the average pool's
    assert marked == {"conv3.aq", "gap.aq.0"}
    assert net.gm.qadd_add.aq[1] is net.gm.conv3.aq


class _InPlace(nn.Module):
    """In-place ReLUs: one on a tensor only it reads (the same as out of place: handed
    over), one on a tensor the add reads too (the add sees the ReLU's result: stays)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        r = self.relu(self.conv1(x))
        b = self.conv2(r)
        c = F.relu(b, inplace=True)
        return self.conv3(c) + b


def test_in_place_relus_are_handed_over_only_where_nothing_else_reads_their_input():
    model = _InPlace()
    net, _ = _calibrated(model)
    kinds = [type(net.gm.get_submodule(n.target)).__name__ if n.op == "call_module" else str(n.target)
             for n in net.gm.graph.nodes if "relu" in n.name]
    assert kinds.count("AbsorbedReLU") == 1 and len(kinds) == 2
    x = torch.rand(2, 3, 8, 8)
    net.set_active(None)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))  # the add still reads the ReLU's result


def test_resnet20_hands_over_every_relu():
    net, _ = _resnet()
    n = sum(isinstance(m, AbsorbedReLU) for m in net.gm.modules())
    assert n == 19 and not any(type(m) is nn.ReLU for m in net.gm.modules())


def _step(net, cfg, x, y, specs, stacked, absorb, seen):
    net.relu_absorb = absorb
    net.zero_grad(set_to_none=True)
    step = stacked_sandwich_step if stacked else sandwich_step
    loss = step(net, net, x, y, specs, cfg)
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return loss, grads, seen[:]


def _grad_fns(net, seen):
    """Per AbsorbedReLU call: "handed on" when it passed its input through (the quantizers
    after it apply the ReLU), else its output's grad_fn."""
    def hook(_m, args, out):
        if out is args[0]:
            seen.append("handed on")
        else:
            seen.append(type(out.grad_fn).__name__ if out.grad_fn is not None else None)

    return [m.register_forward_hook(hook) for m in net.gm.modules() if isinstance(m, AbsorbedReLU)]


@pytest.mark.parametrize(("model", "stacked", "kernel"), [
    ("resnet", False, True), ("resnet", True, True), ("resnet", False, False), ("mixed", False, True),
    ("mixed", False, False),
])
def test_a_step_takes_the_same_gradients_bit_for_bit(model, stacked, kernel):
    """GPG sandwich (KL chain, WDR): the losses and every parameter's gradient equal to
    the bit with the ReLU backwards handed over and without."""
    net, cfg = _resnet() if model == "resnet" else _calibrated(_Mixed())
    net.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    specs = choose_subnets(net, random.Random(3), cfg)
    seen: list = []
    hooks = _grad_fns(net, seen)
    ctx = kernels.disabled() if not kernel else torch.enable_grad()
    with ctx:
        loss_on, on, fns_on = _step(net, cfg, x, y, specs, stacked, True, seen)
        seen.clear()
        loss_off, off, fns_off = _step(net, cfg, x, y, specs, stacked, False, seen)
    for h in hooks:
        h.remove()
    assert set(fns_on) == {"handed on"}  # the hand-over did happen
    assert set(fns_off) == {"ReluBackward0"}
    assert loss_on == loss_off
    assert on.keys() == off.keys()
    for n in on:
        assert torch.equal(bits(on[n]), bits(off[n])), n


def test_float_subnet_no_grad_and_grad_l1_capture_keep_plain_relus():
    """The hand-over is off for the float network, without grad, and in the subnet whose
    activations grad-l1 collects (it needs the ReLU output's own gradient); a grad-l1 step
    then takes the same gradients either way."""
    net, cfg = _resnet(seed=2)
    net.train()
    seen: list = []
    hooks = _grad_fns(net, seen)
    x = torch.rand(4, 3, 8, 8)
    net.set_active(None)
    net(x)
    assert set(seen) == {"ReluBackward0"}
    seen.clear()
    net.set_active(net.highest(cfg.forms[0]))
    with torch.no_grad():
        net(x)
    assert set(seen) == {None}
    seen.clear()
    cfg = replace(cfg, grad_l1_a=1e-3, grad_l1_w=1e-3)
    specs = choose_subnets(net, random.Random(0), cfg)
    y = torch.randint(0, 10, (4,))
    out = []
    for absorb in (True, False):
        net.relu_absorb = absorb
        net.zero_grad(set_to_none=True)
        seen.clear()
        loss = sandwich_step(net, net, x, y, specs, cfg, grad_l1_on=True)
        out.append((loss, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, seen[:]))
    for h in hooks:
        h.remove()
    (loss_on, on, fns_on), (loss_off, off, _) = out
    n = len(fns_on) // 3
    assert set(fns_on[:n]) == {"ReluBackward0"} and set(fns_on[n:]) == {"handed on"}
    assert loss_on == loss_off
    for k in on:
        assert torch.equal(bits(on[k]), bits(off[k])), k


def test_absorbed_relu_is_a_relu_outside_a_hand_over():
    m = AbsorbedReLU()
    x = torch.tensor([-1.0, -0.0, 0.0, 2.0, float("nan")], requires_grad=True)
    assert not relu_absorb.absorbing()
    assert torch.equal(bits(m(x).detach()), bits(torch.relu(x.detach())))
    with relu_absorb.absorb(True):
        y = m(x)
        assert relu_absorb.absorbing()
    assert not relu_absorb.absorbing()
    assert y is x  # handed on: the quantizers reading it apply the ReLU
