import operator

import pytest
import torch
import torch.fx
from torch import nn
from torch.fx.experimental.optimization import fuse

from deployq.errors import UserError
from deployq.models import MODELS, build_model

# Small widths keep the suite fast; the default widths are covered once below.
WIDTHS = {"resnet20": 8, "resnet18": 8, "mobilenetv2": 8}


def _settle_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BN non-trivial running stats so fusing is a real test, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("size", [8, 16, 32])
def test_forward_trace_fuse(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=3, input_size=size, width=WIDTHS[name])
    x = torch.randn(4, 3, size, size)
    _settle_bn(model, x)
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (4, 7)
        traced = torch.fx.symbolic_trace(model)
        assert torch.allclose(traced(x), ref, atol=1e-6)
        fused = fuse(model)
        out = fused(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert (out - ref).abs().max().item() < 1e-4
    assert ref.abs().max().item() > 1e-3  # the comparison above is not between two zeros


@pytest.mark.parametrize("name", list(MODELS))
def test_conv_bn_relu_conventions(name: str) -> None:
    model = build_model(name, num_classes=3, width=WIDTHS[name])
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    convs = [
        n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], nn.Conv2d)
    ]
    assert convs
    for n in convs:
        assert mods[n.target].bias is None
        users = list(n.users)
        assert len(users) == 1 and isinstance(mods[users[0].target], nn.BatchNorm2d), n.target
    adds = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in (torch.add, operator.add)
    ]
    if name == "mobilenetv2":  # narrow widths round channels up to 8, adding residual blocks
        expected_adds = sum(getattr(m, "use_residual", False) for m in model.modules())
    else:
        expected_adds = {"resnet20": 9, "resnet18": 8}[name]
    assert len(adds) == expected_adds
    act = nn.ReLU6 if name == "mobilenetv2" else nn.ReLU
    assert any(isinstance(m, act) for m in model.modules())


def test_default_widths_and_channels() -> None:
    assert build_model("resnet20", num_classes=10).stem[0].out_channels == 16
    assert build_model("resnet18", num_classes=10).stem[0].out_channels == 64
    mb = build_model("mobilenetv2", num_classes=10)
    assert mb.stem[0].out_channels == 32
    # the paper's network: 10 inverted residuals with an identity add
    assert sum(getattr(m, "use_residual", False) for m in mb.modules()) == 10
    grey = build_model("resnet20", num_classes=2, in_channels=1, width=4)
    assert grey(torch.randn(1, 1, 8, 8)).shape == (1, 2)


def test_resnet18_stem_depends_on_input_size() -> None:
    big = build_model("resnet18", num_classes=5, input_size=64, width=8)
    assert big.stem[0].kernel_size == (7, 7) and isinstance(big.stem[-1], nn.MaxPool2d)
    small = build_model("resnet18", num_classes=5, input_size=32, width=8)
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)


def test_unknown_model() -> None:
    with pytest.raises(
        UserError, match=r"unknown model 'x'; choose from resnet18, resnet20, mobilenetv2"
    ):
        build_model("x", num_classes=10)


def test_bad_arguments() -> None:
    with pytest.raises(UserError, match="num_classes"):
        build_model("resnet20", num_classes=0)
    with pytest.raises(UserError, match="width"):
        build_model("mobilenetv2", num_classes=3, width=-1)
