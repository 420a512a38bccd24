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

Soft accuracy at a temperature: the mean of softmax(logits / T) at the true class.
A network trained with cross-entropy is over-confident (digits ResNet-20 supernets:
the held-out NLL of sampled subnets is lowest near T = 1.3), so at T = 1 most images
sit at probability ~1 and only the few near a decision boundary move the measure:
measured again on other images, the ranking of the same subnets agrees only at
Kendall tau 0.70-0.74. At the calibrating temperature (temperature scaling, Guo et
al. 2017) the soft accuracy is the accuracy a calibrated model expects, more images
carry signal, and the two measurements agree at 0.77-0.81 (600 subnets, 2 supernets).
A measurement asked for it (`scores(spec, grid=True)`, the sampled subnets) also
returns soft accuracy and NLL on a grid of temperatures (`TEMPERATURES`), from which
the search picks the calibrating one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deployq.augment import shifted_copies

# 0.5 .. 4 in steps of 2**(1/8) (~9 %); index 8 is exactly 1.
TEMPERATURES = tuple(2.0 ** (k / 8) for k in range(-8, 17))
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
    soft: mean softmax probability of the true class at the measurer's temperature
          ("expected accuracy"). It moves with every image, not only with the few near
          the decision boundary, so two measurements of the same subnets on different
          images rank them far more alike than top-1 does; it is what the predictor
          learns.
    soft_t, nll_t: soft accuracy and mean negative log-likelihood at every one of
          `TEMPERATURES` (for calibrating the temperature).
    per_image: the true-class probability (at the measurer's temperature) of every
          image, averaged over its shifted copies (for paired comparisons).
    """

    top1: float
    soft: float
    soft_t: np.ndarray | None = None
    nll_t: np.ndarray | None = None
    per_image: np.ndarray | None = None


class Measurer:
    """Top-1 and soft accuracy of a subnet on fixed images; counts how often it ran.

    `copies` > 1 adds shifted copies of the images (see `shifted_copies`): a measurement
    then costs that many times more. `temperature` is the one `Scores.soft` is at."""

    def __init__(
        self,
        net,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        batch_size: int = 512,
        copies: int = 1,
        max_shift: int = 0,
        temperature: float = 1.0,
    ):
        self.net = net
        self.temperature = temperature
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

    def scores(self, spec, grid: bool = False) -> Scores:
        """grid: also soft accuracy and NLL at every one of TEMPERATURES (soft_t, nll_t;
        None otherwise), for the samples the temperature is calibrated on."""
        self.calls += 1
        was_training = self.net.training
        previous = self.net.active_spec()
        self.net.eval()
        self.net.set_active(spec)
        correct = 0
        temps = (self.temperature, *TEMPERATURES) if grid else (self.temperature,)
        inv_t = 1.0 / torch.tensor(temps, dtype=torch.float64)
        prob_t = torch.zeros(len(TEMPERATURES), dtype=torch.float64)
        nll_t = torch.zeros(len(TEMPERATURES), dtype=torch.float64)
        p_true = []
        try:
            # no_grad, not inference_mode: the elastic layers memoise quantized tensors
            # by version counter, which inference tensors do not have.
            with torch.no_grad():
                for i in range(0, len(self.y), self.batch_size):
                    logits = self.net(self.x[i : i + self.batch_size])
                    y = self.y[i : i + self.batch_size]
                    correct += int((logits.argmax(1) == y).sum())
                    # [temperatures, batch] log-probability of the true class
                    z = logits.double()[None] * inv_t[:, None, None]
                    logp = z.log_softmax(2).gather(2, y[None, :, None].expand(len(inv_t), -1, 1))[..., 0]
                    p_true.append(logp[0].exp())
                    if grid:
                        prob_t += logp[1:].exp().sum(1)
                        nll_t -= logp[1:].sum(1)
        finally:
            self.net.set_active(previous)
            self.net.train(was_training)
        n = max(len(self.y), 1)
        p = torch.cat(p_true).numpy() if p_true else np.zeros(0)
        per_image = p.reshape(-1, self.n_images).mean(0) if len(p) else p
        return Scores(
            correct / n,
            float(p.sum()) / n,
            (prob_t / n).numpy() if grid else None,
            (nll_t / n).numpy() if grid else None,
            per_image,
        )


def paired_advantage(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of a - b over the same images: how much better subnet a
    scores than b, and how sure that is (the images' noise is shared, so the paired
    error is far smaller than either measurement's)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) < 2:
        return float(d.mean()) if len(d) else 0.0, float("inf")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def calibrating_temperature(nll_t: np.ndarray) -> int:
    """Index into TEMPERATURES of the temperature with the lowest NLL pooled over the
    measured subnets (nll_t: [subnets, temperatures])."""
    return int(np.argmin(np.asarray(nll_t, np.float64).mean(0)))


def split_final(idx: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(search images, final images): `share` of the held-out image indices `idx` kept
    apart for the final choice, the rest for the search; deterministic in seed. With
    share 0 (or fewer than 2 images) both are all of idx."""
    idx = np.asarray(idx)
    if share <= 0 or len(idx) < 2:
        return idx, idx
    n_final = min(max(round(len(idx) * share), 1), len(idx) - 1)
    perm = np.random.default_rng([seed, 1]).permutation(len(idx))
    return np.sort(idx[perm[n_final:]]), np.sort(idx[perm[:n_final]])


def subsample(n_total: int, n: int, seed: int) -> np.ndarray:
    """Indices of at most n of n_total items, deterministic; all of them when n <= 0."""
    if n <= 0 or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))
