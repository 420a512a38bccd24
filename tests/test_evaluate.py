import types

import numpy as np
import torch
from torch import nn

from deployq.evaluate import evaluate


class _Pick(nn.Module):
    """Predicts the class given by the input's first value (logits one-hot)."""

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()


def test_top1_is_the_exact_fraction_and_restores_the_mode():
    # 1 right of 3: a float32 mean would give 0.3333333432674408, off the k / n a
    # benchmark compares against a target such means can hit exactly
    x = np.zeros((3, 1, 1, 1), np.float32)
    x[:, 0, 0, 0] = [0, 1, 2]
    data = types.SimpleNamespace(x=x, y=np.array([0, 2, 1]))
    net = _Pick().train()
    assert evaluate(net, data, None, batch_size=2) == 1 / 3
    assert net.training
    data.y = np.array([0, 1, 2])
    assert evaluate(net, data, None) == 1.0
    empty = types.SimpleNamespace(x=np.zeros((0, 1, 1, 1), np.float32), y=np.zeros(0, np.int64))
    assert np.isnan(evaluate(net, empty, None))
    assert torch.is_grad_enabled()
