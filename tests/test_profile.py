"""Profiles: loading, schema errors, the form a target fixes, and check(spec)."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st

from deployq.cli import main
from deployq.errors import UserError
from deployq.profile import list_profiles, load_profile
from deployq.spec import ALL_FORMS, Form, LayerSpec, QuantSpec, SubnetSpec, act_spec, weight_spec

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "fc"]
SHIPPED = ["cpu", "snpe", "snpe-pc", "tensorrt"]


def shipped_text(name: str) -> str:
    return (resources.files("deployq.profiles") / f"{name}.toml").read_text()


def test_shipped_profiles_load():
    assert list_profiles() == SHIPPED
    for name in SHIPPED:
        p = load_profile(name)
        assert p.name == name
        assert p.opset_range[0] <= p.opset <= p.opset_range[1]
        assert p.to_dict()["name"] == name


def test_form_mapping():
    assert load_profile("tensorrt").form == Form(True, True, True, True)
    assert load_profile("snpe").form == Form(False, False, False, False)
    assert load_profile("snpe-pc").form == Form(True, True, False, False)
    assert load_profile("cpu").form == Form(True, True, False, False)


def test_tensorrt_facts():
    p = load_profile("tensorrt")
    assert p.opset_range == (13, 20) and p.graph.bias == "float"
    assert p.weights.narrow and p.weights.container == "int8" and p.activations.container == "int8"
    assert "Reshape" in p.graph.no_qdq_ops and not p.encodings


def test_containers_and_emulation():
    trt, snpe, pc, cpu = (load_profile(n) for n in ("tensorrt", "snpe", "snpe-pc", "cpu"))
    w4, w8 = weight_spec(4, True, True), weight_spec(8, True, True)
    assert trt.container(w4, "weight") == "int8" and trt.is_emulated(w4, "weight")
    assert not trt.is_emulated(w8, "weight")
    assert pc.container(w4, "weight") == "int4" and not pc.is_emulated(w4, "weight")
    # The HTP simulator refused native uint4 per-tensor weights, so snpe emulates them.
    assert snpe.container(weight_spec(4, False, False), "weight") == "uint8"
    assert snpe.container(weight_spec(3, False, False), "weight") == "uint8"
    assert cpu.container(w4, "weight") == "int8"  # cpu opts out of native int4
    a3 = act_spec(3, False, False)
    assert snpe.container(a3, "act") == "uint8" and snpe.is_emulated(a3, "act")
    assert trt.container(act_spec(8, True, True), "act") == "int8"


def test_native_int4_needs_opset_21(tmp_path):
    text = shipped_text("snpe-pc").replace("opset = 21", "opset = 17")
    path = tmp_path / "pc17.toml"
    path.write_text(text)
    p = load_profile(str(path))
    assert p.container(weight_spec(4, True, True), "weight") == "int8"


@pytest.mark.parametrize("name", SHIPPED)
def test_check_accepts_own_uniform_spec(name):
    p = load_profile(name)
    for wb in p.weight_bits:
        spec = SubnetSpec.uniform(
            LAYERS + ["add1"],
            p.form,
            wb,
            p.act_bits[0],
            weightless=["add1"],
            fixed={"conv1": 8, "fc": 8},
        )
        p.check(spec)


@given(form=st.sampled_from(ALL_FORMS), name=st.sampled_from(SHIPPED))
def test_check_accepts_exactly_the_profile_form(form, name):
    p = load_profile(name)
    spec = SubnetSpec.uniform(LAYERS, form, 8, 8)
    if form == p.form:
        p.check(spec)
    else:
        with pytest.raises(UserError, match="layer 'conv1'"):
            p.check(spec)


def test_check_refuses_bad_bits_naming_the_layer(tmp_path):
    text = shipped_text("tensorrt").replace("bits = [2, 3, 4, 5, 6, 7, 8]", "bits = [8]")
    text = text.replace("bits = [4, 5, 6, 7, 8]", "bits = [8]")
    path = tmp_path / "trt8.toml"
    path.write_text(text)
    p = load_profile(str(path))
    assert p.weight_bits == (8,) and p.act_bits == (8,)
    spec = SubnetSpec.uniform(LAYERS, p.form, 8, 8)
    p.check(spec)
    bad = spec.with_layers({"layer1.0.conv1": LayerSpec(p.form.weight(4), p.form.act(8))})
    with pytest.raises(
        UserError,
        match=re.escape(
            "profile tensorrt accepts weight bits {8}; got 4 for layer 'layer1.0.conv1'"
        ),
    ):
        p.check(bad)
    bad = spec.with_layers({"fc": LayerSpec(p.form.weight(8), p.form.act(6))})
    with pytest.raises(UserError, match=re.escape("activation bits {8}; got 6 for layer 'fc'")):
        p.check(bad)


def test_tensorrt_refuses_activations_below_4_bits():
    p = load_profile("tensorrt")
    assert p.act_bits == (4, 5, 6, 7, 8) and min(p.weight_bits) == 2
    with pytest.raises(UserError, match="activation bits"):
        p.check(SubnetSpec.uniform(LAYERS, p.form, 8, 2))


def test_check_refuses_bad_form_naming_the_layer():
    snpe = load_profile("snpe")
    spec = SubnetSpec.uniform(LAYERS, snpe.form, 8, 8).with_layers(
        {"x": LayerSpec(weight_spec(8, True, True), snpe.form.act(8))}
    )
    with pytest.raises(
        UserError,
        match=re.escape(
            "profile snpe needs per-tensor asymmetric weights; layer 'x' is per-channel symmetric"
        ),
    ):
        snpe.check(spec)
    trt = load_profile("tensorrt")
    unsigned = SubnetSpec.uniform(["a"], trt.form, 8, 8).with_layers(
        {"a": LayerSpec(trt.form.weight(8), act_spec(8, True, False))}
    )
    with pytest.raises(UserError, match="int8; layer 'a' has unsigned activations"):
        trt.check(unsigned)
    wide = SubnetSpec({"a": LayerSpec(QuantSpec(8, granularity="per-channel"), trt.form.act(8))})
    with pytest.raises(UserError, match="narrow-range"):
        trt.check(wide)
    pc_act = SubnetSpec(
        {"a": LayerSpec(trt.form.weight(8), QuantSpec(8, granularity="per-channel"))}
    )
    with pytest.raises(UserError, match="per-tensor activations"):
        trt.check(pc_act)


def test_unknown_name():
    with pytest.raises(
        UserError,
        match=re.escape(
            "unknown profile 'x'; choose from cpu, snpe, snpe-pc, tensorrt or pass a .toml path"
        ),
    ):
        load_profile("x")


@pytest.mark.parametrize(
    "where,key", [("", "colour"), ("[weights]\n", "axis"), ("[graph]\n", "fold_bn")]
)
def test_unknown_key_names_key_and_file(tmp_path, where, key):
    text = shipped_text("cpu")
    if where:
        text = text.replace(where, f"{where}{key} = 1\n")
    else:
        text = f"{key} = 1\n" + text
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_profile(str(path))
    assert key in str(e.value) and str(path) in str(e.value) and "unknown key" in str(e.value)


@pytest.mark.parametrize(
    "old,new,msg",
    [
        ('container = "uint8"', 'container = "uint16"', "activations.container"),
        ("opset = 17", "opset = 30", "outside opset_range"),
        ('bias = "int32"', 'bias = "int16"', "graph.bias"),
        ("symmetric = true", 'symmetric = "yes"', "weights.symmetric"),
        ("[sidecar]\nencodings = false\n", "", "missing key 'sidecar'"),
    ],
)
def test_bad_values(tmp_path, old, new, msg):
    text = shipped_text("cpu")
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(UserError, match=re.escape(msg)):
        load_profile(str(path))


def test_user_path_and_errors(tmp_path):
    d = tomllib.loads(shipped_text("tensorrt"))
    path = tmp_path / "mytrt.toml"
    path.write_text(shipped_text("tensorrt").replace('name = "tensorrt"', 'name = "mytrt"'))
    p = load_profile(str(path))
    assert p.name == "mytrt" and p.opset == d["opset"] and p.source == str(path)
    with pytest.raises(UserError, match="profile file not found"):
        load_profile(str(tmp_path / "nope.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [")
    with pytest.raises(UserError, match="not valid TOML"):
        load_profile(str(broken))


def test_cli_profiles(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in SHIPPED)
    assert main(["profiles", "show", "snpe"]) == 0
    assert "uint8" in capsys.readouterr().out
    assert main(["profiles", "show", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
