"""The linear probe's fit: multinomial logistic regression solved to convergence by L-BFGS.

A probe trained by a few gradient steps per epoch is still improving when small training splits
run out of epochs, so it understates what the features hold. As in CLIP's and VISSL's linear
benchmarks, the probe is solved by L-BFGS for L2 strengths on a grid, and the strength with the
lowest validation loss is kept; the test split plays no part. The solution is written into the
Keras model (standardise -> Dense softmax), so `model.keras` predicts as fitted.

The objective is scikit-learn's (`C * sum(w_i * loss_i) + |W|^2 / 2`, intercept free), minimised by
SciPy's L-BFGS-B with scikit-learn's tolerance, but evaluated here in float32 matrix products: on
45,000 x 256 rows the whole path takes 13.2 s against scikit-learn's 34.2 s, same C and validation loss,
2 cores (bench/probe.py, docs/results/benchmarks.md section 10). The grid is walked a decade at a time from the strongest
regularisation, warm-started, and refined by half-decades around the best decade.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from heads.metrics import row_losses

log = logging.getLogger(__name__)

#: Inverse L2 strengths on the grid, by half-decades; the walk tries every other one first (decades).
C_GRID = tuple(float(c) for c in np.logspace(-4, 3, 15))
MAX_ITER = 1000
TOL = 1e-4   # scikit-learn's: the largest gradient component of the (mean-scaled) objective
#: The solve's products are memory-bound: a second BLAS thread slowed them here (bench/probe.py).
BLAS_THREADS = 1


def fit_linear_probe(model, x_train, y_train, x_val, y_val, *, n_classes: int, weights=(None, None),
                     rival: np.ndarray | None = None) -> dict:
    """Fit the last Dense layer of `model` on (x_train, y_train) by L-BFGS along the C grid; keep the C
    with the lowest validation loss. Inputs are the standardised vectors the Dense layer sees.

    `weights` are (training, validation) class weights or None (heads.balance). With `rival`, the
    per-row (weighted) validation losses of a candidate already fitted, the walk stops as soon as it is
    clearly behind and cannot catch up (see `_cannot_catch_up`): the probe then loses, as it would have.
    Returns a history: one row per C tried (in C order), "best", the row kept, and "raced"."""
    xt, xv = np.asarray(x_train, np.float32), np.asarray(x_val, np.float32)
    sample_w = None if weights[0] is None else weights[0][y_train].astype(np.float64)
    present = np.unique(y_train)
    solve = _Solver(xt, np.searchsorted(present, y_train), len(present), sample_w)
    tried = {}   # grid index -> (row of figures, coef, intercept, solution, per-row validation losses)

    def attempt(i: int, start: np.ndarray | None):
        t0 = time.perf_counter()
        params = solve(C_GRID[i], start)
        coef, intercept = _full(params, present, n_classes)
        row, val_rows = _figures(xt, y_train, xv, y_val, coef, intercept, weights)
        tried[i] = (dict(C=C_GRID[i], **row, seconds=time.perf_counter() - t0), coef, intercept, params, val_rows)
        return tried[i][0]["val_loss"]

    from threadpoolctl import threadpool_limits

    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        raced = _walk_decades(attempt, tried, rival)
        if not raced:
            _refine(attempt, tried, rival)
    order = sorted(tried)
    history = {k: [tried[i][0][k] for i in order] for k in tried[order[0]][0]}
    best = min(order, key=lambda i: tried[i][0]["val_loss"])
    history["best"] = order.index(best)
    history["raced"] = raced
    history["evaluations"] = solve.evaluations   # of the loss and its gradient, over every C tried
    if best in (0, len(C_GRID) - 1):
        log.warning("linear probe: the best L2 strength, C=%g, is at the end of the grid searched", C_GRID[best])
    coef, intercept = tried[best][1], tried[best][2]
    model.get_layer("classes").set_weights([coef.T.astype(np.float32), intercept.astype(np.float32)])
    return history


def fit_at(model, x_train, y_train, c: float, *, n_classes: int, weights=(None, None)) -> dict:
    """Fit the last Dense layer of `model` at the one L2 strength `c` (a refit on train + validation: nothing is
    chosen). Returns a history of one row (training figures only)."""
    from threadpoolctl import threadpool_limits

    xt = np.asarray(x_train, np.float32)
    present = np.unique(y_train)
    sample_w = None if weights[0] is None else weights[0][y_train].astype(np.float64)
    t0 = time.perf_counter()
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        params = _Solver(xt, np.searchsorted(present, y_train), len(present), sample_w)(c, None)
    coef, intercept = _full(params, present, n_classes)
    model.get_layer("classes").set_weights([coef.T.astype(np.float32), intercept.astype(np.float32)])
    p = _softmax(xt @ coef.T.astype(np.float32) + intercept)
    return {"C": [c], "loss": [float(np.mean(row_losses(p, y_train, weights[0])))],
            "accuracy": [float(np.mean(p.argmax(1) == y_train))], "seconds": [time.perf_counter() - t0], "best": 0}


def _walk_decades(attempt, tried: dict, rival: np.ndarray | None) -> bool:
    """Try every other C from the strongest regularisation, warm-started, until validation loss rises
    (it has one minimum along the path). Returns True when stopped early, behind `rival`."""
    losses = []
    for i in range(0, len(C_GRID), 2):
        start = tried[i - 2][3] if i >= 2 else None
        losses.append(attempt(i, start))
        if len(losses) > 1 and losses[-1] > min(losses[:-1]):
            return False
        if rival is not None and _cannot_catch_up(losses, tried[i][4] - rival):
            return True
    return False


def _refine(attempt, tried: dict, rival: np.ndarray | None) -> None:
    """Try the half-decades either side of the best decade, each warm-started from the best decade's solution."""
    best = min(tried, key=lambda i: tried[i][0]["val_loss"])
    loss = lambda i: tried[i][0]["val_loss"]   # noqa: E731
    if rival is not None and best - 2 in tried and best + 2 in tried:
        # were validation loss convex in log C, a half-decade step could gain at most half the larger rise to
        # the decades either side (f(-1) >= f(0) - (f(2) - f(0)) / 2): not enough if clearly behind by more
        gain = 0.5 * (max(loss(best - 2), loss(best + 2)) - loss(best))
        if clearly_behind(tried[best][4] - rival, gain):
            return
    for i in (best - 1, best + 1):
        if 0 <= i < len(C_GRID) and i not in tried:
            attempt(i, tried[best][3])


