"""--refit: validation chooses the setting, then that setting is trained again on train + validation and only that
model sees the test split."""

import numpy as np
import pytest

from featcache.errors import BadInputError
from heads import train as ht
from heads.fit import _stats_of
from heads.metrics import predict
from heads.train import TrainConfig
from tests.heads.test_train import blob_data


def seen_by_test(monkeypatch):
    seen = []
    real = ht.predict
    monkeypatch.setattr(ht, "predict", lambda model, x, bs: seen.append(x) or real(model, x, bs))
    return seen


def accuracy_of(model, data) -> float:
    return float(np.mean(predict(model, data.x_test, 64).argmax(1) == data.y_test))


@pytest.mark.slow
def test_refit_trains_the_chosen_epochs_on_every_row_and_tests_that_model_once(monkeypatch):
    seen, data = seen_by_test(monkeypatch), blob_data(noise=2.0)
    result = ht.train(data, TrainConfig(model="dense", units=(16,), epochs=15, batch_size=32, refit=True),
                      runs_dir=None, progress=False)
    m = result.metrics
    assert len(seen) == 1 and seen[0] is data.x_test
    assert m["n_train"] + m["n_val"] == 300 and m["refit"]["rows"] == 300
    assert m["refit"]["epochs"] == m["best_epoch"], "the epochs validation chose, not chosen again"
    # standardised on every training row (the choosing fit standardised on its training rows only)
    mean, _ = _stats_of(result.model.get_layer("standardise"))
    np.testing.assert_allclose(mean, data.x_train.astype(np.float64).mean(axis=(0, 1, 2)), rtol=1e-3, atol=1e-3)
    assert m["test_accuracy"] == pytest.approx(accuracy_of(result.model, data)), "the saved model is the tested one"


@pytest.mark.parametrize("model, kept", [("linear", ("C",)), ("knn", ("k", "temperature", "smoothing"))])
def test_refit_keeps_the_setting_validation_chose(model, kept):
    data = blob_data(noise=2.0)
    plain = ht.train(data, TrainConfig(model=model), runs_dir=None, progress=False)
    refitted = ht.train(data, TrainConfig(model=model, refit=True), runs_dir=None, progress=False)
    for key in kept:
        assert refitted.metrics["refit"][key] == refitted.metrics[key] == plain.metrics[key]
    assert refitted.metrics["val_loss"] == pytest.approx(plain.metrics["val_loss"]), "validation figures unchanged"
    assert refitted.metrics["refit"]["rows"] == 300
    if model == "knn":
        assert refitted.model.get_layer("knn").bank.shape[0] == 300
    assert refitted.metrics["test_accuracy"] == pytest.approx(accuracy_of(refitted.model, data))


@pytest.mark.slow
def test_refit_of_auto_refits_the_head_it_chose(tmp_path):
    data = blob_data(noise=2.0)
    result = ht.train(data, TrainConfig(model="auto", units=(16,), epochs=10, batch_size=32, refit=True), runs_dir=tmp_path,
                      progress=False)
    m = result.metrics
    assert m["chosen"] in ("conv", "linear") and ("C" in m["refit"]) == (m["chosen"] == "linear")
    assert "refitted with that setting on training + validation (300 rows)" in \
        (result.run_dir / "classification_report.txt").read_text()


def test_refit_is_refused_for_finetune_in_one_line():
    with pytest.raises(BadInputError, match="--refit does not apply to --head finetune"):
        TrainConfig(model="finetune", refit=True)
