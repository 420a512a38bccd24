"""Building blocks shared by the model zoo.

Every conv is `Conv2d(bias=False)` immediately followed by a `BatchNorm2d` that is its only
user, so `torch.fx.experimental.optimization.fuse` (and the exporter's BN folding) can fold
every pair; activations are modules so quantizers can be attached to them by name.
"""

from __future__ import annotations

from torch import nn

from deployq.errors import UserError


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


def init_weights(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="linear")
            nn.init.zeros_(m.bias)
    return model


def check_args(num_classes: int, in_channels: int, input_size: int, width: int) -> None:
    for name, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("input_size", input_size),
        ("width", width),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be a positive integer; got {value!r}")
