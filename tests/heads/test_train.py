import json

import numpy as np
import pytest

from featcache.errors import BadInputError
from heads import train as ht
from heads.builders import MODELS
from heads.provenance import Provenance
from heads.reports import collect_runs, format_table
from heads.train import TrainConfig, TrainData, split_indices


def layer_summary(model):
    return [(type(layer).__name__, getattr(layer, "units", None)) for layer in model.layers]


def test_dense_head_matches_the_spec():
    model = MODELS["dense"].build((4, 4, 256), 10)
    assert layer_summary(model) == [("InputLayer", None), ("GlobalAveragePooling2D", None), ("Normalization", None),
                                    ("BatchNormalization", None), ("Dense", 400), ("Dense", 256), ("Dense", 256),
                                    ("Dropout", None), ("Dense", 10)]
    assert model.get_layer("dropout").rate == 0.2
    standardise = 2 * 256 + 1   # mean, variance (set from the training rows) and a count
    assert model.count_params() == standardise + 4 * 256 + (256 * 400 + 400) + (400 * 256 + 256) + (256 * 256 + 256) \
        + (256 * 10 + 10)
    assert model.layers[-1].activation.__name__ == "softmax"
    flat = MODELS["dense"].build((4, 4, 256), 10, pooling="flatten", batchnorm=False, units=(32,), dropout=0.5)
    assert [type(x).__name__ for x in flat.layers] == ["InputLayer", "Flatten", "Normalization", "Dense", "Dropout",
                                                       "Dense"]
    assert flat.count_params() == 2 * 4096 + 1 + 4096 * 32 + 32 + 32 * 10 + 10


def test_linear_probe_is_linear():
    model = MODELS["linear"].build((4, 4, 256), 10)
    dense = [x for x in model.layers if type(x).__name__ == "Dense"]
    assert len(dense) == 1 and dense[0].units == 10


def test_baselines_match_the_spec():
    cnn = MODELS["cnn"].build((32, 32, 3), 10)
    names = [type(x).__name__ for x in cnn.layers]
    assert names == ["InputLayer", "RandomFlip", "RandomRotation", "RandomZoom", "Rescaling", "Conv2D", "MaxPooling2D",
                     "Conv2D", "MaxPooling2D", "Dropout", "Flatten", "Dense", "Dense"]
    convs = [x for x in cnn.layers if type(x).__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [64, 128] and all(c.kernel_size == (3, 3) for c in convs)
    assert cnn.count_params() == (3 * 9 * 64 + 64) + (64 * 9 * 128 + 128) + (8 * 8 * 128 * 200 + 200) + (200 * 10 + 10)
    ann = MODELS["ann"].build((32, 32, 3), 10)
    assert [x.units for x in ann.layers if type(x).__name__ == "Dense"] == [512, 256, 128, 10]
    assert MODELS["ann"].optimizer == "sgd" and MODELS["cnn"].optimizer == "adam"


def test_split_is_deterministic_disjoint_and_stratified():
    y = np.repeat(np.arange(5), 40)
    tr, va = split_indices(y, 0.1, seed=3)
    tr2, va2 = split_indices(y, 0.1, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(va) == 20 and not set(tr) & set(va) and len(tr) + len(va) == 200
    assert np.array_equal(np.bincount(y[va]), [4] * 5)
    assert not np.array_equal(va, split_indices(y, 0.1, seed=4)[1])


def blob_data(n=300, n_test=90, noise=1.0, seed=0, random_labels=False):
    """Separable gaussian blobs in a (2, 2, 8) 'feature map'."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, 2, 2, 8))

    def make(m):
        y = rng.integers(0, 3, m)
        x = centres[y] + rng.normal(0, noise, (m, 2, 2, 8))
        return x.astype(np.float16), (rng.integers(0, 3, m) if random_labels else y)

    (x, y), (xt, yt) = make(n), make(n_test)
    return TrainData(x, y, xt, yt, ("a", "b", "c"), "features", provenance=Provenance(other={"test": True}))


@pytest.mark.slow
def test_heads_learn_and_test_is_predicted_exactly_once(monkeypatch, tmp_path):
    seen = []
    real = ht.predict
    monkeypatch.setattr(ht, "predict", lambda model, x, bs: seen.append(x) or real(model, x, bs))
    data = blob_data()
    result = ht.train(data, TrainConfig(units=(16,), epochs=30, batch_size=32), runs_dir=tmp_path, progress=False)
    assert len(seen) == 1 and seen[0] is data.x_test
    m = result.metrics
    assert m["test_accuracy"] > 0.9 and m["n_train"] + m["n_val"] == 300 and m["n_test"] == 90
    assert set(m) >= {"test_accuracy", "test_loss", "val_accuracy", "macro_f1", "per_class", "best_epoch",
                      "epochs_run", "n_train", "n_val", "n_test", "seconds", "seconds_per_epoch"}


@pytest.mark.slow
def test_early_stopping_restores_the_best_epoch():
    """Random labels: validation loss rises while the head memorises; the returned weights must be the best epoch's."""
    data = blob_data(n=400, random_labels=True)
    config = TrainConfig(units=(256, 256), dropout=0.0, epochs=24, patience=24, batch_size=32, lr=3e-3)
    result = ht.train(data, config, runs_dir=None, progress=False)
    val_loss = result.history["val_loss"]
    _, start = ht.fit_schedule(360, 32, 24)   # epochs before `start` come before the step floor: never chosen
    assert 0 < start < 20
    best = start + int(np.argmin(val_loss[start:]))
    assert best < len(val_loss) - 1 and val_loss[-1] > val_loss[best] + 0.05, val_loss
    _, va = split_indices(data.y_train, config.val_fraction, config.seed)
    probs = ht.predict(result.model, data.x_train[va], 64)
    loss_now = -np.mean(np.log(np.clip(probs[np.arange(len(va)), data.y_train[va]], 1e-7, 1)))
    assert loss_now == pytest.approx(val_loss[best], abs=1e-3)
    assert result.metrics["best_epoch"] == best + 1


@pytest.mark.slow
def test_run_records_agree_with_the_saved_model(tmp_path):
    import keras

    data = blob_data()
    result = ht.train(data, TrainConfig(units=(16,), epochs=3, name="my run"), runs_dir=tmp_path, progress=False)
    run = result.run_dir
    assert run.parent == tmp_path and run.name.endswith("-my-run")
    for name in ("config.json", "metrics.json", "history.csv", "classification_report.txt", "confusion_matrix.png",
                 "curves.png", "model.keras"):
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["units"] == [16] and config["epochs"] == 3 and config["data"] == {"test": True}
    model = keras.models.load_model(run / "model.keras", safe_mode=True)
    pred = ht.predict(model, data.x_test, 64).argmax(1)
    assert metrics["test_accuracy"] == pytest.approx(np.mean(pred == data.y_test))
    assert len((run / "history.csv").read_text().splitlines()) == metrics["epochs_run"] + 1


@pytest.mark.parametrize("options, message", [
    (dict(units=()), "--units"), (dict(units=(0, 4)), "--units"), (dict(dropout=1.0), "--dropout"),
    (dict(val_fraction=0.0), "--val-fraction"), (dict(val_fraction=1.0), "--val-fraction"),
    (dict(model="resnet"), "model must be one of"), (dict(batch_size=0), "--batch-size"),
])
def test_bad_config_is_refused(options, message):
    with pytest.raises(BadInputError, match=message):
        TrainConfig(**options)


def test_pixels_model_refuses_features():
    with pytest.raises(BadInputError, match="'cnn' trains on pixels, but the data holds features"):
        ht.train(blob_data(), TrainConfig(model="cnn"), runs_dir=None)


def fake_run(runs_dir, name, val, test):
    d = runs_dir / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"val_accuracy": val, "test_accuracy": test, "epochs_run": 5,
                                                "best_epoch": 3, "seconds": 1.0, "seconds_per_epoch": 0.2}))
    (d / "config.json").write_text(json.dumps({"model": "dense", "pooling": "gap", "batchnorm": True,
                                               "units": [400], "dropout": 0.2}))


