"""End-to-end `deployq search` on a tiny calibrated ResNet-20: outputs, cache, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from deployq.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from deployq.cli import main
from deployq.data import Preprocessing, load_data
from deployq.elastic import convert
from deployq.models import build_model
from deployq.profile import load_profile
from deployq.search import SearchConfig, search
from deployq.search.cost import avg_bits, extreme_bits, parse_budget
from deployq.search.layout import NetLayout
from deployq.search.predictor import PredictorConfig
from deployq.spec import ElasticSpace, Form, SubnetSpec

SNPE = Form(False, False, False, False)
CPU = Form(True, True, False, False)
QUICK = [
    "--samples",
    "40",
    "--generations",
    "4",
    "--population",
    "24",
    "--refine-rounds",
    "1",
    "--quiet",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_search.py
    yield
    torch.set_num_threads(n)


def _meta(space, prep, **over) -> CheckpointMeta:
    d = {
        "model": "resnet20",
        "model_args": {"num_classes": 10, "in_channels": 3, "input_size": 8, "width": 4},
        "space": space,
        "preprocessing": prep.to_dict(),
        "class_names": tuple(str(i) for i in range(10)),
        "train_config": {"data": "digits"},
    }
    d.update(over)
    return CheckpointMeta(**d)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread):
    """A FP32-trained (few seconds), calibrated tiny supernet: PTQ only, no supernet training."""
    torch.manual_seed(0)
    prep = Preprocessing.uniform(8, 3)
    ds = load_data("digits", prep, split="train")
    x, y = torch.tensor(ds.x), torch.tensor(ds.y)
    model = build_model("resnet20", num_classes=10, in_channels=3, input_size=8, width=4)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(3):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            b = perm[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    space = ElasticSpace(wbits=(2, 3, 4, 8), abits=(2, 3, 4, 8), forms=(SNPE, CPU))
    net = convert(model.eval(), space)
    net.calibrate([x[:128]])
    path = tmp_path_factory.mktemp("search") / "tiny.pt"
    save_checkpoint(path, net, _meta(space, prep))
    return path


def test_cli_search_writes_spec_csv_png(ckpt, tmp_path, capsys):
    out = tmp_path / "subnet.json"
    rc = main(
        [
            "search",
            str(ckpt),
            "--profile",
            "snpe",
            "--budget",
            "avg-bits=2.6",
            "-o",
            str(out),
            *QUICK,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "Kendall tau" in printed and "uniform w3a3" in printed
    # tau is reported against what the predictor learned and against top-1
    flat = " ".join(printed.replace("│", " ").split())  # the table wraps long cells
    assert "vs measured soft accuracy" in flat and "vs measured top-1" in flat, flat
    # 287 held-out images (0.2 of digits' train split): the summary says they are few
    # (a third kept apart for the final choice: one image is 1/191 of a search measurement)
    assert "287 held-out images: one image is 0.52 points of a search measurement" in flat, flat
    assert "on 96 it never measured x 5 copies" in flat, flat
    spec = SubnetSpec.from_json(out.read_text())
    net = load_checkpoint(ckpt).net
    net.check_spec(spec)
    load_profile("snpe").check(spec)
    assert avg_bits(NetLayout.of(net, (1, 3, 8, 8)), spec) <= 2.6
    searchable = [n for n in spec.layers if n not in net.fixed_layers]
    bits = {spec.layers[n].act.bits for n in searchable}
    bits |= {spec.layers[n].weight.bits for n in searchable if spec.layers[n].weight}
    assert len(bits) > 1  # mixed precision: no uniform subnet fits avg-bits=2.6 but w2a2
    rows = list(csv.DictReader((tmp_path / "subnet.pareto.csv").open()))
    assert {r["kind"] for r in rows} == {"front", "candidate", "uniform"}
    chosen = [r for r in rows if r["chosen"] == "1"]
    assert len(chosen) == 1 and float(chosen[0]["cost_avg-bits"]) <= 2.6
    assert all(r["measured_acc"] for r in rows if r["kind"] != "front")
    assert (tmp_path / "subnet.pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the contract with export: it takes the searched spec as is
    onnx_path = tmp_path / "searched.onnx"
    rc = main(
        ["export", str(ckpt), "--profile", "snpe", "--config", str(out), "-o", str(onnx_path)]
    )
    assert rc == 0, capsys.readouterr().err
    assert onnx_path.stat().st_size > 0


def test_cache_reused_and_invalidated(ckpt, tmp_path):
    cfg = SearchConfig(
        checkpoint=ckpt,
        profile="cpu",
        budget="size=6k",
        n_samples=30,
        generations=3,
        population=20,
        out=tmp_path / "a.json",
        predictor=PredictorConfig(trees=60),
    )
    first = search(cfg, progress=False)
    assert not first.samples_cached and first.n_measured >= 30
    cache = ckpt.parent / (ckpt.name + ".cqap") / "w-pc-sym_a-asym"
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["n_samples"] == 30 and meta["key"]["form"] == CPU.to_dict()
    # samples are measured on the held-out images plus one shifted copy, and the cache
    # says so (a cache of another version or copy count is not reused)
    from deployq.search.cache import CACHE_VERSION

    assert meta["version"] == CACHE_VERSION and meta["key"]["copies"] == 2
    assert first.measure_images == 2 * first.n_holdout
    torch.load(cache / "predictor.pt", weights_only=True)
    # Another budget and output: no subnet is measured again, the predictor is reused.
    second = search(
        SearchConfig(**{**cfg.__dict__, "budget": "avg-bits=4", "out": tmp_path / "b.json"}),
        progress=False,
    )
    assert second.samples_cached and second.predictor_cached
    # top-k per round (4 refinement rounds + the last) + 4 uniform references, then the
    # best measured once more on the final images + shifted copies; plus the
    # near-uniform subnets (uniform ones over budget lowered into it) not measured yet
    from deployq.search.api import NEAR_UNIFORM

    # (+ 1: the best uniform subnet in budget, when the best mixed one is compared with it)
    assert 5 * 5 + 4 + 1 <= second.n_measured <= 5 * 5 + 4 + 1 + NEAR_UNIFORM + 1
    # a third of the held-out images is kept from the search for the final choice
    assert second.final_apart and second.final_images == 5 * second.final_holdout
    assert second.final_holdout == round((second.n_holdout + second.final_holdout) / 3)
    assert second.base_metrics == first.base_metrics
    # The soft accuracies are at the calibrating temperature; without calibration they
    # are at T = 1: the samples are reused (they hold every temperature), the predictor
    # learned another target and is refitted.
    from deployq.search.sampling import TEMPERATURES

    assert first.temperature in TEMPERATURES and second.temperature == first.temperature
    raw = search(
        SearchConfig(**{**cfg.__dict__, "calibrate": False, "refine_rounds": 0, "out": None}),
        progress=False,
    )
    assert raw.samples_cached and not raw.predictor_cached and raw.temperature == 1.0
    one_copy = search(
        SearchConfig(**{**cfg.__dict__, "copies": 1, "refine_rounds": 0, "out": None}),
        progress=False,
    )
    assert not one_copy.samples_cached and one_copy.measure_images == one_copy.n_holdout
    # A cache for another checkpoint (sha256 differs) is not used.
    other = tmp_path / "other.pt"
    other.write_bytes(ckpt.read_bytes() + b"")
    ck = load_checkpoint(ckpt)
    save_checkpoint(other, ck.net, ck.meta.with_(epoch=1))
    (tmp_path / "other.pt.cqap").mkdir()
    import shutil

    shutil.copytree(cache, tmp_path / "other.pt.cqap" / cache.name)
    third = search(
        SearchConfig(**{**cfg.__dict__, "checkpoint": other, "out": None}), progress=False
    )
    assert not third.samples_cached and third.n_measured >= 30


def _fail(capsys, args) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("deployq: error: ")
    return err


def test_bad_input(ckpt, tmp_path, capsys):
    base = ["search", str(ckpt), "-o", str(tmp_path / "s.json"), *QUICK]
    err = _fail(capsys, [*base, "--profile", "snpe", "--budget", "avg-bits=1.5"])
    net = load_checkpoint(ckpt).net
    w, a = extreme_bits(NetLayout.of(net, (1, 3, 8, 8)), (2, 3, 4, 8), (2, 3, 4, 8), min)
    layout = NetLayout.of(net, (1, 3, 8, 8))
    # the averages count the layers the search chooses, so the cheapest is all-2-bit exactly
    assert parse_budget("avg-bits=1").bits_cost(layout, w, a) == 2.0
    assert "budget avg-bits=1.5 cannot be met: the cheapest configuration costs 2.00" in err
    # size counts the fixed 8-bit ends too, and says so
    cheapest = parse_budget("size=1").bits_cost(layout, w, a)
    err = _fail(capsys, [*base, "--profile", "snpe", "--budget", f"size={cheapest - 1:.0f}"])
    assert f"cannot be met: the cheapest configuration costs {cheapest:.0f} (first/last layers fixed at 8 bits)" in err
    assert "unknown budget kind 'speed'" in _fail(
        capsys, [*base, "--profile", "snpe", "--budget", "speed=3"]
    )
    assert "final share must be in [0, 1); got 1.0" in _fail(
        capsys, [*base, "--profile", "snpe", "--budget", "avg-bits=4", "--final-share", "1"]
    )
    assert "unknown profile 'nosuch'" in _fail(
        capsys, [*base, "--profile", "nosuch", "--budget", "avg-bits=4"]
    )
    # tensorrt's form (symmetric signed activations) is not in this supernet's space
    assert "not trained for" in _fail(
        capsys, [*base, "--profile", "tensorrt", "--budget", "avg-bits=4"]
    )
    ck = load_checkpoint(ckpt)
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, ck.net, ck.meta.with_(preprocessing={}))
    err = _fail(
        capsys, ["search", str(bare), "--profile", "snpe", "--budget", "avg-bits=4", *QUICK]
    )
    assert "records no preprocessing" in err
    # another split of the data the supernet trained on holds trained images
    held10 = tmp_path / "held10.pt"
    save_checkpoint(held10, ck.net, ck.meta.with_(train_config={"data": "digits", "holdout": 0.1, "seed": 0}))
    err = _fail(capsys, ["search", str(held10), "--profile", "snpe", "--budget", "avg-bits=4",
                         "--holdout", "0.3", *QUICK])
    assert "trained on all but a 0.1 held-out split" in err and "--holdout 0.3" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert "junk.pt" in _fail(
        capsys, ["search", str(junk), "--profile", "snpe", "--budget", "avg-bits=4"]
    )
    assert not (tmp_path / "s.json").exists()


def test_cli_search_defaults_are_the_library_defaults():
    """The CLI spells its defaults out (command modules must not import torch at import
    time); they must not drift from SearchConfig's, which the benchmark measures."""
    import inspect

    from deployq.commands.search import search_cmd
    from deployq.search.api import SearchConfig

    params = inspect.signature(search_cmd).parameters
    cfg = SearchConfig(checkpoint=Path("x.pt"), profile="snpe", budget="avg-bits=4")
    pairs = {"samples": "n_samples", "copies": "copies", "generations": "generations",
             "population": "population", "top_k": "top_k", "refine_rounds": "refine_rounds",
             "target": "target", "calibrate": "calibrate", "seed": "seed", "holdout": "holdout",
             "final_share": "final_share"}
    for cli_name, field in pairs.items():
        assert params[cli_name].default == getattr(cfg, field), cli_name


