"""ResNet-20 (CIFAR layout) and ResNet-18 (ImageNet layout, with a small-input stem)."""

from __future__ import annotations

import torch
from torch import nn

from deployq.models._common import check_args, conv_bn, init_weights


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) -> ReLU.

    The shortcut is a 1x1 conv + BN projection whenever the shape changes (option B);
    the residual add is a plain `+` so a torch.fx pass can find it and quantize its inputs.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2, self.bn2 = conv_bn(cout, cout, 3, 1)
        self.shortcut = (
            nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        )
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNet(nn.Module):
    def __init__(
        self,
        stem: list[nn.Module],
        stem_out: int,
        widths: list[int],
        blocks_per_stage: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(*stem)
        stages = []
        cin = stem_out
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(cin, w, stride)]
            blocks += [BasicBlock(w, w, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(
    *, num_classes: int, in_channels: int = 3, input_size: int = 32, width: int | None = None
) -> ResNet:
    """CIFAR ResNet-20: 3x3 stem, 3 stages x 3 BasicBlocks (width, 2w, 4w), GAP, Linear.

    `input_size` is accepted for a uniform API; the net works from 4x4 inputs upward.
    """
    w = 16 if width is None else width
    check_args(num_classes, in_channels, input_size, w)
    stem = [*conv_bn(in_channels, w, 3, 1), nn.ReLU(inplace=False)]
    return ResNet(stem, w, [w, 2 * w, 4 * w], 3, num_classes)


def resnet18(
    *, num_classes: int, in_channels: int = 3, input_size: int = 224, width: int | None = None
) -> ResNet:
    """ImageNet ResNet-18: 4 stages x 2 BasicBlocks (w, 2w, 4w, 8w).

    Inputs >= 64 px get the standard 7x7/2 stem + 3x3/2 max-pool; smaller inputs a 3x3/1
    stem without pooling, so 8x8 images still reach the last stage with a 1x1 map.
    """
    w = 64 if width is None else width
    check_args(num_classes, in_channels, input_size, w)
    if input_size >= 64:
        stem = [
            *conv_bn(in_channels, w, 7, 2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
    else:
        stem = [*conv_bn(in_channels, w, 3, 1), nn.ReLU(inplace=False)]
    return ResNet(stem, w, [w, 2 * w, 4 * w, 8 * w], 2, num_classes)