def test_runs_are_ordered_by_validation_never_test(tmp_path):
    fake_run(tmp_path, "a", val=0.70, test=0.90)
    fake_run(tmp_path, "b", val=0.80, test=0.60)
    fake_run(tmp_path, "c", val=0.75, test=0.99)
    rows = collect_runs(tmp_path)
    assert [r["run"] for r in rows] == ["b", "c", "a"]
    table = format_table(rows, markdown=True)
    assert table.index("| b |") < table.index("| c |") < table.index("| a |")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "conv"])
def test_l2_lowers_the_kernels_norms(model):
    data = blob_data()
    norms = {}
    for l2 in (0.0, 0.5):
        config = TrainConfig(model=model, units=(16,), filters=8, epochs=8, patience=8, l2=l2)
        fitted = ht.train(data, config, runs_dir=None, progress=False).model
        norms[l2] = sum(float(np.sum(np.square(layer.kernel.numpy()))) for layer in fitted.layers
                        if type(layer).__name__ in ("Dense", "Conv2D"))
    assert norms[0.5] < 0.8 * norms[0.0], norms
    with pytest.raises(BadInputError, match="--l2 must be at least 0"):
        TrainConfig(l2=-1.0)


@pytest.mark.slow
def test_cosine_schedule_decays_the_learning_rate_to_zero(tmp_path):
    data = blob_data()
    result = ht.train(data, TrainConfig(units=(16,), epochs=4, patience=4, lr=1e-2, lr_schedule="cosine"),
                      runs_dir=tmp_path, progress=False)
    rates = result.history["learning_rate"]   # at each epoch's end: cos(pi * k / 4) halfway to 0
    assert rates == pytest.approx([1e-2 * (1 + np.cos(np.pi * k / 4)) / 2 for k in (1, 2, 3, 4)], abs=1e-7)
    assert "learning_rate" in (result.run_dir / "history.csv").read_text().splitlines()[0]
    constant = ht.train(data, TrainConfig(units=(16,), epochs=2, lr=1e-2), runs_dir=None, progress=False)
    assert constant.history["learning_rate"] == pytest.approx([1e-2, 1e-2])
    with pytest.raises(BadInputError, match="--lr-schedule"):
        TrainConfig(lr_schedule="linear")
