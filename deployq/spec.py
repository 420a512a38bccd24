"""The typed contract that flows through train -> search -> export -> validate.

`QuantSpec` describes how one tensor is quantized in the *canonical* integer
range the supernet trains with; the container a target stores it in (int8 vs
uint8, narrow or not, native int4) is the export's business and is derived
from it, never stored here.

Canonical ranges (see `QuantSpec.qmin` / `qmax`):
- symmetric + signed:   [-(2^(b-1)) (+1 if narrow), 2^(b-1) - 1], zero-point 0
- symmetric + unsigned: [0, 2^b - 1], zero-point 0 (non-negative inputs only)
- asymmetric:           [0, 2^b - 1] with an integer zero-point in that range;
  an int8 container holds the same integers shifted by 2^(b-1).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from deployq.errors import UserError

SCHEMA_VERSION = 1
PER_TENSOR = "per-tensor"
PER_CHANNEL = "per-channel"
GRANULARITIES = (PER_TENSOR, PER_CHANNEL)
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}; got {bits!r}")
    return bits


def counted_layers(weighted: Iterable[str], fixed: Iterable[str]) -> list[str]:
    """The layers a subnet's average bit-width counts: the weighted layers that are not
    fixed (the ones a search chooses; uniform 3-bit between 8-bit ends is W3A3), or all
    weighted layers when every one is fixed. One rule for the search's budgets
    (deployq.search.cost) and the labels reports print (deployq.report.bits_label)."""
    weighted = list(weighted)
    fixed = set(fixed)
    return [n for n in weighted if n not in fixed] or weighted


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    symmetric: bool = True
    signed: bool = True
    granularity: str = PER_TENSOR
    axis: int = 0  # channel axis in the torch weight layout (out-channels for Conv/Linear)
    narrow: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.granularity not in GRANULARITIES:
            raise UserError(f"granularity must be one of {GRANULARITIES}; got {self.granularity!r}")
        if not self.symmetric and self.signed:
            # One canonical form per integer grid: asymmetric is stored unsigned.
            object.__setattr__(self, "signed", False)
        if self.narrow and not (self.symmetric and self.signed):
            raise UserError("narrow range applies to symmetric signed quantization only")

    @property
    def per_channel(self) -> bool:
        return self.granularity == PER_CHANNEL

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def with_bits(self, bits: int) -> QuantSpec:
        return _with_bits(self, bits)

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "signed": self.signed,
            "granularity": self.granularity,
            "axis": self.axis,
            "narrow": self.narrow,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> QuantSpec:
        unknown = set(d) - {"bits", "symmetric", "signed", "granularity", "axis", "narrow"}
        if unknown:
            raise UserError(f"unknown QuantSpec keys: {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"bad QuantSpec {dict(d)}: {e}") from None


@functools.lru_cache(maxsize=1024)
def _with_bits(spec: QuantSpec, bits: int) -> QuantSpec:
    # Specs are immutable, and a training step asks for the same few hundred of them
    # (per layer, subnet and step): built once each (as weight_spec / act_spec).
    return replace(spec, bits=bits)


@functools.lru_cache(maxsize=1024)
def weight_spec(bits: int, per_channel: bool, symmetric: bool) -> QuantSpec:
    """Weights: symmetric means signed narrow range (what TensorRT requires and
    what keeps +w and -w equally representable); asymmetric is unsigned + zero-point."""
    return QuantSpec(
        bits=bits,
        symmetric=symmetric,
        signed=symmetric,
        granularity=PER_CHANNEL if per_channel else PER_TENSOR,
        narrow=symmetric,
    )


@functools.lru_cache(maxsize=1024)
def act_spec(bits: int, symmetric: bool, signed: bool) -> QuantSpec:
    """Activations are per-tensor. `signed` only matters when symmetric: a
    symmetric unsigned quantizer (uint8, zero-point 0) only suits non-negative inputs."""
    return QuantSpec(bits=bits, symmetric=symmetric, signed=signed and symmetric)


@dataclass(frozen=True)
class Form:
    """The network-wide quantization form a target fixes (the CQAP condition)."""

    weight_per_channel: bool = True
    weight_symmetric: bool = True
    act_symmetric: bool = False
    act_signed: bool = False  # only meaningful with act_symmetric

    def weight(self, bits: int) -> QuantSpec:
        return weight_spec(bits, self.weight_per_channel, self.weight_symmetric)

    def act(self, bits: int) -> QuantSpec:
        return act_spec(bits, self.act_symmetric, self.act_signed)

    def to_dict(self) -> dict:
        return {
            "weight_per_channel": self.weight_per_channel,
            "weight_symmetric": self.weight_symmetric,
            "act_symmetric": self.act_symmetric,
            "act_signed": self.act_signed,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Form:
        unknown = set(d) - {"weight_per_channel", "weight_symmetric", "act_symmetric", "act_signed"}
        if unknown:
            raise UserError(f"unknown Form keys: {sorted(unknown)}")
        return cls(**d)


ALL_FORMS = tuple(
    Form(wpc, wsym, asym, asigned)
    for wpc in (False, True)
    for wsym in (False, True)
    for asym, asigned in ((False, False), (True, False), (True, True))
)


@dataclass(frozen=True)
class LayerSpec:
    """One quantized layer: its weight and the activation at its input(s).
    Residual-add quantizers have no weight (weight is None)."""

    weight: QuantSpec | None
    act: QuantSpec

    def to_dict(self) -> dict:
        return {"weight": self.weight.to_dict() if self.weight else None, "act": self.act.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerSpec:
        if set(d) != {"weight", "act"}:
            raise UserError(f"a layer spec needs exactly 'weight' and 'act'; got {sorted(d)}")
        w = d["weight"]
        return cls(QuantSpec.from_dict(w) if w is not None else None, QuantSpec.from_dict(d["act"]))


@dataclass(frozen=True)
class SubnetSpec:
    """Per-layer quantization of one subnet, keyed by the layer's qualified name."""

    layers: Mapping[str, LayerSpec] = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))

    def __hash__(self) -> int:
        return hash((tuple(self.layers.items()), self.version))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SubnetSpec)
            and self.version == other.version
            and dict(self.layers) == dict(other.layers)
        )

    @classmethod
    def uniform(
        cls,
        names: Iterable[str],
        form: Form,
        wbits: int,
        abits: int,
        weightless: Iterable[str] = (),
        fixed: Mapping[str, int] | None = None,
    ) -> SubnetSpec:
        """Every layer at (wbits, abits) in `form`; `fixed` pins layers (first/last) to
        a bit-width; `weightless` names quantizers without a weight (residual adds)."""
        fixed = dict(fixed or {})
        weightless = set(weightless)
        layers = {}
        for n in names:
            wb = fixed.get(n, wbits)
            ab = fixed.get(n, abits)
            layers[n] = LayerSpec(None if n in weightless else form.weight(wb), form.act(ab))
        return cls(layers)

    def with_layers(self, updates: Mapping[str, LayerSpec]) -> SubnetSpec:
        return SubnetSpec({**self.layers, **updates}, self.version)

    # --- summaries -------------------------------------------------------
    def weight_bits(self) -> dict[str, int]:
        return {n: s.weight.bits for n, s in self.layers.items() if s.weight is not None}

    def act_bits(self) -> dict[str, int]:
        return {n: s.act.bits for n, s in self.layers.items()}

    # --- JSON -----------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": "deployq.SubnetSpec",
            "version": self.version,
            "layers": {n: s.to_dict() for n, s in self.layers.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping) -> SubnetSpec:
        if not isinstance(d, Mapping) or d.get("schema") != "deployq.SubnetSpec":
            raise UserError("not a deployq SubnetSpec (missing schema 'deployq.SubnetSpec')")
        if d.get("version") != SCHEMA_VERSION:
            raise UserError(
                f"SubnetSpec schema version {d.get('version')!r} is not supported "
                f"(this deployq reads version {SCHEMA_VERSION})"
            )
        layers = d.get("layers")
        if not isinstance(layers, Mapping) or not layers:
            raise UserError("SubnetSpec has no layers")
        return cls({str(n): LayerSpec.from_dict(s) for n, s in layers.items()}, SCHEMA_VERSION)

    @classmethod
    def from_json(cls, text: str) -> SubnetSpec:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"SubnetSpec is not valid JSON: {e}") from None
        return cls.from_dict(d)


@dataclass(frozen=True)
class ElasticSpace:
    """What the supernet was trained to switch between."""

    wbits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    abits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    forms: tuple[Form, ...] = ALL_FORMS
    fixed_bits: int | None = 8  # first, last layer and residual stream (adds, pools); None = elastic

    def __post_init__(self) -> None:
        for b in (*self.wbits, *self.abits):
            check_bits(b)
        if not self.wbits or not self.abits or not self.forms:
            raise UserError("the elastic space needs at least one weight bit, act bit and form")
        object.__setattr__(self, "wbits", tuple(sorted(set(self.wbits))))
        object.__setattr__(self, "abits", tuple(sorted(set(self.abits))))

    def to_dict(self) -> dict:
        return {
            "wbits": list(self.wbits),
            "abits": list(self.abits),
            "forms": [f.to_dict() for f in self.forms],
            "fixed_bits": self.fixed_bits,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ElasticSpace:
        return cls(
            wbits=tuple(d["wbits"]),
            abits=tuple(d["abits"]),
            forms=tuple(Form.from_dict(f) for f in d["forms"]),
            fixed_bits=d.get("fixed_bits"),
        )
