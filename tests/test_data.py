from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from deployq.data import (
    Dataset,
    Preprocessing,
    default_preprocessing,
    holdout,
    infer_preprocessing,
    load_data,
    stratified_split,
)
from deployq.errors import UserError


@pytest.fixture(scope="module")
def digits_train() -> Dataset:
    return load_data("digits", split="train")


@pytest.fixture(scope="module")
def digits_val() -> Dataset:
    return load_data("digits", split="val")


def test_digits_split(digits_train: Dataset, digits_val: Dataset) -> None:
    assert len(digits_train) == 1437 and len(digits_val) == 360
    assert digits_train.x.shape == (1437, 3, 16, 16) and digits_train.x.dtype == np.float32
    assert digits_val.y.dtype == np.int64
    assert digits_val.class_names == tuple(str(i) for i in range(10))
    # stratified: every class holds 35-37 of the 360 val images
    counts = np.bincount(digits_val.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # disjoint and together exactly the full set
    all_ds = load_data("digits")
    assert len(all_ds) == 1797
    keys = lambda ds: {a.tobytes() for a in ds.x}
    assert not keys(digits_train) & keys(digits_val)


def test_digits_deterministic_and_default_preprocessing(digits_val: Dataset) -> None:
    again = load_data("digits", split="val")
    np.testing.assert_array_equal(again.x, digits_val.x)
    np.testing.assert_array_equal(again.y, digits_val.y)
    pre = default_preprocessing("digits")
    assert pre == Preprocessing(16, 3, (0.5,) * 3, (0.25,) * 3)
    assert infer_preprocessing("digits") == pre
    # pixel 0 maps to (0 - 0.5) / 0.25
    assert digits_val.x.min() == pytest.approx(-2.0)
    native = load_data("digits", Preprocessing.uniform(8, 1), split="val")
    assert native.x.shape == (360, 1, 8, 8)


def test_preprocessing_round_trip_and_errors() -> None:
    pre = Preprocessing(32, 3, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "BGR")
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    with pytest.raises(UserError, match="unknown preprocessing key.*bogus"):
        Preprocessing.from_dict({**pre.to_dict(), "bogus": 1})
    with pytest.raises(UserError, match="mean has 1 values for 3 channels"):
        Preprocessing(8, 3, (0.5,), (0.2, 0.2, 0.2))
    with pytest.raises(UserError, match="std must be positive"):
        Preprocessing.uniform(8, 1, std=0.0)


def test_preprocessing_apply_convention() -> None:
    img = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    img[..., 0] = 255  # pure red
    rgb = Preprocessing(2, 3, (0.5,) * 3, (0.5,) * 3).apply(img)
    assert rgb.shape == (1, 3, 2, 2) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[0, :, 0, 0], [1.0, -1.0, -1.0])
    bgr = Preprocessing(2, 3, (0.5,) * 3, (0.5,) * 3, "BGR").apply(img)
    np.testing.assert_allclose(bgr[0, :, 0, 0], [-1.0, -1.0, 1.0])
    grey = Preprocessing(2, 1, (0.0,), (1.0,)).apply(img)
    np.testing.assert_allclose(grey[0, 0], 0.299, atol=1e-6)
    # constant images stay constant under bilinear resizing; grey is replicated to 3 channels
    const = np.full((2, 5, 5), 0.75, dtype=np.float32)
    up = Preprocessing.uniform(9, 3, mean=0.0, std=1.0).apply(const)
    assert up.shape == (2, 3, 9, 9)
    np.testing.assert_allclose(up, 0.75, atol=1e-6)


def _write_tree(root: Path, classes: dict[str, int], size=(8, 8), mode="RGB", seed=0) -> None:
    rng = np.random.default_rng(seed)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            # the class index is painted into pixel (0,0) so labels can be checked
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            a[0, 0] = sorted(classes).index(name) * 40
            Image.fromarray(a, mode=None).convert(mode).save(root / name / f"img{i}.png")


def test_image_folder_labels(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"cat": 3, "ant": 4, "bee": 5})
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_data(str(tmp_path), Preprocessing.uniform(8, 3, mean=0.0, std=1.0))
    assert ds.class_names == ("ant", "bee", "cat")
    assert len(ds) == 12 and np.bincount(ds.y).tolist() == [4, 5, 3]
    painted = np.round(ds.x[:, 0, 0, 0] * 255 / 40).astype(int)
    np.testing.assert_array_equal(painted, ds.y)
    pre = infer_preprocessing(str(tmp_path))
    assert (pre.size, pre.channels) == (8, 3)
    train, val = load_data(str(tmp_path), split="train"), load_data(str(tmp_path), split="val")
    assert len(train) + len(val) == 12 and set(val.y.tolist()) == {0, 1, 2}


