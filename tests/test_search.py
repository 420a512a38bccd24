"""Search: encoder, costs, budgets, evolution, predictor, end-to-end CLI, cache, bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deployq.elastic import convert
from deployq.errors import UserError
from deployq.search.cost import (
    KINDS,
    avg_abits,
    avg_bits,
    avg_wbits,
    bitops,
    check_feasible,
    parse_budget,
    size_bytes,
)
from deployq.search.encoder import FORM_FEATURES, encode, encoding_size
from deployq.search.evolution import EvolutionConfig, evolve
from deployq.search.genes import GeneSpace
from deployq.search.layout import NetLayout
from deployq.search.predictor import Predictor, PredictorConfig, fit_and_score
from deployq.spec import ElasticSpace, Form, SubnetSpec

SNPE = Form(False, False, False, False)
CPU = Form(True, True, False, False)


class Tiny(nn.Module):
    """c1 (fixed) -> c2 (+ residual add) -> c3 (1x1, stride 2) -> fc (fixed)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 8, 1, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        z = F.relu(self.b2(self.c2(y)) + y)
        z = F.relu(self.c3(z))
        return self.fc(z.mean((2, 3)))


SPACE = ElasticSpace(wbits=(2, 3, 4, 8), abits=(2, 3, 4, 8), forms=(SNPE, CPU))
TINY = convert(Tiny(), SPACE)
LAYOUT = NetLayout.of(TINY, (1, 3, 8, 8))
GSPACE = GeneSpace(LAYOUT, (2, 3, 4, 8), (2, 3, 4, 8))


def tiny_spec(genes, form=SNPE) -> SubnetSpec:
    return GSPACE.to_spec(genes, lambda n, w, a: TINY.layer_spec(n, form, w, a))


genes_st = st.lists(st.sampled_from([2, 3, 4, 8]), min_size=GSPACE.size, max_size=GSPACE.size)


# --------------------------------------------------------------------------- layout / genes


def test_layout_of_tiny_net():
    names = [li.name for li in LAYOUT.layers]
    assert names[0] == "c1" and names[-1] == "fc" and len(names) == 5
    # first, last, and the weightless add (the residual stream) are fixed
    assert [li.fixed for li in LAYOUT.layers] == [True, False, True, False, True]
    assert [li.weighted for li in LAYOUT.layers] == [True, True, False, True, True]
    # MACs per image by hand: out elements x filter size.
    assert [li.macs for li in LAYOUT.layers] == [4 * 64 * 27, 4 * 64 * 36, 0, 8 * 16 * 4, 5 * 8]
    assert GSPACE.w_layers == ("c2", "c3") and len(GSPACE.a_layers) == 2


@given(genes_st)
def test_genes_spec_round_trip(genes):
    spec = tiny_spec(genes)
    assert list(GSPACE.from_spec(spec)) == genes
    assert spec.layers["c1"].weight.bits == 8 and spec.layers["fc"].act.bits == 8
    TINY.check_spec(spec)


# --------------------------------------------------------------------------- encoder


@given(genes_st)
@settings(max_examples=30)
def test_encoder_one_hot(genes):
    spec = tiny_spec(genes)
    v = encode(spec, LAYOUT)
    assert v.shape == (encoding_size(LAYOUT),)
    assert list(v[:FORM_FEATURES]) == [0, 0, 0, 0]  # snpe: per-tensor asym weights, asym acts
    pos = FORM_FEATURES
    wb, ab = spec.weight_bits(), spec.act_bits()
    for li in LAYOUT.searchable:  # fixed c1 / fc are skipped
        if li.weighted:
            block = v[pos : pos + 4]
            assert block.sum() == 1 and block[LAYOUT.wbits.index(wb[li.name])] == 1
            pos += 4 + 2
        block = v[pos : pos + 4]
        assert block.sum() == 1 and block[LAYOUT.abits.index(ab[li.name])] == 1
        pos += 4 + 2
    assert pos == len(v)


