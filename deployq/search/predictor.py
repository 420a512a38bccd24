"""CQAP: a regressor from a subnet's condition vector to its accuracy.

Two kinds share one interface (`Predictor.fit / predict / state`):
  gbm  gradient-boosted depth-3 regression trees (sklearn fits them; the trees are
       kept as plain arrays and evaluated here). The default: on digits ResNet-20 it
       ranks held-out subnets better than the MLP (Kendall tau 0.74 vs 0.70 against
       the soft accuracy, mean of 5 splits of 320 train / ~190 unseen test subnets;
       the same subnets measured again on the val images agree with the held-out
       measurement at 0.73: the predictor is about as good as a second measurement).
  mlp  the paper's MLP (200-wide ReLU layers), Adam, early stopping.
Trees see each one-hot bit group (`groups`, from encoder.onehot_groups) as one
ordinal feature, the bit-width itself ("features": "ordinal"): one split then says
"this layer at <= 3 bits", where on one-hot columns it takes a split per value. On
four digits ResNet-20 sample sets (2 supernets x 2 forms, 400 subnets, 6 splits of
320/80) that raises held-out Kendall tau from 0.72-0.75 to 0.755-0.766 (mean); an
additive per-layer ridge prior, trees on its residuals, the ridge prediction as a
feature, other depths / learning rates and 5-seed ensembles did not beat it. (Measuring
on shifted copies too: see SearchConfig.copies.)
Two more features ("noise_features"): the sum over layers of 4**-bits, once for
weights and once for activations, i.e. the total quantization noise power (a step
size halves with every bit). Accuracy falls with the sum of many small per-layer
losses, which depth-3 trees can only build from many splits. On the same four sample
sets (calibrated soft accuracy, 10 splits of 400/100) tau rises by 0.006-0.017 (mean);
the mean bit-widths as features, or one noise sum over both kinds, help less.
Monotone constraints (sklearn's HistGradientBoosting, accuracy rising with every
layer's bits) lowered tau by 0.01-0.07 on the same sets (700 subnets, 8 splits): a
supernet's cells are not monotone in bits layer by layer.
Targets are accuracies in (0, 1); both kinds regress their logit (a subnet that
loses 1 point at 97% is worse off than one losing 1 point at 80%, and the logit
makes those steps comparable), standardised. Predictions come back as accuracies.
The quality that gets reported is Kendall tau and RMSE on configurations the
predictor never saw (`split_indices`). The state is plain tensors + numbers so it
loads with torch.load(weights_only=True).
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
    kind: str = "gbm"  # "gbm" (boosted trees) or "mlp" (the paper's MLP)
    features: str = "ordinal"  # gbm: "ordinal" (bit-width per one-hot group) or "onehot"
    noise_features: bool = True  # gbm, ordinal: + total weight / activation noise (4**-bits)
    logit_target: bool = True
    trees: int = 400  # gbm
    tree_depth: int = 3
    tree_lr: float = 0.05
    tree_subsample: float = 0.8
    hidden: int = 200  # mlp
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


_EPS = 1e-4  # accuracies are clipped to [eps, 1 - eps] before the logit


def _to_logit(y: np.ndarray) -> np.ndarray:
    y = np.clip(np.asarray(y, np.float64), _EPS, 1 - _EPS)
    return np.log(y / (1 - y))


def _from_logit(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


@dataclass
class Trees:
    """A boosted regression-tree ensemble as arrays: node i of tree t goes left when
    x[feature[t, i]] <= threshold[t, i]; leaves have left == -1 and hold value."""

    left: np.ndarray  # int64 [T, nodes]
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray  # float32 (sklearn compares float32 inputs)
    value: np.ndarray  # float64 [T, nodes], already scaled by the learning rate
    base: float

    @classmethod
    def from_sklearn(cls, gbm) -> Trees:
        trees = [e[0].tree_ for e in gbm.estimators_]
        n = max(t.node_count for t in trees)

        def pad(get, fill, dtype):
            out = np.full((len(trees), n), fill, dtype)
            for i, t in enumerate(trees):
                out[i, : t.node_count] = get(t)
            return out

        return cls(
            left=pad(lambda t: t.children_left, -1, np.int64),
            right=pad(lambda t: t.children_right, -1, np.int64),
            feature=pad(lambda t: np.maximum(t.feature, 0), 0, np.int64),
            threshold=pad(lambda t: t.threshold, 0.0, np.float32),
            value=pad(lambda t: t.value[:, 0, 0] * gbm.learning_rate, 0.0, np.float64),
            base=float(np.ravel(gbm.init_.constant_)[0]),
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        t_idx = np.arange(len(self.left))[:, None]
        node = np.zeros((len(self.left), len(x)), np.int64)
        rows = np.arange(len(x))[None, :]
        while True:
            left = self.left[t_idx, node]
            inner = left >= 0
            if not inner.any():
                break
            go_left = x[rows, self.feature[t_idx, node]] <= self.threshold[t_idx, node]
            nxt = np.where(go_left, left, self.right[t_idx, node])
            node = np.where(inner, nxt, node)
        return self.base + self.value[t_idx, node].sum(0)

    def state(self) -> dict:
        return {
            k: torch.as_tensor(getattr(self, k))
            for k in ("left", "right", "feature", "threshold", "value")
        } | {"base": self.base}

    @classmethod
    def from_state(cls, state: dict) -> Trees:
        arrays = {k: state[k].numpy() for k in ("left", "right", "feature", "threshold", "value")}
        return cls(**arrays, base=float(state["base"]))


# (start column, bit-width per column, "w" or "a" for weight or activation bits)
Groups = tuple[tuple[int, tuple[int, ...], str], ...]


def ordinal(x: np.ndarray, groups: Groups, noise: bool = False) -> np.ndarray:
    """One-hot groups replaced by the value they encode (appended after the columns
    outside any group, which are kept); with `noise`, then per kind ("w", "a", in that
    order, kinds present only) the sum of 4**-bits over its groups."""
    x = np.asarray(x, np.float32)
    inside = np.zeros(x.shape[1], bool)
    values = []
    power: dict[str, np.ndarray] = {}
    for start, vals, kind in groups:
        stop = start + len(vals)
        inside[start:stop] = True
        values.append(x[:, start:stop] @ np.asarray(vals, np.float32))
        if noise:
            p = x[:, start:stop].astype(np.float64) @ (4.0 ** -np.asarray(vals, np.float64))
            power[kind] = power.get(kind, 0.0) + p
    if noise:
        values += [power[k].astype(np.float32) for k in ("w", "a") if k in power]
    return np.column_stack([x[:, ~inside], *values]) if values else x


def _groups(groups) -> Groups:
    # (lists, as a saved state holds them, become the tuples `ordinal` reads)
    return tuple((int(s), tuple(int(v) for v in vals), str(kind)) for s, vals, kind in groups)


class Predictor:
    def __init__(self, in_dim: int, config: PredictorConfig | None = None, groups: Groups = ()):
        self.config = config or PredictorConfig()
        if self.config.kind not in ("gbm", "mlp"):
            raise ValueError(f"unknown predictor kind {self.config.kind!r}")
        if self.config.features not in ("ordinal", "onehot"):
            raise ValueError(f"unknown predictor features {self.config.features!r}")
        self.in_dim = in_dim
        self.groups: Groups = _groups(groups)
        self.net: nn.Module | None = None
        if self.config.kind == "mlp":
            torch.manual_seed(self.config.seed)
            self.net = mlp(in_dim, self.config.hidden, self.config.depth)
        self.trees: Trees | None = None
        self.y_mean = 0.0
        self.y_std = 1.0
        self.epochs_run = 0

    def _features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.config.kind == "gbm" and self.config.features == "ordinal" and self.groups:
            return ordinal(x, self.groups, self.config.noise_features)
        return x

    def _target(self, y: np.ndarray) -> np.ndarray:
        return _to_logit(y) if self.config.logit_target else np.asarray(y, np.float64)

    def _untarget(self, z: np.ndarray) -> np.ndarray:
        return _from_logit(z) if self.config.logit_target else np.asarray(z, np.float64)

    def fit(
        self, x: np.ndarray, y: np.ndarray, on_epoch: Callable[[int, int], None] | None = None
    ) -> Predictor:
        """Train on (encodings, accuracies). `on_epoch(step, total)` reports progress."""
        t = self._target(y)
        self.y_mean = float(t.mean())
        self.y_std = float(t.std()) if len(t) > 1 and float(t.std()) > 1e-8 else 1.0
        z = (t - self.y_mean) / self.y_std
        if self.config.kind == "gbm":
            self._fit_trees(self._features(x), z, on_epoch)
        else:
            self._fit_mlp(np.asarray(x, np.float32), z.astype(np.float32), on_epoch)
        return self

    def _fit_trees(self, x, z, on_epoch) -> None:
        from sklearn.ensemble import GradientBoostingRegressor

        cfg = self.config
        total = cfg.trees
        if on_epoch:
            on_epoch(0, total)
        gbm = GradientBoostingRegressor(
            n_estimators=cfg.trees,
            max_depth=cfg.tree_depth,
            learning_rate=cfg.tree_lr,
            subsample=cfg.tree_subsample if len(z) >= 10 else 1.0,
            random_state=cfg.seed,
        ).fit(x, z)
        self.trees = Trees.from_sklearn(gbm)
        self.epochs_run = cfg.trees
        if on_epoch:
            on_epoch(total, total)

    def _fit_mlp(self, x, z, on_epoch) -> None:
        cfg = self.config
        x = torch.as_tensor(x)
        z = torch.as_tensor(z)
        fit_idx, stop_idx = split_indices(len(z), cfg.early_stop_fraction, cfg.seed + 1)
        if len(stop_idx) < 2:  # too few samples to hold any out: train on all, no stopping
            fit_idx, stop_idx = np.arange(len(z)), np.arange(len(z))
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

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted accuracies of a batch of encodings [N, in_dim] -> [N]."""
        x = np.asarray(x, np.float32)
        if self.trees is not None:
            z = self.trees.predict(self._features(x))
        elif self.net is None:
            raise ValueError("predict() before fit()")
        else:
            with torch.inference_mode():
                z = self.net(torch.as_tensor(x)).squeeze(1).numpy().astype(np.float64)
        return self._untarget(z * self.y_std + self.y_mean)

    # --- persistence (weights_only-safe) --------------------------------------
    def state(self) -> dict:
        out = {
            "in_dim": self.in_dim,
            "config": self.config.to_dict(),
            "y_mean": self.y_mean,
            "y_std": self.y_std,
            "epochs_run": self.epochs_run,
            "groups": [[s, list(vals), kind] for s, vals, kind in self.groups],
        }
        if self.trees is not None:
            out["trees"] = self.trees.state()
        else:
            out["state_dict"] = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return out

    @classmethod
    def from_state(cls, state: dict) -> Predictor:
        p = cls(int(state["in_dim"]), PredictorConfig(**state["config"]), state.get("groups", ()))
        if "trees" in state:
            p.trees = Trees.from_state(state["trees"])
        else:
            p.net.load_state_dict(state["state_dict"])
            p.net.eval()
        p.y_mean, p.y_std = float(state["y_mean"]), float(state["y_std"])
        p.epochs_run = int(state.get("epochs_run", 0))
        return p


