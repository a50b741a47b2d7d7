"""Long-tailed training splits: class weights (auto, balanced, none) in every head, model choice by a
class-weighted validation loss, balanced accuracy in the records; the probe's own L-BFGS and its racing."""

import json

import numpy as np
import pytest

from heads import balance, probe
from heads import train as ht
from heads.provenance import Provenance
from heads.train import TrainConfig, TrainData


def overlapping(counts, n_test_per_class=200, dim=32, seed=0):
    """Gaussian classes that overlap (so the class prior sways the decision), `counts[c]` training rows of
    class c and a balanced test split, as (n, dim) vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (len(counts), dim))

    def make(y):
        return (centres[y] + rng.normal(0, 1.6, (len(y), dim))).astype(np.float32)

    y = np.repeat(np.arange(len(counts)), counts)
    yt = np.repeat(np.arange(len(counts)), n_test_per_class)
    return TrainData(make(y), y, make(yt), yt, tuple(f"c{i}" for i in range(len(counts))), "features",
                     provenance=Provenance(other={"synthetic": True}))


LONG_TAIL = (400, 200, 100, 50, 25, 12)


def test_class_weights_follow_the_counts_and_average_one():
    y = np.repeat([0, 1, 3], [60, 30, 10])
    w = balance.class_weights(y, 4)
    assert w == pytest.approx([100 / (3 * 60), 100 / (3 * 30), 0.0, 100 / (3 * 10)])
    assert w[y].mean() == pytest.approx(1.0)
    assert balance.resolve("auto", y, 4) == "balanced" and balance.imbalance(y, 4) == 6.0
    assert balance.resolve("auto", np.repeat([0, 1], [10, 9]), 2) == "none"
    assert balance.resolve("none", y, 4) == "none" and balance.resolve("balanced", np.arange(4), 4) == "balanced"


@pytest.mark.slow
def test_default_head_on_a_long_tail_beats_the_unweighted_probe_widely():
    data = overlapping(LONG_TAIL)
    default = ht.train(data, TrainConfig(model="auto"), runs_dir=None, progress=False).metrics
    unweighted = ht.train(data, TrainConfig(model="linear", class_weight="none"), runs_dir=None, progress=False).metrics
    balanced = ht.train(data, TrainConfig(model="linear"), runs_dir=None, progress=False).metrics
    assert default["class_weight"] == "balanced" and default["train_imbalance"] > 20
    assert unweighted["class_weight"] == "none"
    assert default["test_balanced_accuracy"] > unweighted["test_balanced_accuracy"] + 0.05
    assert balanced["test_balanced_accuracy"] > unweighted["test_balanced_accuracy"] + 0.05
    assert "val_balanced_accuracy" in default and "val_balanced_accuracy" not in unweighted


@pytest.mark.slow
def test_balanced_data_trains_exactly_as_without_weights():
    data = overlapping((60,) * 5)
    for model in ("auto", "knn"):
        auto = ht.train(data, TrainConfig(model=model), runs_dir=None, progress=False).metrics
        none = ht.train(data, TrainConfig(model=model, class_weight="none"), runs_dir=None, progress=False).metrics
        assert auto["class_weight"] == "none"
        for key in ("val_loss", "test_accuracy", "test_loss", "chosen", "C", "k"):
            assert auto.get(key) == none.get(key), key


@pytest.mark.slow
def test_keras_heads_receive_the_class_weights_and_validate_by_the_weighted_loss(monkeypatch):
    """The dense head's batches carry each row's class weight (training rows' weights from the training
    counts, validation rows' from the validation counts), and early stopping watches that weighted loss."""
    import keras

    seen = {}
    real_fit = keras.Model.fit

    def spy(self, x=None, validation_data=None, **kw):
        seen["train"] = [b for b in x.take(3)]
        seen["val"] = [b for b in validation_data]
        return real_fit(self, x, validation_data=validation_data, **kw)

    monkeypatch.setattr(keras.Model, "fit", spy)
    data = overlapping(LONG_TAIL)
    tr, va = ht.split_indices(data.y_train, 0.1, 0, data.class_names)
    result = ht.train(data, TrainConfig(model="dense", epochs=2, patience=0), runs_dir=None, progress=False)
    want_train, want_val = balance.class_weights(data.y_train[tr], 6), balance.class_weights(data.y_train[va], 6)
    for _, y, w in seen["train"]:
        assert np.allclose(w.numpy(), want_train[y.numpy()])
    y_val = np.concatenate([b[1].numpy() for b in seen["val"]])
    w_val = np.concatenate([b[2].numpy() for b in seen["val"]])
    assert np.allclose(w_val, want_val[y_val])
    model = result.model   # val_loss recorded = class-weighted mean cross-entropy of the restored model
    p = model.predict(data.x_train[va], verbose=0)
    weighted = np.average(-np.log(p[np.arange(len(va)), data.y_train[va]]), weights=want_val[data.y_train[va]])
    assert result.metrics["val_loss"] == pytest.approx(weighted, rel=1e-3)


def test_probe_solves_scikit_learns_objective_with_class_weights():
    """Our float32 L-BFGS reaches scikit-learn's LogisticRegression solution (class_weight included)."""
    from sklearn.linear_model import LogisticRegression

    data = overlapping(LONG_TAIL, dim=16)
    x, y = data.x_train.astype(np.float64), data.y_train
    w = balance.class_weights(y, 6)
    solver = probe._Solver(x.astype(np.float32), y, 6, w[y].astype(np.float64))
    params = solver(0.1, None)
    coef, intercept = probe._full(params, np.arange(6), 6)
    ref = LogisticRegression(C=0.1, class_weight=dict(enumerate(w)), max_iter=5000, tol=1e-8).fit(x, y)
    ours, theirs = probe._softmax(x @ coef.T + intercept), ref.predict_proba(x)
    assert np.abs(ours - theirs).max() < 5e-3   # both stop at a gradient of 1e-4, not at the optimum itself
    assert (ours.argmax(1) == theirs.argmax(1)).mean() > 0.99


def test_probe_missing_class_is_never_predicted_and_binary_works():
    data = overlapping((50, 50, 0 + 2), n_test_per_class=20, dim=8)
    keep = data.y_train != 2
    data.x_train, data.y_train = data.x_train[keep], data.y_train[keep]
    m = ht.train(data, TrainConfig(model="linear", val_fraction=0.2), runs_dir=None, progress=False).metrics
    assert m["per_class"]["c2"]["recall"] == 0.0 and sum(m["confusion_matrix"][i][2] for i in range(3)) == 0
    assert m["test_accuracy"] > 0.5


def test_probe_stops_once_clearly_behind_and_loses_as_it_would_have():
    tight = np.full(400, 0.5) + np.tile([-0.01, 0.01], 200)   # row-by-row differences of little noise
    assert probe._cannot_catch_up([1.0, 0.8, 0.7], tight + 0.3 - 0.5)       # gains 0.2, 0.1: at most 0.2 more...
    assert not probe._cannot_catch_up([1.0, 0.8, 0.7], tight + 0.1 - 0.5)   # ...so 0.1 behind may still win
    assert not probe._cannot_catch_up([1.0, 0.9, 0.8], tight + 0.5 - 0.5)   # gains not shrinking: anything may come
    noisy = np.tile([-2.0, 2.0], 10) + 0.15   # 0.15 behind on 20 rows whose differences spread by 2: noise
    assert probe._cannot_catch_up([1.0, 0.6, 0.55], np.full(20, 0.15)) and not probe._cannot_catch_up(
        [1.0, 0.6, 0.55], noisy)
    data = overlapping((500,) * 4, dim=8)
    tr, va = ht.split_indices(data.y_train, 0.1, 0, data.class_names)
    stub = type("M", (), {"get_layer": lambda self, name: type("L", (), {"set_weights": lambda s, w: None})()})()
    x = (data.x_train - data.x_train[tr].mean(0)) / data.x_train[tr].std(0)
    fit = lambda rival=None: probe.fit_linear_probe(stub, x[tr], data.y_train[tr], x[va], data.y_train[va],   # noqa: E731
                                                    n_classes=4, rival=rival)
    full = fit()
    raced = fit(np.full(len(va), min(full["val_loss"]) - 0.5))   # a rival far ahead on every row
    assert not full["raced"] and raced["raced"] and len(raced["C"]) < len(full["C"])
    kept = fit(np.full(len(va), min(full["val_loss"]) + 0.01))   # a race it wins is run to the end
    assert not kept["raced"] and kept["C"] == full["C"] and kept["val_loss"] == pytest.approx(full["val_loss"])


@pytest.mark.slow
def test_auto_records_a_probe_stopped_early(tmp_path):
    data = overlapping((300,) * 3, dim=8)
    data.x_train = np.concatenate([data.x_train, data.x_train ** 2], axis=1)   # the dense head wins this
    data.x_test = np.concatenate([data.x_test, data.x_test ** 2], axis=1)
    m = ht.train(data, TrainConfig(model="auto"), runs_dir=None, progress=False).metrics
    assert set(m["candidates"]) == {"dense", "linear"}
    assert m["chosen"] == min(m["candidates"], key=lambda k: m["candidates"][k]["val_loss"])


def test_runs_table_shows_balanced_accuracy_where_classes_are_imbalanced(tmp_path):
    from heads.reports import collect_runs, format_table

    ht.train(overlapping((60,) * 3, dim=8), TrainConfig(model="linear"), runs_dir=tmp_path, progress=False)
    balanced_only = format_table(collect_runs(tmp_path))
    assert "bal. acc" not in balanced_only
    run = ht.train(overlapping((200, 40, 10), dim=8), TrainConfig(model="linear"), runs_dir=tmp_path,
                   progress=False).run_dir
    table = format_table(collect_runs(tmp_path))
    assert "test bal. acc" in table and "macro-F1" in table
    m = json.loads((run / "metrics.json").read_text())
    assert f"{m['test_balanced_accuracy']:.4f}" in table and "classes weighted" in (
        run / "classification_report.txt").read_text()
    config = json.loads((run / "config.json").read_text())
    assert config["class_weight"] == "auto" and m["class_weight"] == "balanced"


def test_refinement_is_skipped_only_when_convexity_says_it_cannot_win():
    """Half-decades next to the best decade can gain at most half the larger rise to the decades either side
    (were validation loss convex in log C): refined when that could reach the rival, skipped when not."""
    def refine(rival_loss, right=0.9):
        rows = np.full(400, 0.5) + np.tile([-0.01, 0.01], 200)   # the best decade's rows: mean 0.5, little noise
        tried = {i: ({"val_loss": v}, None, None, None, rows + v - 0.5) for i, v in ((2, 1.0), (4, 0.5), (6, right))}
        calls = []
        probe._refine(lambda i, start: calls.append(i), tried, None if rival_loss is None else np.full(400, rival_loss))
        return calls

    assert refine(None) == [3, 5]
    assert refine(0.3) == [3, 5]    # 0.2 behind: a half step might gain up to 0.25
    assert refine(0.2) == []        # 0.3 behind: it cannot
    assert refine(0.35, right=0.6) == [3, 5]   # 0.15 behind, more than the smaller rise (0.1): may still win


def test_long_tail_table_refuses_options_it_sets_itself():
    from featcache.errors import BadInputError
    from heads.longtail import long_tail_table

    with pytest.raises(BadInputError, match="seed is set by the long-tail table"):
        long_tail_table("no-such-cache.h5", seed=3)
