"""The kNN head: a temperature-weighted cosine vote of the k nearest training rows, k and temperature
chosen on validation, saved as one Keras model."""

import json

import numpy as np
import pytest

from heads import balance, knn
from heads import train as ht
from heads.train import TrainConfig
from tests.heads.test_balance import LONG_TAIL, overlapping


def reference(data, metrics, tr, class_weights=None):
    """Brute force in NumPy: standardise by the training rows, L2-normalise, sort every similarity."""
    mean, std = data.x_train[tr].mean(0), data.x_train[tr].std(0)
    unit = lambda x: (lambda z: z / np.linalg.norm(z, axis=1, keepdims=True))((x - mean) / std)   # noqa: E731
    bank, queries, labels = unit(data.x_train[tr]), unit(data.x_test), data.y_train[tr]
    k, t, s, n_classes = metrics["k"], metrics["temperature"], metrics["smoothing"], len(data.class_names)
    out = np.zeros((len(queries), n_classes))
    for i, q in enumerate(queries):
        sims = bank @ q
        for j in np.argsort(-sims)[:k]:
            out[i, labels[j]] += np.exp(sims[j] / t) * (1.0 if class_weights is None else class_weights[labels[j]])
    out /= out.sum(axis=1, keepdims=True)
    return (1 - s) * out + s / n_classes


@pytest.mark.parametrize("counts", [(60,) * 5, LONG_TAIL])
def test_knn_head_equals_a_brute_force_vote(counts, tmp_path):
    import keras

    import heads.knn  # noqa: F401  (what loading a kNN model needs)

    data = overlapping(counts, n_test_per_class=40, dim=12)
    result = ht.train(data, TrainConfig(model="knn"), runs_dir=tmp_path, progress=False)
    m = result.metrics
    tr, _ = ht.split_indices(data.y_train, 0.1, 0, data.class_names)
    weights = balance.class_weights(data.y_train[tr], len(counts)) if m["class_weight"] == "balanced" else None
    assert (weights is None) == (counts != LONG_TAIL)
    want = reference(data, m, tr, weights)
    got = result.model.predict(data.x_test, verbose=0)
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    assert m["test_accuracy"] == pytest.approx(np.mean(want.argmax(1) == data.y_test))
    loaded = keras.saving.load_model(result.run_dir / "model.keras", compile=False)   # what predict/export load
    assert np.mean(loaded.predict(data.x_test, verbose=0).argmax(1) == data.y_test) == pytest.approx(m["test_accuracy"])


def test_knn_chooses_its_setting_by_validation_loss(tmp_path):
    data = overlapping((60,) * 4, dim=12)
    result = ht.train(data, TrainConfig(model="knn"), runs_dir=tmp_path, progress=False)
    h, m = result.history, result.metrics
    assert len(h["val_loss"]) == len({min(k, m["n_train"]) for k in knn.K_GRID}) * len(knn.TEMPERATURE_GRID) * len(
        knn.SMOOTHING_GRID)
    assert m["val_loss"] == min(h["val_loss"]) and m["k"] in knn.K_GRID
    rows = (result.run_dir / "history.csv").read_text().splitlines()
    assert rows[0].startswith("setting,k,temperature,smoothing") and len(rows) == 1 + len(h["val_loss"])
    assert json.loads((result.run_dir / "metrics.json").read_text())["temperature"] == m["temperature"]
    assert (result.run_dir / "curves.png").stat().st_size > 0


def test_nearest_is_exact_across_query_batches(monkeypatch):
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(50, 4)), rng.normal(size=(7, 4))
    monkeypatch.setattr(knn, "QUERY_BATCH", 3)
    sims, rows = knn.nearest(queries, bank, 5)
    full = queries @ bank.T
    assert (rows == np.argsort(-full, axis=1)[:, :5]).all() and np.allclose(sims, np.sort(full, axis=1)[:, ::-1][:, :5])
    assert knn.nearest(queries, bank, 80)[0].shape == (7, 50)   # k above the bank: every row


def test_knn_on_the_cli_and_in_the_runs_table(tmp_path):
    from heads.reports import collect_runs, format_table

    ht.train(overlapping((40,) * 3, dim=8), TrainConfig(model="knn"), runs_dir=tmp_path, progress=False)
    table = format_table(collect_runs(tmp_path))
    assert "knn" in table and "k=" in table and "T=" in table
