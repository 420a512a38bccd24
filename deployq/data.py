"""Data sets as numpy arrays, and the preprocessing that is recorded with the model.

Sources understood by `load_data`:
- ``"digits"``: scikit-learn's 1,797 8x8 handwritten digits (no download needed). The split
  is THE fixed one: ``train_test_split(test_size=0.2, random_state=0, stratify=y)``
  (1,437 train / 360 val).
- a directory holding an ImageFolder tree ``root/<class>/<image>``, or a tree with
  ``train/`` and ``val/`` subfolders each holding such a tree.
- a ``.npz`` file with ``x`` (N,H,W), (N,H,W,C) or (N,C,H,W) and ``y`` (N,), optional
  ``class_names``.

Where a source has no split of its own (npz, plain tree), "train"/"val" are a deterministic
stratified 80/20 split (`stratified_split(y, 0.2, seed=0)`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from deployq.errors import UserError

SPLITS = ("train", "val", "all")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
CHANNEL_ORDERS = ("RGB", "BGR")
VAL_FRACTION = 0.2
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become the float32 NCHW tensor the model was trained on.

    The convention, applied in this order by `apply`:
    1. pixel values are scaled to [0, 1]: uint8 is divided by 255; float input is taken as
       already in [0, 1] (scikit-learn's digits, 0..16, are divided by 16 when loaded);
    2. each image is resized to ``size`` x ``size`` with PIL's bilinear filter (on float
       values, per channel), unless it already has that size;
    3. channels are converted to ``channels``: grey (1) is replicated to 3; RGB (3) becomes
       grey with PIL's "L" weights (0.299 R + 0.587 G + 0.114 B);
    4. if ``channel_order`` is "BGR" the 3 channels are reversed (input is always RGB);
    5. ``(x - mean[c]) / std[c]`` per channel.
    """

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise UserError(f"preprocessing size must be a positive integer; got {self.size!r}")
        if self.channels not in (1, 3):
            raise UserError(f"preprocessing channels must be 1 or 3; got {self.channels!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise UserError(
                f"preprocessing channel_order must be one of {', '.join(CHANNEL_ORDERS)}; "
                f"got {self.channel_order!r}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise UserError(f"preprocessing {name} must be a list of numbers") from None
            if len(value) != self.channels:
                raise UserError(
                    f"preprocessing {name} has {len(value)} values for {self.channels} channels"
                )
            object.__setattr__(self, name, value)
        if any(not s > 0 for s in self.std):
            raise UserError(f"preprocessing std must be positive; got {self.std}")

    @classmethod
    def uniform(
        cls, size: int, channels: int, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD
    ) -> Preprocessing:
        return cls(size=size, channels=channels, mean=(mean,) * channels, std=(std,) * channels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        if not isinstance(d, dict):
            raise UserError(f"preprocessing must be a mapping; got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown preprocessing key(s): {', '.join(unknown)}")
        missing = sorted(k for k in ("size", "channels", "mean", "std") if k not in d)
        if missing:
            raise UserError(f"preprocessing is missing key(s): {', '.join(missing)}")
        return cls(**d)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """(N,H,W) or (N,H,W,C) uint8 / float images -> float32 (N, channels, size, size)."""
        a = np.asarray(images)
        if a.ndim == 3:
            a = a[..., None]
        if a.ndim != 4 or a.shape[-1] not in (1, 3):
            raise UserError(f"images must be (N,H,W) or (N,H,W,1|3); got shape {a.shape}")
        if a.dtype == np.uint8:
            x = a.astype(np.float32) / np.float32(255.0)
        elif np.issubdtype(a.dtype, np.floating):
            x = a.astype(np.float32, copy=False)
        else:
            raise UserError(f"images must be uint8 or float; got {a.dtype}")
        x = _resize(x, self.size)
        c = x.shape[-1]
        if c == 1 and self.channels == 3:
            x = np.repeat(x, 3, axis=-1)
        elif c == 3 and self.channels == 1:
            x = x @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
        if self.channel_order == "BGR" and self.channels == 3:
            x = x[..., ::-1]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear PIL resize of float32 NHWC images, channel by channel (mode "F")."""
    n, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    from PIL import Image

    out = np.empty((n, size, size, c), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            img = Image.fromarray(np.ascontiguousarray(x[i, :, :, j]))
            out[i, :, :, j] = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    return out


def default_preprocessing(source: str) -> Preprocessing:
    """The recorded default for a built-in source: digits -> 16x16, 3 channels, 0.5 / 0.25."""
    if source == "digits":
        return Preprocessing.uniform(16, 3)
    raise UserError(f"no default preprocessing for {source!r}; built-in sources: digits")


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True, eq=False)
class Dataset:
    """Preprocessed images (float32 NCHW), labels (int64) and the class names they index."""

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise UserError(f"x has {len(self.x)} samples but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], self.class_names)


def stratified_split(
    y: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of indices -> (rest, held_out), each sorted.

    Per class, round(fraction * n_class) samples are held out, at least one and at most
    n_class - 1 when the class has two or more samples (a singleton stays in `rest`).
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"split fraction must be in (0, 1); got {fraction!r}")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        k = round(fraction * len(idx))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        held.append(rng.permutation(idx)[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def holdout(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split `ds` into (rest, held_out), stratified and deterministic for a given seed.

    Used for per-epoch metrics and for the CQAP predictor's samples, which must come from
    the training data and never from the val split.
    """
    rest, held = stratified_split(ds.y, fraction, seed)
    if len(rest) == 0 or len(held) == 0:
        raise UserError(
            f"cannot hold out {fraction:g} of {len(ds)} samples: one side would be empty"
        )
    return ds.subset(rest), ds.subset(held)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")


def load_data(
    source: str, preprocessing: Preprocessing | None = None, split: str = "all"
) -> Dataset:
    """Load `source` ("digits", an ImageFolder directory or a .npz file) as a Dataset.

    Without `preprocessing`, `infer_preprocessing(source)` is used (for digits: the
    recorded default, see `default_preprocessing`).
    """
    _check_split(split)
    if preprocessing is None:
        preprocessing = infer_preprocessing(source)
    if source == "digits":
        images, y, names = _digits(split)
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(
                f"data source {source!r} does not exist (expected digits, a directory or a .npz file)"
            )
        if path.is_dir():
            images, y, names = _folder(path, split)
        elif path.suffix.lower() == ".npz":
            images, y, names = _npz(path, split)
        else:
            raise UserError(
                f"unsupported data source {source!r}: expected a directory or a .npz file"
            )
    return Dataset(preprocessing.apply(images), y.astype(np.int64), names)


def infer_preprocessing(source: str) -> Preprocessing:
    """Preprocessing that keeps a source's own size and channels: mean 0.5, std 0.25.

    Size = the images' side (the longer side if they are not square); channels = 1 for
    grey images (PIL mode L, or npz without a channel axis / with C=1), else 3.
    """
    if source == "digits":
        return default_preprocessing("digits")
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"data source {source!r} does not exist (expected digits, a directory or a .npz file)"
        )
    if path.is_dir():
        roots = _split_roots(path)
        first = _list_tree(roots[0][1])[0][0]
        with _open_image(first) as img:
            (w, h), channels = img.size, _channels_of(img.mode, first)
        return Preprocessing.uniform(max(h, w), channels)
    if path.suffix.lower() == ".npz":
        x, _, _ = _read_npz(path)
        _, h, w, c = x.shape
        return Preprocessing.uniform(max(h, w), c)
    raise UserError(f"unsupported data source {source!r}: expected a directory or a .npz file")


# --------------------------------------------------------------------------- digits


def _digits(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    names = tuple(str(i) for i in range(10))
    if split == "all":
        return images, y, names
    train_idx, val_idx = train_test_split(
        np.arange(len(y)), test_size=VAL_FRACTION, random_state=0, stratify=y
    )
    idx = train_idx if split == "train" else val_idx
    return images[idx], y[idx], names


# --------------------------------------------------------------------------- image folders


def _split_roots(root: Path) -> list[tuple[str, Path]]:
    """[(split name, tree root)]: ("train", root/train), ("val", root/val) or ("all", root)."""
    try:
        entries = list(root.iterdir())
    except OSError as e:
        raise UserError(f"cannot read directory {str(root)!r}: {e.strerror or e}") from None
    if not entries:
        raise UserError(f"data directory {str(root)!r} is empty")
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train and has_val:
        train_classes = set(_class_dirs(root / "train"))
        val_classes = set(_class_dirs(root / "val"))
        if train_classes != val_classes:
            only_t = ", ".join(sorted(train_classes - val_classes)) or "-"
            only_v = ", ".join(sorted(val_classes - train_classes)) or "-"
            raise UserError(
                f"train/ and val/ class folders differ in {str(root)!r}: "
                f"only in train: {only_t}; only in val: {only_v}"
            )
        return [("train", root / "train"), ("val", root / "val")]
    if has_train != has_val:
        missing = "val" if has_train else "train"
        raise UserError(
            f"{str(root)!r} has {'train' if has_train else 'val'}/ but no {missing}/ folder"
        )
    return [("all", root)]


def _class_dirs(root: Path) -> list[str]:
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserError(
            f"no class folders in {str(root)!r} (expected {root!s}/<class>/<image files>)"
        )
    return names


def _list_tree(root: Path) -> list[tuple[Path, int]]:
    """[(image path, class index)] in sorted class then sorted file order."""
    classes = _class_dirs(root)
    files: list[tuple[Path, int]] = []
    for ci, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    found.append(Path(dirpath) / f)
        if not found:
            raise UserError(
                f"class folder {str(root / name)!r} has no images "
                f"({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})"
            )
        files += [(p, ci) for p in found]
    return files


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {str(path)!r}: {e}") from None


_GREY_MODES = {"1", "L", "LA", "I;16", "I;16B", "I;16L"}


def _channels_of(mode: str, path: Path) -> int:
    if mode in ("I", "F"):
        raise UserError(f"unsupported image mode {mode} (32-bit) in {str(path)!r}")
    return 1 if mode in _GREY_MODES else 3


def _read_image(path: Path) -> tuple[np.ndarray, str]:
    """-> (H,W) or (H,W,3) uint8 array, and the image's normalised mode ("L" or "RGB")."""
    img = _open_image(path)
    try:
        with img:
            img.load()
            channels = _channels_of(img.mode, path)
            if img.mode.startswith("I;16"):
                return (np.asarray(img, dtype=np.float64) / 257.0).round().astype(np.uint8), "L"
            target = "L" if channels == 1 else "RGB"
            if img.mode != target:
                img = img.convert(target)
            return np.asarray(img, dtype=np.uint8), target
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {str(path)!r}: {e}") from None


def _load_tree(root: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    files = _list_tree(root)
    arrays: list[np.ndarray] = []
    first_path: Path | None = None
    first_mode = ""
    for path, _ in files:
        a, mode = _read_image(path)
        if first_path is None:
            first_path, first_mode = path, mode
        elif a.shape[:2] != arrays[0].shape[:2]:
            h0, w0 = arrays[0].shape[:2]
            h, w = a.shape[:2]
            raise UserError(
                f"images of mixed sizes: {str(path)!r} is {w}x{h} but {str(first_path)!r} is "
                f"{w0}x{h0} (resize them to one size first)"
            )
        elif mode != first_mode:
            raise UserError(
                f"images of mixed modes: {str(path)!r} is {mode} but {str(first_path)!r} is "
                f"{first_mode} (convert them to one mode first)"
            )
        arrays.append(a)
    y = np.fromiter((ci for _, ci in files), dtype=np.int64, count=len(files))
    return np.stack(arrays), y, tuple(_class_dirs(root))


def _folder(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    roots = _split_roots(root)
    if roots[0][0] == "all":
        images, y, names = _load_tree(root)
        return (*_take_split(images, y, split), names)
    if split == "all":
        parts = [_load_tree(r) for _, r in roots]
        (xt, yt, names), (xv, yv, _) = parts
        if xt.shape[1:] != xv.shape[1:]:
            raise UserError(
                f"train/ and val/ images differ in {str(root)!r}: "
                f"shape {xt.shape[1:]} vs {xv.shape[1:]} (H,W[,C])"
            )
        return np.concatenate([xt, xv]), np.concatenate([yt, yv]), names
    return _load_tree(dict(roots)[split])


def _take_split(images: np.ndarray, y: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "all":
        return images, y
    train_idx, val_idx = stratified_split(y, VAL_FRACTION, seed=0)
    idx = train_idx if split == "train" else val_idx
    return images[idx], y[idx]


# --------------------------------------------------------------------------- npz


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """-> x as (N,H,W,C) uint8 or float32 in [0,1], y int64, class names if stored."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                raise UserError(
                    f"{str(path)!r} has no array {' or '.join(missing)} "
                    f"(found: {', '.join(sorted(keys)) or 'nothing'})"
                )
            x, y = z["x"], z["y"]
            names = z["class_names"] if "class_names" in keys else None
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"cannot read {str(path)!r} as .npz: {e}") from None
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or _is_integral(y)):
        raise UserError(
            f"y in {str(path)!r} must be a 1-D array of integers; got {y.dtype} {y.shape}"
        )
    if len(x) != len(y):
        raise UserError(f"x and y in {str(path)!r} differ in length: {len(x)} vs {len(y)}")
    if len(y) == 0:
        raise UserError(f"{str(path)!r} holds no samples")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise UserError(f"y in {str(path)!r} has negative labels")
    x = _to_nhwc(x, path)
    x = _to_unit_range(x, path)
    class_names: tuple[str, ...] | None = None
    if names is not None:
        class_names = tuple(str(n) for n in np.asarray(names).reshape(-1))
        if len(class_names) <= int(y.max()):
            raise UserError(
                f"{str(path)!r} has {len(class_names)} class_names but label {int(y.max())}"
            )
    return x, y, class_names


def _is_integral(a: np.ndarray) -> bool:
    return (
        np.issubdtype(a.dtype, np.floating)
        and bool(np.all(np.isfinite(a)))
        and bool(np.all(a == np.round(a)))
    )


def _to_nhwc(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        return x[..., None]
    if x.ndim == 4:
        last, second = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
        if last and not second:
            return x
        if second and not last:
            return x.transpose(0, 2, 3, 1)
        if last and second:  # both plausible (tiny images): prefer the square spatial pair
            nchw = x.shape[1] != x.shape[2] and x.shape[2] == x.shape[3]
            return x.transpose(0, 2, 3, 1) if nchw else x
    raise UserError(
        f"x in {str(path)!r} must be (N,H,W), (N,H,W,C) or (N,C,H,W) with C 1 or 3; got {x.shape}"
    )


def _to_unit_range(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise UserError(f"integer x in {str(path)!r} must lie in 0..255")
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)) or x.min() < -1e-6 or x.max() > 1 + 1e-6:
            raise UserError(
                f"float x in {str(path)!r} must lie in [0, 1] (or store uint8 0..255); "
                f"got {float(np.nanmin(x)):g}..{float(np.nanmax(x)):g}"
            )
        return np.clip(x, 0.0, 1.0)
    raise UserError(f"x in {str(path)!r} must be uint8 or float; got {x.dtype}")


def _npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    x, y, names = _read_npz(path)
    if names is None:
        names = tuple(str(i) for i in range(int(y.max()) + 1))
    return (*_take_split(x, y, split), names)


__all__ = [
    "Dataset",
    "Preprocessing",
    "default_preprocessing",
    "holdout",
    "infer_preprocessing",
    "load_data",
    "stratified_split",
]
