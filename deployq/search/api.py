"""`search(config)`: CQAP predictor + genetic search for one target and budget.

Steps: load checkpoint and profile -> layout, gene space, budget check -> held-out
split of the TRAINING data -> sampled subnets measured on it (cached) -> predictor
fitted and scored on held-out configurations (cached) -> evolution with predicted
accuracy as fitness -> top-k re-measured for real -> the best of those measured again
on held-out images kept apart from the search (plus shifted copies) and compared with
the best uniform subnet there -> SubnetSpec JSON plus a Pareto CSV/PNG. Uniform
subnets are measured for reference.

What the predictor learns (`target`): "soft", the mean probability of the true
class, by default, at the temperature that calibrates the sampled subnets (`calibrate`:
lowest NLL pooled over the predictor's training subnets, see sampling.TEMPERATURES). On
a few hundred held-out images top-1 moves in whole images and is flat for most good
subnets, so two measurements of the same subnets on different images rank them alike
only at Kendall tau ~0.5; the soft accuracy moves with every image and agrees at
0.70-0.74 at T = 1, 0.77-0.81 at the calibrating T ~1.3 (digits ResNet-20, 434 held-out
x 2 copies vs 360 val images). The reported tau says which it is computed against, and
tau against measured top-1 is reported too.

The final choice is made on held-out images the search never measured (`final_share`
of them, a third by default, kept apart before sampling): every sample, refit and
evolution round measures on the rest, so the best of the hundreds measured there is
also the luckiest on exactly those images, and a mixed subnet that only looked better
on them was chosen over uniform W3A3 on digits and lost 3-5 val images to it. The best
measured candidate (or the best of the `final_k` best) is measured on the final images
plus `final_copies - 1` shifted copies (training augments with shifts of up to size/8
pixels, so these are in-distribution); if a uniform subnet fits the budget and the
mixed subnet's advantage over it there, paired image by image, is within
`MIXED_OVER_UNIFORM_Z` standard errors, the uniform one is chosen (it is the simpler
deployment). The chosen subnet's top-1 there is a held-out estimate nothing was
selected on but that mixed-or-uniform decision. Besides the
evolution's best, the candidates include the uniform subnets within budget and, for
the nearest uniform subnets over budget, the subnet the predictor reaches by lowering
their genes one step at a time into budget (`NEAR_UNIFORM`, `evolution.descend`);
those also seed every evolution round.
Soft rather than top-1 for the choice too: 100 subnets measured on the held-out images
and again on val rank alike at tau 0.72-0.85 by calibrated soft accuracy, 0.48-0.74 by
top-1 (benchmarks/search_quality.py, four digits supernets in two sessions). Among the near-best subnets
neither measure predicts the other images' top-1 (split-half check on 600-1100 subnets,
best quarter: tau ~0 for both); there the uniform rule above decides. Nothing here reads
the val split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deployq.errors import UserError
from deployq.search.cost import Budget, check_feasible, format_cost, parse_budget
from deployq.search.evolution import EvolutionConfig, descend, evolve
from deployq.search.pareto import ParetoRow, front, genes_id, pareto_paths, write_csv, write_png
from deployq.search.predictor import (
    Predictor,
    PredictorConfig,
    PredictorMetrics,
    score_predictor,
    split_indices,
)

DEFAULT_HOLDOUT = 0.2
# Uniform subnets over budget (the nearest this many) are lowered gene by gene, the
# predictor choosing each step, into budget: these near-uniform subnets seed every
# evolution round and are measured for the final choice, so the search always weighs
# the mixed subnet closest to the uniform one the budget just misses.
NEAR_UNIFORM = 2
# The best mixed subnet is chosen over the best uniform subnet within budget only when
# its paired advantage in soft accuracy on the final images exceeds this many
# standard errors.
MIXED_OVER_UNIFORM_Z = 2.0


@dataclass(frozen=True)
class SearchConfig:
    checkpoint: str | Path
    profile: str
    budget: str | Budget
    data: str | None = None  # default: the checkpoint's training source, else "digits"
    # tau rises slowly with more (calibrated target, 8 splits, seed-0 supernet: 0.804 /
    # 0.819 / 0.828 at 500 / 700 / 900; 5-split means on two supernets x two forms
    # 0.768-0.837 at 700, 0.817-0.855 at 1200). 1200 on two thirds of 434 held-out
    # digits images (x 2 copies) took 135-185 s on 2 cores (benchmarks/search_quality.py).
    n_samples: int = 1200
    holdout: float | None = None  # fraction of the train split; default: training's, else 0.2
    holdout_seed: int | None = None
    generations: int = 30
    population: int = 100
    parents: int | None = None  # kept per generation; default: a quarter of the population
    mutate_p: float = 0.1
    seed: int = 0
    out: str | Path | None = "subnet.json"
    top_k: int = 5  # candidates measured for real per round
    refine_rounds: int = 4  # evolve, measure top-k, refit the predictor with them; repeat
    use_cache: bool = True
    n_measure: int = 0  # measure on at most this many held-out images (0 = all)
    # Samples and candidates measured on the held-out images x this many shifted copies:
    # predictor tau against that measurement, same 450-500 subnets, ordinal gbm, 5
    # splits: 0.729 -> 0.737 (s0 snpe), 0.728 -> 0.775 (s1 cpu) at 2 copies, at twice
    # the measuring time; 3 and 5 copies add little more.
    copies: int = 2
    target: str = "soft"  # what the predictor learns: "soft" (true-class probability) or "top1"
    # soft at the temperature that calibrates the sampled subnets (else T = 1). Predictor
    # tau, 500 subnets, 6 splits: 0.758 -> 0.803 (seed-0 supernet), 0.813 -> 0.829 (seed 1)
    calibrate: bool = True
    # Share of the held-out images the search never measures: the final choice is made
    # on them (0: on the search's own images, where the best of hundreds measured is
    # the luckiest on exactly those images).
    final_share: float = 1 / 3
    # Candidates of best measured soft accuracy re-measured on the final images; the
    # best there is the choice. 1: the search's best, tested against the best uniform
    # subnet only (re-ranking near-best subnets on other images is noise, see above).
    final_k: int = 1
    final_copies: int = 5  # final images x this many (shifted) copies
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    test_fraction: float = 0.2  # share of samples held out to score the predictor


@dataclass(frozen=True)
class UniformRef:
    bits: int
    cost: float
    predicted: float
    measured: float


@dataclass(frozen=True)
class SearchResult:
    spec: object  # SubnetSpec
    measured_acc: float
    predicted_acc: float
    cost: float
    budget: Budget
    cheapest: float
    metrics: PredictorMetrics  # the final (refined) predictor on held-out configurations
    base_metrics: PredictorMetrics  # the predictor fitted on the samples only
    pareto: tuple[ParetoRow, ...]
    uniform: tuple[UniformRef, ...]
    n_measured: int  # real measurements made by this run (0 samples when the cache held them)
    samples_cached: bool
    predictor_cached: bool
    timings: dict
    form: object  # Form
    data: str
    n_holdout: int  # held-out images the search measures on
    measure_images: int = 0  # images a sample is measured on (held-out x copies)
    final_holdout: int = 0  # held-out images the final choice was measured on
    final_apart: bool = False  # those are images the search never measured
    final_images: int = 0  # images the final choice was measured on (those x copies)
    final_measured: float = float("nan")  # the chosen subnet's top-1 on those
    temperature: float = 1.0  # the soft accuracies' (calibrated unless calibrate=False)
    # The best mixed finalist's soft-accuracy advantage over the best uniform subnet
    # within budget and its standard error (nan: the best was uniform, or no uniform
    # subnet fits); uniform_kept: it was not significant, the uniform one was chosen.
    advantage: float = float("nan")
    advantage_se: float = float("nan")
    uniform_kept: bool = False
    outputs: tuple[Path, ...] = ()
    predictor: object = None  # the final Predictor (scores encoder.encode(spec, layout) vectors)

    def nearest_uniform(self) -> UniformRef | None:
        """The uniform subnet whose cost is closest to the budget."""
        if not self.uniform:
            return None
        return min(self.uniform, key=lambda u: (abs(u.cost - self.budget.value), -u.bits))


class _Bars:
    """rich progress bars, or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def task(self, description: str, total: int):
        if self.progress is None:
            return lambda *a, **k: None
        tid = self.progress.add_task(description, total=total, info="")

        def update(completed: int, info: str = "") -> None:
            self.progress.update(tid, completed=completed, info=info)

        return update


