"""The search's genome: one integer bit-width per searchable weight and activation.

`GeneSpace` maps between a flat int vector (what sampling and evolution manipulate)
and a SubnetSpec (what the net, the encoder and the cost functions take). Gene i
is either the weight bits of a weighted searchable layer or the activation bits of
a searchable layer; its allowed values are the profile's bits intersected with the
supernet space. Fixed layers are not genes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deployq.search.layout import NetLayout
from deployq.spec import LayerSpec, SubnetSpec

LayerSpecFn = Callable[[str, int, int], LayerSpec]  # (name, wbits, abits) -> LayerSpec


@dataclass(frozen=True)
class GeneSpace:
    layout: NetLayout
    wchoices: tuple[int, ...]
    achoices: tuple[int, ...]

    @property
    def w_layers(self) -> tuple[str, ...]:
        return tuple(li.name for li in self.layout.searchable if li.weighted)

    @property
    def a_layers(self) -> tuple[str, ...]:
        return tuple(li.name for li in self.layout.searchable)

    @property
    def size(self) -> int:
        return len(self.w_layers) + len(self.a_layers)

    @property
    def choices(self) -> tuple[tuple[int, ...], ...]:
        return (self.wchoices,) * len(self.w_layers) + (self.achoices,) * len(self.a_layers)

    def bits(self, genes) -> tuple[dict[str, int], dict[str, int]]:
        """(weight bits, act bits) per layer name, fixed layers included."""
        g = [int(x) for x in genes]
        nw = len(self.w_layers)
        fb = self.layout.fixed_bits
        w = dict(zip(self.w_layers, g[:nw]))
        a = dict(zip(self.a_layers, g[nw:]))
        for li in self.layout.layers:
            if li.fixed:
                if li.weighted:
                    w[li.name] = fb
                a[li.name] = fb
        return w, a

    def uniform(self, wbits: int, abits: int) -> np.ndarray:
        return np.array([wbits] * len(self.w_layers) + [abits] * len(self.a_layers), dtype=np.int64)

    def to_spec(self, genes, layer_spec: LayerSpecFn) -> SubnetSpec:
        w, a = self.bits(genes)
        return SubnetSpec({n: layer_spec(n, w.get(n, 8), a[n]) for n in self.layout.names})

    def from_spec(self, spec: SubnetSpec) -> np.ndarray:
        wb, ab = spec.weight_bits(), spec.act_bits()
        return np.array(
            [wb[n] for n in self.w_layers] + [ab[n] for n in self.a_layers], dtype=np.int64
        )


def cached_layer_spec(fn: LayerSpecFn) -> LayerSpecFn:
    """Memoise (name, wbits, abits) -> LayerSpec: building specs is the hot loop of the search."""
    memo: dict[tuple[str, int, int], LayerSpec] = {}

    def get(name: str, wbits: int, abits: int) -> LayerSpec:
        key = (name, wbits, abits)
        if key not in memo:
            memo[key] = fn(name, wbits, abits)
        return memo[key]

    return get
