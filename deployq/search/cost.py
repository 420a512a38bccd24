"""Cost models of a subnet and the budget a search must meet.

Each cost is a pure function of (layout, spec) -> float; the search receives the one
the budget names. Costs count every weighted layer, fixed first/last layers included
(they are deployed too), so the cheapest subnet of a net with 8-bit ends costs more
than its minimum bit-width. The weightless quantizers (residual adds, pooling) carry
the residual stream at the fixed width in every subnet: they are not a choice and
are left out of the averages, as the paper counts layers (weights and their inputs).

- avg-bits:  mean over the weight bit-widths and the input-activation bit-widths of
             the weighted layers -- the paper's measure
- avg-wbits: mean weight bit-width over weighted layers
- avg-abits: mean input-activation bit-width over weighted layers
- size:      bytes of weights at their bit-width (numel * bits / 8) plus an int32 bias
             per output channel (scales and zero-points are not counted)
- bitops:    sum over weighted layers of MACs * weight bits * activation bits (per image)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from deployq.errors import UserError
from deployq.search.layout import NetLayout
from deployq.spec import SubnetSpec

Bits = Mapping[str, int]


def _avg_bits(layout: NetLayout, w: Bits, a: Bits) -> float:
    vals = [w[li.name] for li in layout.layers if li.weighted] + [
        a[li.name] for li in layout.layers if li.weighted
    ]
    return sum(vals) / len(vals)


def _avg_wbits(layout: NetLayout, w: Bits, a: Bits) -> float:
    vals = [w[li.name] for li in layout.layers if li.weighted]
    return sum(vals) / len(vals)


def _avg_abits(layout: NetLayout, w: Bits, a: Bits) -> float:
    vals = [a[li.name] for li in layout.layers if li.weighted]
    return sum(vals) / len(vals)


def _size_bytes(layout: NetLayout, w: Bits, a: Bits) -> float:
    return sum(
        li.weight_numel * w[li.name] / 8 + 4 * li.bias_numel for li in layout.layers if li.weighted
    )


def _bitops(layout: NetLayout, w: Bits, a: Bits) -> float:
    return float(sum(li.macs * w[li.name] * a[li.name] for li in layout.layers if li.weighted))


BitsCost = Callable[[NetLayout, Bits, Bits], float]
KINDS: dict[str, tuple[BitsCost, str]] = {
    "avg-bits": (_avg_bits, "bits"),
    "avg-wbits": (_avg_wbits, "bits"),
    "avg-abits": (_avg_abits, "bits"),
    "size": (_size_bytes, "bytes"),
    "bitops": (_bitops, "BitOps"),
}


def _of_spec(fn: BitsCost) -> Callable[[NetLayout, SubnetSpec], float]:
    def cost(layout: NetLayout, spec: SubnetSpec) -> float:
        return fn(layout, spec.weight_bits(), spec.act_bits())

    cost.__name__ = fn.__name__.lstrip("_")
    return cost


avg_bits = _of_spec(_avg_bits)
avg_wbits = _of_spec(_avg_wbits)
avg_abits = _of_spec(_avg_abits)
size_bytes = _of_spec(_size_bytes)
bitops = _of_spec(_bitops)

_SUFFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKMGT]?)\s*$")


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"

    @property
    def unit(self) -> str:
        return KINDS[self.kind][1]

    def cost_fn(self) -> Callable[[NetLayout, SubnetSpec], float]:
        return _of_spec(KINDS[self.kind][0])

    def bits_cost(self, layout: NetLayout, w: Bits, a: Bits) -> float:
        return KINDS[self.kind][0](layout, w, a)

    def cost(self, layout: NetLayout, spec: SubnetSpec) -> float:
        return self.bits_cost(layout, spec.weight_bits(), spec.act_bits())

    def met(self, cost: float) -> bool:
        # Relative slack for float sums: a budget equal to a cost must admit it.
        return cost <= self.value * (1 + 1e-9) + 1e-12


def format_cost(kind: str, value: float) -> str:
    if kind.startswith("avg"):
        return f"{value:.2f}"
    if kind == "size":
        return f"{value:.0f}"
    return f"{value:.4g}"


def parse_budget(text: str) -> Budget:
    """`avg-bits=4`, `avg-wbits=3.5`, `size=20k` (bytes), `bitops=1.2e9` (k/M/G/T suffixes)."""
    kinds = ", ".join(KINDS)
    if not isinstance(text, str) or "=" not in text:
        raise UserError(
            f"budget must look like KIND=VALUE (e.g. avg-bits=4); kinds: {kinds}; got {text!r}"
        )
    kind, _, raw = text.partition("=")
    kind = kind.strip()
    if kind not in KINDS:
        raise UserError(f"unknown budget kind {kind!r}; choose from {kinds}")
    m = _NUMBER.match(raw)
    if not m:
        raise UserError(
            f"budget value {raw.strip()!r} is not a number (suffixes k, M, G, T allowed)"
        )
    value = float(m.group(1)) * _SUFFIX[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"budget value must be positive; got {raw.strip()!r}")
    return Budget(kind, value)


def extreme_bits(
    layout: NetLayout, wbits: tuple[int, ...], abits: tuple[int, ...], pick=min
) -> tuple[dict, dict]:
    """Per-layer bits of the cheapest (pick=min) or dearest (pick=max) allowed subnet."""
    fb = layout.fixed_bits
    w = {li.name: (fb if li.fixed else pick(wbits)) for li in layout.layers if li.weighted}
    a = {li.name: (fb if li.fixed else pick(abits)) for li in layout.layers}
    return w, a


def check_feasible(
    budget: Budget, layout: NetLayout, wbits: tuple[int, ...], abits: tuple[int, ...]
) -> float:
    """Every cost grows with every bit-width, so the all-minimum subnet is the cheapest;
    refuse a budget below it. Returns the cheapest cost."""
    w, a = extreme_bits(layout, wbits, abits, min)
    cheapest = budget.bits_cost(layout, w, a)
    if not budget.met(cheapest):
        why = ""
        if any(li.fixed for li in layout.layers):
            why = f" (first/last layers fixed at {layout.fixed_bits} bits)"
        raise UserError(
            f"budget {budget} cannot be met: the cheapest configuration costs "
            f"{format_cost(budget.kind, cheapest)}{why}"
        )
    return cheapest