def _load(config: SearchConfig):
    from deployq.checkpoint import load_checkpoint
    from deployq.profile import load_profile

    budget = parse_budget(config.budget) if isinstance(config.budget, str) else config.budget
    profile = load_profile(config.profile)
    for name, v, lo in (
        ("samples", config.n_samples, 10),
        ("generations", config.generations, 1),
        ("population", config.population, 4),
        ("top-k", config.top_k, 1),
        ("final-k", config.final_k, 1),
        ("final copies", config.final_copies, 1),
        ("copies", config.copies, 1),
    ):
        if v < lo:
            raise UserError(f"{name} must be at least {lo}; got {v}")
    if not 0 <= config.final_share < 1:
        raise UserError(f"final share must be in [0, 1); got {config.final_share}")
    if config.target not in ("soft", "top1"):
        raise UserError(f"predictor target must be soft or top1; got {config.target!r}")
    if config.parents is not None and not 1 <= config.parents < config.population:
        raise UserError(f"parents must be in 1..population-1; got {config.parents}")
    ckpt = load_checkpoint(config.checkpoint)
    meta = ckpt.meta
    if not meta.preprocessing:
        raise UserError(
            f"checkpoint {str(config.checkpoint)!r} records no preprocessing: cannot measure subnets on data"
        )
    if not meta.calibrated:
        raise UserError(
            f"checkpoint {str(config.checkpoint)!r} is not calibrated: its quantizers hold no ranges yet"
        )
    return budget, profile, ckpt


