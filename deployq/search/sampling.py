"""Training data for the predictor: subnets with evenly spread average bit-width,
each measured for real on a held-out split of the training data.

`sample_genes` draws a target average uniformly between the smallest and largest
allowed bit-width, then every gene independently around it (Gaussian, rounded to
the nearest allowed value), so the sample covers the cheap and the dear end of the
space alike instead of piling up in the middle as independent uniform draws would.

Half of the genomes (`LOCAL_FRACTION`) are instead a uniform subnet at a target drawn
the same way with a few genes set at random (`local_genes`): the average bit-width
stays evenly spread, but single layers now move on their own. Genomes drawn around a
shared target move all their genes together, so they cannot tell which layer costs
the accuracy; an additive model fitted on them alone ranks unseen subnets poorly.

`Measurer` keeps the held-out images as one tensor and evaluates a spec in large
batches without autograd; switching subnets is `net.set_active(spec)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deployq.augment import shifted_copies

SPREAD = 1.0  # mean std-dev (in bits) of per-layer bits around the drawn target
LOCAL_FRACTION = 0.5  # share of genomes that are a uniform subnet with a few genes changed
MAX_CHANGES = 6


def _nearest(values: np.ndarray, choices: tuple[int, ...]) -> np.ndarray:
    c = np.asarray(choices)
    return c[np.abs(values[:, None] - c[None, :]).argmin(axis=1)]


def sample_genes(
    rng: np.random.Generator, choices: tuple[tuple[int, ...], ...], spread: float | None = None
) -> np.ndarray:
    """One genome; `spread` None draws it per genome in [0, 2 * SPREAD], so the sample
    holds near-uniform subnets as well as strongly mixed ones."""
    if spread is None:
        spread = rng.uniform(0.0, 2 * SPREAD)
    lo = min(min(c) for c in choices)
    hi = max(max(c) for c in choices)
    target = rng.uniform(lo, hi)
    raw = target + rng.normal(0.0, spread, size=len(choices))
    out = np.empty(len(choices), dtype=np.int64)
    # Genes sharing a choice set are rounded together (weights, then activations).
    for cs in set(choices):
        idx = np.array([i for i, c in enumerate(choices) if c == cs])
        out[idx] = _nearest(raw[idx], cs)
    return out


def local_genes(
    rng: np.random.Generator, choices: tuple[tuple[int, ...], ...], max_changes: int = MAX_CHANGES
) -> np.ndarray:
    """A (near-)uniform genome at a target average drawn uniformly, with 1..max_changes
    random genes set to a random allowed value."""
    out = sample_genes(rng, choices, spread=0.0)
    k = int(rng.integers(1, min(max_changes, len(choices)) + 1))
    for i in rng.choice(len(choices), size=k, replace=False):
        out[i] = choices[i][rng.integers(len(choices[i]))]
    return out


def sample_population(
    rng: np.random.Generator,
    choices,
    n: int,
    local_fraction: float = LOCAL_FRACTION,
    exclude=(),
    max_tries: int = 100,
) -> np.ndarray:
    """n distinct genomes, none of them in `exclude` (so a genome measured twice cannot
    sit on both sides of the predictor's train/test split). A tiny space may give fewer
    than n after `max_tries` redraws of a duplicate."""
    seen = {tuple(int(v) for v in g) for g in exclude}
    out = []
    for _ in range(n):
        for _ in range(max_tries):
            g = (
                local_genes(rng, choices)
                if rng.random() < local_fraction
                else sample_genes(rng, choices)
            )
            key = tuple(int(v) for v in g)
            if key not in seen:
                seen.add(key)
                out.append(g)
                break
    return np.stack(out) if out else np.zeros((0, len(choices)), np.int64)


@dataclass(frozen=True)
class Scores:
    """What one measurement of a subnet gives.

    top1: share of images classified right (what gets reported).
    soft: mean softmax probability of the true class ("expected accuracy"). It moves
          with every image, not only with the few near the decision boundary, so two
          measurements of the same subnets on different images rank them far more
          alike than top-1 does; it is what the predictor learns.
    """

    top1: float
    soft: float


class Measurer:
    """Top-1 and soft accuracy of a subnet on fixed images; counts how often it ran.

    `copies` > 1 adds shifted copies of the images (see `shifted_copies`): a measurement
    then costs that many times more."""

    def __init__(
        self,
        net,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        batch_size: int = 512,
        copies: int = 1,
        max_shift: int = 0,
    ):
        self.net = net
        x = torch.as_tensor(x, dtype=torch.float32).contiguous()
        y = torch.as_tensor(y, dtype=torch.int64)
        self.n_images = len(y)
        self.x = shifted_copies(x, max_shift, copies)
        self.y = y.repeat(len(self.x) // max(len(y), 1)) if len(y) else y
        self.batch_size = batch_size
        self.calls = 0

    def __len__(self) -> int:
        return len(self.y)

    def __call__(self, spec) -> float:
        """Top-1 accuracy."""
        return self.scores(spec).top1

    def scores(self, spec) -> Scores:
        self.calls += 1
        was_training = self.net.training
        previous = self.net.active_spec()
        self.net.eval()
        self.net.set_active(spec)
        correct, prob = 0, 0.0
        try:
            # no_grad, not inference_mode: the elastic layers memoise quantized tensors
            # by version counter, which inference tensors do not have.
            with torch.no_grad():
                for i in range(0, len(self.y), self.batch_size):
                    logits = self.net(self.x[i : i + self.batch_size])
                    y = self.y[i : i + self.batch_size]
                    correct += int((logits.argmax(1) == y).sum())
                    prob += float(logits.softmax(1).gather(1, y[:, None]).sum())
        finally:
            self.net.set_active(previous)
            self.net.train(was_training)
        n = max(len(self.y), 1)
        return Scores(correct / n, prob / n)


def subsample(n_total: int, n: int, seed: int) -> np.ndarray:
    """Indices of at most n of n_total items, deterministic; all of them when n <= 0."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))