def test_encoder_form_condition():
    g = GSPACE.uniform(4, 4)
    a, b = encode(tiny_spec(g, SNPE), LAYOUT), encode(tiny_spec(g, CPU), LAYOUT)
    assert list(b[:FORM_FEATURES]) == [1, 1, 0, 0]
    assert not np.array_equal(a, b)


# --------------------------------------------------------------------------- costs


def test_size_bytes_by_hand():
    spec = tiny_spec([4, 2, 3, 3, 3])  # c2 w4, c3 w2; acts 3; c1/fc fixed at 8
    # weights numel * bits / 8 + 4-byte bias per output channel
    expected = (
        (108 * 8 / 8 + 4 * 4) + (144 * 4 / 8 + 4 * 4) + (32 * 2 / 8 + 4 * 8) + (40 * 8 / 8 + 4 * 5)
    )
    assert size_bytes(LAYOUT, spec) == expected == 312
    # averages over the weighted layers the search chooses (weights and their inputs):
    # the fixed c1 / fc and the add are the same in every subnet
    assert avg_wbits(LAYOUT, spec) == (4 + 2) / 2
    assert avg_abits(LAYOUT, spec) == (3 + 3) / 2
    assert avg_bits(LAYOUT, spec) == (4 + 2 + 3 + 3) / 4
    uniform3 = tiny_spec([3] * GSPACE.size)
    assert avg_bits(LAYOUT, uniform3) == 3.0  # W3A3 with 8-bit ends is a 3-bit net
    assert bitops(LAYOUT, spec) == 6912 * 64 + 9216 * 12 + 512 * 6 + 40 * 64


