"""Class weights for imbalanced training splits: which runs use them, and the weight of each class.

A head trained on a long-tailed split (hundreds of images of some classes, a few dozen of others)
learns the large classes' prior and misses the small ones. With class-balanced weights each class
counts as much as any other in the loss, as scikit-learn's `class_weight="balanced"` does: a row of
class c weighs n / (k * n_c), for n rows of k classes present. The same weights, computed on the
validation rows, make the validation loss that early stopping, the probe's C and auto's choice
minimise a class-balanced loss too, so that model choice matches what is trained.
"""

from __future__ import annotations

import numpy as np

CLASS_WEIGHTS = ("auto", "balanced", "none")
#: "auto" weighs classes when the largest training class has at least this many times the rows of the
#: smallest: a split that balanced (CIFAR-10, every --per-class subset) trains exactly as unweighted.
IMBALANCE_RATIO = 1.5


def imbalance(y: np.ndarray, n_classes: int) -> float:
    """Rows of the largest class over rows of the smallest, among the classes present in `y`."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=n_classes)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def resolve(mode: str, y: np.ndarray, n_classes: int) -> str:
    """"balanced" or "none": what `mode` (auto, balanced, none) means for training labels `y`."""
    if mode == "auto":
        return "balanced" if imbalance(y, n_classes) >= IMBALANCE_RATIO else "none"
    return mode


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes,) float32 balanced weights from the rows `y`: n / (k * n_c); 0 for a class absent from `y`.

    The rows' weights average 1, so a weighted loss stays on the scale of the unweighted one."""
    counts = np.bincount(np.asarray(y, np.int64), minlength=n_classes).astype(np.float64)
    present = counts > 0
    out = np.zeros(n_classes)
    out[present] = counts.sum() / (present.sum() * counts[present])
    return out.astype(np.float32)


def split_weights(mode: str, y: np.ndarray, tr: np.ndarray, va: np.ndarray, n_classes: int):
    """(training weights, validation weights), each (n_classes,) or None when `mode` resolves to "none".

    Each side's weights come from its own rows, so each side's weighted rows average 1."""
    if resolve(mode, y[tr], n_classes) == "none":
        return None, None
    return class_weights(y[tr], n_classes), class_weights(y[va], n_classes)