def test_mixed_subnet_must_beat_uniform_significantly(ckpt, tmp_path, monkeypatch):
    """The best mixed finalist replaces the best uniform subnet within budget only when
    its paired advantage exceeds MIXED_OVER_UNIFORM_Z standard errors."""
    import math

    from deployq.search import api

    cfg = SearchConfig(
        checkpoint=ckpt, profile="cpu", budget="avg-bits=3.5", n_samples=30, generations=3,
        population=20, refine_rounds=1, out=None, predictor=PredictorConfig(trees=60),
    )
    net = load_checkpoint(ckpt).net
    layout = NetLayout.of(net, (1, 3, 8, 8))

    def chosen_bits(r) -> set[int]:
        return {r.spec.layers[li.name].act.bits for li in layout.searchable} | {
            r.spec.layers[li.name].weight.bits for li in layout.searchable if li.weighted
        }

    monkeypatch.setattr(api, "MIXED_OVER_UNIFORM_Z", -math.inf)  # any mixed winner stands
    free = search(cfg, progress=False)
    monkeypatch.setattr(api, "MIXED_OVER_UNIFORM_Z", math.inf)  # never significant
    strict = search(cfg, progress=False)
    assert len(chosen_bits(strict)) == 1 and chosen_bits(strict) <= {2, 3}
    # at this budget a mixed subnet wins, with an advantage of several standard errors
    assert len(chosen_bits(free)) > 1 and not free.uniform_kept
    assert free.advantage > 2 * free.advantage_se > 0
    assert strict.uniform_kept
    assert (strict.advantage, strict.advantage_se) == (free.advantage, free.advantage_se)


def test_holdout_split_of_other_data_is_free(tmp_path):
    from dataclasses import replace

    from deployq.errors import UserError
    from deployq.search.api import _holdout_params

    trained = {"data": "digits", "holdout": 0.1, "seed": 0}
    cfg = SearchConfig(checkpoint=tmp_path / "x.pt", profile="snpe", budget="avg-bits=4", holdout=0.3)
    assert _holdout_params(cfg, trained, same_data=False) == (0.3, 0)
    with pytest.raises(UserError, match="would use images it trained on"):
        _holdout_params(cfg, trained, same_data=True)
    # training's own split, spelled out or not, is what the search measures on
    assert _holdout_params(replace(cfg, holdout=0.1), trained, same_data=True) == (0.1, 0)
    assert _holdout_params(replace(cfg, holdout=None), trained, same_data=True) == (0.1, 0)
