"""The report's plots: matplotlib (Agg) figures returned as PNG bytes.

Each function takes plain data (no file I/O, no deployq types beyond tuples and
dicts) so the report can embed the bytes as data: URIs and tests can call them alone.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

# One colour per target, stable across plots of the same report.
PROFILE_COLORS = {
    "fp32": "#555555",
    "tensorrt": "#76b900",
    "snpe": "#d4145a",
    "snpe-pc": "#f47ca4",
    "cpu": "#1f77b4",
}
_FALLBACK = ("#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#bcbd22")


def profile_color(name: str | None) -> str:
    key = name or "fp32"
    if key in PROFILE_COLORS:
        return PROFILE_COLORS[key]
    return _FALLBACK[sum(map(ord, key)) % len(_FALLBACK)]


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ax.grid(alpha=0.3)
    return fig, ax


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    # No timestamps or software tags: the same inputs give the same bytes.
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def elastic_plot(rows: Mapping[str, Mapping[int, float]], fp32: float | None) -> bytes:
    """Top-1 of every uniform subnet against its bit-width, one line per form."""
    fig, ax = _figure(7.5, 4.2)
    for form, row in rows.items():
        bits = sorted(row)
        ax.plot(bits, [100 * row[b] for b in bits], "o-", ms=4, label=form)
    if fp32 is not None:
        ax.axhline(100 * fp32, color="black", ls=":", lw=1, label=f"float {100 * fp32:.2f}%")
    all_bits = sorted({b for row in rows.values() for b in row})
    if all_bits:
        ax.set_xticks(all_bits)
        ax.set_xticklabels([f"w{b}a{b}" for b in all_bits])
    ax.set_xlabel("uniform subnet (weight / activation bits)")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def pareto_plot(
    front: Sequence[tuple[float, float]],
    candidates: Sequence[tuple[float, float, float | None, bool]],
    uniform: Sequence[tuple[str, float, float | None]],
    cost_label: str,
    budget: float | None,
) -> bytes:
    """Search result: predicted front (cost, acc), re-measured candidates
    (cost, predicted, measured, chosen) and uniform subnets (label, cost, measured)."""
    fig, ax = _figure(7.5, 4.5)
    if front:
        fr = sorted(front)
        ax.step([c for c, _ in fr], [100 * a for _, a in fr], where="post", color="tab:blue", alpha=0.5)
        ax.scatter([c for c, _ in fr], [100 * a for _, a in fr], s=14, color="tab:blue", label="Pareto front (predicted)")
    meas = [(c, m, ch) for c, _, m, ch in candidates if m is not None]
    if candidates:
        ax.scatter([c for c, _, _, _ in candidates], [100 * p for _, p, _, _ in candidates], s=34,
                   facecolors="none", edgecolors="tab:blue", label="top candidates (predicted)")
    if meas:
        ax.scatter([c for c, _, _ in meas], [100 * m for _, m, _ in meas], s=30, color="tab:orange",
                   label="top candidates (measured)")
        for c, m, ch in meas:
            if ch:
                ax.scatter([c], [100 * m], marker="*", s=220, color="tab:red", zorder=5, label="chosen subnet")
    uni = sorted((u for u in uniform if u[2] is not None), key=lambda u: u[1])
    if uni:
        ax.plot([u[1] for u in uni], [100 * u[2] for u in uni], "x--", color="tab:gray", label="uniform subnets (measured)")
        for label, c, m in uni:
            ax.annotate(label, (c, 100 * m), fontsize=7, xytext=(3, -10), textcoords="offset points")
    if budget is not None:
        ax.axvline(budget, color="tab:red", ls=":", label=f"budget {budget:g}")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("top-1 (%) on the held-out training split")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def bits_plot(layers: Sequence[tuple[str, int | None, int]]) -> bytes:
    """Per-layer bit-widths of one subnet: (layer, weight bits or None, activation bits)."""
    import numpy as np

    n = len(layers)
    fig, ax = _figure(max(7.5, 0.32 * n + 2), 4.2)
    x = np.arange(n)
    wb = [w if w is not None else 0 for _, w, _ in layers]
    ab = [a for _, _, a in layers]
    ax.bar(x - 0.2, wb, 0.4, label="weight bits", color="tab:blue")
    ax.bar(x + 0.2, ab, 0.4, label="activation bits", color="tab:orange")
    for i, (_, w, _) in enumerate(layers):
        if w is None:  # residual-add quantizers carry no weight
            ax.text(i - 0.2, 0.2, "-", ha="center", fontsize=7, color="tab:blue")
    ax.set_xticks(x)
    ax.set_xticklabels([name for name, _, _ in layers], rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(9))
    ax.set_ylim(0, 8.8)
    ax.set_ylabel("bits")
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    ax.grid(False, axis="x")
    return _png(fig)


def accuracy_latency_plot(points: Sequence[dict]) -> bytes:
    """One marker per validated model: dicts with label, profile, backend, latency_ms,
    top1, simulated. Simulated latencies (QNN HTP simulator) get hollow markers."""
    fig, ax = _figure(9.5, 4.5)
    seen: set[str] = set()
    for p in points:
        if p.get("latency_ms") is None or p.get("top1") is None:
            continue
        prof = p.get("profile") or "fp32"
        color = profile_color(prof)
        label = prof if prof not in seen else None
        seen.add(prof)
        marker = "s" if p.get("backend") == "qnn" else "o"
        face = "none" if p.get("simulated") else color
        ax.scatter([p["latency_ms"]], [100 * p["top1"]], s=60, marker=marker, facecolors=face,
                   edgecolors=color, linewidths=1.5, label=label, zorder=3)
        ax.annotate(p["label"], (p["latency_ms"], 100 * p["top1"]), fontsize=7, xytext=(5, 3),
                    textcoords="offset points")
    if any(p.get("simulated") for p in points):
        ax.scatter([], [], marker="s", facecolors="none", edgecolors="black", label="QNN HTP simulator (simulated latency)")
    ax.set_xscale("log")
    ax.set_xlabel("latency p50, batch 1 (ms, log scale)")
    ax.set_ylabel("top-1 (%)")
    # Outside the axes: low-bit points sit in the lower right where a legend would hide them.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _png(fig)


__all__ = ["accuracy_latency_plot", "bits_plot", "elastic_plot", "pareto_plot", "profile_color"]
