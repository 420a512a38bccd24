"""Hardware target profiles: what a target accepts, loaded from TOML.

A profile fixes the network-wide quantization form (`Profile.form`), the bit-widths
a subnet may use, the containers the export stores integers in, which ops get Q/DQ
and how bias is carried. `Profile.check(spec)` refuses a SubnetSpec the target
cannot run, before anything is written; `deployq.check.check_model` checks a graph.

Sub-8-bit: a target without a native b-bit type carries b-bit quantization exactly
inside its 8-bit container (`emulate = true`): weight integers lie within the b-bit
range and activations get their b-bit clamp in the graph. `native_int4 = true` lets
4-bit weights use int4/uint4 Q/DQ when the profile's opset is >= 21.

Schema (every key required; unknown keys are errors):

    name, description, backend, opset, opset_range = [lo, hi]
    [weights]     granularity, symmetric, container, narrow, bits, emulate,
                  native_int4, per_tensor_ops
    [activations] symmetric, container, bits, emulate
    [graph]       qdq_ops, bias ("float" | "int32"), no_qdq_ops
    [sidecar]     encodings
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import tomllib

from deployq.errors import UserError
from deployq.fileio import read_user_text
from deployq.spec import GRANULARITIES, PER_CHANNEL, Form, QuantSpec, SubnetSpec, check_bits

CONTAINERS = ("int8", "uint8")
CONTAINER_BITS = {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4}
BIAS_MODES = ("float", "int32")
NATIVE_INT4_MIN_OPSET = 21  # INT4/UINT4 Q/DQ exist from opset 21
WEIGHT, ACT = "weight", "act"


@dataclass(frozen=True)
class WeightRules:
    granularity: str
    symmetric: bool
    container: str
    narrow: bool
    bits: tuple[int, ...]
    emulate: bool
    native_int4: bool
    per_tensor_ops: tuple[str, ...]  # ops whose weights stay per-tensor (snpe-pc MatMul)


@dataclass(frozen=True)
class ActRules:
    symmetric: bool
    container: str
    bits: tuple[int, ...]
    emulate: bool


@dataclass(frozen=True)
class GraphRules:
    qdq_ops: tuple[str, ...]
    bias: str
    no_qdq_ops: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    backend: str
    opset: int
    opset_range: tuple[int, int]
    weights: WeightRules
    activations: ActRules
    graph: GraphRules
    encodings: bool  # write an AIMET-style encodings JSON sidecar
    source: str = ""  # file it was loaded from

    # --- what the target fixes ----------------------------------------------
    @property
    def form(self) -> Form:
        return Form(
            weight_per_channel=self.weights.granularity == PER_CHANNEL,
            weight_symmetric=self.weights.symmetric,
            act_symmetric=self.activations.symmetric,
            act_signed=self.activations.symmetric and _signed(self.activations.container),
        )

    @property
    def weight_bits(self) -> tuple[int, ...]:
        return self.weights.bits

    @property
    def act_bits(self) -> tuple[int, ...]:
        return self.activations.bits

    @property
    def native_int4(self) -> bool:
        """4-bit weights go in int4/uint4 Q/DQ (the profile allows it at its opset)."""
        return self.weights.native_int4 and self.opset >= NATIVE_INT4_MIN_OPSET

    def container(self, spec: QuantSpec, role: str) -> str:
        """ONNX integer type that carries `spec`: "int8", "uint8", "int4" or "uint4"."""
        if role == WEIGHT:
            if spec.bits == 4 and self.native_int4:
                return "int4" if spec.signed else "uint4"
            return self.weights.container
        if role == ACT:
            return self.activations.container
        raise ValueError(f"role must be {WEIGHT!r} or {ACT!r}; got {role!r}")

    def is_emulated(self, spec: QuantSpec, role: str) -> bool:
        """True when b-bit quantization is carried inside a wider container."""
        return spec.bits < CONTAINER_BITS[self.container(spec, role)]

    # --- refusing what the target cannot run -----------------------------------
    def check(self, spec: SubnetSpec) -> None:
        """Raise UserError naming the first layer the target cannot run."""
        for layer, ls in spec.layers.items():
            if ls.weight is not None:
                self._check_weight(layer, ls.weight)
            self._check_act(layer, ls.act)

    def _check_weight(self, layer: str, q: QuantSpec) -> None:
        w = self.weights
        if q.bits not in w.bits:
            raise UserError(
                f"profile {self.name} accepts weight bits {_set(w.bits)}; got {q.bits} "
                f"for layer '{layer}'"
            )
        if q.granularity != w.granularity or q.symmetric != w.symmetric:
            raise UserError(
                f"profile {self.name} needs {w.granularity} {_sym(w.symmetric)} weights; "
                f"layer '{layer}' is {q.granularity} {_sym(q.symmetric)}"
            )
        if w.symmetric and q.signed != _signed(w.container):
            raise UserError(
                f"profile {self.name} stores weights in {w.container}; layer '{layer}' has "
                f"{'signed' if q.signed else 'unsigned'} weights"
            )
        if w.narrow and q.symmetric and not q.narrow:
            raise UserError(
                f"profile {self.name} needs narrow-range weights [-(2^(b-1)-1), 2^(b-1)-1]; "
                f"layer '{layer}' uses the full range"
            )

    def _check_act(self, layer: str, q: QuantSpec) -> None:
        a = self.activations
        if q.bits not in a.bits:
            raise UserError(
                f"profile {self.name} accepts activation bits {_set(a.bits)}; got {q.bits} "
                f"for layer '{layer}'"
            )
        if q.per_channel:
            raise UserError(
                f"profile {self.name} needs per-tensor activations; layer '{layer}' is per-channel"
            )
        if q.symmetric != a.symmetric:
            raise UserError(
                f"profile {self.name} needs {_sym(a.symmetric)} activations; "
                f"layer '{layer}' is {_sym(q.symmetric)}"
            )
        if a.symmetric and q.signed != _signed(a.container):
            raise UserError(
                f"profile {self.name} stores activations in {a.container}; layer '{layer}' has "
                f"{'signed' if q.signed else 'unsigned'} activations"
            )

    # --- printing --------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "backend": self.backend,
            "opset": self.opset,
            "opset_range": list(self.opset_range),
            "weights": _listify(asdict(self.weights)),
            "activations": _listify(asdict(self.activations)),
            "graph": _listify(asdict(self.graph)),
            "sidecar": {"encodings": self.encodings},
        }


def _signed(container: str) -> bool:
    return not container.startswith("u")


def _sym(symmetric: bool) -> str:
    return "symmetric" if symmetric else "asymmetric"


def _set(bits: tuple[int, ...]) -> str:
    return "{" + ", ".join(str(b) for b in bits) + "}"


def _listify(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --- loading -------------------------------------------------------------------
_TOP = {
    "name",
    "description",
    "backend",
    "opset",
    "opset_range",
    "weights",
    "activations",
    "graph",
    "sidecar",
}
_WEIGHTS = {
    "granularity",
    "symmetric",
    "container",
    "narrow",
    "bits",
    "emulate",
    "native_int4",
    "per_tensor_ops",
}
_ACTS = {"symmetric", "container", "bits", "emulate"}
_GRAPH = {"qdq_ops", "bias", "no_qdq_ops"}
_SIDECAR = {"encodings"}


class _Reader:
    """Typed access to one TOML table; every error names the key and the file."""

    def __init__(self, d: Mapping, where: str, table: str, keys: set[str]) -> None:
        if not isinstance(d, Mapping):
            raise UserError(f"{where}: [{table}] must be a table")
        self.d, self.where, self.table = d, where, table
        unknown = sorted(set(d) - keys)
        if unknown:
            raise UserError(f"{where}: unknown key '{self._key(unknown[0])}' in profile")
        missing = sorted(keys - set(d))
        if missing:
            raise UserError(f"{where}: missing key '{self._key(missing[0])}' in profile")

    def _key(self, k: str) -> str:
        return f"{self.table}.{k}" if self.table else k

    def _bad(self, k: str, want: str) -> UserError:
        return UserError(f"{self.where}: '{self._key(k)}' must be {want}; got {self.d[k]!r}")

    def str(self, k: str, choices: tuple[str, ...] | None = None) -> str:
        v = self.d[k]
        if not isinstance(v, str) or (choices and v not in choices):
            raise self._bad(k, f"one of {', '.join(choices)}" if choices else "a string")
        return v

    def bool(self, k: str) -> bool:
        if not isinstance(self.d[k], bool):
            raise self._bad(k, "true or false")
        return self.d[k]

    def int(self, k: str) -> int:
        v = self.d[k]
        if not isinstance(v, int) or isinstance(v, bool):
            raise self._bad(k, "an integer")
        return v

    def strs(self, k: str) -> tuple[str, ...]:
        v = self.d[k]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._bad(k, "a list of strings")
        return tuple(v)

    def bits(self, k: str) -> tuple[int, ...]:
        v = self.d[k]
        if not isinstance(v, list) or not v:
            raise self._bad(k, "a non-empty list of bit-widths")
        try:
            return tuple(sorted({check_bits(b) for b in v}))
        except UserError as e:
            raise UserError(f"{self.where}: '{self._key(k)}': {e}") from None


def profile_from_dict(d: Mapping, where: str = "<profile>") -> Profile:
    top = _Reader(d, where, "", _TOP)
    w = _Reader(d["weights"], where, "weights", _WEIGHTS)
    a = _Reader(d["activations"], where, "activations", _ACTS)
    g = _Reader(d["graph"], where, "graph", _GRAPH)
    s = _Reader(d["sidecar"], where, "sidecar", _SIDECAR)

    rng = d["opset_range"]
    if (
        not isinstance(rng, list)
        or len(rng) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
        or rng[0] > rng[1]
    ):
        raise top._bad("opset_range", "[lo, hi] with lo <= hi")
    opset = top.int("opset")
    if not rng[0] <= opset <= rng[1]:
        raise UserError(f"{where}: opset {opset} is outside opset_range {rng}")

    weights = WeightRules(
        granularity=w.str("granularity", GRANULARITIES),
        symmetric=w.bool("symmetric"),
        container=w.str("container", CONTAINERS),
        narrow=w.bool("narrow"),
        bits=w.bits("bits"),
        emulate=w.bool("emulate"),
        native_int4=w.bool("native_int4"),
        per_tensor_ops=w.strs("per_tensor_ops"),
    )
    acts = ActRules(
        symmetric=a.bool("symmetric"),
        container=a.str("container", CONTAINERS),
        bits=a.bits("bits"),
        emulate=a.bool("emulate"),
    )
    # Asymmetric integers are stored unsigned (spec.py's canonical form), so an
    # asymmetric role needs an unsigned container.
    for table, r in (("weights", weights), ("activations", acts)):
        if not r.symmetric and _signed(r.container):
            raise UserError(f"{where}: asymmetric {table} need container 'uint8'")
        native = {8} | ({4} if table == "weights" and weights.native_int4 else set())
        if not r.emulate and not set(r.bits) <= native:
            raise UserError(
                f"{where}: {table}.bits {list(r.bits)} include bits below the container "
                f"but {table}.emulate is false"
            )
    if weights.narrow and not weights.symmetric:
        raise UserError(f"{where}: weights.narrow applies to symmetric weights only")

    return Profile(
        name=top.str("name"),
        description=top.str("description"),
        backend=top.str("backend"),
        opset=opset,
        opset_range=(rng[0], rng[1]),
        weights=weights,
        activations=acts,
        graph=GraphRules(
            qdq_ops=g.strs("qdq_ops"),
            bias=g.str("bias", BIAS_MODES),
            no_qdq_ops=g.strs("no_qdq_ops"),
        ),
        encodings=s.bool("encodings"),
        source=where,
    )


def _shipped() -> dict[str, resources.abc.Traversable]:
    root = resources.files("deployq.profiles")
    return {p.name[: -len(".toml")]: p for p in root.iterdir() if p.name.endswith(".toml")}


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(_shipped())


def _parse(text: str, where: str) -> Profile:
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML: {e}") from None
    return profile_from_dict(d, where)


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name, or a user profile from a .toml path."""
    key = str(name_or_path)
    shipped = _shipped()
    if key in shipped:
        return _parse(shipped[key].read_text(encoding="utf-8"), f"{key}.toml")
    path = Path(key)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"profile file not found: {path}")
        return _parse(read_user_text(path, "profile file"), str(path))
    raise UserError(
        f"unknown profile '{key}'; choose from {', '.join(sorted(shipped))} or pass a .toml path"
    )
