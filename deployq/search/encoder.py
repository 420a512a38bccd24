"""The CQAP condition vector: quantization form + per-layer one-hot bit-widths.

Layout of `encode(spec, layout)` (float32):
  [4]  the network's form: weight per-channel, weight symmetric, act symmetric, act signed
  per searchable layer (graph order; fixed layers carry no information and are skipped):
    weighted: one-hot weight bits over the space's wbits, then the layer's own weight
              form flags (per-channel, symmetric)
    all:      one-hot activation bits over the space's abits, then the layer's own act
              form flags (symmetric, signed)
The per-layer form flags keep the encoding exact where a layer deviates from the
network form (a symmetric-unsigned form quantizes signed inputs with a signed grid),
so the predictor is not told a network-wide form that some layer does not run.
"""

from __future__ import annotations

import numpy as np

from deployq.search.layout import NetLayout
from deployq.spec import Form, QuantSpec, SubnetSpec

FORM_FEATURES = 4


def encoding_size(layout: NetLayout) -> int:
    n = FORM_FEATURES
    for li in layout.searchable:
        if li.weighted:
            n += len(layout.wbits) + 2
        n += len(layout.abits) + 2
    return n


def onehot_groups(layout: NetLayout) -> tuple[tuple[int, tuple[int, ...], str], ...]:
    """(start column, bit-widths, "w" or "a") of every one-hot bit group in `encode`'s
    vector, so a predictor can read a layer's weight or activation bit-width as one
    ordered number."""
    out = []
    i = FORM_FEATURES
    for li in layout.searchable:
        if li.weighted:
            out.append((i, tuple(layout.wbits), "w"))
            i += len(layout.wbits) + 2
        out.append((i, tuple(layout.abits), "a"))
        i += len(layout.abits) + 2
    return tuple(out)


def form_of(spec: SubnetSpec) -> Form:
    """The network-wide form a spec was built in (its first weighted layer's weight form;
    activations are signed only if every symmetric activation grid is)."""
    weights = [ls.weight for ls in spec.layers.values() if ls.weight is not None]
    acts = [ls.act for ls in spec.layers.values()]
    w = weights[0] if weights else QuantSpec(8)
    act_sym = all(a.symmetric for a in acts)
    return Form(
        weight_per_channel=w.per_channel,
        weight_symmetric=w.symmetric,
        act_symmetric=act_sym,
        act_signed=act_sym and all(a.signed for a in acts),
    )


def form_vector(form: Form) -> np.ndarray:
    return np.array(
        [form.weight_per_channel, form.weight_symmetric, form.act_symmetric, form.act_signed],
        dtype=np.float32,
    )


def _one_hot(value: int, choices: tuple[int, ...]) -> np.ndarray:
    v = np.zeros(len(choices), dtype=np.float32)
    v[choices.index(value)] = 1.0
    return v


def encode(spec: SubnetSpec, layout: NetLayout) -> np.ndarray:
    parts = [form_vector(form_of(spec))]
    for li in layout.searchable:
        ls = spec.layers[li.name]
        if li.weighted:
            parts.append(_one_hot(ls.weight.bits, layout.wbits))
            parts.append(np.array([ls.weight.per_channel, ls.weight.symmetric], dtype=np.float32))
        parts.append(_one_hot(ls.act.bits, layout.abits))
        parts.append(np.array([ls.act.symmetric, ls.act.signed], dtype=np.float32))
    return np.concatenate(parts)


def encode_many(specs, layout: NetLayout) -> np.ndarray:
    return (
        np.stack([encode(s, layout) for s in specs])
        if specs
        else np.zeros((0, encoding_size(layout)), np.float32)
    )