def _cannot_catch_up(losses: list[float], behind: np.ndarray) -> bool:
    """Whether a path whose validation losses fall as `losses` did, now `behind` the rival row by row (its
    per-row losses minus the rival's), will stay behind it.

    An assumption, not a bound: the gains along the path shrink at least geometrically once they start
    to shrink (near its minimum a smooth loss converges faster than that), so the rest of the path is
    taken to gain at most twice what a geometric series with the last two gains' ratio would (anything
    while the gains have not started to shrink); and the probe must be behind by more than that plus two
    standard errors of the row-by-row difference, so that noise on a small validation split never
    decides."""
    if len(losses) < 3:
        return False
    previous, last = losses[-3] - losses[-2], losses[-2] - losses[-1]
    if not 0 < last < previous:
        return False
    ratio = last / previous
    return clearly_behind(behind, 2 * last * ratio / (1 - ratio))


def clearly_behind(behind: np.ndarray, still_to_gain: float = 0.0, errors: float = 2.0) -> bool:
    """Mean of `behind` (a model's per-row losses minus another's) above `still_to_gain` by more than `errors`
    standard errors: a paired comparison, False on fewer than two rows."""
    if len(behind) < 2:
        return False
    standard_error = float(np.std(behind, ddof=1)) / np.sqrt(len(behind))
    return float(np.mean(behind)) - still_to_gain > errors * standard_error


