"""The kNN head: DINO's and VISSL's weighted k-nearest-neighbour classifier on cached features.

Pooled features are standardised (training statistics) and L2-normalised, so that a dot product is a
cosine similarity. A query's k most similar training rows vote for their classes, each with weight
exp(similarity / temperature) (times its class weight, heads.balance); the class probabilities are the
normalised votes, mixed with a little of the uniform distribution (`smoothing`) so that a class no
neighbour voted for costs a finite loss. k, temperature and smoothing are chosen by validation loss,
like every other head's setting, so the kNN head competes on the same footing.

Search is exact: batched matrix products against every training row, in NumPy while choosing and in
the saved Keras model (`KnnVote`, which holds the training rows as weights) when predicting. That is
n_train x dim floats in the model and n_train x dim multiply-adds per query: fine for the pooled
features of a few hundred thousand images; beyond it an approximate index (faiss-cpu, on the package
index) would replace the products.
"""

from __future__ import annotations

import time

import keras
import numpy as np
from keras import ops

from heads.metrics import row_losses

K_GRID = (5, 10, 20, 50, 100)
TEMPERATURE_GRID = (0.02, 0.05, 0.07, 0.1, 0.2)   # DINO's k=20, T=0.07 among them
SMOOTHING_GRID = (0.001, 0.01, 0.1)
#: Queries per similarity product while choosing: (QUERY_BATCH x n_train) float32 at a time.
QUERY_BATCH = 512


@keras.saving.register_keras_serializable(package="featcache")
class KnnVote(keras.layers.Layer):
    """Class probabilities from a temperature-weighted vote of the k most similar rows of a bank.

    Inputs are L2-normalised vectors; the bank (the training rows, normalised the same way), its labels
    and the class weights are non-trainable weights, saved with the model."""

    def __init__(self, bank_size: int, n_classes: int, k: int = 20, temperature: float = 0.07,
                 smoothing: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        self.bank_size, self.n_classes = int(bank_size), int(n_classes)
        self.k, self.temperature, self.smoothing = int(k), float(temperature), float(smoothing)

    def build(self, input_shape):
        self.bank = self.add_weight(shape=(self.bank_size, input_shape[-1]), initializer="zeros",
                                    trainable=False, name="bank")
        self.bank_labels = self.add_weight(shape=(self.bank_size,), initializer="zeros", dtype="int32",
                                           trainable=False, name="bank_labels")
        self.class_weights = self.add_weight(shape=(self.n_classes,), initializer="ones", trainable=False,
                                             name="class_weights")

    def call(self, x):
        similarity = ops.matmul(x, ops.transpose(self.bank))
        top, rows = ops.top_k(similarity, min(self.k, self.bank_size))
        labels = ops.take(self.bank_labels, rows)
        # relative to the nearest row: exp((s - s_max) / T) never underflows for the row that matters most
        weight = ops.exp((top - top[:, :1]) / self.temperature) * ops.take(self.class_weights, labels)
        votes = ops.sum(ops.one_hot(labels, self.n_classes) * weight[..., None], axis=1)
        p = votes / ops.maximum(ops.sum(votes, axis=-1, keepdims=True), 1e-30)
        return (1.0 - self.smoothing) * p + self.smoothing / self.n_classes

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.n_classes)

    def get_config(self):
        return {**super().get_config(), "bank_size": self.bank_size, "n_classes": self.n_classes, "k": self.k,
                "temperature": self.temperature, "smoothing": self.smoothing}


def vote_probabilities(top: np.ndarray, labels: np.ndarray, n_classes: int, *, k: int, temperature: float,
                       smoothing: float, class_weights: np.ndarray | None = None) -> np.ndarray:
    """What `KnnVote` computes, in NumPy, from the similarities `top` (n, >=k, most similar first) and labels."""
    top, labels = top[:, :k], labels[:, :k]
    weight = np.exp((top - top[:, :1]) / temperature)
    if class_weights is not None:
        weight = weight * class_weights[labels]
    votes = np.zeros((len(top), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(top)), top.shape[1]), labels.ravel()), weight.ravel())
    p = votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-30)
    return (1.0 - smoothing) * p + smoothing / n_classes