@given(genes_st, st.integers(0, GSPACE.size - 1))
def test_costs_monotone_in_bits(genes, i):
    lower = list(genes)
    choices = [2, 3, 4, 8]
    if lower[i] == 2:
        return
    lower[i] = choices[choices.index(lower[i]) - 1]
    a, b = tiny_spec(lower), tiny_spec(genes)
    for kind, (fn, _) in KINDS.items():
        assert fn(LAYOUT, a.weight_bits(), a.act_bits()) <= fn(
            LAYOUT, b.weight_bits(), b.act_bits()
        ), kind
    layer = (GSPACE.w_layers + GSPACE.a_layers)[i]
    if not layer.startswith("qadd"):  # residual-add quantizers feed no MAC
        assert bitops(LAYOUT, a) < bitops(LAYOUT, b)


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "text,kind,value",
    [
        ("avg-bits=4", "avg-bits", 4.0),
        ("avg-wbits=3.5", "avg-wbits", 3.5),
        ("avg-abits=6", "avg-abits", 6.0),
        ("size=20000", "size", 20000.0),
        ("size=20k", "size", 20000.0),
        ("size=1.5M", "size", 1.5e6),
        ("bitops=1.2e9", "bitops", 1.2e9),
        ("bitops=3G", "bitops", 3e9),
    ],
)
def test_parse_budget(text, kind, value):
    b = parse_budget(text)
    assert (b.kind, b.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "latency=3",
            "unknown budget kind 'latency'; choose from avg-bits, avg-wbits, avg-abits, size, bitops",
        ),
        ("avg-bits", "budget must look like KIND=VALUE"),
        ("size=lots", "is not a number"),
        ("size=0", "must be positive"),
    ],
)
def test_parse_budget_errors(text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_budget(text)


def test_infeasible_budget_names_cheapest_cost():
    # cheapest: the chosen c2/c3 at 2 bits (weights and inputs); c1/fc do not count
    with pytest.raises(UserError) as e:
        check_feasible(parse_budget("avg-bits=1.5"), LAYOUT, (2, 3), (2, 3))
    assert str(e.value) == "budget avg-bits=1.5 cannot be met: the cheapest configuration costs 2.00"
    assert check_feasible(parse_budget("avg-bits=2"), LAYOUT, (2, 3), (2, 3)) == pytest.approx(2.0)
    # size counts the fixed 8-bit ends: (108 + 40) * 8/8 + (144 + 32) * 2/8 + 4 * (4 + 4 + 8 + 5)
    with pytest.raises(UserError) as e:
        check_feasible(parse_budget("size=200"), LAYOUT, (2, 3), (2, 3))
    assert str(e.value) == (
        "budget size=200 cannot be met: the cheapest configuration costs 276 "
        "(first/last layers fixed at 8 bits)"
    )


# --------------------------------------------------------------------------- evolution


def _knapsack(seed: int):
    rng = np.random.default_rng(seed)
    n, choices = 20, tuple(range(2, 9))
    weights = rng.uniform(0.1, 1.0, n)
    budget = 80.0  # average 4 bits over 20 genes
    # Linear value per bit: the optimum fills the most valuable genes to 8 first.
    opt = np.full(n, 2)
    spare = budget - opt.sum()
    for i in np.argsort(-weights):
        add = min(6, spare)
        opt[i] += add
        spare -= add
    return weights, (choices,) * n, budget, float(weights @ opt)


def test_evolution_finds_near_optimum_within_budget():
    weights, choices, budget, optimum = _knapsack(1)
    cfg = EvolutionConfig(population=100, parents=25, generations=60, seed=3)
    run = lambda: evolve(
        choices,
        lambda pop: pop @ weights,
        lambda g: float(g.sum()),
        lambda c: c <= budget,
        cfg,
        init=lambda rng: rng.integers(2, 9, len(choices)),
    )
    r = run()
    assert r.best.sum() <= budget
    assert r.best_fitness >= 0.97 * optimum
    assert all(c <= budget for c, _ in r.archive.values())
    assert r.history == sorted(r.history)  # elitism: the best never gets worse
    assert np.array_equal(run().best, r.best)  # deterministic for a seed


def test_descend_lowers_uniform_into_budget_as_fitness_prefers():
    from deployq.search.evolution import descend

    choices = ((2, 3, 4, 8),) * 6
    cost = lambda g: float(np.mean(g))
    # fitness: gene 0 matters a lot, the others a little, gene 5 least
    weight = np.array([10.0, 1, 1, 1, 1, 0.1])
    fitness = lambda pop: np.log(pop) @ weight
    g = descend(np.full(6, 8), choices, fitness, cost, lambda c: c <= 4.0)
    assert cost(g) <= 4.0 and (g <= 8).all()
    assert g[0] == 8 and g[5] == 2  # the sensitive gene kept, the insensitive one lowered
    assert cost(g) > 3.0  # stops as soon as the budget is met
    # nothing to lower: returns the all-minimum genome
    assert (descend(np.full(6, 2), choices, fitness, cost, lambda c: c < 1) == 2).all()


def test_evolution_starts_from_seeds_within_budget():
    choices = ((2, 3, 4, 8),) * 6
    seed = np.array([8, 2, 2, 2, 2, 2])
    over = np.full(6, 8)
    res = evolve(
        choices,
        lambda pop: -np.abs(pop - 3).sum(1).astype(float),
        lambda g: float(np.mean(g)),
        lambda c: c <= 3.5,
        EvolutionConfig(population=8, parents=2, generations=1, seed=0),
        init=lambda rng: np.full(6, 2),
        seeds=[seed, over],
    )
    assert tuple(seed) in res.archive and tuple(over) not in res.archive


# --------------------------------------------------------------------------- predictor


# An additive, smooth function of the bits: the MLP's home ground; boosted depth-3
# trees approximate a sum over 12 genes less well (hence the lower bar).
@pytest.mark.parametrize("kind,min_tau", [("mlp", 0.8), ("gbm", 0.65)])
def test_predictor_learns_monotone_function(tmp_path, kind, min_tau):
    rng = np.random.default_rng(0)
    n, g, choices = 300, 12, np.arange(2, 9)
    genes = rng.integers(2, 9, (n, g))
    x = (genes[:, :, None] == choices[None, None, :]).reshape(n, -1).astype(np.float32)
    importance = np.linspace(0.2, 1.0, g)
    score = np.log(genes - 1.0) @ importance
    z = 2 * (score - score.mean()) / score.std()
    y = (0.5 + 0.5 / (1 + np.exp(-z))).astype(np.float32)  # accuracy-like, in (0.5, 1)
    y += rng.normal(0, 0.005, n).astype(np.float32)
    pred, metrics = fit_and_score(x, y, PredictorConfig(kind=kind, epochs=150, seed=0))
    assert metrics.kendall_tau > min_tau, metrics
    assert metrics.rmse < 0.1
    torch.save(pred.state(), tmp_path / "p.pt")
    back = Predictor.from_state(torch.load(tmp_path / "p.pt", weights_only=True))
    np.testing.assert_allclose(back.predict(x[:10]), pred.predict(x[:10]), rtol=1e-6)


def test_trees_learn_accuracy_cliffs():
    """What a supernet shows: a few layers lose a lot at 2 bits, the rest little. Trees
    rank such subnets well; predictions stay accuracies (in (0, 1))."""
    rng = np.random.default_rng(1)
    n, g, choices = 300, 16, np.array([2, 3, 4, 8])
    genes = choices[rng.integers(0, 4, (n, g))]
    x = (genes[:, :, None] == choices[None, None, :]).reshape(n, -1).astype(np.float32)
    logit = 3.5 - 1.5 * (genes[:, :3] == 2).sum(1) - 0.1 * (genes[:, 3:] <= 3).sum(1)
    y = (1 / (1 + np.exp(-logit))).astype(np.float32)
    _, metrics = fit_and_score(x, y, PredictorConfig(kind="gbm"))
    assert metrics.kendall_tau > 0.8, metrics
    pred = Predictor(x.shape[1]).fit(x, y).predict(x)
    assert ((pred > 0) & (pred < 1)).all()


def test_ordinal_features_read_bit_widths_and_help_trees(tmp_path):
    """Trees on the bit-widths (one ordinal feature per one-hot group) rank per-layer
    accuracy cliffs better than trees on the one-hot columns; the groups travel with
    the predictor's state."""
    from deployq.search.encoder import onehot_groups
    from deployq.search.predictor import ordinal

    genes = np.array([2, 8, 3, 4, 8, 2, 3][: GSPACE.size])
    x = encode(tiny_spec(genes), LAYOUT)[None]
    groups = onehot_groups(LAYOUT)
    assert len(groups) == GSPACE.size
    w, a = GSPACE.bits(genes)
    bits = [w[li.name] if li.weighted else None for li in LAYOUT.searchable]
    want = []
    for li, wb in zip(LAYOUT.searchable, bits):
        want += ([wb] if li.weighted else []) + [a[li.name]]
    assert ordinal(x, groups)[0, -len(groups) :].tolist() == want
    assert ordinal(x, groups).shape[1] == x.shape[1] - sum(len(g[1]) for g in groups) + len(groups)
    # noise features: the weight bits' and the activation bits' sum of 4**-bits
    noisy = ordinal(x, groups, noise=True)[0]
    assert noisy[: -2].tolist() == ordinal(x, groups)[0].tolist()
    kinds = [k for _, _, k in groups]
    for got, kind in zip(noisy[-2:], ("w", "a")):
        bits_k = [b for b, k in zip(want, kinds) if k == kind]
        assert got == pytest.approx(sum(4.0**-b for b in bits_k), rel=1e-6)

    # Each layer loses accuracy below its own threshold bit-width (what supernets show):
    # one split on the bit-width, several on one-hot columns.
    rng = np.random.default_rng(0)
    n, g, choices = 300, 12, np.arange(2, 9)
    gen = rng.integers(2, 9, (n, g))
    xs = (gen[:, :, None] == choices[None, None, :]).reshape(n, -1).astype(np.float32)
    threshold = np.array([3, 4, 5] * 4)
    logit = 4.0 - (gen <= threshold) @ np.linspace(0.2, 1.0, g) + 0.05 * rng.normal(size=n)
    y = (1 / (1 + np.exp(-logit))).astype(np.float32)
    grp = tuple((7 * i, tuple(int(c) for c in choices), "wa"[i % 2]) for i in range(g))
    _, m_oh = fit_and_score(xs, y, PredictorConfig(features="onehot"), groups=grp)
    pred, m_ord = fit_and_score(xs, y, PredictorConfig(features="ordinal"), groups=grp)
    assert m_ord.kendall_tau > m_oh.kendall_tau + 0.1, (m_ord, m_oh)
    # Accuracy falling with the total quantization noise (a sum over all layers), as
    # it does when many layers lose a little each: the noise sums rank it better.
    logit = 3.0 - 60.0 * (4.0 ** -gen.astype(float)).sum(1) + 0.05 * rng.normal(size=n)
    y2 = (1 / (1 + np.exp(-logit))).astype(np.float32)
    _, m_plain = fit_and_score(xs, y2, PredictorConfig(noise_features=False), groups=grp)
    _, m_noise = fit_and_score(xs, y2, PredictorConfig(noise_features=True), groups=grp)
    assert m_noise.kendall_tau > m_plain.kendall_tau + 0.05, (m_noise, m_plain)
    torch.save(pred.state(), tmp_path / "p.pt")
    back = Predictor.from_state(torch.load(tmp_path / "p.pt", weights_only=True))
    assert back.groups == grp
    np.testing.assert_allclose(back.predict(xs[:10]), pred.predict(xs[:10]), rtol=1e-9)


def test_tree_arrays_predict_like_sklearn():
    from sklearn.ensemble import GradientBoostingRegressor

    from deployq.search.predictor import Trees

    rng = np.random.default_rng(2)
    x = (rng.random((80, 10)) < 0.5).astype(np.float32)
    y = x @ rng.normal(size=10) + 0.5 * x[:, 0] * x[:, 1]
    gbm = GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=0).fit(x, y)
    trees = Trees.from_sklearn(gbm)
    np.testing.assert_allclose(trees.predict(x), gbm.predict(x), atol=1e-9)
    back = Trees.from_state(trees.state())
    np.testing.assert_array_equal(back.predict(x), trees.predict(x))


