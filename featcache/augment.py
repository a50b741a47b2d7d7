"""Deterministic augmented views of training images, for caching their features.

View v of the image in row r is a pure function of (seed, r, v): rerunning, resuming or
extracting another layer gives the same pixels. View 0 is always the original image.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import BadInputError


def _flip(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img[:, ::-1] if rng.random() < 0.5 else img


def _crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pad by 1/8 of the size (reflect), then crop back at a random offset: the usual CIFAR shift."""
    h, w = img.shape[:2]
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = np.pad(img, ((ph, ph), (pw, pw), (0, 0)), mode="reflect")
    y, x = rng.integers(0, 2 * ph + 1), rng.integers(0, 2 * pw + 1)
    return padded[y:y + h, x:x + w]


AUGMENTATIONS = {"flip": _flip, "crop": _crop}
DEFAULT_AUGMENT = "flip,crop"


def parse(augment: str) -> tuple[str, ...]:
    names = tuple(a.strip() for a in augment.split(",") if a.strip())
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown or not names:
        raise BadInputError(f"--augment must name some of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    return names


def views(images: np.ndarray, rows: range, view: int, augment: str, seed: int) -> np.ndarray:
    """View `view` (>= 1) of each image; `rows` are the images' row numbers in their split."""
    names = parse(augment)
    out = np.empty_like(images)
    for i, (img, row) in enumerate(zip(images, rows)):
        rng = np.random.default_rng([seed, row, view])
        for name in names:
            img = AUGMENTATIONS[name](img, rng)
        out[i] = img
    return out