def nearest(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, bank rows) of the `k` most similar bank rows of each query, most similar first."""
    k = min(k, len(bank))
    sims, rows = [], []
    for i in range(0, len(queries), QUERY_BATCH):
        s = queries[i:i + QUERY_BATCH] @ bank.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < len(bank) else np.tile(np.arange(len(bank)), (len(s), 1))
        part_s = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-part_s, axis=1, kind="stable")
        sims.append(np.take_along_axis(part_s, order, axis=1))
        rows.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(sims), np.concatenate(rows)


def fit_knn(fit_model, x_fit, y, tr, va, *, n_classes: int, weights=(None, None)) -> dict:
    """Fill the model's bank with the training rows `tr` and choose k, temperature and smoothing by the
    (class-weighted, with `weights`) validation loss on rows `va`. Returns one history row per setting."""
    bank, queries = fill_bank(fit_model, x_fit, y, tr, n_classes, weights[0]), _embed(fit_model, x_fit, va)
    vote = fit_model.get_layer("knn")
    class_w = weights[0] if weights[0] is not None else np.ones(n_classes, np.float32)
    top, rows = nearest(queries, bank, max(K_GRID))
    labels, y_val = y[tr][rows], y[va]
    history = {key: [] for key in ("k", "temperature", "smoothing", "val_loss", "val_accuracy", "seconds")}
    for k in sorted({min(k, len(tr)) for k in K_GRID}):
        for t in TEMPERATURE_GRID:
            for s in SMOOTHING_GRID:
                t0 = time.perf_counter()
                p = vote_probabilities(top, labels, n_classes, k=k, temperature=t, smoothing=s, class_weights=class_w)
                _record(history, p, y_val, weights[1], k=k, temperature=t, smoothing=s)
                history["seconds"].append(time.perf_counter() - t0)
    history["best"] = int(np.argmin(history["val_loss"]))
    vote.k, vote.temperature, vote.smoothing = (history[key][history["best"]] for key in ("k", "temperature",
                                                                                         "smoothing"))
    return history


def refit_knn(fit_model, x_fit, y, rows: np.ndarray, *, n_classes: int, weights=(None, None), setting: dict) -> dict:
    """The bank filled with rows `rows` (train + validation), the vote at the chosen `setting` (k, temperature,
    smoothing): a refit chooses nothing. Returns a history of one row."""
    t0 = time.perf_counter()
    fill_bank(fit_model, x_fit, y, rows, n_classes, weights[0])
    vote = fit_model.get_layer("knn")
    vote.k, vote.temperature, vote.smoothing = (setting[key] for key in ("k", "temperature", "smoothing"))
    return {**{key: [setting[key]] for key in ("k", "temperature", "smoothing")},
            "seconds": [time.perf_counter() - t0], "best": 0}


def fill_bank(fit_model, x_fit, y, rows: np.ndarray, n_classes: int, class_weights=None) -> np.ndarray:
    """Put rows `rows` (their normalised vectors and labels) in the vote's bank, with the class weights; return
    the bank. A refit fills it with train + validation and keeps the vote's k, temperature and smoothing."""
    bank, vote = _embed(fit_model, x_fit, rows), fit_model.get_layer("knn")
    vote.bank.assign(bank)
    vote.bank_labels.assign(y[rows].astype(np.int32))
    vote.class_weights.assign(class_weights if class_weights is not None else np.ones(n_classes, np.float32))
    return bank


def _embed(fit_model, x, rows: np.ndarray) -> np.ndarray:
    """The normalised vectors the vote sees for rows `rows` of `x`: the model's layers before it, in order."""
    layers = [layer for layer in fit_model.layers if layer.name.startswith("pool_") or layer.name in
              ("standardise", "unit_norm")]
    out = []
    for i in range(0, len(rows), 4096):
        v = x[rows[i:i + 4096]].astype(np.float32)
        for layer in layers:
            v = layer(v)
        out.append(np.asarray(v, np.float32))
    return np.concatenate(out)


def _record(history: dict, p: np.ndarray, y: np.ndarray, class_weights, **setting) -> None:
    """One setting's row: its validation loss (class-weighted, as every head's) and accuracies."""
    for key, value in setting.items():
        history[key].append(value)
    hit = p.argmax(axis=1) == y
    history["val_loss"].append(float(np.mean(row_losses(p, y, class_weights))))
    history["val_accuracy"].append(float(hit.mean()))
    if class_weights is not None:
        history.setdefault("val_balanced_accuracy", []).append(float(np.average(hit, weights=class_weights[y])))
