"""The linear probe's fit: multinomial logistic regression solved to convergence by L-BFGS.

A probe trained by a few gradient steps per epoch is still improving when small training splits
run out of epochs, so it understates what the features hold. As in CLIP's and VISSL's linear
benchmarks, the probe is solved by L-BFGS (scikit-learn) for each L2 strength on a grid, and the
strength with the lowest validation loss is kept; the test split plays no part. The solution is
written into the Keras model (standardise -> Dense softmax), so `model.keras` predicts as fitted.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

#: Inverse L2 strengths tried, weakest regularisation last (warm-started in this order). Wide on purpose:
#: easy, well-separated features (handwritten digits) want C above 10, hard small splits C near 0.03.
C_GRID = tuple(float(c) for c in np.logspace(-4, 3, 15))
MAX_ITER = 1000
#: The path stops once validation loss has risen this many strengths in a row past its best: the weakly
#: regularised end is the slowest to solve, and validation loss along the path has one minimum.
PATIENCE = 2


def fit_linear_probe(model, x_train, y_train, x_val, y_val, *, n_classes: int, seed: int = 0) -> dict:
    """Fit the last Dense layer of `model` on (x_train, y_train) by L-BFGS for each C of the grid;
    keep the C with the lowest validation loss. Inputs are the vectors the Dense layer sees
    (already standardised). Returns a history: one row per C, and "best", the index of the C kept."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    labels = np.arange(n_classes)
    history = {k: [] for k in ("C", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")}
    best = None
    clf = LogisticRegression(max_iter=MAX_ITER, warm_start=True, random_state=seed)
    for c in C_GRID:
        t0 = time.perf_counter()
        clf.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)   # counted below instead
            clf.fit(x_train, y_train)
        if clf.n_iter_.max() >= MAX_ITER:
            log.warning("linear probe: L-BFGS reached %d iterations at C=%g without converging", MAX_ITER, c)
        coef, intercept = _full(clf, n_classes)
        p_train, p_val = _softmax(x_train @ coef.T + intercept), _softmax(x_val @ coef.T + intercept)
        history["C"].append(c)
        history["loss"].append(float(log_loss(y_train, p_train, labels=labels)))
        history["accuracy"].append(float(np.mean(p_train.argmax(1) == y_train)))
        history["val_loss"].append(float(log_loss(y_val, p_val, labels=labels)))
        history["val_accuracy"].append(float(np.mean(p_val.argmax(1) == y_val)))
        history["seconds"].append(time.perf_counter() - t0)
        if best is None or history["val_loss"][-1] < history["val_loss"][best[0]]:
            best = (len(history["C"]) - 1, coef, intercept)
        elif len(history["C"]) - 1 - best[0] >= PATIENCE:
            break
    history["best"], coef, intercept = best
    if history["best"] in (0, len(C_GRID) - 1):
        log.warning("linear probe: the best L2 strength, C=%g, is at the end of the grid searched", history["C"][best[0]])
    model.get_layer("classes").set_weights([coef.T.astype(np.float32), intercept.astype(np.float32)])
    return history


def _full(clf, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_classes, d) weights and (n_classes,) biases, with classes absent from training at -inf-like bias."""
    coef = np.zeros((n_classes, clf.coef_.shape[1]))
    intercept = np.full(n_classes, -1e4)   # a class never seen in training is never predicted
    if len(clf.classes_) == 2 and clf.coef_.shape[0] == 1:   # binary: sklearn keeps one row
        coef[clf.classes_] = np.stack([-clf.coef_[0] / 2, clf.coef_[0] / 2])
        intercept[clf.classes_] = [-clf.intercept_[0] / 2, clf.intercept_[0] / 2]
    else:
        coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_
    return coef, intercept


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