class Sure90(nn.Module):
    """A stand-in net that says "class 0 with probability 0.9" on every image."""

    def forward(self, inp):
        return torch.tensor([0.9, 0.1]).log().expand(len(inp), 2)

    def active_spec(self):
        return None

    def set_active(self, spec):
        pass


def test_measurer_scores_and_shifted_copies():
    from deployq.search.sampling import Measurer, shifted_copies

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    xs = shifted_copies(x, 1, 5)
    assert xs.shape == (10, 3, 8, 8)
    assert torch.equal(xs[:2], x)  # the originals first
    # copy 1 is shifted by (+1, +1): its pixel (i, j) is the original's (i + 1, j + 1)
    assert torch.equal(xs[2, :, :7, :7], x[0, :, 1:, 1:])
    assert torch.equal(shifted_copies(x, 0, 5), x)  # no augmentation: no copies

    m = Measurer(Sure90(), x, torch.tensor([0, 1]), copies=3, max_shift=1)
    assert len(m) == 6 and m.n_images == 2
    sc = m.scores(None)
    assert sc.top1 == pytest.approx(0.5) and sc.soft == pytest.approx(0.5)
    # per image (its copies averaged): true class 0 gets 0.9, true class 1 gets 0.1
    np.testing.assert_allclose(sc.per_image, [0.9, 0.1], rtol=1e-6)
    m2 = Measurer(Sure90(), x, torch.tensor([0, 0]))
    assert m2.scores(None).soft == pytest.approx(0.9) and m2(None) == 1.0
    assert m.calls == 1 and m2.calls == 2


