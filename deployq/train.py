"""Supernet training: FP32 warm-up (or a pretrained state_dict), BN-folding conversion,
calibration, then the GPG sandwich with WDR and the optional gradient-l1 regulariser.

    cfg = TrainConfig(model="resnet20", data="digits", out="ckpt.pt")
    ckpt = train(cfg)

Runs as is under `torchrun --nproc_per_node N` (DistributedDataParallel; gloo on CPU,
nccl on GPU); rank 0 evaluates, prints and writes. A checkpoint is written atomically at
the end of the warm-up (epoch 0) and after every supernet epoch; `resume=True` continues
from it with the same epoch counter, optimizer and scheduler state. The warm-up itself is
short and is simply rerun if a kill lands inside it.

All randomness of a step (subnet choice, augmentation, shuffling) is derived from
(seed, epoch, step), so a resumed run and every DDP rank see the same subnets without
any stored RNG state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deployq.augment import max_shift, random_shift
from deployq.errors import UserError
from deployq.fileio import check_writable
from deployq.spec import ElasticSpace, Form, check_bits

REFERENCE_FORM = Form(weight_per_channel=True, weight_symmetric=True, act_symmetric=False)
# The default space: the four weight forms with asymmetric (uint) activations, plus
# TensorRT's int8 form (symmetric signed activations). That covers every shipped profile;
# more forms share the same weights and cost accuracy (ALL_FORMS has 12).
DEFAULT_FORMS = (
    Form(False, True, False),
    Form(False, False, False),
    Form(True, True, False),
    Form(True, False, False),
    Form(True, True, True, True),
)
PER_TENSOR_REFERENCE = Form(weight_per_channel=False, weight_symmetric=False, act_symmetric=False)
CLIP_VALUE = 1.0
STACKED_CHOICES = ("auto", "on", "off")
LOWEST_TEACHERS = ("highest", "random")
ALL_BITS = (2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (recorded in the checkpoint)."""

    model: str = "resnet20"
    data: str = "digits"
    out: str = "ckpt.pt"
    # Supernet epochs (after the warm-up). 10-20 leave 4-8 bits ~1 point under FP32. 120, not
    # 60: on digits 8x8 (ten seeds, paired) the 2-bit subnets gain 0.56 points from the second
    # 60 epochs while a dedicated 2-bit model gains no more than noise, which is what brings
    # them to within 0.5-0.6 of it (README, "Supernet accuracy"); 4-8 bits gain ~0.05. Not
    # 180: from the third 60 the dedicated 2-bit models gain more than the supernet's cells.
    epochs: int = 120
    batch_size: int = 64
    # Adam on the BN-folded weights. 1e-3 first knocks them out of their FP32 minimum, but
    # over 60 cosine epochs they settle lower than at 3e-4 (2e-3 diverged at 16x16 width 16).
    lr_weights: float = 1e-3
    lr_quant: float = 1e-2  # relative Adam step of the step sizes (fraction of their value)
    lr_zero_point: float = 1e-2  # Adam step of the zero-points, in integer levels
    # Epochs over which the supernet phase's learning rates ramp up linearly from zero
    # before the cosine decay (0 = none). MobileNetV2 on digits (16x16, held-out top-1 of
    # w8a8 after supernet epochs 1 / 2 / 3 of 3, FP32 97%): 34 / 62 / 73% at full lr from the
    # start, 70 / 88 / 94% with a one-epoch ramp. ResNet-20's README figures use no ramp.
    lr_ramp_epochs: float = 0.0
    # FP32 epochs when no pretrained state_dict is given. 20 left ResNet-20 on digits short of
    # its optimum (16x16: 98.61-99.44 over five seeds, 8x8: 97.22-98.61; 80: 99.17-99.44 and
    # 98.89-99.44 on the same seeds), and the supernet fine-tuned from an unconverged model
    # drifted 0.6-0.9 points below it at 4-8 bits on three seeds of five (README, "Supernet accuracy").
    warmup_epochs: int = 80
    warmup_lr: float = 0.05  # SGD (momentum 0.9, nesterov), cosine to 0
    input_size: int | None = None  # None: the data's default (digits: 16)
    width: int | None = None  # None: the model's default
    wbits: tuple[int, ...] = ALL_BITS
    abits: tuple[int, ...] = ALL_BITS
    forms: tuple[Form, ...] = DEFAULT_FORMS
    fixed_bits: int | None = 8  # first/last layer bits; None = elastic too
    wdr: bool = True
    gpg: bool = True
    grad_l1_w: float = 0.0
    grad_l1_a: float = 0.0
    grad_l1_last: int = 0  # apply grad-l1 only in the last N epochs (0 = all)
    pretrained: str | None = None
    seed: int = 0
    resume: bool = False
    holdout: float = 0.1  # fraction of the TRAIN split held out for per-epoch metrics
    calib_batches: int = 4
    calibration: str = "search"  # cell initialisation: "search" (clipping search) or "minmax"
    augment: bool = True  # random shifts of up to size/8 pixels
    # The FP32 model (pretrained or warmed up) heads the GPG chain as the highest subnet's
    # teacher. Off by default: on digits it helped one 16x16 seed and cost 0.3-0.8 points at
    # 5-8 bits on another and at 8x8 (README, "Supernet accuracy").
    distill: bool = False
    # Probability that the lowest subnet takes a per-tensor form (else a per-channel one).
    # Until this was fixed the per-channel branch drew among all four forms, so 0.5 meant
    # 0.75 (README, "Supernet accuracy").
    lowest_per_tensor: float = 0.5
    # The lowest subnet's bit-width is drawn from the space's N lowest (1: always the lowest,
    # EQ-Net's sandwich). With 1, 3-bit cells are trained only through the random subnet's
    # per-layer draws and the 8x8 benchmark's 3-bit cells sat 0.6-1.8 points under FP32
    # (five seeds); with 2 they sit within 0.2-0.5 of it, while 2-bit stays inside its
    # target but 1.0-1.3 points behind dedicated 2-bit QAT (README, "Supernet accuracy").
    lowest_bits_pool: int = 2
    # Probability that the sandwich's random subnet is instead the uniform subnet at the
    # bit-width just above the lowest subnet's pool, in a random form (with a pool of 1: 3
    # bits, which the lowest subnet then does not train).
    middle_uniform: float = 0.0
    # The lowest subnet's GPG teacher: "random" (the subnet before it, EQ-Net's chain) or
    # "highest" (the sandwich's first subnet). `lowest_bits_pool=1, middle_uniform=0.5,
    # lowest_teacher="highest"` narrowed the 8x8 2-bit gap to dedicated QAT by a third but
    # cost the search's ranking (Kendall tau 0.76-0.80 against 0.83-0.86) and one 16x16
    # target; it is an option, not the default (README, "Supernet accuracy").
    lowest_teacher: str = "random"
    # The lowest subnet runs in this many forms each step (at most as many as it may take),
    # each on an equal share of the batch (per-tensor and per-channel alternating), instead
    # of in one form on all of it: the same rows, but every step trains the low cells of N
    # forms. With one form a given 2-bit form was the lowest subnet on 1 step in 8 to 16.
    lowest_forms: int = 1
    # GPG's weight on the lowest subnet's term of the sandwich loss (1: EQ-Net's plain sum).
    # Part of GPG: the ablation without GPG sums plain cross-entropies with equal weights.
    # 2 over 1, paired by seed: the 8x8 w2a2 per-channel sym cell +0.29 ± 0.14 (thirty
    # seeds), the one target weight 1 missed; the 16x16 4..8-bit cells -0.10 ± 0.10 (ten
    # seeds). README, "Supernet accuracy".
    lowest_weight: float = 2.0
    final_eval: bool = True  # uniform-subnet table on the val split at the end
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    # Run the sandwich's subnets as one stacked batch (deployq.stacked): "auto" does where
    # it is faster (small activations, compiled kernel, CPU, no gradient-l1), "on" wherever
    # it can run, "off" never. Same steps up to float rounding.
    stacked: str = "auto"

    def __post_init__(self) -> None:
        for name in ("wbits", "abits"):
            bits = tuple(int(b) for b in getattr(self, name))
            if not bits:
                raise UserError(f"--{name} is empty")
            for b in bits:
                check_bits(b, name)
            object.__setattr__(self, name, tuple(sorted(set(bits))))
        if self.fixed_bits is not None:
            check_bits(self.fixed_bits, "fixed bits")
        object.__setattr__(self, "forms", tuple(self.forms))
        for name in ("epochs", "warmup_epochs", "grad_l1_last", "calib_batches"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1; got {self.batch_size}")
        for name in ("lr_weights", "lr_quant", "lr_zero_point", "warmup_lr", "grad_l1_w", "grad_l1_a",
                     "lr_ramp_epochs"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not 0.0 < self.holdout < 1.0:
            raise UserError(f"holdout fraction must be in (0, 1); got {self.holdout}")
        if self.stacked not in STACKED_CHOICES:
            raise UserError(f"stacked must be one of {', '.join(STACKED_CHOICES)}; got {self.stacked!r}")
        if self.calibration not in ("search", "minmax", "hybrid"):
            raise UserError(f"calibration must be search, minmax or hybrid; got {self.calibration!r}")
        if self.distill and not self.pretrained and self.warmup_epochs == 0:
            raise UserError("distillation needs an FP32 teacher: give --pretrained or --warmup-epochs > 0")
        if self.lowest_bits_pool < 1:
            raise UserError(f"lowest_bits_pool must be >= 1; got {self.lowest_bits_pool}")
        if not 0.0 <= self.lowest_per_tensor <= 1.0:
            raise UserError("lowest_per_tensor must be a probability")
        if not 0.0 <= self.middle_uniform <= 1.0:
            raise UserError(f"middle_uniform must be a probability in [0, 1]; got {self.middle_uniform}")
        if self.lowest_teacher not in LOWEST_TEACHERS:
            raise UserError(f"lowest_teacher must be one of {', '.join(LOWEST_TEACHERS)}; "
                            f"got {self.lowest_teacher!r}")
        if not self.lowest_weight > 0:
            raise UserError(f"lowest_weight must be > 0; got {self.lowest_weight}")
        if self.lowest_forms < 1:
            raise UserError(f"lowest_forms must be >= 1; got {self.lowest_forms}")
        for name in ("input_size", "width"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be a positive integer; got {v}")

    @property
    def space(self) -> ElasticSpace:
        return ElasticSpace(self.wbits, self.abits, self.forms, self.fixed_bits)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["wbits"], d["abits"] = list(self.wbits), list(self.abits)
        d["forms"] = [f.to_dict() for f in self.forms]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "forms" in kw:
            kw["forms"] = tuple(Form.from_dict(f) for f in kw["forms"])
        for k in ("wbits", "abits"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return _Dist(dist.get_rank(), dist.get_world_size(), device)


def _barrier(d: _Dist) -> None:
    if d.active:
        torch.distributed.barrier()


def _broadcast_state(module: nn.Module, d: _Dist) -> None:
    """Make every rank hold rank 0's parameters and buffers (BN statistics, calibration)."""
    if not d.active:
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            torch.distributed.broadcast(t, 0)


def _ddp(net: nn.Module) -> nn.Module:
    """DDP over the supernet. find_unused_parameters: a step uses only the cells of its
    subnets, the rest keep grad None. No buffer sync: the only buffers are calibration
    flags, identical on every rank."""
    import inspect

    kw = {"find_unused_parameters": True}
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    kw["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    return nn.parallel.DistributedDataParallel(net, **kw)


def _allreduce_grads(params: list[nn.Parameter], d: _Dist) -> None:
    """Average gradients over ranks (used where DDP's hooks cannot run: double backward).
    Every rank trains the same subnets, so the set of None gradients is the same."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not d.active:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= d.world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


# --------------------------------------------------------------------------- data


@dataclass
class _Data:
    fit: Any  # deployq.data.Dataset
    held: Any
    preprocessing: Any
    class_names: tuple[str, ...]


def _load_data(cfg: TrainConfig) -> _Data:
    from deployq.data import holdout, infer_preprocessing, load_data

    pre = infer_preprocessing(cfg.data)
    if cfg.input_size is not None and cfg.input_size != pre.size:
        pre = replace(pre, size=cfg.input_size)
    ds = load_data(cfg.data, pre, split="train")
    if len(ds) < 2:
        raise UserError(f"data source {cfg.data!r} has too few training samples ({len(ds)})")
    fit, held = holdout(ds, cfg.holdout, seed=cfg.seed)
    return _Data(fit, held, pre, tuple(ds.class_names))


def _epoch_batches(
    n: int, batch_size: int, epoch: int, seed: int, d: _Dist
) -> list[np.ndarray]:
    """This rank's batches of an epoch: a DistributedSampler shard, in full batches
    (the last partial batch is dropped unless it is the only one)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = np.fromiter(iter(sampler), dtype=np.int64)
    bs = min(batch_size, len(idx))
    full = len(idx) // bs
    return [idx[i * bs : (i + 1) * bs] for i in range(full)]


# --------------------------------------------------------------------------- model


def _check_model(name: str) -> None:
    from deployq.models import MODELS

    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _model_args(cfg: TrainConfig, data: _Data) -> dict[str, Any]:
    _check_model(cfg.model)
    return {
        "num_classes": len(data.class_names),
        "in_channels": data.preprocessing.channels,
        "input_size": data.preprocessing.size,
        "width": cfg.width,
    }


def load_pretrained(model: nn.Module, path: str, name: str) -> None:
    """Load a plain float state_dict (as torch.save(model.state_dict())) strictly."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"pretrained file {path!r} does not exist")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises anything on garbage
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"pretrained file {path!r} is not a loadable state_dict ({first[:160]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"pretrained file {path!r} is not a plain state_dict of tensors")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"pretrained state_dict {path!r} does not fit model {name!r} ({first[:200]})") from None


# --------------------------------------------------------------------------- optimizer


class ElasticAdam(torch.optim.Optimizer):
    """Adam whose update is, in groups with relative=True, multiplied by each element's
    magnitude when first trained (its calibrated value).

    Adam makes the absolute step ~lr whatever the gradient's size, so one learning rate
    cannot suit step sizes that span 1e-3 (8-bit) to 1 (2-bit): one that moves the 2-bit
    cells knocks the 8-bit ones off their grid. Relative steps treat every cell alike,
    without storing logarithms (which made 2-bit per-tensor far worse in the prototype).

    clip_value: each gradient element is first clamped to [-clip_value, clip_value], as
    torch.nn.utils.clip_grad_value_ would (on the flat gradient: one op, not one per
    parameter; the parameters' .grad are left as they are)."""

    def __init__(self, groups, betas=(0.9, 0.999), eps=1e-8, clip_value: float | None = None):
        super().__init__(groups, {"lr": 1e-3, "betas": betas, "eps": eps, "relative": False})
        self.clip_value = clip_value
        self._flat: list[_FlatState | None] = [None] * len(self.param_groups)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._flat = [None] * len(self.param_groups)  # rebuilt from the loaded state

    def _flat_state(self, i: int, group) -> _FlatState:
        fs = self._flat[i]
        if fs is None:
            fs = self._flat[i] = _FlatState(group["params"], self.state, group["relative"])
        return fs

    @torch.no_grad()
    def step(self, closure=None):
        # The moments of a group live in flat buffers (each parameter's state holds views
        # of them, so state_dict() is per parameter as usual): a sandwich step updates
        # ~220 small tensors, and per-tensor ops (foreach included: on CPU it loops) cost
        # far more than the math. The arithmetic is Adam's, element by element.
        for i, group in enumerate(self.param_groups):
            b1, b2 = group["betas"]
            lr, eps, rel = group["lr"], group["eps"], group["relative"]
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            fs = self._flat_state(i, group)
            steps = []
            for p in ps:
                st = self.state[p]
                if not st:
                    fs.start(p, st)
                st["step"] += 1
                steps.append(st["step"])
            sizes = [p.numel() for p in ps]
            g = torch.cat([p.grad.reshape(-1) for p in ps])
            if self.clip_value is not None:
                g.clamp_(-self.clip_value, self.clip_value)
            if len(ps) == len(group["params"]):
                # every parameter has a gradient (the weights, every step): in place
                idx = None
                m = fs.exp_avg.lerp_(g, 1 - b1)
                v = fs.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            else:
                idx = torch.cat([fs.index[id(p)] for p in ps])
                m = fs.exp_avg[idx].lerp_(g, 1 - b1)
                v = fs.exp_avg_sq[idx].mul_(b2).addcmul_(g, g, value=1 - b2)
                fs.exp_avg[idx] = m
                fs.exp_avg_sq[idx] = v
            if len(set(steps)) == 1:
                # one step count (the weights, every step): the bias corrections are
                # scalars, as in Adam, not two group-sized tensors to build and divide by
                bc1, bc2 = 1 - b1 ** steps[0], 1 - b2 ** steps[0]
            else:
                counts = torch.tensor(sizes, device=g.device)
                like = {"dtype": g.dtype, "device": g.device}
                bc1 = torch.repeat_interleave(torch.tensor([1 - b1**k for k in steps], **like), counts)
                bc2 = torch.repeat_interleave(torch.tensor([1 - b2**k for k in steps], **like), counts)
            upd = (m / bc1).div_((v / bc2).sqrt_().add_(eps))
            if rel:
                upd.mul_(fs.ref if idx is None else fs.ref[idx])
            torch._foreach_add_(ps, [u.view_as(p) for u, p in zip(upd.split(sizes), ps)], alpha=-lr)


class _FlatState:
    """One parameter group's Adam moments (and relative references) as flat buffers,
    each parameter's state holding views of its slice. Built from whatever state the
    parameters already have (a resumed optimizer). The group's parameters share one
    dtype and device (the buffers take them from the first)."""

    def __init__(self, params, state, relative: bool):
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        like = {"dtype": params[0].dtype, "device": params[0].device} if params else {}
        if any(p.dtype != like["dtype"] or p.device != like["device"] for p in params):
            raise ValueError("ElasticAdam: a parameter group mixes dtypes or devices")
        self.relative = relative
        self.exp_avg = torch.zeros(total, **like)
        self.exp_avg_sq = torch.zeros(total, **like)
        self.ref = torch.ones(total, **like) if relative else None
        self.index: dict[int, torch.Tensor] = {}
        self.views: dict[int, tuple] = {}
        off = 0
        for p, n in zip(params, sizes):
            self.index[id(p)] = torch.arange(off, off + n, device=p.device)
            views = [self.exp_avg[off : off + n].view_as(p), self.exp_avg_sq[off : off + n].view_as(p)]
            if relative:
                views.append(self.ref[off : off + n].view_as(p))
            self.views[id(p)] = tuple(views)
            st = state.get(p)
            if st:  # loaded: copy in, then point the state at the buffers
                self._bind(p, st, copy=True)
            off += n

    def _bind(self, p, st, copy: bool) -> None:
        names = ("exp_avg", "exp_avg_sq", "ref") if self.relative else ("exp_avg", "exp_avg_sq")
        for name, view in zip(names, self.views[id(p)]):
            if copy:
                view.copy_(st[name])
            st[name] = view

    def start(self, p, st) -> None:
        """State for a parameter trained for the first time."""
        st["step"] = 0
        views = self.views[id(p)]
        views[0].zero_()
        views[1].zero_()
        if self.relative:
            views[2].copy_(p.detach().abs().clamp(min=1e-8))
        self._bind(p, st, copy=False)


def make_optimizer(net, cfg: TrainConfig) -> ElasticAdam:
    """Three groups: the BN-folded weights (small absolute lr: they start at their FP32
    minimum), step sizes (relative lr), zero-points (absolute, in integer levels)."""
    weights = net.weight_parameters()
    ids = {id(p) for p in weights}
    scales, zps = [], []
    for name, p in net.named_parameters():
        if id(p) in ids:
            continue
        (zps if ".zero_point." in f".{name}." else scales).append(p)
    return ElasticAdam(
        [
            {"params": weights, "lr": cfg.lr_weights},
            {"params": scales, "lr": cfg.lr_quant, "relative": True},
            {"params": zps, "lr": cfg.lr_zero_point},
        ],
        clip_value=CLIP_VALUE,
    )


def supernet_schedule(opt, total_steps: int, ramp_steps: int = 0):
    """Cosine decay to zero over total_steps; with ramp_steps > 0, multiplied by a linear
    ramp from 1/ramp_steps up to 1 over the first ramp_steps steps."""
    total = max(total_steps, 1)
    if ramp_steps <= 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)

    def factor(step: int) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        return min(1.0, (step + 1) / ramp_steps) * cosine

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------- sandwich


def low_bit_forms(forms) -> list[Form]:
    """The forms the sandwich's lowest subnet may take. Symmetric activation grids are the
    int8 forms of TensorRT-style targets, and a 2-bit symmetric grid on post-ReLU
    activations wastes half its levels: those low-bit cells train through the random
    subnet only."""
    return [f for f in forms if not f.act_symmetric] or list(forms)


def choose_subnets(net, rng: random.Random, cfg: TrainConfig) -> list:
    """[highest, random, lowest] of one step (identical on every rank): SubnetSpecs, the
    lowest a tuple of SubnetSpecs (one per share of the batch) when cfg.lowest_forms > 1."""
    space = net.space
    form_h = rng.choice(space.forms)
    low_forms = low_bit_forms(space.forms)
    per_tensor = [f for f in low_forms if not f.weight_per_channel]
    per_channel = [f for f in low_forms if f.weight_per_channel]
    if per_tensor and per_channel:
        form_l = rng.choice(per_tensor if rng.random() < cfg.lowest_per_tensor else per_channel)
    else:
        form_l = rng.choice(low_forms)
    middle = net.sample(rng)
    wbits, abits = sorted(space.wbits), sorted(space.abits)

    def uniform(form, i: int):
        return net.uniform_spec(form, wbits[min(i, len(wbits) - 1)], abits[min(i, len(abits) - 1)])

    # no draw for a pool of 1: EQ-Net's sandwich draws as it always did
    low_i = rng.randrange(cfg.lowest_bits_pool) if cfg.lowest_bits_pool > 1 else 0
    if cfg.middle_uniform > 0 and rng.random() < cfg.middle_uniform:
        middle = uniform(rng.choice(space.forms), cfg.lowest_bits_pool)
    n = min(cfg.lowest_forms, len(low_forms))
    if n > 1:
        lowest = tuple(uniform(f, low_i) for f in _more_forms(form_l, low_forms, n, rng))
    else:
        lowest = uniform(form_l, low_i)
    return [net.highest(form_h), middle, lowest]


def _more_forms(first: Form, forms: list[Form], n: int, rng: random.Random) -> list[Form]:
    """n distinct forms starting with `first`, each next one drawn among those of the
    granularity (per-tensor / per-channel) chosen least so far."""
    chosen = [first]
    while len(chosen) < n:
        left = [f for f in forms if f not in chosen]
        count = {g: sum(f.weight_per_channel == g for f in chosen) for g in (False, True)}
        least = min(count[f.weight_per_channel] for f in left)
        chosen.append(rng.choice([f for f in left if count[f.weight_per_channel] == least]))
    return chosen


def _teacher_of(i: int, last: int, head, logits: list, cfg: TrainConfig):
    """Subnet i's GPG teacher: for the first, `head` (the FP32 teacher's logits or None);
    else among the logits of the subnets before it (detached) the one just before, or for
    the lowest (last) subnet the highest when cfg.lowest_teacher says so."""
    if i == 0:
        return head
    if i == last and cfg.lowest_teacher == "highest":
        return logits[0]
    return logits[i - 1]


def single_subnet(space: ElasticSpace) -> bool:
    """A space with one subnet only (dedicated QAT): the sandwich degenerates to one pass."""
    return len(space.wbits) == 1 and len(space.abits) == 1 and len(space.forms) == 1


def wdr_weights(net) -> list[torch.Tensor]:
    from deployq.elastic import ElasticWeightless

    ws = [m.weight for _, m in net.layers() if not isinstance(m, ElasticWeightless)]
    return ws[1:]  # the first layer is excluded (EQ-Net)


@contextlib.contextmanager
def _capture_activations(net, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """Collect the tensors every activation quantizer sees during a forward (the inputs
    of the elastic layers; both inputs of a residual add), for grad-l1 on activations."""
    acts: list[torch.Tensor] = []
    if not enabled:
        yield acts
        return
    hooks = [m.register_forward_pre_hook(lambda _m, args: acts.extend(args)) for _, m in net.layers()]
    # grad-l1 wants each captured tensor's own gradient: no ReLU backward handed to the
    # quantizers reading it (deployq/relu_absorb.py), which would mask it
    net.__dict__["_capturing"] = True
    try:
        yield acts
    finally:
        net.__dict__["_capturing"] = False
        for h in hooks:
            h.remove()


def sandwich_step(
    net,
    forward,
    x: torch.Tensor,
    y: torch.Tensor,
    specs: list,
    cfg: TrainConfig,
    grad_l1_on: bool = False,
    no_sync=None,
    teacher: nn.Module | None = None,
) -> float:
    """Accumulate the gradients of one GPG step (no optimizer step). `forward` is the
    DDP module (or the net); `no_sync` its no_sync context for all passes but the last;
    `teacher` a frozen float model whose logits the first subnet learns from (GPG).
    Returns the summed loss."""
    head_teacher = None
    if teacher is not None and cfg.gpg:
        with torch.no_grad():
            head_teacher = teacher(x)
    last = len(specs) - 1
    # The first (highest) subnet alone carries WDR and the gradient-l1 term.
    logits, total = _first_pass(net, forward, x, y, specs[0], head_teacher, cfg, grad_l1_on,
                                no_sync if last > 0 else None)
    seen = [logits]
    for i, spec in enumerate(specs[1:], start=1):
        logits, loss = _subnet_passes(net, forward, x, y, spec if isinstance(spec, tuple) else (spec,),
                                      _teacher_of(i, last, head_teacher, seen, cfg), cfg, no_sync, i, last)
        total += loss
        seen.append(logits)
    return total


def _first_pass(net, forward, x, y, spec, teacher_logits, cfg: TrainConfig, grad_l1_on: bool, no_sync):
    """The sandwich's first subnet on the whole batch, forward and backward (inside no_sync
    when given). Returns (its logits, detached; its loss)."""
    net.set_active(spec)
    with no_sync() if no_sync is not None else contextlib.nullcontext():
        with _capture_activations(net, grad_l1_on and cfg.grad_l1_a > 0) as acts:
            logits = forward(x)
        loss = _subnet_loss(logits, y, teacher_logits, cfg)
        if grad_l1_on:
            from deployq.losses import grad_l1

            ws = [m.weight for m in _weighted(net)]
            loss = loss + grad_l1(loss, ws, cfg.grad_l1_w) + grad_l1(loss, acts, cfg.grad_l1_a)
        loss = _with_wdr(loss, net, cfg)
        loss.backward()
    return logits.detach(), float(loss.detach())


def _subnet_passes(net, forward, x, y, specs: tuple, teacher_logits, cfg: TrainConfig, no_sync,
                   i: int, last: int):
    """The sandwich's subnet i of 0..last: subnets `specs` on consecutive shares of the
    batch (one subnet: all of it), one forward and backward each, each share's term
    weighted by its share of the rows (_term_loss), so that they sum to the term of the
    whole batch. Returns (the batch's logits, detached; the summed loss). no_sync: DDP's
    (or None), entered for every share but the last, and for the last too unless i is
    the last subnet."""
    k = len(specs)
    teachers = [None] * k if teacher_logits is None else teacher_logits.tensor_split(k)
    outs, total = [], 0.0
    for j, (xj, yj, tj, spec) in enumerate(zip(x.tensor_split(k), y.tensor_split(k), teachers, specs)):
        net.set_active(spec)
        sync_here = no_sync is None or (i == last and j == k - 1)
        with contextlib.nullcontext() if sync_here else no_sync():
            out = forward(xj)
            loss = _term_loss(i, last, out, yj, tj, cfg, xj.shape[0] / x.shape[0])
            loss.backward()
        outs.append(out.detach())
        total += float(loss.detach())
    return torch.cat(outs), total


def _term_loss(i: int, last: int, logits, y, teacher_logits, cfg: TrainConfig, share: float = 1.0):
    """Subnet i's term of the sandwich loss (i > 0; the first carries WDR instead), on rows
    that are `share` of the batch: its GPG loss (_subnet_loss) times share and, for the
    lowest (last) subnet under GPG, cfg.lowest_weight. Both sandwich paths build their
    terms here, so that they stay the same loss."""
    loss = _subnet_loss(logits, y, teacher_logits, cfg)
    w = (cfg.lowest_weight if cfg.gpg and i == last else 1.0) * share
    return loss if w == 1.0 else loss * w  # no multiply node at weight 1: same bits as without


def _subnet_loss(logits, y, teacher_logits, cfg: TrainConfig) -> torch.Tensor:
    """A sandwich subnet's loss: GPG (KL to the subnet above + CE) when it has a teacher."""
    if cfg.gpg and teacher_logits is not None:
        from deployq.losses import gpg_loss

        return gpg_loss(logits, y, teacher_logits)
    return F.cross_entropy(logits, y)


def _with_wdr(loss: torch.Tensor, net, cfg: TrainConfig) -> torch.Tensor:
    """The first subnet's loss plus WDR on the weights (when on)."""
    if cfg.wdr:
        from deployq.losses import wdr_loss

        ws = wdr_weights(net)
        if ws:
            return loss + wdr_loss(ws)
    return loss


def stacked_sandwich_step(
    net, forward, x: torch.Tensor, y: torch.Tensor, specs: list, cfg: TrainConfig,
    teacher: nn.Module | None = None,
) -> float:
    """sandwich_step's gradients and loss with the k subnets run as ONE batch of k
    stacked copies (deployq.stacked): one forward, one backward. Subnet j's teacher is
    the one the sequential sandwich gives it (_teacher_of), detached. No gradient-l1 (that
    needs a double backward): the caller runs the sequential sandwich then.

    A subnet given as a tuple (choose_subnets' split lowest) takes equal shares of the
    batch: every subnet's copy is then stacked as that many slices of a share each. A
    batch that does not split evenly runs the sequential sandwich."""
    k = len(specs)
    shares = max(len(s) if isinstance(s, tuple) else 1 for s in specs)
    if x.shape[0] % shares:
        return sandwich_step(net, forward, x, y, specs, cfg, teacher=teacher)
    slices = [s[j * len(s) // shares] if isinstance(s, tuple) else s for s in specs for j in range(shares)]
    spans = [shares // len(s) if isinstance(s, tuple) else shares for s in specs for _ in range(shares)]
    head_teacher = None
    if teacher is not None and cfg.gpg:
        with torch.no_grad():
            head_teacher = teacher(x)
    net.set_active_stack(slices, tuple(spans))
    try:
        logits = forward(x.repeat(k, *([1] * (x.dim() - 1)))).chunk(k)
    finally:
        net.set_active(None)
    losses = []
    seen = [out.detach() for out in logits]
    for i, out in enumerate(logits):
        teacher_i = _teacher_of(i, k - 1, head_teacher, seen, cfg)
        losses.append(_with_wdr(_subnet_loss(out, y, teacher_i, cfg), net, cfg) if i == 0
                      else _term_loss(i, k - 1, out, y, teacher_i, cfg))
    torch.stack(losses).sum().backward()
    return float(sum(float(v.detach()) for v in losses))


def use_stacked(net, cfg: TrainConfig, x: torch.Tensor, single: bool = False, say=None) -> bool:
    """Whether train() runs the sandwich stacked (TrainConfig.stacked), for a batch like
    x; `say` (if given) hears that it does, or why not when "on" was asked for."""
    from deployq import kernels
    from deployq.stacked import AUTO_MAX_FLOATS, max_conv_floats

    say = say or (lambda _msg: None)
    if cfg.stacked == "off" or single:
        return False
    why = None
    if x.device.type != "cpu":
        why = "its kernel runs on CPU only"
    elif kernels.get() is None:
        why = "the compiled fake-quant kernel is unavailable (no C compiler, or DEPLOYQ_KERNELS=0)"
    if why is not None:
        if cfg.stacked == "on":
            say(f"stacked sandwich not used: {why}")
        return False
    if cfg.stacked == "auto" and max_conv_floats(net, x) > AUTO_MAX_FLOATS:
        return False
    say("sandwich: the three subnets run as one stacked batch (--stacked off: one after the other)")
    return True


def _weighted(net) -> list[nn.Module]:
    from deployq.elastic import ElasticWeightless

    return [m for _, m in net.layers() if not isinstance(m, ElasticWeightless)]


# --------------------------------------------------------------------------- stages


class _Printer:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)


@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int):
    """A rich progress bar (loss, img/s); a no-op callable when disabled."""
    if enabled:
        from rich.console import Console

        enabled = Console(stderr=True).is_terminal  # no bar (nor blank lines) in logs
    if not enabled:
        yield lambda **kw: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  {task.fields[ips]:.0f} img/s"),
        TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(description, total=total, loss=float("nan"), ips=0.0)

        def update(loss: float, ips: float) -> None:
            bar.update(task, advance=1, loss=loss, ips=ips)

        yield update


def _step_rng(cfg: TrainConfig, epoch: int, step: int) -> random.Random:
    return random.Random(f"deployq-{cfg.seed}-{epoch}-{step}")


def _to_batch(ds, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ds.x[idx]).to(device), torch.from_numpy(ds.y[idx]).to(device)


def warmup_fp32(model: nn.Module, data: _Data, cfg: TrainConfig, d: _Dist, say, progress: bool) -> float:
    """Plain FP32 training with batch-norm alive; returns the held-out top-1."""
    from deployq.evaluate import evaluate

    model.to(d.device).train()
    wrapped = model
    if d.active:
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.warmup_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = cfg.warmup_epochs * len(_epoch_batches(len(data.fit), cfg.batch_size, 0, cfg.seed, d))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    shift = max_shift(data.preprocessing.size, cfg.augment)
    acc = float("nan")
    for epoch in range(cfg.warmup_epochs):
        batches = _epoch_batches(len(data.fit), cfg.batch_size, epoch, cfg.seed + 7919, d)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + d.rank + 5)
        t0, seen, total = time.perf_counter(), 0, 0.0
        with _progress(progress and d.main, f"fp32 {epoch + 1}/{cfg.warmup_epochs}", len(batches)) as tick:
            for idx in batches:
                x, y = _to_batch(data.fit, idx, d.device)
                x = random_shift(x, shift, gen)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(wrapped(x), y)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(idx) * d.world
                total += float(loss.detach())
                tick(loss=float(loss.detach()), ips=seen / (time.perf_counter() - t0))
        if d.main and (epoch + 1 == cfg.warmup_epochs or (epoch + 1) % 5 == 0):
            acc = evaluate(model, data.held, None)
            say(
                f"fp32 epoch {epoch + 1}/{cfg.warmup_epochs}  loss {total / max(len(batches), 1):.4f}  "
                f"{seen / (time.perf_counter() - t0):.0f} img/s  held-out top-1 {100 * acc:.2f}%"
            )
    _broadcast_state(model, d)
    model.eval()
    return acc


def _calibration_batches(data: _Data, cfg: TrainConfig, device) -> list[torch.Tensor]:
    rng = np.random.default_rng(cfg.seed)
    n = len(data.fit)
    idx = rng.permutation(n)[: min(n, cfg.batch_size * max(cfg.calib_batches, 1))]
    bs = min(cfg.batch_size, len(idx))
    return [torch.from_numpy(data.fit.x[idx[i : i + bs]]).to(device) for i in range(0, len(idx), bs)]


def _holdout_metrics(net, held) -> dict[str, float]:
    from deployq.evaluate import evaluate

    space = net.space
    ref = REFERENCE_FORM if REFERENCE_FORM in space.forms else space.forms[0]
    out = {
        "highest": evaluate(net, held, net.highest(ref)),
        "lowest": evaluate(net, held, net.lowest(ref)),
    }
    pt = PER_TENSOR_REFERENCE if PER_TENSOR_REFERENCE in space.forms else None
    if pt is not None:
        out["lowest_per_tensor"] = evaluate(net, held, net.lowest(pt))
    return out


def _final_metrics(net, cfg: TrainConfig, data: _Data) -> dict[str, Any]:
    """Cheap end-of-training table on the val split: FP32 and every uniform subnet for the
    weight forms with asymmetric activations (reporting only; nothing is selected on it)."""
    from deployq.data import load_data
    from deployq.evaluate import evaluate, uniform_table

    try:
        val = load_data(cfg.data, data.preprocessing, split="val")
    except UserError:
        return {}
    if tuple(val.class_names) != data.class_names:
        return {}
    forms = [f for f in net.space.forms if not f.act_symmetric] or list(net.space.forms)
    bits = sorted(set(net.space.wbits) & set(net.space.abits))
    return {
        "val_fp32_folded": evaluate(net, val, None),
        "val_uniform": {k: {str(b): v for b, v in row.items()} for k, row in uniform_table(net, val, forms, bits).items()},
    }


def _meta(cfg: TrainConfig, data: _Data, model_args, epoch: int, metrics: dict):
    from deployq.checkpoint import CheckpointMeta

    return CheckpointMeta(
        model=cfg.model,
        model_args=model_args,
        space=cfg.space,
        preprocessing=data.preprocessing.to_dict(),
        class_names=data.class_names,
        train_config=cfg.to_dict(),
        metrics=metrics,
        epoch=epoch,
        calibrated=True,
    )


def _resume_config(cfg: TrainConfig, say) -> tuple[TrainConfig, Any] | None:
    """The stored config and checkpoint to resume from, or None to start fresh."""
    from deployq.checkpoint import load_checkpoint

    if not cfg.resume or not Path(cfg.out).exists():
        if cfg.resume:
            say(f"nothing to resume at {cfg.out}: starting from scratch")
        return None
    ckpt = load_checkpoint(cfg.out)
    if ckpt.extra.get("stage") != "supernet":
        raise UserError(f"{cfg.out!r} was not written by `deployq train`: nothing to resume")
    stored = TrainConfig.from_dict(ckpt.meta.train_config)
    keep = {"out": cfg.out, "resume": True, "final_eval": cfg.final_eval, "threads": cfg.threads,
            "stacked": cfg.stacked}
    ignored = [
        f.name
        for f in fields(TrainConfig)
        if f.name not in keep and getattr(stored, f.name) != getattr(cfg, f.name)
        and getattr(cfg, f.name) != getattr(TrainConfig(), f.name)
    ]
    if ignored:
        say(f"resuming with the checkpoint's settings; ignoring {', '.join(ignored)}")
    return replace(stored, **keep), ckpt


def train(config: TrainConfig, progress: bool = True):
    """Train (or resume) a supernet; returns the final deployq.checkpoint.Checkpoint."""
    from deployq.checkpoint import Checkpoint, save_checkpoint
    from deployq.elastic import convert
    from deployq.models import build_model

    check_writable(config.out)  # before any work
    _check_model(config.model)
    d = _init_distributed()
    if config.threads:
        torch.set_num_threads(config.threads)
    from deployq.alloc import keep_freed_memory

    keep_freed_memory()  # ~15% off a step: activation buffers stop page-faulting
    say = _Printer(progress and d.main)
    resumed = _resume_config(config, say)
    cfg = resumed[0] if resumed else config
    torch.manual_seed(cfg.seed)
    data = _load_data(cfg)
    model_args = _model_args(cfg, data)
    space = cfg.space

    metrics: dict[str, Any] = {"epochs": []}
    start_epoch = 0
    extra: dict[str, Any] = {}
    teacher = None
    if resumed:
        ckpt = resumed[1]
        net = ckpt.net.to(d.device)
        metrics = dict(ckpt.meta.metrics) or metrics
        metrics.setdefault("epochs", [])
        start_epoch = int(ckpt.extra.get("epoch", 0))
        extra = ckpt.extra
        say(f"resuming {cfg.out} after epoch {start_epoch}/{cfg.epochs}")
        if cfg.distill and "teacher" in extra:
            teacher = build_model(cfg.model, **model_args)
            teacher.load_state_dict(extra["teacher"])
            teacher = frozen_teacher(teacher, d.device)
        elif cfg.distill and start_epoch < cfg.epochs:
            say("this checkpoint stores no FP32 teacher: resuming without distillation")
    else:
        model = build_model(cfg.model, **model_args)
        if cfg.pretrained:
            load_pretrained(model, cfg.pretrained, cfg.model)
            say(f"loaded pretrained FP32 weights from {cfg.pretrained}")
        elif cfg.warmup_epochs > 0:
            acc = warmup_fp32(model, data, cfg, d, say, progress)
            metrics["fp32_holdout_top1"] = acc
        model.eval()
        if cfg.distill:
            teacher = frozen_teacher(model, d.device)
        net = convert(model, space).to(d.device)
        net.calibrate(_calibration_batches(data, cfg, d.device), method=cfg.calibration)
        _broadcast_state(net, d)
        if d.main:
            metrics["folded_holdout_top1"] = _evaluate_float(net, data.held)
            save_checkpoint(cfg.out, net, _meta(cfg, data, model_args, 0, metrics),
                            _extra(teacher, stage="supernet", epoch=0))
        _barrier(d)

    opt = make_optimizer(net, cfg)
    steps_per_epoch = len(_epoch_batches(len(data.fit), cfg.batch_size, 0, cfg.seed, d))
    sched = supernet_schedule(opt, cfg.epochs * steps_per_epoch, round(cfg.lr_ramp_epochs * steps_per_epoch))
    if "optimizer" in extra:
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["scheduler"])

    forward = net
    no_sync = None
    if d.active:
        forward = _ddp(net)
        no_sync = forward.no_sync

    single = single_subnet(space)
    shift = max_shift(data.preprocessing.size, cfg.augment)
    all_params = [p for p in net.parameters()]
    stack = use_stacked(net, cfg, _to_batch(data.fit, np.arange(1), d.device)[0], single, say)
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        batches = _epoch_batches(len(data.fit), cfg.batch_size, epoch, cfg.seed, d)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 10 + d.rank)
        gl1 = (cfg.grad_l1_w > 0 or cfg.grad_l1_a > 0) and (
            cfg.grad_l1_last == 0 or epoch >= cfg.epochs - cfg.grad_l1_last
        )
        t0, seen, total = time.perf_counter(), 0, 0.0
        with _progress(progress and d.main, f"epoch {epoch + 1}/{cfg.epochs}", len(batches)) as tick:
            for step, idx in enumerate(batches):
                x, y = _to_batch(data.fit, idx, d.device)
                x = random_shift(x, shift, gen)
                rng = _step_rng(cfg, epoch, step)
                specs = [net.highest(space.forms[0])] if single else choose_subnets(net, rng, cfg)
                opt.zero_grad(set_to_none=True)
                if gl1 and d.active:
                    # DDP's reducer cannot follow a double backward: sync by hand.
                    with forward.no_sync():
                        loss = sandwich_step(net, forward, x, y, specs, cfg, gl1, teacher=teacher)
                    _allreduce_grads(all_params, d)
                elif stack and not gl1:
                    loss = stacked_sandwich_step(net, forward, x, y, specs, cfg, teacher)
                else:
                    loss = sandwich_step(net, forward, x, y, specs, cfg, gl1, no_sync, teacher)
                opt.step()  # clips the gradients at CLIP_VALUE first
                sched.step()
                seen += len(idx) * d.world
                total += loss
                tick(loss=loss, ips=seen / (time.perf_counter() - t0))
        elapsed = time.perf_counter() - t0
        net.set_active(None)
        if d.main:
            held = _holdout_metrics(net, data.held)
            row = {
                "epoch": epoch + 1,
                "loss": total / max(len(batches), 1),
                "img_per_s": seen / elapsed if elapsed > 0 else 0.0,
                "holdout_top1": held,
            }
            metrics["epochs"] = [*metrics["epochs"], row]
            say(_epoch_line(row, cfg.epochs, space))
            save_checkpoint(
                cfg.out,
                net,
                _meta(cfg, data, model_args, epoch + 1, metrics),
                # the teacher rides along while there are epochs left to resume
                _extra(teacher if epoch + 1 < cfg.epochs else None, stage="supernet", epoch=epoch + 1,
                       optimizer=opt.state_dict(), scheduler=sched.state_dict()),
            )
        _barrier(d)

    net.set_active(None)
    net.eval()
    if d.main and cfg.final_eval and "val_uniform" not in metrics:
        metrics.update(_final_metrics(net, cfg, data))
        save_checkpoint(
            cfg.out,
            net,
            _meta(cfg, data, model_args, cfg.epochs, metrics),
            _extra(None, stage="supernet", epoch=cfg.epochs, optimizer=opt.state_dict(),
                   scheduler=sched.state_dict()),
        )
        _print_final(say, metrics)
    _barrier(d)
    return Checkpoint(net=net, meta=_meta(cfg, data, model_args, cfg.epochs, metrics), path=Path(cfg.out))


def frozen_teacher(model: nn.Module, device) -> nn.Module:
    """A frozen copy of the float model in eval mode (BN on its running statistics: the
    function the BN-folded supernet starts from)."""
    import copy

    teacher = copy.deepcopy(model).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def _extra(teacher: nn.Module | None, **state) -> dict[str, Any]:
    """The checkpoint's training state; the teacher's weights (if given) ride along for --resume."""
    if teacher is not None:
        state["teacher"] = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    return state


def _evaluate_float(net, held) -> float:
    from deployq.evaluate import evaluate

    return evaluate(net, held, None)


def _epoch_line(row: dict, epochs: int, space: ElasticSpace) -> str:
    h = row["holdout_top1"]
    hi, lo = max(space.wbits), min(space.wbits)
    ahi, alo = max(space.abits), min(space.abits)
    parts = [
        f"epoch {row['epoch']}/{epochs}",
        f"loss {row['loss']:.4f}",
        f"{row['img_per_s']:.0f} img/s",
        f"held-out top-1 w{hi}a{ahi} {100 * h['highest']:.2f}%",
        f"w{lo}a{alo} {100 * h['lowest']:.2f}%",
    ]
    if "lowest_per_tensor" in h:
        parts.append(f"w{lo}a{alo} per-tensor {100 * h['lowest_per_tensor']:.2f}%")
    return "  ".join(parts)


def _print_final(say, metrics: dict) -> None:
    table = metrics.get("val_uniform")
    if not table:
        return
    bits = sorted({int(b) for row in table.values() for b in row})
    say(f"val top-1 (folded float {100 * metrics.get('val_fp32_folded', math.nan):.2f}%), uniform subnets, asym activations:")
    say("  form            " + "".join(f"{f'w{b}a{b}':>8}" for b in bits))
    for key, row in table.items():
        say(f"  {key:<16}" + "".join(f"{100 * row[str(b)]:>7.2f}%" for b in bits))


__all__ = ["TrainConfig", "choose_subnets", "load_pretrained", "random_shift", "sandwich_step", "train"]


def _json_default(o):  # pragma: no cover - debugging aid
    return str(o)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(TrainConfig().to_dict(), indent=2, default=_json_default))
