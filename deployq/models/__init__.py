"""The model zoo (own code; torchvision is not available beside the CPU torch here).

`build_model(name, num_classes=..., ...)` is the one entry point; `MODELS` lists the builders.
Every model is torch.fx-traceable, every Conv2d is bias-free and followed by its own
BatchNorm2d, and residual adds are plain `+` nodes in the traced graph.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from deployq.errors import UserError
from deployq.models.mobilenetv2 import mobilenetv2
from deployq.models.resnet import resnet18, resnet20

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "mobilenetv2": mobilenetv2,
}


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 32,
    width: int | None = None,
) -> nn.Module:
    """Build a freshly initialised (Kaiming) model by registry name."""
    builder = MODELS.get(name)
    if builder is None:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return builder(
        num_classes=num_classes, in_channels=in_channels, input_size=input_size, width=width
    )


__all__ = ["MODELS", "build_model", "mobilenetv2", "resnet18", "resnet20"]