@given(st.integers(0, 500), st.sampled_from([0.0, 0.1, 1 / 3, 0.5, 0.9]), st.integers(0, 3))
def test_split_final_keeps_images_apart(n, share, seed):
    from deployq.search.sampling import split_final

    idx = np.arange(n) * 3 + 1  # any index set
    search_idx, final_idx = split_final(idx, share, seed)
    if share == 0 or n < 2:
        assert np.array_equal(search_idx, idx) and np.array_equal(final_idx, idx)
        return
    assert not set(search_idx) & set(final_idx)  # the search never measures a final image
    assert np.array_equal(np.sort(np.concatenate([search_idx, final_idx])), idx)
    assert len(search_idx) >= 1 and len(final_idx) == min(max(round(n * share), 1), n - 1)
    again = split_final(idx, share, seed)
    assert np.array_equal(again[0], search_idx) and np.array_equal(again[1], final_idx)


def test_paired_advantage():
    from deployq.search.sampling import paired_advantage

    a = np.array([0.9, 0.8, 0.7, 0.6])
    mean, se = paired_advantage(a, a - [0.01, 0.03, 0.01, 0.03])
    assert mean == pytest.approx(0.02)
    assert se == pytest.approx(np.std([0.01, 0.03, 0.01, 0.03], ddof=1) / 2)
    # a constant advantage is certain however noisy the images are
    assert paired_advantage(a, a - 0.05) == pytest.approx((0.05, 0.0), abs=1e-12)