def _choices(profile, space) -> tuple[tuple[int, ...], tuple[int, ...]]:
    w = tuple(sorted(set(profile.weight_bits) & set(space.wbits)))
    a = tuple(sorted(set(profile.act_bits) & set(space.abits)))
    if not w or not a:
        raise UserError(
            f"profile {profile.name} allows weight bits {list(profile.weight_bits)} / act bits "
            f"{list(profile.act_bits)}, the supernet was trained for {list(space.wbits)} / "
            f"{list(space.abits)}: no common bit-width"
        )
    return w, a


def _holdout_params(config: SearchConfig, train_config: dict, same_data: bool) -> tuple[float, int]:
    # Reuse the split training held out, so the measured images were not trained on.
    frac = (
        config.holdout
        if config.holdout is not None
        else train_config.get("holdout", DEFAULT_HOLDOUT)
    )
    # deployq.train holds out `holdout` of the train split with seed `seed`.
    t_seed = train_config.get("holdout_seed", train_config.get("seed", 0))
    seed = config.holdout_seed if config.holdout_seed is not None else t_seed
    try:
        frac, seed = float(frac), int(seed)
    except (TypeError, ValueError):
        raise UserError(
            f"bad held-out split in the checkpoint's train config: {frac!r}, seed {seed!r}"
        ) from None
    if not 0 < frac < 1:
        raise UserError(f"held-out fraction must be in (0, 1); got {frac}")
    trained = train_config.get("holdout")
    # Another split of the same data holds images the supernet trained on: measured
    # there, every subnet looks near-perfect and the predictor learns noise.
    if same_data and trained is not None and (float(trained), int(t_seed)) != (frac, seed):
        raise UserError(
            f"the checkpoint was trained on all but a {float(trained):g} held-out split "
            f"(seed {t_seed}) of its data; measuring on a {frac:g} split (seed {seed}) would "
            f"use images it trained on: drop --holdout, or train with --holdout {frac:g}"
        )
    return frac, seed


@dataclass(frozen=True)
class HeldOut:
    """The images `search` measures on: `held` is the held-out split (fraction `frac`,
    seed `seed`) of the TRAIN data of `source`; the search measures `idx` of it, the
    final choice `final_idx`."""

    source: str
    frac: float
    seed: int
    held: object  # deployq.data.Dataset
    idx: np.ndarray
    final_idx: np.ndarray


