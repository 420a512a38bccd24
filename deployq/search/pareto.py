"""The accuracy-vs-cost Pareto front of a search: rows, CSV and a PNG plot."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from deployq.fileio import atomic_path, write_text


@dataclass(frozen=True)
class ParetoRow:
    kind: str  # "front" (predictor's non-dominated), "candidate" (re-measured), "uniform"
    spec_id: str
    cost: float
    predicted: float
    measured: float | None = None
    chosen: bool = False


def genes_id(genes) -> str:
    return hashlib.sha1(",".join(str(int(g)) for g in genes).encode()).hexdigest()[:10]


def front(points: list[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
    """Non-dominated (lower cost, higher accuracy) points of (cost, acc, payload), by cost."""
    out: list[tuple[float, float, object]] = []
    best = float("-inf")
    for c, a, p in sorted(points, key=lambda t: (t[0], -t[1])):
        if a > best:
            out.append((c, a, p))
            best = a
    return out


def pareto_paths(out: str | Path) -> tuple[Path, Path]:
    """`subnet.json` -> (`subnet.pareto.csv`, `subnet.pareto.png`)."""
    p = Path(out)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + ".pareto.csv"), p.with_name(stem + ".pareto.png")


def write_csv(path: str | Path, rows: list[ParetoRow], cost_kind: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "spec_id", f"cost_{cost_kind}", "predicted_acc", "measured_acc", "chosen"])
    for r in rows:
        w.writerow(
            [
                r.kind,
                r.spec_id,
                f"{r.cost:.6g}",
                f"{r.predicted:.6f}",
                "" if r.measured is None else f"{r.measured:.6f}",
                int(r.chosen),
            ]
        )
    write_text(path, buf.getvalue())


def write_png(
    path: str | Path, rows: list[ParetoRow], cost_kind: str, budget: float, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    fr = sorted((r for r in rows if r.kind == "front"), key=lambda r: r.cost)
    if fr:
        ax.step(
            [r.cost for r in fr],
            [r.predicted for r in fr],
            where="post",
            color="tab:blue",
            alpha=0.6,
        )
        ax.scatter(
            [r.cost for r in fr],
            [r.predicted for r in fr],
            s=14,
            color="tab:blue",
            label="predicted (Pareto front)",
        )
    cand = [r for r in rows if r.kind == "candidate"]
    if cand:
        ax.scatter(
            [r.cost for r in cand],
            [r.predicted for r in cand],
            s=30,
            facecolors="none",
            edgecolors="tab:blue",
            label="top candidates, predicted",
        )
        ax.scatter(
            [r.cost for r in cand],
            [r.measured for r in cand],
            s=30,
            color="tab:orange",
            label="top candidates, measured",
        )
    uni = sorted((r for r in rows if r.kind == "uniform"), key=lambda r: r.cost)
    if uni:
        ax.plot(
            [r.cost for r in uni],
            [r.measured for r in uni],
            "x--",
            color="tab:gray",
            label="uniform subnets, measured",
        )
        for r in uni:
            ax.annotate(
                r.spec_id.replace("uniform-", ""),
                (r.cost, r.measured),
                fontsize=7,
                xytext=(3, -9),
                textcoords="offset points",
            )
    chosen = [r for r in rows if r.chosen]
    for r in chosen:
        ax.scatter(
            [r.cost],
            [r.measured],
            marker="*",
            s=180,
            color="tab:red",
            zorder=5,
            label="chosen (measured)",
        )
    ax.axvline(budget, color="tab:red", linestyle=":", label=f"budget {cost_kind}={budget:g}")
    ax.set_xlabel(cost_kind)
    ax.set_ylabel("top-1 accuracy (held-out training split)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
