"""Training's augmentation (random translations) and its deterministic twin, the
shifted copies the search measures subnets on.

Both translate by whole pixels with replicate padding (the border of a digit image is
its background), by at most `max_shift(size)` pixels: shifted copies are in-distribution
exactly because training saw the same translations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHIFT_DIVISOR = 8  # translations of up to size / 8 pixels


def max_shift(size: int, augment: bool = True) -> int:
    """How far training translates images of `size` pixels (0 without augmentation)."""
    return size // SHIFT_DIVISOR if augment else 0


def _padded(x: torch.Tensor, s: int) -> torch.Tensor:
    return F.pad(x, (s,) * 4, mode="replicate")


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels in each direction."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = _padded(x, max_shift)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def shifted_copies(x: torch.Tensor, max_shift: int, n_copies: int) -> torch.Tensor:
    """x followed by n_copies - 1 translated copies (deterministic offsets within
    +-max_shift): more in-distribution images to measure on without touching other data."""
    if n_copies <= 1 or max_shift <= 0:
        return x
    offsets = [(dy, dx) for r in range(1, max_shift + 1) for dy, dx in _ring(r)]
    offsets = offsets[: n_copies - 1]
    s = max_shift
    h, w = x.shape[-2:]
    padded = _padded(x, s)
    copies = [x] + [padded[..., s + dy : s + dy + h, s + dx : s + dx + w] for dy, dx in offsets]
    return torch.cat(copies).contiguous()


def _ring(r: int) -> list[tuple[int, int]]:
    # Diagonals first: they move the digit in both directions at once.
    return [(r, r), (-r, -r), (r, -r), (-r, r), (r, 0), (-r, 0), (0, r), (0, -r)]