def held_out_images(config: SearchConfig, meta, prep) -> HeldOut:
    """What `search` measures on, for reports that must measure on the same images."""
    from deployq.data import holdout, load_data
    from deployq.search.sampling import split_final, subsample

    trained_on = meta.train_config.get("data") or "digits"
    source = config.data or trained_on
    frac, hseed = _holdout_params(config, meta.train_config, _same_source(source, trained_on))
    _, held = holdout(load_data(str(source), prep, split="train"), frac, hseed)
    idx, final_idx = split_final(
        subsample(len(held), config.n_measure, hseed), config.final_share, hseed
    )
    return HeldOut(str(source), frac, hseed, held, idx, final_idx)


def _same_source(a: str, b: str) -> bool:
    """Whether two --data values name the same data (a path spelled two ways too)."""
    if str(a) == str(b):
        return True
    pa, pb = Path(str(a)), Path(str(b))
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def search(config: SearchConfig, progress: bool = True) -> SearchResult:
    from deployq.augment import max_shift as augment_shift
    from deployq.checkpoint import file_sha256
    from deployq.data import Preprocessing
    from deployq.fileio import check_writable
    from deployq.search.cache import CacheKey, SearchCache, cache_dir
    from deployq.search.encoder import encode_many, onehot_groups
    from deployq.search.genes import GeneSpace, cached_layer_spec
    from deployq.search.layout import NetLayout
    from deployq.search.sampling import (
        TEMPERATURES,
        Measurer,
        Scores,
        calibrating_temperature,
        paired_advantage,
        sample_genes,
        sample_population,
    )

    t_start = time.perf_counter()
    if config.out is not None:
        check_writable(config.out)
    budget, profile, ckpt = _load(config)
    net, meta = ckpt.net, ckpt.meta
    form = profile.form
    if form not in net.space.forms:
        raise UserError(
            f"profile {profile.name} needs form {form.to_dict()}, which this supernet was not trained for"
        )
    wchoices, achoices = _choices(profile, net.space)
    prep = Preprocessing.from_dict(meta.preprocessing)
    layout = NetLayout.of(net, (1, prep.channels, prep.size, prep.size))
    gspace = GeneSpace(layout, wchoices, achoices)
    layer_spec = cached_layer_spec(lambda n, wb, ab: net.layer_spec(n, form, wb, ab))

    def to_spec(g):
        return gspace.to_spec(g, layer_spec)

    def cost_of(g) -> float:
        w, a = gspace.bits(g)
        return budget.bits_cost(layout, w, a)

    cheapest = check_feasible(budget, layout, wchoices, achoices)
    common_bits = sorted(set(wchoices) & set(achoices))
    profile.check(to_spec(gspace.uniform(min(wchoices), min(achoices))))  # fixed layers too

    # --- held-out split of the training data ------------------------------------
    ho = held_out_images(config, meta, prep)
    source, held, idx, final_idx = ho.source, ho.held, ho.idx, ho.final_idx
    # Training's augmentation (random shifts of up to size/8 pixels) is what makes
    # shifted copies in-distribution; without it there are no copies.
    max_shift = augment_shift(prep.size, meta.train_config.get("augment", True))
    measure = Measurer(net, held.x[idx], held.y[idx], copies=config.copies, max_shift=max_shift)

    key = CacheKey(
        checkpoint_sha256=file_sha256(config.checkpoint),
        form=form.to_dict(),
        data=str(source),
        holdout=ho.frac,
        holdout_seed=ho.seed,
        n_measure=measure.n_images,
        final_share=float(config.final_share),
        copies=len(measure) // max(measure.n_images, 1),
        wchoices=wchoices,
        achoices=achoices,
        layout=layout.fingerprint(),
    )
    cache = SearchCache(cache_dir(config.checkpoint, form), key, enabled=config.use_cache)
    timings: dict[str, float] = {}
    with _Bars(progress) as bars:
        # --- samples ------------------------------------------------------------
        t0 = time.perf_counter()
        cached = cache.load_samples()
        n_t = len(TEMPERATURES)
        genes = np.zeros((0, gspace.size), np.int64)
        accs = np.zeros(0, np.float32)  # top-1
        soft_t = np.zeros((0, n_t), np.float32)  # soft accuracy at every temperature
        nll_t = np.zeros((0, n_t), np.float32)
        if cached is not None:
            genes, _, accs, soft_t, nll_t = cached
        samples_cached = cached is not None and len(accs) >= config.n_samples
        n_new = max(0, config.n_samples - len(accs))
        if n_new:
            rng = np.random.default_rng([config.seed, len(accs)])
            anchors = np.zeros((0, gspace.size), np.int64)
            if len(accs) == 0:
                # Uniform subnets anchor the predictor where the supernet is trained best.
                anchors = np.array(
                    [gspace.uniform(b, b) for b in common_bits][: n_new // 4], np.int64
                ).reshape(-1, gspace.size)
            # Distinct from each other and from what is measured already.
            new = np.concatenate(
                [
                    anchors,
                    sample_population(
                        rng,
                        gspace.choices,
                        n_new - len(anchors),
                        exclude=[*genes, *anchors],
                    ),
                ]
            )
            n_new = len(new)
            update = bars.task("measuring subnets", n_new)
            new_acc = np.zeros(n_new, np.float32)
            new_soft = np.zeros((n_new, n_t), np.float32)
            new_nll = np.zeros((n_new, n_t), np.float32)
            for i, g in enumerate(new):
                sc = measure.scores(to_spec(g), grid=True)
                new_acc[i], new_soft[i], new_nll[i] = sc.top1, sc.soft_t, sc.nll_t
                update(i + 1, f"acc {sc.top1:.3f}")
            genes, accs = np.concatenate([genes, new]), np.concatenate([accs, new_acc])
            soft_t = np.concatenate([soft_t, new_soft])
            nll_t = np.concatenate([nll_t, new_nll])
        x = encode_many([to_spec(g) for g in genes], layout)
        groups = onehot_groups(layout)
        if n_new:
            cache.save_samples(genes, x, accs, soft_t, nll_t)
        timings["sampling_s"] = time.perf_counter() - t0
        timings["measure_per_candidate_s"] = (
            timings["sampling_s"] / n_new if n_new else float("nan")
        )

        # --- predictor ----------------------------------------------------------
        t0 = time.perf_counter()
        tr, te = split_indices(len(accs), config.test_fraction, config.predictor.seed)
        # Calibrated on the predictor's training subnets only; every later measurement
        # (refits, final choice) is at the same temperature.
        t_idx = calibrating_temperature(nll_t[tr]) if config.calibrate else TEMPERATURES.index(1.0)
        temperature = TEMPERATURES[t_idx]
        measure.temperature = temperature
        target = soft_t[:, t_idx] if config.target == "soft" else accs
        target_key = f"soft@T={temperature:.4f}" if config.target == "soft" else config.target

        def score(p: Predictor) -> PredictorMetrics:
            return score_predictor(p, x, target, tr, te, top1=accs, target=config.target)

        loaded = cache.load_predictor(config.predictor, len(accs), target_key)
        predictor_cached = loaded is not None
        if loaded is None:
            update = bars.task("training predictor", 1)
            predictor = Predictor(x.shape[1], config.predictor, groups).fit(
                x[tr], target[tr], on_epoch=lambda e, t: update(e / t)
            )
            metrics = score(predictor)
            cache.save_predictor(predictor, metrics, len(accs), target_key)
        else:
            predictor, metrics = loaded
        base_metrics = metrics
        timings["predictor_s"] = time.perf_counter() - t0

        # --- evolution, refined with real measurements of its best candidates ----
        t0 = time.perf_counter()
        scored = [0, 0.0]
        # genes -> (genes, cost, predicted, measured top-1, measured soft)
        measured: dict[tuple[int, ...], tuple[np.ndarray, float, float, float, float]] = {}
        extra_x: list[np.ndarray] = []
        extra_y: list[float] = []
        def gkey(g) -> tuple[int, ...]:
            return tuple(int(v) for v in g)

        test_keys = {gkey(genes[i]) for i in te}

        def fitness(pop: np.ndarray) -> np.ndarray:
            t = time.perf_counter()
            out = predictor.predict(encode_many([to_spec(g) for g in pop], layout))
            scored[0] += len(pop)
            scored[1] += time.perf_counter() - t
            return out

        over = [b for b in common_bits if not budget.met(cost_of(gspace.uniform(b, b)))]

        def near_uniform() -> list[np.ndarray]:
            return [
                descend(gspace.uniform(b, b), gspace.choices, fitness, cost_of, budget.met)
                for b in over[:NEAR_UNIFORM]
            ]

        def measure_candidate(g, c, p) -> Scores:
            sc = measure.scores(to_spec(g))
            measured[gkey(g)] = (g, c, p, sc.top1, sc.soft)
            return sc

        result = None
        for rnd in range(config.refine_rounds + 1):
            evo_cfg = EvolutionConfig(
                population=config.population,
                parents=config.parents or max(1, config.population // 4),
                generations=config.generations,
                mutate_p=config.mutate_p,
                seed=config.seed + rnd,
            )
            label = "evolution" if rnd == config.refine_rounds else f"evolution (round {rnd + 1})"
            update = bars.task(label, config.generations)
            seeds = near_uniform()  # with this round's predictor
            result = evolve(
                gspace.choices,
                fitness,
                cost_of,
                budget.met,
                evo_cfg,
                init=lambda rng: sample_genes(rng, gspace.choices),
                on_generation=lambda g, best, update=update: update(
                    g, f"best predicted {best:.4f}"
                ),
                seeds=seeds,
            )
            # The predictor is most wrong exactly where the search drives it: measure
            # the top candidates for real, and (but after the last round) learn from them.
            top = [t for t in result.top(config.top_k * 4) if gkey(t[0]) not in measured]
            top = top[: config.top_k]
            update = bars.task("measuring top candidates", len(top))
            for i, (g, c, p) in enumerate(top):
                sc = measure_candidate(g, c, p)
                if gkey(g) not in test_keys:  # the reported tau stays on unseen configurations
                    extra_x.append(encode_many([to_spec(g)], layout)[0])
                    extra_y.append(sc.soft if config.target == "soft" else sc.top1)
                update(i + 1, f"predicted {p:.3f} measured top-1 {sc.top1:.3f} soft {sc.soft:.3f}")
            if rnd < config.refine_rounds and extra_y:
                update = bars.task(f"refining predictor ({len(extra_y)} new)", 1)
                predictor = Predictor(x.shape[1], config.predictor, groups).fit(
                    np.concatenate([x[tr], np.stack(extra_x)]),
                    np.concatenate([target[tr], np.asarray(extra_y, np.float32)]),
                    on_epoch=lambda e, t, update=update: update(e / t),
                )
                metrics = score(predictor)
        # the last round's seeds: no refit followed them, the predictor is the same
        for g in seeds:
            if gkey(g) not in measured:
                p = float(predictor.predict(encode_many([to_spec(g)], layout))[0])
                measure_candidate(g, cost_of(g), p)
        timings["evolution_s"] = time.perf_counter() - t0
        timings["predict_per_candidate_s"] = scored[1] / max(scored[0], 1)

        # --- uniform references; the choice is the best MEASURED subnet in budget -----
        t0 = time.perf_counter()
        uniform = []
        in_budget = []  # the measured rows of the uniform subnets within budget
        for b in common_bits:
            g = gspace.uniform(b, b)
            sc = measure.scores(to_spec(g))
            u = UniformRef(
                b,
                cost_of(g),
                float(predictor.predict(encode_many([to_spec(g)], layout))[0]),
                sc.top1,
            )
            uniform.append(u)
            if budget.met(u.cost):
                in_budget.append(
                    measured.setdefault(gkey(g), (g, u.cost, u.predicted, sc.top1, sc.soft))
                )
        remeasured = list(measured.values())
        # The final few by measured soft accuracy (ties: top-1, then cheaper), measured
        # once more on the final images (ones the search never measured) plus shifted
        # copies; the best soft accuracy there is the choice (soft, not top-1: see the
        # module docstring).
        finalists = sorted(remeasured, key=lambda r: (-r[4], -r[3], r[1]))[: config.final_k]
        final = Measurer(
            net,
            held.x[final_idx],
            held.y[final_idx],
            copies=config.final_copies,
            max_shift=max_shift,
            temperature=temperature,
        )
        update = bars.task(f"final measurement ({len(final)} images)", len(finalists))
        final_scores = []
        for i, r in enumerate(finalists):
            final_scores.append(final.scores(to_spec(r[0])))
            update(i + 1)
        best_i = max(
            range(len(finalists)),
            key=lambda i: (final_scores[i].soft, final_scores[i].top1, -finalists[i][1]),
        )
        # A mixed subnet replaces the best uniform one within budget only when it is
        # measurably better: the best of many noisy measurements is biased upwards (on
        # digits, finalists within a few tenths of a point of uniform W3A3 on the
        # held-out images fell on either side of it on val).
        advantage = advantage_se = float("nan")
        uniform_kept = False
        if in_budget and not any(np.array_equal(finalists[best_i][0], u[0]) for u in in_budget):
            ref = max(in_budget, key=lambda r: (r[4], r[3], -r[1]))
            ref_i = next(
                (i for i, r in enumerate(finalists) if np.array_equal(r[0], ref[0])), None
            )
            if ref_i is None:
                finalists.append(ref)
                final_scores.append(final.scores(to_spec(ref[0])))
                ref_i = len(finalists) - 1
            advantage, advantage_se = paired_advantage(
                final_scores[best_i].per_image, final_scores[ref_i].per_image
            )
            if not advantage > MIXED_OVER_UNIFORM_Z * advantage_se:
                best_i, uniform_kept = ref_i, True
        best_g, best_c, best_p, best_m, _ = finalists[best_i]
        best_final = final_scores[best_i].top1
        timings["remeasure_s"] = time.perf_counter() - t0

    spec = to_spec(best_g)
    profile.check(spec)
    net.check_spec(spec)
    rows = [
        ParetoRow("front", genes_id(g), c, f)
        for c, f, g in front([(c, f, k) for k, (c, f) in result.archive.items()])
    ]
    rows += [
        ParetoRow("candidate", genes_id(g), c, p, m, chosen=bool(np.array_equal(g, best_g)))
        for g, c, p, m, _ in remeasured
    ]
    rows += [
        ParetoRow("uniform", f"uniform-w{u.bits}a{u.bits}", u.cost, u.predicted, u.measured)
        for u in uniform
    ]
    outputs: tuple[Path, ...] = ()
    if config.out is not None:
        from deployq.fileio import write_text

        csv_path, png_path = pareto_paths(config.out)
        write_text(config.out, spec.to_json() + "\n")
        write_csv(csv_path, rows, budget.kind)
        write_png(
            png_path,
            rows,
            budget.kind,
            budget.value,
            f"{Path(str(config.checkpoint)).name} / {profile.name}: budget {budget} "
            f"(chosen {format_cost(budget.kind, best_c)}, measured {best_m:.4f})",
        )
        outputs = (Path(config.out), csv_path, png_path)
    timings["total_s"] = time.perf_counter() - t_start
    return SearchResult(
        spec=spec,
        measured_acc=float(best_m),
        predicted_acc=float(best_p),
        cost=float(best_c),
        budget=budget,
        cheapest=float(cheapest),
        metrics=metrics,
        base_metrics=base_metrics,
        pareto=tuple(rows),
        uniform=tuple(uniform),
        n_measured=measure.calls + final.calls,
        samples_cached=samples_cached,
        predictor_cached=predictor_cached,
        timings=timings,
        form=form,
        data=str(source),
        n_holdout=measure.n_images,
        final_holdout=final.n_images,
        final_apart=not np.array_equal(idx, final_idx),
        measure_images=len(measure),
        final_images=len(final),
        final_measured=float(best_final),
        temperature=float(temperature),
        advantage=advantage,
        advantage_se=advantage_se,
        uniform_kept=uniform_kept,
        outputs=outputs,
        predictor=predictor,
    )