@dataclass(frozen=True)
class PredictorMetrics:
    """Quality on held-out configurations. kendall_tau / rmse compare the predictions
    with what the predictor learned (`target`: "soft" = mean true-class probability,
    or "top1"); kendall_tau_top1 ranks the same predictions against measured top-1."""

    kendall_tau: float
    rmse: float
    n_train: int
    n_test: int
    target: str = "top1"
    kendall_tau_top1: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def score_predictor(
    predictor: Predictor,
    x: np.ndarray,
    y: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    top1: np.ndarray | None = None,
    target: str = "top1",
) -> PredictorMetrics:
    p = predictor.predict(x[test_idx])
    t1 = y if top1 is None else top1
    return PredictorMetrics(
        kendall_tau(p, y[test_idx]),
        rmse(p, y[test_idx]),
        len(train_idx),
        len(test_idx),
        target,
        kendall_tau(p, t1[test_idx]),
    )


def fit_and_score(
    x: np.ndarray,
    y: np.ndarray,
    config: PredictorConfig | None = None,
    test_fraction: float = 0.2,
    on_epoch: Callable[[int, int], None] | None = None,
    groups: Groups = (),
) -> tuple[Predictor, PredictorMetrics]:
    """Fit on a split of the samples and score on the held-out configurations."""
    config = config or PredictorConfig()
    tr, te = split_indices(len(y), test_fraction, config.seed)
    pred = Predictor(x.shape[1], config, groups).fit(x[tr], y[tr], on_epoch)
    return pred, score_predictor(pred, x, y, tr, te)
