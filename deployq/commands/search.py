"""`deployq search CKPT --profile NAME --budget KIND=VALUE`: mixed-precision search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def search_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Supernet checkpoint (.pt).")],
    profile: Annotated[
        str, typer.Option("--profile", "-p", help="Target profile name or .toml path.")
    ],
    budget: Annotated[
        str,
        typer.Option(
            "--budget",
            "-b",
            help="KIND=VALUE: avg-bits, avg-wbits, avg-abits (bits), size (bytes), bitops; "
            "k/M/G suffixes allowed, e.g. avg-bits=4, size=20k, bitops=1.2e9.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="SubnetSpec JSON to write (+ .pareto.csv/.png).")
    ] = Path("subnet.json"),
    data: Annotated[
        str | None,
        typer.Option(
            help="Data source (digits, dir, .npz); default: the checkpoint's training data."
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", help="Subnets measured to train the predictor.")
    ] = 1200,
    generations: Annotated[
        int, typer.Option("--generations", help="Genetic search generations.")
    ] = 30,
    population: Annotated[int, typer.Option("--population", help="Population size.")] = 100,
    holdout: Annotated[
        float | None,
        typer.Option(
            help="Fraction of the TRAIN split held out for measuring (default: training's, else "
            "0.2; on the data the checkpoint trained on, only training's own split)."
        ),
    ] = None,
    copies: Annotated[
        int,
        typer.Option(
            "--copies",
            help="Measure subnets on the held-out images x this many shifted copies.",
        ),
    ] = 2,
    final_share: Annotated[
        float,
        typer.Option(
            "--final-share",
            help="Share of the held-out images the search never measures; the final choice "
            "(best candidate vs best uniform subnet) is made on them. 0: on the search's own.",
            show_default="1/3",
        ),
    ] = 1 / 3,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Candidates measured for real in each round.")
    ] = 5,
    refine_rounds: Annotated[
        int,
        typer.Option("--refine-rounds", help="Rounds of: evolve, measure top-k, refit predictor."),
    ] = 4,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="What the predictor learns: soft (mean true-class probability, less noisy) "
            "or top1.",
        ),
    ] = "soft",
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate/--no-calibrate",
            help="Soft accuracy at the temperature that calibrates the sampled subnets "
            "(lowest held-out NLL), not at T=1.",
        ),
    ] = True,
    seed: Annotated[int, typer.Option(help="Random seed (sampling, predictor, evolution).")] = 0,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Ignore and do not write <ckpt>.cqap/.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Search per-layer bit-widths for a target under a budget (CQAP predictor + genetic search)."""
    from deployq.search.api import SearchConfig, search

    result = search(
        SearchConfig(
            checkpoint=checkpoint,
            profile=profile,
            budget=budget,
            data=data,
            n_samples=samples,
            copies=copies,
            holdout=holdout,
            final_share=final_share,
            generations=generations,
            population=population,
            seed=seed,
            out=out,
            top_k=top_k,
            refine_rounds=refine_rounds,
            target=target,
            calibrate=calibrate,
            use_cache=not no_cache,
        ),
        progress=not quiet,
    )
    _print_summary(result)


# Below this many held-out images (search and final shares together) the summary says
# the measurements are noisy: on digits ResNet-20, 434 images (x 2 copies) are what kept a
# second measurement of the same subnets agreeing with the first at Kendall tau ~0.8
# (README, "Mixed-precision search").
FEW_HELD_OUT = 300


def _print_summary(r) -> None:
    from rich.console import Console
    from rich.table import Table

    from deployq.search.cost import format_cost

    def c(v: float) -> str:
        return format_cost(r.budget.kind, v)

    t = Table(title=f"deployq search: budget {r.budget}", show_header=False)
    t.add_column("what")
    t.add_column("value", overflow="fold")
    m, b = r.metrics, r.base_metrics
    what = f"soft accuracy at T={r.temperature:.2f}" if m.target == "soft" else "top-1"
    t.add_row(
        "predictor",
        f"Kendall tau {m.kendall_tau:.3f} vs measured {what}, {m.kendall_tau_top1:.3f} vs "
        f"measured top-1; RMSE {m.rmse:.4f}; on {m.n_test} held-out configs "
        f"(from the samples alone: tau {b.kendall_tau:.3f} / {b.kendall_tau_top1:.3f}"
        f"{', cached' if r.predictor_cached else ''})",
    )
    t.add_row(
        "samples",
        f"{m.n_train + m.n_test} subnets on {r.n_holdout} held-out training images of {r.data}"
        f"{f' x {r.measure_images // r.n_holdout} shifted copies' if r.measure_images > r.n_holdout else ''}"
        f"{' (cached)' if r.samples_cached else ''}",
    )
    held = r.n_holdout + (r.final_holdout if r.final_apart else 0)
    if held < FEW_HELD_OUT:
        t.add_row(
            "note",
            f"{held} held-out images: one image is {100 / r.n_holdout:.2f} points of a search "
            "measurement, so measurements and tau are noisy; `deployq train --holdout 0.3` "
            "holds out more",
        )
    copies = f" x {r.final_images // r.final_holdout} copies" if r.final_images > r.final_holdout else ""
    if r.final_apart:
        final = f" on the search's images, {r.final_measured:.4f} on {r.final_holdout} it never measured{copies}"
    else:
        final = f"; {r.final_measured:.4f} on the same images{copies}" if copies else ""
    t.add_row(
        "chosen subnet",
        f"measured top-1 {r.measured_acc:.4f}{final}; predicted {r.predicted_acc:.4f} ({what})",
    )
    if r.uniform_kept:
        t.add_row(
            "uniform kept",
            f"the best mixed subnet's advantage, {100 * r.advantage:+.2f} points of soft "
            f"accuracy (standard error {100 * r.advantage_se:.2f}), is not significant",
        )
    elif r.advantage == r.advantage:  # not nan: a mixed subnet beat the best uniform one
        t.add_row(
            "vs uniform",
            f"{100 * r.advantage:+.2f} points of soft accuracy over the best uniform subnet "
            f"in budget (standard error {100 * r.advantage_se:.2f})",
        )
    t.add_row(
        "cost",
        f"{c(r.cost)} {r.budget.unit} (budget {c(r.budget.value)}, cheapest {c(r.cheapest)})",
    )
    u = r.nearest_uniform()
    if u is not None:
        within = "within" if r.budget.met(u.cost) else "over"
        t.add_row(
            f"uniform w{u.bits}a{u.bits}",
            f"measured top-1 {u.measured:.4f}, predicted {u.predicted:.4f} ({what}), "
            f"cost {c(u.cost)} ({within} budget)",
        )
    t.add_row("time", f"{r.timings['total_s']:.1f} s (measuring {r.timings['sampling_s']:.1f} s)")
    for p in r.outputs:
        t.add_row("wrote", str(p))
    Console(soft_wrap=True).print(t)


def register(app: typer.Typer) -> None:
    app.command("search")(search_cmd)
