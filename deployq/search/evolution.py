"""Genetic search over integer genomes under a cost budget.

Generic: genes are integers with a finite set of allowed values each, fitness is a
batch function (the predictor scores a whole population at once) and cost a
per-genome function. Every generation keeps the `parents` best, then fills the
population with mutants (each gene resampled with probability `mutate_p`) and
uniform crossovers of two parents. A child over budget is rejected and another one
drawn; after `max_tries` a random over-budget child is repaired by lowering random
genes, which always succeeds when the all-minimum genome is within budget (costs
grow with every bit). Deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Genome = np.ndarray  # int64 [n_genes]
Fitness = Callable[[np.ndarray], np.ndarray]  # [pop, n_genes] -> [pop]
Cost = Callable[[Genome], float]


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 100
    parents: int = 25
    generations: int = 30
    mutate_p: float = 0.1
    crossover_fraction: float = 0.5  # share of children made by crossover (rest: mutation)
    max_tries: int = 50
    seed: int = 0


@dataclass
class EvolutionResult:
    best: Genome
    best_fitness: float
    best_cost: float
    history: list[float] = field(default_factory=list)  # best fitness per generation
    archive: dict[tuple[int, ...], tuple[float, float]] = field(
        default_factory=dict
    )  # genes -> (cost, fitness)

    def top(self, k: int) -> list[tuple[Genome, float, float]]:
        """The k fittest distinct genomes seen, as (genes, cost, fitness)."""
        items = sorted(self.archive.items(), key=lambda kv: (-kv[1][1], kv[1][0]))
        return [(np.array(g, dtype=np.int64), c, f) for g, (c, f) in items[:k]]


def repair(
    genes: Genome,
    choices,
    cost: Cost,
    budget_met: Callable[[float], bool],
    rng: np.random.Generator,
) -> Genome:
    """Lower random genes one allowed step at a time until the genome is within budget."""
    g = genes.copy()
    sorted_choices = [sorted(c) for c in choices]
    while not budget_met(cost(g)):
        lowerable = [i for i in range(len(g)) if g[i] > sorted_choices[i][0]]
        if not lowerable:
            break
        i = lowerable[rng.integers(len(lowerable))]
        cs = sorted_choices[i]
        g[i] = cs[cs.index(int(g[i])) - 1]
    return g


def descend(
    genes: Genome,
    choices,
    fitness: Fitness,
    cost: Cost,
    budget_met: Callable[[float], bool],
) -> Genome:
    """Lower one gene one allowed step at a time, each time the step the fitness
    likes best (ties: the cheaper genome), until the genome is within budget: a
    uniform subnet over budget becomes the mixed subnet nearest to it that fits.
    Stops at the all-minimum genome."""
    g = np.array(genes, dtype=np.int64)
    sorted_choices = [sorted(c) for c in choices]
    while not budget_met(cost(g)):
        steps = []
        for i in range(len(g)):
            cs = sorted_choices[i]
            k = cs.index(int(g[i]))
            if k > 0:
                h = g.copy()
                h[i] = cs[k - 1]
                steps.append(h)
        if not steps:
            break
        fit = np.asarray(fitness(np.stack(steps)), dtype=np.float64)
        g = steps[max(range(len(steps)), key=lambda j: (fit[j], -cost(steps[j])))]
    return g


def _picker(parents: list[Genome], rng: np.random.Generator) -> Callable[[], Genome]:
    return lambda: parents[rng.integers(len(parents))]


def evolve(
    choices: tuple[tuple[int, ...], ...],
    fitness: Fitness,
    cost: Cost,
    budget_met: Callable[[float], bool],
    config: EvolutionConfig,
    init: Callable[[np.random.Generator], Genome],
    on_generation: Callable[[int, float], None] | None = None,
    seeds=(),
) -> EvolutionResult:
    """`seeds`: genomes put in the first population (those within budget), the rest
    drawn with `init`."""
    rng = np.random.default_rng(config.seed)
    archive: dict[tuple[int, ...], tuple[float, float]] = {}
    cost_memo: dict[tuple[int, ...], float] = {}

    def cost_of(g: Genome) -> float:
        key = tuple(int(x) for x in g)
        if key not in cost_memo:
            cost_memo[key] = float(cost(g))
        return cost_memo[key]

    def valid(make: Callable[[], Genome]) -> Genome:
        g = make()
        for _ in range(config.max_tries):
            if budget_met(cost_of(g)):
                return g
            g = make()
        return repair(g, choices, cost_of, budget_met, rng)

    def score(pop: list[Genome]) -> np.ndarray:
        keys = [tuple(int(x) for x in g) for g in pop]
        new = [i for i, k in enumerate(keys) if k not in archive]
        if new:
            fit = np.asarray(fitness(np.stack([pop[i] for i in new])), dtype=np.float64)
            for i, f in zip(new, fit):
                archive[keys[i]] = (cost_of(pop[i]), float(f))
        return np.array([archive[k][1] for k in keys])

    def mutate(parent: Genome) -> Genome:
        g = parent.copy()
        for i in np.flatnonzero(rng.random(len(g)) < config.mutate_p):
            g[i] = choices[i][rng.integers(len(choices[i]))]
        return g

    def crossover(a: Genome, b: Genome) -> Genome:
        return np.where(rng.random(len(a)) < 0.5, a, b)

    population = [np.array(g, dtype=np.int64) for g in seeds if budget_met(cost_of(g))]
    population = population[: config.population]
    population += [valid(lambda: init(rng)) for _ in range(config.population - len(population))]
    history: list[float] = []
    for gen in range(config.generations):
        fit = score(population)
        order = np.argsort(-fit, kind="stable")
        parents = [population[i] for i in order[: config.parents]]
        history.append(float(fit[order[0]]))
        if on_generation:
            on_generation(gen + 1, history[-1])
        n_cross = round((config.population - len(parents)) * config.crossover_fraction)
        n_mut = config.population - len(parents) - n_cross
        pick = _picker(parents, rng)
        children = [valid(lambda pick=pick: mutate(pick())) for _ in range(n_mut)]
        children += [valid(lambda pick=pick: crossover(pick(), pick())) for _ in range(n_cross)]
        population = parents + children
    score(population)
    within = {k: v for k, v in archive.items() if budget_met(v[0])}
    best_key = max(within, key=lambda k: (within[k][1], -within[k][0]))
    c, f = within[best_key]
    return EvolutionResult(np.array(best_key, dtype=np.int64), f, c, history, within)
