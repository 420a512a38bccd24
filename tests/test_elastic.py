import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deployq.elastic import (
    ElasticAdd,
    ElasticAvgPool,
    ElasticConv2d,
    ElasticLinear,
    ElasticWeightless,
    convert,
    dequantized_weight,
)
from deployq.errors import UserError
from deployq.models import build_model
from deployq.quant import dequantize, quantize
from deployq.spec import ALL_FORMS, ElasticSpace, Form, LayerSpec, QuantSpec, SubnetSpec


class Tiny(nn.Module):
    """conv-bn-relu, a (depthwise) residual branch, 1x1 conv, GAP, linear."""

    def __init__(self, depthwise: bool = False):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8 if depthwise else 1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(x)))
        y = self.b3(self.c3(y))
        x = F.relu(x + y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def _x(n=8, size=8, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = _randomize_bn(build_model("resnet20", num_classes=10, input_size=8, width=4))
    net = convert(model, ElasticSpace())
    net.calibrate([_x(16), _x(16, seed=2)])
    return model, net


def test_convert_folds_bn_into_convs(resnet):
    model, net = resnet
    x = _x(seed=5)
    net.set_active(None)
    with torch.no_grad():
        ref, got = model(x), net(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_layers_are_swapped_and_residual_adds_quantized(resnet):
    _, net = resnet
    kinds = [type(m) for _, m in net.layers()]
    assert kinds.count(ElasticAdd) == 9  # one per BasicBlock
    assert kinds.count(ElasticLinear) == 1
    assert kinds.count(ElasticConv2d) == 19 + 2  # 19 convs + 2 projection shortcuts
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in net.modules())


def test_calibration_records_signed_inputs(resnet):
    _, net = resnet
    first = net.layer_names[0]
    assert net.input_signed(first)  # normalised images
    post_relu = [n for n, m in net.layers() if isinstance(m, ElasticConv2d)][1]
    assert not net.input_signed(post_relu)


def _capture(net, x):
    ins, outs = {}, {}
    hooks = []

    def keep(name):
        def hook(_mod, args, out):
            ins[name], outs[name] = args, out

        return hook

    for n, m in net.layers():
        hooks.append(m.register_forward_hook(keep(n)))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


def _qdq(x, scale, zp, spec):
    return dequantize(quantize(x, scale, zp, spec.qmin, spec.qmax), scale, zp)


def _stored(x, stored):
    """A shared tensor is first quantized as stored, then requantized by its reader."""
    if stored is None:
        return x
    spec, s, z = stored
    return _qdq(x, s, z, spec)


FORMS = [Form(pc, ws, False) for pc in (False, True) for ws in (False, True)] + [Form(True, True, True, True)]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"pc{int(f.weight_per_channel)}-ws{int(f.weight_symmetric)}-as{int(f.act_symmetric)}")
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("depthwise", [False, True])
def test_freeze_integers_reproduce_the_elastic_forward_exactly(form, bits, depthwise):
    torch.manual_seed(3)
    model = _randomize_bn(Tiny(depthwise), seed=3)
    net = convert(model, ElasticSpace())
    net.calibrate([_x(16)])
    spec = net.uniform_spec(form, bits)
    net.set_active(spec)
    ins, outs = _capture(net, _x(seed=9))
    frozen = net.freeze(spec)
    for name, m in net.layers():
        p = frozen[name]
        if isinstance(m, ElasticWeightless):
            xs = [_stored(x, st) for x, st in zip(ins[name], p.stored)]
            got = m.op(*(_qdq(x, s, z, p.spec.act) for x, (s, z) in zip(xs, p.act)))
        else:
            xq = _qdq(_stored(ins[name][0], p.stored), p.act_scale, p.act_zero_point, p.spec.act)
            w = dequantized_weight(p)
            assert int(p.weight_int.min()) >= p.spec.weight.qmin and int(p.weight_int.max()) <= p.spec.weight.qmax
            bias = p.bias_int.to(torch.float32) * p.bias_scale
            if isinstance(m, ElasticConv2d):
                got = F.conv2d(xq, w, bias, m.stride, m.padding, m.dilation, m.groups)
            else:
                got = F.linear(xq, w, bias)
        assert torch.equal(got, outs[name]), name


def test_fixed_first_and_last_layers(resnet):
    _, net = resnet
    weighted = [n for n, m in net.layers() if not isinstance(m, ElasticWeightless)]
    first, last = weighted[0], weighted[-1]
    # The weightless ops (residual adds, the head's pool) carry the residual stream at
    # the fixed width too.
    weightless = [n for n, m in net.layers() if isinstance(m, ElasticWeightless)]
    assert net.fixed_layers == (first, *weightless, last)
    assert sum(isinstance(net.layer(n), ElasticAvgPool) for n in weightless) == 1
    rng = random.Random(0)
    for spec in [net.uniform_spec(ALL_FORMS[0], 2), net.lowest(Form()), net.sample(rng), net.sample(rng)]:
        for n in (first, last):
            assert spec.layers[n].weight.bits == 8 and spec.layers[n].act.bits == 8
    low = net.lowest(Form())
    assert {low.layers[n].weight.bits for n in weighted[1:-1]} == {2}
    elastic_all = convert(Tiny(), ElasticSpace(fixed_bits=None))
    elastic_all.calibrate([_x()])
    assert elastic_all.fixed_layers == ()
    assert all(ls.act.bits == 2 for ls in elastic_all.lowest(Form()).layers.values())


def test_sample_respects_form_and_space():
    net = convert(Tiny(), ElasticSpace(wbits=(2, 4), abits=(4, 8), forms=(Form(False, True, False),)))
    net.calibrate([_x()])
    rng = random.Random(1)
    for _ in range(20):
        spec = net.sample(rng)
        net.check_spec(spec)
        for n, ls in spec.layers.items():
            if n not in net.fixed_layers and ls.weight is not None:
                assert ls.weight.bits in (2, 4) and not ls.weight.per_channel and ls.weight.symmetric
            assert ls.act.bits in (4, 8)


def test_check_spec_rejects_foreign_specs(resnet):
    _, net = resnet
    other = convert(Tiny(), ElasticSpace())
    other.calibrate([_x()])
    with pytest.raises(UserError, match="does not fit"):
        net.set_active(other.uniform_spec(Form(), 4))
    small = convert(Tiny(), ElasticSpace(wbits=(2, 4), abits=(2, 4)))
    small.calibrate([_x()])
    with pytest.raises(UserError, match="not in the supernet"):
        small.set_active(small.uniform_spec(Form(), 3))
    first = small.layer_names[0]
    bad = small.uniform_spec(Form(), 4).with_layers(
        {first: LayerSpec(small.uniform_spec(Form(), 4).layers[first].weight, QuantSpec(8, symmetric=True, signed=False))}
    )
    with pytest.raises(UserError, match="signed inputs"):
        small.check_spec(bad)
    with pytest.raises(UserError):
        small.check_spec(SubnetSpec({}))


def test_quantized_forward_changes_with_bits_and_float_is_restored(resnet):
    _, net = resnet
    x = _x(seed=11)
    with torch.no_grad():
        net.set_active(None)
        f = net(x)
        net.set_active(net.uniform_spec(Form(), 8))
        q8 = net(x)
        net.set_active(net.uniform_spec(Form(), 2))
        q2 = net(x)
        net.set_active(None)
        f2 = net(x)
    assert torch.equal(f, f2)
    assert (q8 - f).abs().mean() < (q2 - f).abs().mean()


def test_untraceable_model_is_a_user_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.c(x)
            return -self.c(x)

    with pytest.raises(UserError, match="trace"):
        convert(Branchy())


def test_model_without_quantizable_layers_is_a_user_error():
    with pytest.raises(UserError, match="no Conv2d or Linear"):
        convert(nn.Sequential(nn.ReLU()))


def test_layers_reading_the_same_tensor_share_one_quantizer():
    from deployq.models import build_model

    net = convert(build_model("resnet20", num_classes=10, input_size=8, width=4))
    modules = dict(net.gm.named_modules())
    shared = 0
    for node in net.gm.graph.nodes:
        qs = []
        for u in node.users:
            m = modules.get(u.target) if u.op == "call_module" else None
            if isinstance(m, ElasticWeightless):
                qs += [m.aq[i] for i, a in enumerate(u.args) if a is node]
            elif m is not None and hasattr(m, "aq"):
                qs.append(m.aq)
        if len(qs) > 1:
            shared += 1
            assert all(q is qs[0] for q in qs), node.name
    assert shared >= 8  # every block input feeds conv1 (and the shortcut) and the add
    # Tied cells load back from a checkpoint state_dict as one parameter.
    clone = convert(build_model("resnet20", num_classes=10, input_size=8, width=4))
    clone.load_state_dict(net.state_dict(), strict=True)


@pytest.mark.parametrize("per_channel", [False, True])
def test_calibration_sees_every_image_column(per_channel):
    # A digit has a blank border. A strided subsample of a 16-pixel-wide NCHW tensor
    # (every 16th element) saw only column 0, so the clipping search fitted the border
    # and the 8-bit grids clipped what the images hold. Calibrated at 8 bits, the
    # subnet must reproduce the float net closely.
    torch.manual_seed(0)
    model = _randomize_bn(Tiny())
    # 1024 x 3 x 16 x 16: the old stride (48) landed on column 0 of every row
    x = torch.rand(1024, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 4
    x[..., 0] = 0.0
    net = convert(model, ElasticSpace())
    net.calibrate([x])
    net.set_active(None)
    with torch.no_grad():
        ref = net(x)
        net.set_active(net.uniform_spec(Form(weight_per_channel=per_channel), 8))
        got = net(x)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.02, rel
