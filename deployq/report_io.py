"""The validation Report: what `deployq validate` measured, as schema-versioned JSON and JUnit XML.

Accuracies are stored as fractions in [0, 1]; latencies in milliseconds. Gates are
part of the report so a CI job can read why it failed from the JSON alone.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

from deployq.errors import UserError
from deployq.fileio import write_bytes, write_text

SCHEMA = "deployq.Report"
VERSION = 1


@dataclass(frozen=True)
class ModelInfo:
    path: str
    sha256: str
    input_shape: tuple  # as declared in the graph; None for a free dimension
    n_classes: int
    kind: str | None = None  # deployq.kind metadata ("qdq" / "fp32") when deployq exported it
    profile: str | None = None


@dataclass(frozen=True)
class DataInfo:
    source: str
    split: str
    n_images: int
    n_classes: int
    labels_sha256: str  # identifies the evaluation set cheaply (order and labels)
    preprocessing: dict  # deployq.data.Preprocessing.to_dict()
    preprocessing_from: str  # "model", "flags" or "data"


@dataclass(frozen=True)
class Accuracy:
    top1: float
    top5: float | None  # None when the model has fewer than 5 classes
    n: int


@dataclass(frozen=True)
class ReferenceResult:
    path: str
    backend: str
    provider: str
    top1: float  # the reference model's own accuracy on the same data
    agreement: float  # fraction of images where top-1 predictions agree
    max_abs_err: float  # over all logits
    mean_abs_err: float


@dataclass(frozen=True)
class Latency:
    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # images per second at the median latency
    warmup: int
    iters: int
    simulated: bool


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    measured: float
    threshold: float
    message: str


@dataclass(frozen=True)
class Report:
    model: ModelInfo
    data: DataInfo
    backend: str
    provider: str  # what actually executed the graph
    simulated: bool
    accuracy: Accuracy
    reference: ReferenceResult | None
    latency: tuple[Latency, ...]
    environment: dict
    gates: tuple[GateResult, ...] = ()
    created: str = ""
    schema: str = field(default=SCHEMA)
    version: int = field(default=VERSION)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failed_gates(self) -> tuple[GateResult, ...]:
        return tuple(g for g in self.gates if not g.passed)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"schema": d.pop("schema"), "version": d.pop("version"), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"not a deployq validation report (schema {got!r}, expected {SCHEMA!r})")
        if d.get("version") != VERSION:
            raise UserError(f"report version {d.get('version')!r} is not supported "
                            f"(this deployq reads version {VERSION})")
        try:
            model = dict(d["model"])
            model["input_shape"] = tuple(model["input_shape"])
            ref = d.get("reference")
            return cls(
                model=ModelInfo(**model),
                data=DataInfo(**d["data"]),
                backend=d["backend"],
                provider=d["provider"],
                simulated=d["simulated"],
                accuracy=Accuracy(**d["accuracy"]),
                reference=ReferenceResult(**ref) if ref else None,
                latency=tuple(Latency(**x) for x in d["latency"]),
                environment=dict(d["environment"]),
                gates=tuple(GateResult(**g) for g in d.get("gates", ())),
                created=d.get("created", ""),
            )
        except (KeyError, TypeError) as e:
            raise UserError(f"malformed {SCHEMA} version {VERSION} report: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> Report:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"report is not JSON: {e}") from None
        return cls.from_dict(d)


def load_report(path: str | os.PathLike) -> Report:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read report {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"report {str(path)!r} is not a text file") from None
    try:
        return Report.from_json(text)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def write_json(report: Report, path: str | os.PathLike) -> None:
    write_text(path, report.to_json())


def junit_xml(report: Report) -> bytes:
    """JUnit XML: one testcase per gate, or one "accuracy" case (always passing) without gates."""
    suite_name = f"deployq.validate[{report.backend}]"
    cases = report.gates or (GateResult(
        "accuracy", True, report.accuracy.top1, 0.0,
        f"top-1 {report.accuracy.top1:.2%} on {report.accuracy.n} images (no gates set)"),)
    failures = sum(not g.passed for g in cases)
    suites = ET.Element("testsuites", tests=str(len(cases)), failures=str(failures))
    suite = ET.SubElement(suites, "testsuite", name=suite_name, tests=str(len(cases)),
                          failures=str(failures), errors="0", skipped="0",
                          timestamp=report.created)
    props = ET.SubElement(suite, "properties")
    for k, v in (("model", report.model.path), ("data", report.data.source),
                 ("split", report.data.split), ("provider", report.provider),
                 ("top1", f"{report.accuracy.top1:.6f}"), ("simulated", str(report.simulated))):
        ET.SubElement(props, "property", name=k, value=str(v))
    # dots in a classname read as packages in CI viewers: keep the file name in one segment
    classname = f"deployq.validate.{os.path.basename(report.model.path).replace('.', '_')}"
    for g in cases:
        case = ET.SubElement(suite, "testcase", name=g.name, classname=classname, time="0")
        if not g.passed:
            fail = ET.SubElement(case, "failure", message=g.message, type="GateFailed")
            fail.text = (f"{g.message}\nmeasured={g.measured:g} threshold={g.threshold:g}")
        else:
            ET.SubElement(case, "system-out").text = g.message
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(report: Report, path: str | os.PathLike) -> None:
    write_bytes(path, junit_xml(report))
