"""Top-1 accuracy of a supernet's subnets in PyTorch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from deployq.spec import Form, SubnetSpec

FORM_LABELS = {
    (False, True): "per-tensor sym",
    (False, False): "per-tensor asym",
    (True, True): "per-channel sym",
    (True, False): "per-channel asym",
}


def form_label(form: Form) -> str:
    w = FORM_LABELS[(form.weight_per_channel, form.weight_symmetric)]
    if not form.act_symmetric:
        a = "act asym"
    else:
        a = "act sym-signed" if form.act_signed else "act sym"
    return f"{w} / {a}"


def form_key(form: Form) -> str:
    """Short stable key for metrics dicts: e.g. 'pc-sym/a-asym'."""
    w = ("pc" if form.weight_per_channel else "pt") + ("-sym" if form.weight_symmetric else "-asym")
    a = "a-asym" if not form.act_symmetric else ("a-sym-s" if form.act_signed else "a-sym-u")
    return f"{w}/{a}"


@torch.no_grad()
def predict(net: torch.nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Argmax predictions of `net` as it is (active subnet and mode untouched)."""
    xt = torch.as_tensor(x)
    preds = [net(xt[i : i + batch_size]).argmax(dim=1) for i in range(0, len(xt), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def evaluate(net, dataset, spec: SubnetSpec | None, batch_size: int = 256) -> float:
    """Top-1 (0..1) of the subnet `spec` (None = the float network) on `dataset`
    (anything with float32 NCHW `x` and int64 `y`). Restores the previous subnet and mode."""
    previous = net.active_spec() if hasattr(net, "active_spec") else None
    was_training = net.training
    net.eval()
    try:
        if hasattr(net, "set_active"):
            net.set_active(spec)
        elif spec is not None:
            raise TypeError("a SubnetSpec needs an elastic network")
        pred = predict(net, dataset.x, batch_size)
        y = torch.as_tensor(dataset.y)
        # Exactly k / n (a float32 mean is off by ~1e-7: the benchmarks compare means of these
        # against targets that such means can hit exactly)
        return int((pred == y).sum()) / len(y) if len(y) else float("nan")
    finally:
        if hasattr(net, "set_active"):
            net.set_active(previous)
        net.train(was_training)


def uniform_table(
    net,
    dataset,
    forms: Iterable[Form],
    bits: Sequence[int],
    batch_size: int = 256,
) -> dict[str, dict[int, float]]:
    """{form_key: {bits: top-1}} for every uniform subnet (weights and activations at the
    same bit-width; first/last layers stay at the space's fixed bits)."""
    table: dict[str, dict[int, float]] = {}
    for form in forms:
        row = {}
        for b in bits:
            row[int(b)] = evaluate(net, dataset, net.uniform_spec(form, b, b), batch_size)
        table[form_key(form)] = row
    return table


__all__ = ["evaluate", "form_key", "form_label", "predict", "uniform_table"]