def test_image_folder_grey_and_train_val_tree(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train", {"a": 3, "b": 2}, size=(6, 6), mode="L")
    _write_tree(tmp_path / "val", {"a": 1, "b": 2}, size=(6, 6), mode="L", seed=1)
    pre = infer_preprocessing(str(tmp_path))
    assert (pre.size, pre.channels) == (6, 1)
    train = load_data(str(tmp_path), split="train")
    val = load_data(str(tmp_path), split="val")
    both = load_data(str(tmp_path))
    assert train.x.shape == (5, 1, 6, 6) and len(val) == 3 and len(both) == 8
    assert val.y.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(both.x[5:], val.x)


def test_train_val_class_mismatch(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train", {"a": 1, "b": 1})
    _write_tree(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(UserError, match="only in train: b; only in val: c"):
        load_data(str(tmp_path), split="val")


def test_mixed_sizes_and_modes(tmp_path: Path) -> None:
    _write_tree(tmp_path / "s", {"a": 2})
    Image.new("RGB", (9, 8)).save(tmp_path / "s" / "a" / "odd.png")
    with pytest.raises(UserError, match=r"mixed sizes: .*odd\.png.* 9x8 .* 8x8"):
        load_data(str(tmp_path / "s"))
    _write_tree(tmp_path / "m", {"a": 2})
    Image.new("L", (8, 8)).save(tmp_path / "m" / "a" / "zgrey.png")
    with pytest.raises(UserError, match=r"mixed modes: .*zgrey\.png.* L .* RGB"):
        load_data(str(tmp_path / "m"))


def test_corrupt_image(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"a": 2})
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
        load_data(str(tmp_path))


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_data(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="is empty"):
        load_data(str(tmp_path))
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(UserError, match="no class folders"):
        load_data(str(tmp_path))
    (tmp_path / "cls").mkdir()
    with pytest.raises(UserError, match="has no images"):
        load_data(str(tmp_path))
    with pytest.raises(UserError, match="unknown split 'test'"):
        load_data("digits", split="test")


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_round_trip(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 5, 5, 3), dtype=np.uint8)
    if layout == "NHW":
        x = x[..., 0]
    y = np.arange(20) % 4
    stored = x.transpose(0, 3, 1, 2) if layout == "NCHW" else x
    path = tmp_path / "d.npz"
    np.savez(path, x=stored, y=y, class_names=np.array(["w", "x", "y", "z"]))
    pre = Preprocessing.uniform(5, 1 if layout == "NHW" else 3)
    assert infer_preprocessing(str(path)) == pre
    ds = load_data(str(path))
    assert ds.class_names == ("w", "x", "y", "z")
    np.testing.assert_array_equal(ds.y, y)
    np.testing.assert_allclose(ds.x, pre.apply(x), atol=1e-6)
    train, val = load_data(str(path), split="train"), load_data(str(path), split="val")
    assert (len(train), len(val)) == (16, 4) and sorted(val.y.tolist()) == [0, 1, 2, 3]


def test_npz_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.npz"
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(UserError, match="no array y"):
        load_data(str(p))
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(UserError, match="differ in length: 3 vs 2"):
        load_data(str(p))
    np.savez(p, x=np.full((2, 4, 4), 7.0, np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        load_data(str(p))
    p.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_data(str(p))


def test_holdout_deterministic_and_disjoint(digits_train: Dataset) -> None:
    rest, held = holdout(digits_train, 0.1, seed=3)
    rest2, held2 = holdout(digits_train, 0.1, seed=3)
    np.testing.assert_array_equal(held.x, held2.x)
    np.testing.assert_array_equal(rest.y, rest2.y)
    assert len(rest) + len(held) == len(digits_train)
    assert abs(len(held) - 144) <= 5
    assert not {a.tobytes() for a in rest.x} & {a.tobytes() for a in held.x}
    assert set(held.y.tolist()) == set(range(10))
    _, other = holdout(digits_train, 0.1, seed=4)
    assert not np.array_equal(other.x, held.x)
    with pytest.raises(UserError, match="fraction"):
        holdout(digits_train, 1.5)


@settings(max_examples=50)
@given(
    y=st.lists(st.integers(0, 4), min_size=2, max_size=60),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 1000),
)
def test_stratified_split_properties(y: list[int], fraction: float, seed: int) -> None:
    y = np.array(y)
    rest, held = stratified_split(y, fraction, seed)
    assert np.intersect1d(rest, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([rest, held])), np.arange(len(y)))
    for c in np.unique(y):
        n = int((y == c).sum())
        k = int((y[held] == c).sum())
        if n >= 2:
            assert 1 <= k <= n - 1
        else:
            assert k == 0
    again = stratified_split(y, fraction, seed)
    assert np.array_equal(again[1], held)
