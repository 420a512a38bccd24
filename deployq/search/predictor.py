"""CQAP: an MLP that regresses a subnet's accuracy from its condition vector.

Targets are standardised (accuracies of a good supernet sit in a narrow band; raw
MSE on them gives tiny gradients), training is Adam on mini-batches with early
stopping on a slice of the training pairs, and the quality that gets reported is
Kendall tau and RMSE on configurations the predictor never saw (`split_indices`).
The state is plain tensors + numbers so it loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class PredictorConfig:
    hidden: int = 200
    depth: int = 3  # hidden layers
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 300
    batch_size: int = 32
    patience: int = 40  # epochs without improvement on the early-stopping slice
    early_stop_fraction: float = 0.15
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def mlp(in_dim: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def kendall_tau(pred: np.ndarray, true: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if len(pred) < 2:
        return float("nan")
    tau = kendalltau(pred, true).statistic
    return 0.0 if math.isnan(tau) else float(tau)  # all-tied targets give nan: no ranking skill


def rmse(pred: np.ndarray, true: np.ndarray) -> float:
    return (
        float(np.sqrt(np.mean((np.asarray(pred) - np.asarray(true)) ** 2)))
        if len(pred)
        else float("nan")
    )


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index split of n samples; test gets at least 2 when n >= 4."""
    perm = np.random.default_rng(seed).permutation(n)
    k = round(n * test_fraction)
    if n >= 4:
        k = min(max(k, 2), n - 2)
    return np.sort(perm[k:]), np.sort(perm[:k])


class Predictor:
    def __init__(self, in_dim: int, config: PredictorConfig | None = None):
        self.config = config or PredictorConfig()
        self.in_dim = in_dim
        torch.manual_seed(self.config.seed)
        self.net = mlp(in_dim, self.config.hidden, self.config.depth)
        self.y_mean = 0.0
        self.y_std = 1.0
        self.epochs_run = 0

    def fit(
        self, x: np.ndarray, y: np.ndarray, on_epoch: Callable[[int, int], None] | None = None
    ) -> Predictor:
        """Train on (encodings, accuracies). `on_epoch(epoch, total)` reports progress."""
        cfg = self.config
        x = torch.as_tensor(np.asarray(x, np.float32))
        y = torch.as_tensor(np.asarray(y, np.float32))
        self.y_mean = float(y.mean())
        self.y_std = float(y.std()) if len(y) > 1 and float(y.std()) > 1e-8 else 1.0
        z = (y - self.y_mean) / self.y_std
        fit_idx, stop_idx = split_indices(len(y), cfg.early_stop_fraction, cfg.seed + 1)
        if len(stop_idx) < 2:  # too few samples to hold any out: train on all, no stopping
            fit_idx, stop_idx = np.arange(len(y)), np.arange(len(y))
        xf, zf = x[fit_idx], z[fit_idx]
        xs, zs = x[stop_idx], z[stop_idx]
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
        best, best_state, stale = math.inf, None, 0
        for epoch in range(cfg.epochs):
            self.net.train()
            perm = torch.randperm(len(xf), generator=gen)
            for i in range(0, len(xf), cfg.batch_size):
                b = perm[i : i + cfg.batch_size]
                loss = nn.functional.mse_loss(self.net(xf[b]).squeeze(1), zf[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            self.net.eval()
            with torch.no_grad():
                val = float(nn.functional.mse_loss(self.net(xs).squeeze(1), zs))
            self.epochs_run = epoch + 1
            if on_epoch:
                on_epoch(epoch + 1, cfg.epochs)
            if val < best - 1e-6:
                best, stale = val, 0
                best_state = {k: v.clone() for k, v in self.net.state_dict().items()}
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.net.eval()
        if on_epoch:
            on_epoch(cfg.epochs, cfg.epochs)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted accuracies of a batch of encodings [N, in_dim] -> [N]."""
        with torch.inference_mode():
            out = self.net(torch.as_tensor(np.asarray(x, np.float32))).squeeze(1)
        return out.numpy() * self.y_std + self.y_mean

    # --- persistence (weights_only-safe) --------------------------------------
    def state(self) -> dict:
        return {
            "in_dim": self.in_dim,
            "config": self.config.to_dict(),
            "y_mean": self.y_mean,
            "y_std": self.y_std,
            "epochs_run": self.epochs_run,
            "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> Predictor:
        p = cls(int(state["in_dim"]), PredictorConfig(**state["config"]))
        p.net.load_state_dict(state["state_dict"])
        p.net.eval()
        p.y_mean, p.y_std = float(state["y_mean"]), float(state["y_std"])
        p.epochs_run = int(state.get("epochs_run", 0))
        return p


@dataclass(frozen=True)
class PredictorMetrics:
    kendall_tau: float
    rmse: float
    n_train: int
    n_test: int

    def to_dict(self) -> dict:
        return asdict(self)


def score_predictor(
    predictor: Predictor, x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray
) -> PredictorMetrics:
    p = predictor.predict(x[test_idx])
    return PredictorMetrics(
        kendall_tau(p, y[test_idx]), rmse(p, y[test_idx]), len(train_idx), len(test_idx)
    )


def fit_and_score(
    x: np.ndarray,
    y: np.ndarray,
    config: PredictorConfig | None = None,
    test_fraction: float = 0.2,
    on_epoch: Callable[[int, int], None] | None = None,
) -> tuple[Predictor, PredictorMetrics]:
    """Fit on a split of the samples and score on the held-out configurations."""
    config = config or PredictorConfig()
    tr, te = split_indices(len(y), test_fraction, config.seed)
    pred = Predictor(x.shape[1], config).fit(x[tr], y[tr], on_epoch)
    p = pred.predict(x[te])
    return pred, PredictorMetrics(kendall_tau(p, y[te]), rmse(p, y[te]), len(tr), len(te))