def test_soft_accuracy_temperatures_and_calibration():
    """Soft accuracy and NLL on the temperature grid follow softmax(logits / T); the
    calibrating temperature is the one whose confidence matches the accuracy."""
    from deployq.search.sampling import TEMPERATURES, Measurer, calibrating_temperature

    # class 0 is right on 7 of 10 images: calibrated, 0.9 must become 0.7, i.e.
    # 9 ** (1 / T) = 7 / 3, T = ln 9 / ln(7 / 3) = 2.593, on the grid at 2 ** (11 / 8)
    y = torch.tensor([0] * 7 + [1] * 3)
    x = torch.zeros(10, 1, 4, 4)
    assert Measurer(Sure90(), x, y).scores(None).soft_t is None  # the grid only on request
    sc = Measurer(Sure90(), x, y).scores(None, grid=True)
    t = np.array(TEMPERATURES)
    p0 = 1 / (1 + 9.0 ** (-1 / t))
    np.testing.assert_allclose(sc.soft_t, 0.7 * p0 + 0.3 * (1 - p0), rtol=1e-6)
    np.testing.assert_allclose(sc.nll_t, -(0.7 * np.log(p0) + 0.3 * np.log(1 - p0)), rtol=1e-6)
    assert sc.soft == pytest.approx(0.7 * 0.9 + 0.3 * 0.1)  # T = 1
    k = calibrating_temperature(sc.nll_t[None])
    assert TEMPERATURES[k] == pytest.approx(2 ** (11 / 8))
    hot = Measurer(Sure90(), x, y, temperature=TEMPERATURES[k]).scores(None)
    assert hot.soft == pytest.approx(sc.soft_t[k])
    assert hot.soft == pytest.approx(0.7 * 0.7 + 0.3 * 0.3, abs=2e-3)


# --------------------------------------------------------------------------- sampling


def test_sampled_average_bits_spread_evenly():
    from deployq.search.sampling import local_genes, sample_population

    choices = ((2, 3, 4, 5, 6, 7, 8),) * 30
    pop = sample_population(np.random.default_rng(0), choices, 600)
    avg = pop.mean(axis=1)
    counts = np.histogram(avg, bins=[2, 3, 4, 5, 6, 7, 8.01])[0]
    assert counts.min() >= 0.1 * len(pop), counts  # every unit of average bits is covered
    assert len({tuple(g) for g in pop}) == len(pop)  # distinct: no config on both sides of a split
    more = sample_population(np.random.default_rng(0), choices, 50, exclude=pop)
    assert not {tuple(g) for g in more} & {tuple(g) for g in pop}
    tiny = sample_population(np.random.default_rng(0), ((2, 3),) * 2, 10)
    assert len(tiny) == 4 and len({tuple(g) for g in tiny}) == 4  # only 4 exist
    g = local_genes(np.random.default_rng(1), choices)
    _, n = np.unique(g, return_counts=True)
    assert n.max() >= 30 - 6  # a uniform genome with at most 6 genes changed
