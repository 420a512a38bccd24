import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from same_math import grads

from deployq import cli
from deployq.checkpoint import load_checkpoint, read_payload
from deployq.commands import train as train_cmd
from deployq.elastic import convert
from deployq.errors import UserError
from deployq.losses import gpg_loss
from deployq.models import build_model
from deployq.spec import Form
from deployq.train import (
    ElasticAdam,
    TrainConfig,
    choose_subnets,
    frozen_teacher,
    low_bit_forms,
    sandwich_step,
    stacked_sandwich_step,
    supernet_schedule,
    train,
)

TINY = ["--input-size", "8", "--width", "4", "--warmup-epochs", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    """400 of the real digits as an .npz (8x8 grey): an 80/20 split of its own."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(0).permutation(len(d.target))[:400]
    path = tmp_path_factory.mktemp("data") / "digits400.npz"
    np.savez(path, x=(d.images[idx] * 255 / 16).astype(np.uint8), y=d.target[idx].astype(np.int64))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One CLI training run on the built-in digits (8x8, width 4, 1 + 1 epochs)."""
    out = tmp_path_factory.mktemp("train") / "ckpt.pt"
    code = cli.main(["train", "--data", "digits", "--epochs", "1", "--out", str(out), *TINY,
                     "--width", "8", "--warmup-epochs", "3", "--warmup-lr", "0.2"])
    assert code == 0
    return out


def test_cli_train_writes_a_loadable_checkpoint_with_metrics(trained):
    payload = torch.load(trained, weights_only=True)
    assert payload["extra"]["epoch"] == 1
    assert "param_groups" in payload["extra"]["optimizer"]
    ckpt = load_checkpoint(trained)
    meta = ckpt.meta
    assert meta.model == "resnet20" and meta.model_args["width"] == 8
    assert meta.preprocessing["size"] == 8 and meta.class_names == tuple(str(i) for i in range(10))
    assert meta.train_config["epochs"] == 1 and meta.epoch == 1
    (row,) = meta.metrics["epochs"]
    assert set(row["holdout_top1"]) >= {"highest", "lowest", "lowest_per_tensor"}
    assert 0.0 <= row["holdout_top1"]["highest"] <= 1.0 and row["img_per_s"] > 0
    table = meta.metrics["val_uniform"]
    assert set(table) == {"pt-asym/a-asym", "pt-sym/a-asym", "pc-asym/a-asym", "pc-sym/a-asym"}
    assert set(table["pc-sym/a-asym"]) == {str(b) for b in range(2, 9)}
    # 3 FP32 epochs + 1 supernet epoch already learn the digits at 8 bits (chance: 10%)
    assert meta.metrics["fp32_holdout_top1"] > 0.5
    assert table["pc-sym/a-asym"]["8"] > 0.5


def test_cli_eval_prints_the_subnet_accuracy(trained, capsys, tmp_path):
    assert cli.main(["eval", str(trained), "--wbits", "4", "--abits", "4", "--granularity", "per-tensor", "--asymmetric"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "w4a4 per-tensor asym" in out and "/360)" in out
    ckpt = load_checkpoint(trained)
    expected = ckpt.meta.metrics["val_uniform"]["pt-asym/a-asym"]["4"]
    assert f"{100 * expected:.2f}%" in out
    assert cli.main(["eval", str(trained), "--fp32"]) == 0
    assert "float" in capsys.readouterr().out
    spec = ckpt.net.uniform_spec(ckpt.meta.space.forms[0], 3)
    cfg = tmp_path / "subnet.json"
    cfg.write_text(spec.to_json())
    assert cli.main(["eval", str(trained), "--config", str(cfg), "--split", "train"]) == 0
    assert "/1437)" in capsys.readouterr().out
    assert cli.main(["eval", str(trained), "--wbits", "8", "--act-symmetric", "--act-signed"]) == 0


def _interrupt_after_first_epoch(monkeypatch):
    import deployq.checkpoint as ck

    real = ck.save_checkpoint

    def save(path, net, meta, extra=None):
        real(path, net, meta, extra)
        if meta.epoch == 1:
            raise KeyboardInterrupt  # a kill right after the epoch-1 checkpoint

    monkeypatch.setattr(ck, "save_checkpoint", save)


def test_resume_continues_the_epoch_count_and_matches_an_uninterrupted_run(tiny_npz, tmp_path, monkeypatch):
    base = TrainConfig(
        data=str(tiny_npz), input_size=8, width=4, epochs=2, warmup_epochs=1,
        wbits=(2, 4, 8), abits=(2, 4, 8), final_eval=False, seed=3, distill=True,
    )
    full = tmp_path / "full.pt"
    ref = train(replace_cfg(base, out=str(full)), progress=False)
    part = tmp_path / "part.pt"
    with monkeypatch.context() as m:
        _interrupt_after_first_epoch(m)
        with pytest.raises(KeyboardInterrupt):
            train(replace_cfg(base, out=str(part)), progress=False)
    assert read_payload(part)["extra"]["epoch"] == 1
    assert "teacher" in read_payload(part)["extra"]  # resuming must distill from the same model
    resumed = train(replace_cfg(base, out=str(part), resume=True), progress=False)
    ckpt = load_checkpoint(part)
    assert ckpt.meta.epoch == 2 and [r["epoch"] for r in ckpt.meta.metrics["epochs"]] == [1, 2]
    assert "teacher" not in read_payload(part)["extra"]  # a finished run does not carry the FP32 model
    assert "teacher" not in read_payload(full)["extra"]
    a, b = ref.net.state_dict(), resumed.net.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # resuming a finished run trains nothing more
    again = train(replace_cfg(base, out=str(part), resume=True), progress=False)
    assert again.meta.epoch == 2


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


def test_pretrained_state_dict_skips_warmup(tiny_npz, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, input_size=8, width=4)
    sd = tmp_path / "fp32.pt"
    torch.save(model.state_dict(), sd)
    out = tmp_path / "c.pt"
    cfg = TrainConfig(data=str(tiny_npz), input_size=8, width=4, epochs=1, pretrained=str(sd), out=str(out),
                      wbits=(4, 8), abits=(4, 8), final_eval=False)
    ckpt = train(cfg, progress=True)
    text = capsys.readouterr().out
    assert "pretrained" in text and "fp32 epoch" not in text and "epoch 1/1" in text
    assert "fp32_holdout_top1" not in ckpt.meta.metrics
    assert ckpt.meta.model_args["in_channels"] == 1


def test_dedicated_single_subnet_space_and_ablations_train(tiny_npz, tmp_path):

    for kw in (
        {"wbits": (2,), "abits": (2,), "forms": (Form(False, True, False),)},
        {"wbits": (2, 8), "abits": (2, 8), "wdr": False, "gpg": False,
         "grad_l1_w": 1e-3, "grad_l1_a": 1e-3, "grad_l1_last": 1},
        {"wbits": (2, 8), "abits": (2, 8), "stacked": "off"},  # the sequential sandwich
    ):
        out = tmp_path / "d.pt"
        cfg = TrainConfig(data=str(tiny_npz), input_size=8, width=4, epochs=1, warmup_epochs=1, out=str(out),
                          final_eval=False, **kw)
        ckpt = train(cfg, progress=False)
        assert np.isfinite(ckpt.meta.metrics["epochs"][0]["loss"])
        assert load_checkpoint(out).meta.space == cfg.space


@pytest.mark.parametrize("extra", [[], ["--stacked", "off", "--lowest-forms", "2"]], ids=["stacked", "split-lowest"])
def test_ddp_two_processes(tiny_npz, tmp_path, extra):
    """Two CPU processes under torchrun; the second run takes the sequential sandwich with
    the lowest subnet split over two forms (several passes per subnet under no_sync)."""
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "deployq", "train", "--data", str(tiny_npz), "--out", str(out), "--epochs", "1",
        "--wbits", "2,8", "--abits", "2,8", *TINY, *extra,
    ]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert sum(line.startswith("epoch 1/1") for line in lines) == 1, r.stdout  # only rank 0 prints
    stacked = any("one stacked batch" in line for line in lines)
    assert stacked == (not extra), r.stdout  # DDP runs the stacked sandwich unless told not to
    ckpt = load_checkpoint(out)
    assert ckpt.meta.epoch == 1 and len(ckpt.meta.metrics["epochs"]) == 1
    # each rank saw half of the data per step, the throughput counts both
    assert ckpt.meta.metrics["epochs"][0]["img_per_s"] > 0


# --------------------------------------------------------------------------- bad input


def _fails(capsys, argv, match: str, out: Path | None = None):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("deployq: error:") and "\n" not in err and "Traceback" not in err
    assert match in err, err
    if out is not None:
        assert not out.exists()
    return err


def _png_tree(root: Path, classes, size=(8, 8), odd=None):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(3):
            s = odd if (odd and c == classes[-1] and i == 2) else size
            Image.fromarray(np.full(s[::-1], 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")


def test_bad_inputs_exit_2_with_one_line(capsys, tmp_path, trained):
    out = tmp_path / "o.pt"
    _fails(capsys, ["train", "--model", "resnet99", "--out", str(out)], "unknown model", out)
    _fails(capsys, ["train", "--data", str(tmp_path / "nope"), "--out", str(out)], "does not exist", out)
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["train", "--data", str(tmp_path / "empty"), "--out", str(out)], "empty", out)
    _png_tree(tmp_path / "mix" / "train", ["a", "b"])
    _png_tree(tmp_path / "mix" / "val", ["a", "c"])
    _fails(capsys, ["train", "--data", str(tmp_path / "mix"), "--out", str(out), *TINY], "differ", out)
    _png_tree(tmp_path / "sizes", ["a", "b"], odd=(9, 8))
    _fails(capsys, ["train", "--data", str(tmp_path / "sizes"), "--out", str(out), *TINY], "mixed sizes", out)
    _fails(capsys, ["train", "--wbits", "9", "--out", str(out)], "2..8", out)
    _fails(capsys, ["train", "--abits", "1-4", "--out", str(out)], "2..8", out)
    _fails(capsys, ["train", "--wbits", "two", "--out", str(out)], "range", out)
    _fails(capsys, ["train", "--stacked", "sometimes", "--out", str(out)], "stacked must be one of", out)
    _fails(capsys, ["train", "--lowest-forms", "0", "--out", str(out)], "lowest_forms must be >= 1", out)
    _fails(capsys, ["train", "--out", str(tmp_path / "missing" / "o.pt")], "does not exist")
    wrong = tmp_path / "wrong.pt"
    torch.save(build_model("resnet20", num_classes=10, width=8).state_dict(), wrong)
    _fails(capsys, ["train", "--pretrained", str(wrong), "--out", str(out), *TINY], "does not fit", out)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    _fails(capsys, ["train", "--pretrained", str(garbage), "--out", str(out), *TINY], "not a loadable", out)


def test_eval_bad_inputs(capsys, tmp_path, trained):
    truncated = tmp_path / "t.pt"
    data = trained.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    _fails(capsys, ["eval", str(truncated)], "not a loadable deployq checkpoint")
    foreign = tmp_path / "f.pt"
    torch.save(build_model("resnet20", num_classes=10).state_dict(), foreign)
    _fails(capsys, ["eval", str(foreign)], "not a deployq checkpoint")
    _fails(capsys, ["eval", str(tmp_path / "none.pt")], "does not exist")
    _fails(capsys, ["eval", str(trained), "--wbits", "9"], "2..8")
    _fails(capsys, ["eval", str(trained), "--granularity", "per-row"], "granularity")
    _fails(capsys, ["eval", str(trained), "--config", str(tmp_path / "none.json")], "does not exist")
    other = tmp_path / "o.json"
    other.write_text('{"schema": "deployq.SubnetSpec", "version": 1, "layers": {"x": {"weight": null, "act": {"bits": 4}}}}')
    _fails(capsys, ["eval", str(trained), "--config", str(other)], "does not fit")
    _png_tree(tmp_path / "three", ["a", "b", "c"])
    _fails(capsys, ["eval", str(trained), "--data", str(tmp_path / "three"), "--split", "all"], "differ")


def test_cli_train_defaults_are_the_library_defaults():
    """The CLI spells its defaults out (command modules must not import torch at import
    time); they must not drift from TrainConfig's, which the benchmarks measure."""
    import inspect

    import typer


    app = typer.Typer()
    train_cmd.register(app)
    (fn,) = [c.callback for c in app.registered_commands if c.name == "train"]
    params = inspect.signature(fn).parameters
    cfg = TrainConfig()
    pairs = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr_weights", "lr_quant": "lr_quant",
             "warmup_epochs": "warmup_epochs", "warmup_lr": "warmup_lr", "lr_ramp_epochs": "lr_ramp_epochs",
             "lowest_bits_pool": "lowest_bits_pool", "middle_uniform": "middle_uniform",
             "lowest_teacher": "lowest_teacher", "lowest_forms": "lowest_forms",
             "lowest_weight": "lowest_weight"}
    for cli_name, field in pairs.items():
        assert params[cli_name].default == getattr(cfg, field), cli_name
    for flag, field in {"no_wdr": "wdr", "no_gpg": "gpg"}.items():
        assert params[flag].default is not getattr(cfg, field), flag
    assert params["distill"].default is cfg.distill


def test_distill_without_an_fp32_model_is_refused(capsys, tmp_path):
    out = tmp_path / "c.pt"
    code = cli.main(["train", "--data", "digits", "--out", str(out), "--distill", "--warmup-epochs", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "FP32 teacher" in err and "Traceback" not in err and not out.exists()


def test_sandwich_step_distills_the_first_subnet_from_the_teacher():

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, input_size=8, width=4).eval()
    cfg = TrainConfig(wbits=(2, 8), abits=(2, 8), wdr=False)
    net = convert(model, cfg.space)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    net.calibrate([x])
    teacher = build_model("resnet20", num_classes=10, in_channels=1, input_size=8, width=4)
    teacher = frozen_teacher(teacher, "cpu")
    spec = net.highest(cfg.space.forms[0])
    with torch.no_grad():
        net.set_active(spec)
        logits = net(x)
        want_kd = float(gpg_loss(logits, y, teacher(x)))
        want_ce = float(torch.nn.functional.cross_entropy(logits, y))
    assert abs(want_kd - want_ce) > 1e-3  # a teacher that changes the loss
    got = sandwich_step(net, net, x, y, [spec], cfg, teacher=teacher)
    assert got == pytest.approx(want_kd, rel=1e-5)
    assert all(p.grad is None for p in teacher.parameters())
    assert sandwich_step(net, net, x, y, [spec], cfg) == pytest.approx(want_ce, rel=1e-5)
    # the ablation without GPG drops the chain, teacher included
    assert sandwich_step(net, net, x, y, [spec], replace_cfg(cfg, gpg=False), teacher=teacher) == pytest.approx(
        want_ce, rel=1e-5
    )


def _head_loss(hi, mid, y) -> float:
    """The sandwich's first two terms: the highest subnet's CE, the random one's GPG loss."""
    return float(torch.nn.functional.cross_entropy(hi, y)) + float(gpg_loss(mid, y, hi))


def _small_sandwich():
    """A tiny calibrated 8x8 supernet, a batch, one step's [highest, random, lowest] specs
    and each one's logits on the batch (no grad)."""

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, input_size=8, width=4).eval()
    cfg = TrainConfig(input_size=8, width=4, wdr=False)
    net = convert(model, cfg.space)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    net.calibrate([x])
    specs = choose_subnets(net, random.Random(1), cfg)
    with torch.no_grad():
        outs = []
        for spec in specs:
            net.set_active(spec)
            outs.append(net(x))
        net.set_active(None)
    return net, cfg, x, y, specs, outs


@pytest.mark.parametrize("stacked", [False, True])
def test_the_lowest_subnet_learns_from_the_teacher_lowest_teacher_names(stacked):
    """GPG: the random subnet learns from the highest; the lowest from the random one
    ("random", EQ-Net's chain, the default) or from the highest ("highest")."""

    net, cfg, x, y, specs, (hi, mid, low) = _small_sandwich()
    head = _head_loss(hi, mid, y)
    w = cfg.lowest_weight
    want = {"highest": head + w * float(gpg_loss(low, y, hi)), "random": head + w * float(gpg_loss(low, y, mid))}
    assert abs(want["highest"] - want["random"]) > 1e-4  # the two teachers differ here
    step = stacked_sandwich_step if stacked else sandwich_step
    for name, value in want.items():
        net.zero_grad(set_to_none=True)
        got = step(net, net, x, y, specs, replace_cfg(cfg, lowest_teacher=name))
        assert got == pytest.approx(value, rel=1e-5), name
    with pytest.raises(UserError, match="lowest_teacher"):
        TrainConfig(lowest_teacher="middle")


@pytest.mark.parametrize("stacked", [False, True])
def test_lowest_weight_scales_the_lowest_subnets_term_under_gpg_only(stacked):
    """lowest_weight w: the sandwich's loss is head + w * lowest's term, and so is its
    gradient (linear in w); without GPG the three cross-entropies keep equal weights."""

    net, cfg, x, y, specs, (hi, mid, low) = _small_sandwich()
    head = _head_loss(hi, mid, y)
    term = float(gpg_loss(low, y, mid))
    step = stacked_sandwich_step if stacked else sandwich_step

    def run(c):
        net.zero_grad(set_to_none=True)
        loss = step(net, net, x, y, specs, c)
        return loss, torch.cat([g.reshape(-1) for g in grads(net).values() if g is not None])

    (l1, g1), (l2, g2), (l3, g3) = (run(replace_cfg(cfg, lowest_weight=w)) for w in (1.0, 2.0, 3.0))
    assert l1 == pytest.approx(head + term, rel=1e-5)
    assert l2 == pytest.approx(head + 2 * term, rel=1e-5)
    assert l3 == pytest.approx(head + 3 * term, rel=1e-5)
    lowest_grad = g2 - g1
    assert lowest_grad.abs().max() > 1e-4  # the lowest subnet's term moves the parameters
    torch.testing.assert_close(g3 - g1, 2 * lowest_grad, rtol=1e-3, atol=1e-6)
    plain = replace_cfg(cfg, gpg=False)
    l_plain, g_plain = run(plain)
    l_plain3, g_plain3 = run(replace_cfg(plain, lowest_weight=3.0))
    assert l_plain3 == pytest.approx(l_plain, rel=1e-6)
    torch.testing.assert_close(g_plain3, g_plain)
    with pytest.raises(UserError, match="lowest_weight"):
        TrainConfig(lowest_weight=0.0)


def test_middle_uniform_makes_the_random_subnet_uniform_above_the_lowest_pool():


    cfg = TrainConfig(input_size=8, width=4)
    net = convert(build_model("resnet20", num_classes=10, input_size=8, width=4).eval(), cfg.space)

    def middles(**kw):
        c = TrainConfig(input_size=8, width=4, **kw)
        out = []
        for seed in range(40):
            mid = choose_subnets(net, random.Random(seed), c)[1]
            elastic = {(ls.weight.bits, ls.act.bits) for n, ls in mid.layers.items()
                       if n not in net.fixed_layers and ls.weight is not None}
            out.append(elastic)
        return out

    assert all(m == {(3, 3)} for m in middles(middle_uniform=1.0, lowest_bits_pool=1))
    assert all(m == {(4, 4)} for m in middles(middle_uniform=1.0, lowest_bits_pool=2))
    sampled = middles(middle_uniform=0.0)
    assert all(len(m) > 1 for m in sampled)  # per-layer draws: never uniform here
    half = middles(middle_uniform=0.5, lowest_bits_pool=1)
    assert 5 < sum(m == {(3, 3)} for m in half) < 35
    # its draw comes last: the highest and lowest subnets are the ones drawn without it
    for seed in range(10):
        off, on = (choose_subnets(net, random.Random(seed), replace_cfg(cfg, middle_uniform=p)) for p in (0.0, 1.0))
        assert (off[0], off[2]) == (on[0], on[2]) and off[1] != on[1]
    with pytest.raises(UserError, match="middle_uniform"):
        TrainConfig(middle_uniform=1.5)


def test_lowest_per_tensor_is_the_probability_of_a_per_tensor_lowest_subnet():
    from collections import Counter


    cfg = TrainConfig(input_size=8, width=4)
    net = convert(build_model("resnet20", num_classes=10, input_size=8, width=4).eval(), cfg.space)

    def forms(p, n=400):
        c = replace_cfg(cfg, lowest_per_tensor=p)
        out = Counter()
        for seed in range(n):
            low = choose_subnets(net, random.Random(seed), c)[2]
            (ls,) = {ls for name, ls in low.layers.items() if name not in net.fixed_layers and ls.weight is not None}
            out[(ls.weight.granularity, ls.weight.symmetric, ls.act.symmetric)] += 1
        return out

    half = forms(0.5)
    assert len(half) == 4 and all(not act_sym for _, _, act_sym in half)  # never the symmetric-activation form
    per_tensor = sum(v for (g, _, _), v in half.items() if g == "per-tensor")
    assert 160 <= per_tensor <= 240  # 0.5 of 400 (was 0.75: the per-channel branch also drew per-tensor forms)
    assert all(60 <= v <= 140 for v in half.values())
    assert {g for g, _, _ in forms(1.0, 60)} == {"per-tensor"}
    assert {g for g, _, _ in forms(0.0, 60)} == {"per-channel"}


def test_lowest_forms_splits_the_lowest_subnet_over_forms_of_both_granularities():


    cfg = TrainConfig(input_size=8, width=4)
    net = convert(build_model("resnet20", num_classes=10, input_size=8, width=4).eval(), cfg.space)
    low_forms = low_bit_forms(cfg.space.forms)
    assert len(low_forms) == 4

    def form_of(spec):
        (ls,) = {ls for n, ls in spec.layers.items() if n not in net.fixed_layers and ls.weight is not None} or {None}
        return ls

    seen_pairs = set()
    for seed in range(40):
        one = choose_subnets(net, random.Random(seed), cfg)
        two = choose_subnets(net, random.Random(seed), replace_cfg(cfg, lowest_forms=2))
        four = choose_subnets(net, random.Random(seed), replace_cfg(cfg, lowest_forms=4))
        assert one[:2] == two[:2] == four[:2]  # its draws come last
        assert isinstance(two[2], tuple) and len(two[2]) == 2 and two[2][0] == one[2]
        assert four[2][:1] == (one[2],) and len(set(four[2])) == 4
        for split in (two[2], four[2]):
            layers = [form_of(s) for s in split]
            assert len({(ls.weight.bits, ls.act.bits) for ls in layers}) == 1  # one bit-width, several forms
        pair = tuple(form_of(s).weight.granularity for s in two[2])
        assert sorted(pair) == ["per-channel", "per-tensor"]
        seen_pairs.add(tuple(form_of(s).weight.symmetric for s in two[2]))
    assert len(seen_pairs) == 4  # both symmetries on either side
    # more than the space has: every low form; a one-form space: no split
    assert len(choose_subnets(net, random.Random(0), replace_cfg(cfg, lowest_forms=9))[2]) == 4
    one_form = TrainConfig(input_size=8, width=4, forms=(low_forms[0],), lowest_forms=2)
    small = convert(build_model("resnet20", num_classes=10, input_size=8, width=4).eval(), one_form.space)
    assert not isinstance(choose_subnets(small, random.Random(0), one_form)[2], tuple)
    with pytest.raises(UserError, match="lowest_forms"):
        TrainConfig(lowest_forms=0)


@pytest.mark.parametrize("rows", [16, 15])
def test_a_split_lowest_subnet_learns_on_shares_of_the_batch(rows):
    """lowest_forms=2: each form of the lowest subnet sees its share of the rows, learns
    from the teacher's logits of those rows, and the shares' losses add up to a loss over
    the batch; the stacked sandwich takes the same step (15 rows: it runs the sequential
    one, as the rows do not split evenly)."""

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, input_size=8, width=4).eval()
    cfg = TrainConfig(input_size=8, width=4, wdr=False, lowest_forms=2)
    net = convert(model, cfg.space)
    x, y = torch.randn(rows, 1, 8, 8), torch.randint(0, 10, (rows,))
    net.calibrate([x])
    hi_spec, mid_spec, (low_a, low_b) = choose_subnets(net, random.Random(1), cfg)
    cut = (rows + 1) // 2  # torch.tensor_split's first share
    with torch.no_grad():
        outs = []
        for spec, xs in ((hi_spec, x), (mid_spec, x), (low_a, x[:cut]), (low_b, x[cut:])):
            net.set_active(spec)
            outs.append(net(xs))
        net.set_active(None)
    hi, mid, la, lb = outs
    shares = (float(gpg_loss(la, y[:cut], mid[:cut])) * cut / rows
              + float(gpg_loss(lb, y[cut:], mid[cut:])) * (rows - cut) / rows)
    head = _head_loss(hi, mid, y)
    want = head + cfg.lowest_weight * shares
    # a split that had run both forms on the whole batch, or one form, would differ
    net.set_active(low_a)
    with torch.no_grad():
        whole_a = float(gpg_loss(net(x), y, mid))
    net.set_active(None)
    assert abs(shares - whole_a) > 1e-4
    specs = [hi_spec, mid_spec, (low_a, low_b)]
    grads = {}
    for name, step in (("sequential", sandwich_step), ("stacked", stacked_sandwich_step)):
        net.zero_grad(set_to_none=True)
        got = step(net, net, x, y, specs, cfg)
        assert got == pytest.approx(want, rel=1e-5), name
        grads[name] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert grads["sequential"].keys() == grads["stacked"].keys()
    for n, g in grads["sequential"].items():
        torch.testing.assert_close(grads["stacked"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def _reference_adam_step(params, state, lr, rel, b1=0.9, b2=0.999, eps=1e-8):
    """Adam, parameter by parameter, with ElasticAdam's relative update: the spec the
    flat-buffer optimizer must follow to the bit."""
    for p in params:
        if p.grad is None:
            continue
        st = state.setdefault(id(p), {})
        if not st:
            st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
            if rel:
                st["ref"] = p.detach().abs().clamp(min=1e-8)
        st["step"] += 1
        st["m"].lerp_(p.grad, 1 - b1)
        st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        upd = (st["m"] / (1 - b1 ** st["step"])) / ((st["v"] / (1 - b2 ** st["step"])).sqrt() + eps)
        if rel:
            upd = upd * st["ref"]
        p.data.add_(upd, alpha=-lr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elastic_adam_is_adam_to_the_bit_across_save_and_load(dtype):
    """Parameters trained only some steps (a cell a subnet did not use has no gradient)
    keep their own step counts; the state round-trips through torch.save / load as a
    checkpoint's does, and training resumed from it continues bit for bit."""
    import io


    shapes = [(8, 3, 3, 3), (8,), (1,), (1,), (16,), (3,), (1,)]
    spec = [(slice(0, 2), 1e-3, False), (slice(2, 5), 1e-2, True), (slice(5, 7), 0.1, False)]

    def params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]

    def groups(ps):
        return [{"params": ps[sl], "lr": lr, "relative": rel} for sl, lr, rel in spec]

    def grads(ps, i, rng):
        gen = torch.Generator().manual_seed(i)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) if rng.random() < 0.6 else None

    ref, state, rng = params(), {}, random.Random(1)
    got, rng2 = params(), random.Random(1)
    opt = ElasticAdam(groups(got))
    for i in range(60):
        grads(ref, i, rng)
        for sl, lr, rel in spec:
            _reference_adam_step(ref[sl], state, lr, rel)
        if i == 30:  # resume from a saved state, as --resume does
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            opt = ElasticAdam(groups(got))
            opt.load_state_dict(torch.load(buf, weights_only=True))
        grads(got, i, rng2)
        opt.step()
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    st = opt.state_dict()["state"]
    assert set(st[2]) == {"step", "exp_avg", "exp_avg_sq", "ref"} and set(st[0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert 0 < st[2]["step"] < 60  # trained on some steps only


def test_elastic_adam_clips_like_clip_grad_value():
    """clip_value clamps on the flat gradient: the same updates, to the bit, as
    torch.nn.utils.clip_grad_value_ before the step; the parameters' .grad untouched."""

    def run(clip_in_optimizer: bool):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.rand(2) + 0.1)]
        groups = [{"params": ps[:2], "lr": 0.01}, {"params": ps[2:], "lr": 0.05, "relative": True}]
        opt = ElasticAdam(groups, clip_value=0.5 if clip_in_optimizer else None)
        raw = []
        for i in range(20):
            gen = torch.Generator().manual_seed(i)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * 2
            raw.append([p.grad.clone() for p in ps])
            if not clip_in_optimizer:
                torch.nn.utils.clip_grad_value_(ps, 0.5)
            opt.step()
        return ps, raw

    got, raw = run(True)
    want, _ = run(False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert any(float(g.abs().max()) > 0.5 for g in raw[-1])
    assert all(torch.equal(p.grad, g) for p, g in zip(got, raw[-1]))


def test_supernet_schedule_ramps_then_decays():

    def lrs(total, ramp):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = supernet_schedule(opt, total, ramp)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    plain = lrs(100, 0)
    assert plain[0] == 1.0 and plain[50] == pytest.approx(0.5) and plain[-1] < 1e-3
    ramped = lrs(100, 10)
    assert ramped[0] == pytest.approx(0.1) and ramped[4] == pytest.approx(0.5 * plain[4])
    assert all(a < b for a, b in itertools.pairwise(ramped[:10]))  # rising through the ramp
    # after the ramp: the same cosine
    assert ramped[10:] == pytest.approx(plain[10:], rel=1e-6)


def test_negative_lr_ramp_is_refused():
    with pytest.raises(UserError, match="lr_ramp_epochs"):
        TrainConfig(lr_ramp_epochs=-1)


def test_lowest_bits_pool_draws_the_lowest_subnet_from_the_n_lowest_widths():


    cfg = TrainConfig(input_size=8, width=4)
    net = convert(build_model("resnet20", num_classes=10, input_size=8, width=4).eval(), cfg.space)

    def lowest_bits(pool):
        c = TrainConfig(input_size=8, width=4, lowest_bits_pool=pool)
        out = set()
        for seed in range(60):
            low = choose_subnets(net, random.Random(seed), c)[2]
            elastic = [ls for n, ls in low.layers.items() if n not in net.fixed_layers]
            out |= {(ls.weight.bits, ls.act.bits) for ls in elastic if ls.weight is not None}
        return out

    assert lowest_bits(1) == {(2, 2)}
    assert lowest_bits(2) == {(2, 2), (3, 3)}
    assert lowest_bits(3) == {(2, 2), (3, 3), (4, 4)}
    # the extra draw comes last: the highest and random subnets are the ones pool 1 picks
    for seed in range(10):
        one, two = (choose_subnets(net, random.Random(seed), TrainConfig(lowest_bits_pool=n, middle_uniform=0.0))
                    for n in (1, 2))
        assert one[:2] == two[:2]
    with pytest.raises(UserError, match="lowest_bits_pool"):
        TrainConfig(lowest_bits_pool=0)
