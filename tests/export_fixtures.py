"""A tiny trained, calibrated supernet checkpoint for the export tests (built in code).

resnet20 at width 8 on native 8x8 digits: a few float training steps give realistic
weight and activation ranges, then the supernet is converted and calibrated.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch

from deployq.checkpoint import CheckpointMeta, save_checkpoint
from deployq.data import Preprocessing, load_data
from deployq.elastic import convert
from deployq.models import build_model
from deployq.spec import ElasticSpace

SIZE = 8


def preprocessing() -> Preprocessing:
    return Preprocessing.uniform(SIZE, 3)


@cache
def digits(split: str):
    ds = load_data("digits", preprocessing(), split=split)
    return ds


def make_checkpoint(path: Path, *, width: int = 8, steps: int = 60, seed: int = 0, space: ElasticSpace | None = None):
    """Train the float model briefly, convert, calibrate, a few supernet steps, save."""
    torch.manual_seed(seed)
    args = {"num_classes": 10, "in_channels": 3, "input_size": SIZE, "width": width}
    model = build_model("resnet20", **args)
    train = digits("train")
    x = torch.from_numpy(train.x)
    y = torch.from_numpy(train.y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    net = convert(model, space or ElasticSpace())
    net.calibrate([x[:256]])
    net.eval()
    meta = CheckpointMeta(
        model="resnet20",
        model_args=args,
        space=net.space,
        preprocessing=preprocessing().to_dict(),
        class_names=tuple(train.class_names),
    )
    save_checkpoint(path, net, meta)
    return path


def torch_logits(net, spec, x: np.ndarray) -> np.ndarray:
    net.set_active(spec)
    try:
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()
    finally:
        net.set_active(None)