class _Solver:
    """L-BFGS on scikit-learn's logistic regression objective, scaled by the total sample weight:
    mean weighted cross-entropy + |W|^2 / (2 C sum(w)), intercepts unregularised."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, sample_w: np.ndarray | None):
        self.x, self.y, self.k = x, y, n_classes
        self.w = np.ones(len(y)) if sample_w is None else sample_w
        self.total = float(self.w.sum())
        self.weighted, self.row_w = sample_w is not None, self.w.astype(np.float32)[:, None]
        self.evaluations = 0

    def __call__(self, c: float, start: np.ndarray | None) -> np.ndarray:
        from scipy.optimize import minimize

        d = self.x.shape[1]
        x0 = np.zeros((d + 1) * self.k) if start is None else start
        result = minimize(self._loss_grad, x0, args=(1.0 / (c * self.total),), jac=True, method="L-BFGS-B",
                          options=dict(maxiter=MAX_ITER, gtol=TOL, ftol=64 * np.finfo(float).eps))
        if result.nit >= MAX_ITER:
            log.warning("linear probe: L-BFGS reached %d iterations at C=%g without converging", MAX_ITER, c)
        elif not result.success:   # e.g. a line search that float32 rounding ended before the gradient tolerance
            log.debug("linear probe at C=%g: %s after %d iterations", c, result.message, result.nit)
        return result.x

    def _loss_grad(self, params: np.ndarray, alpha: float):
        # float32 products and softmax (the rows are float32 already); sums of the loss in float64
        self.evaluations += 1
        d = self.x.shape[1]
        weights = params.reshape(d + 1, self.k)
        z = self.x @ weights[:d].astype(np.float32) + weights[d].astype(np.float32)
        z -= z.max(axis=1, keepdims=True)
        rows = np.arange(len(self.y))
        picked = z[rows, self.y].astype(np.float64)
        np.maximum(z, -60.0, out=z)    # products with subnormal float32 (below 1e-38) run at a fraction of the speed
        np.exp(z, out=z)
        norm = z.sum(axis=1, keepdims=True)
        loss = float(self.w @ (np.log(norm[:, 0]).astype(np.float64) - picked)) / self.total
        z /= norm                      # probabilities
        z[rows, self.y] -= 1.0         # minus the one-hot labels: the gradient of the loss by the logits
        if self.weighted:
            z *= self.row_w
        grad = np.empty_like(weights)
        grad[:d] = (self.x.T @ z).astype(np.float64) / self.total + alpha * weights[:d]
        grad[d] = z.sum(axis=0, dtype=np.float64) / self.total
        return loss + 0.5 * alpha * float(np.sum(weights[:d] ** 2)), grad.ravel()


def _figures(xt, yt, xv, yv, coef, intercept, weights) -> tuple[dict, np.ndarray]:
    """Training and validation loss and accuracy (validation loss and balanced accuracy class-weighted
    where `weights` are given), and the validation rows' (weighted) losses."""
    out = {}
    for name, x, y, w in (("", xt, yt, weights[0]), ("val_", xv, yv, weights[1])):
        p = _softmax(x @ coef.T.astype(np.float32) + intercept)
        rows = row_losses(p, y, w)
        out[f"{name}loss"] = float(np.mean(rows))
        out[f"{name}accuracy"] = float(np.mean(p.argmax(1) == y))
        if w is not None:
            out[f"{name}balanced_accuracy"] = float(np.average(p.argmax(1) == y, weights=w[y]))
    return out, rows


def _full(params: np.ndarray, present: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_classes, d) weights and (n_classes,) biases from the solution over the classes `present`; a class
    never seen in training gets a -inf-like bias, so it is never predicted."""
    weights = params.reshape(-1, len(present))
    coef = np.zeros((n_classes, weights.shape[0] - 1))
    intercept = np.full(n_classes, -1e4)
    coef[present], intercept[present] = weights[:-1].T, weights[-1]
    return coef, intercept


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
