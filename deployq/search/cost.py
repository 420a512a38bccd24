"""Cost models of a subnet and the budget a search must meet.

Each cost is a pure function of (layout, spec) -> float; the search receives the one
the budget names.

The averages count the layers the search chooses: the weighted layers that are not
pinned. Fixed first/last layers (8 bits by default) are the same in every subnet, as
the residual stream through the weightless quantizers (adds, pooling) is: none of them
is a choice, and a net that keeps 8-bit ends with 3-bit layers between them is what
papers call W3A3, so uniform 3-bit must cost exactly avg-bits=3. (With every layer
fixed, the averages fall back to all weighted layers.) Size and BitOps are physical and
count every weighted layer, fixed ones included.

- avg-bits:  mean over the weight bit-widths and the input-activation bit-widths of
             the chosen weighted layers -- the paper's measure
- avg-wbits: mean weight bit-width over the chosen weighted layers
- avg-abits: mean input-activation bit-width over the chosen weighted layers
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
from deployq.spec import SubnetSpec, counted_layers

Bits = Mapping[str, int]


def _chosen(layout: NetLayout) -> list[str]:
    """Names of the weighted layers the averages count (see the module docstring)."""
    weighted = [li for li in layout.layers if li.weighted]
    return counted_layers((li.name for li in weighted), (li.name for li in weighted if li.fixed))


def _avg_bits(layout: NetLayout, w: Bits, a: Bits) -> float:
    names = _chosen(layout)
    return (sum(w[n] for n in names) + sum(a[n] for n in names)) / (2 * len(names))


def _avg_wbits(layout: NetLayout, w: Bits, a: Bits) -> float:
    names = _chosen(layout)
    return sum(w[n] for n in names) / len(names)


def _avg_abits(layout: NetLayout, w: Bits, a: Bits) -> float:
    names = _chosen(layout)
    return sum(a[n] for n in names) / len(names)


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
        if any(li.fixed for li in layout.layers) and not budget.kind.startswith("avg"):
            why = f" (first/last layers fixed at {layout.fixed_bits} bits)"
        raise UserError(
            f"budget {budget} cannot be met: the cheapest configuration costs "
            f"{format_cost(budget.kind, cheapest)}{why}"
        )
    return cheapest
