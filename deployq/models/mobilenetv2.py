"""MobileNetV2 (inverted residuals, depthwise convs, ReLU6) with a small-input stride plan."""

from __future__ import annotations

import math

import torch
from torch import nn

from deployq.models._common import check_args, conv_bn, init_weights

# (expansion t, output channels c at width 32, repeats n, first stride s) from the paper.
_CONFIG = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
_LAST_CHANNELS = 1280


def _divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8 (as the reference does), never below 90% of v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> 1x1 project-BN (linear bottleneck)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*conv_bn(cin, hidden, 1), nn.ReLU6(inplace=False)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=False)]
        layers += conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:  # a constructor-time flag, so torch.fx traces it statically
            out = out + x
        return out


def _stride_plan(input_size: int) -> list[int]:
    """Strides for the 5 downsampling points (stem + 4 stages).

    Keep only as many stride-2 points as leave a >= 4x4 final map (all 5 from 128 px up),
    dropping the EARLY ones first, as CIFAR ports of MobileNetV2 do.
    """
    n_down = max(0, min(5, math.floor(math.log2(input_size)) - 2))
    return [1] * (5 - n_down) + [2] * n_down


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, input_size: int, width: int) -> None:
        super().__init__()
        mult = width / 32
        strides = iter(_stride_plan(input_size))
        self.stem = nn.Sequential(
            *conv_bn(in_channels, width, 3, next(strides)), nn.ReLU6(inplace=False)
        )
        blocks: list[nn.Module] = []
        cin = width
        for t, c, n, s in _CONFIG:
            cout = _divisible(c * mult)
            first_stride = next(strides) if s == 2 else 1
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, first_stride if i == 0 else 1, t))
                cin = cout
        self.features = nn.Sequential(*blocks)
        last = _divisible(_LAST_CHANNELS * max(1.0, mult))
        self.head = nn.Sequential(*conv_bn(cin, last, 1), nn.ReLU6(inplace=False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def mobilenetv2(
    *, num_classes: int, in_channels: int = 3, input_size: int = 224, width: int | None = None
) -> MobileNetV2:
    """MobileNetV2; `width` = stem channels (32 = the paper's 1.0x, 16 = 0.5x, ...)."""
    w = 32 if width is None else width
    check_args(num_classes, in_channels, input_size, w)
    return MobileNetV2(num_classes, in_channels, input_size, w)
