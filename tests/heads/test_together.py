"""Heads fitted together (heads.together): the same trajectory as each alone, their own early stopping, learning
rates and pruning, and passes grouped by what the heads share."""

import keras
import numpy as np
import pytest

from heads.config import TrainConfig
from heads.data import split_indices
from heads.fit import fit
from heads.together import Restarts, _Patience, fit_together, groups
from heads.train import fit_and_choose, fit_and_choose_all
from tests.heads.test_train import blob_data

#: Heads trained together against the same heads alone, same seeds and batches: the only differences are the order
#: of float sums (the joint loss is one sum); measured at most 6e-7 on TensorFlow, 0 on JAX.
ATOL = 1e-5


def configs(**common):
    """Three dense heads with different sizes, dropout, rates, weight decay and patience."""
    return [TrainConfig(model="dense", units=(16, 8), lr=1e-3, patience=2, **common),
            TrainConfig(model="dense", units=(16,), lr=3e-3, dropout=0.4, patience=0, **common),
            TrainConfig(model="dense", units=(16,), lr=3e-2, l2=1e-3, patience=1, **common)]


def alone(data, cs, tr, va):
    out = []
    for c in cs:
        keras.utils.set_random_seed(c.seed)
        out.append(fit(data, c, tr, va, False))
    return out


def assert_same_fit(a, b):
    assert a.best == b.best
    # a training loss with weight decay adds the penalty at the epoch's end, not each batch's as Keras does
    for key in ("accuracy", "val_loss", "val_accuracy", *(("loss",) if not a.config.l2 else ())):
        np.testing.assert_allclose(a.history[key], b.history[key], atol=ATOL, rtol=1e-5)
    for x, y in zip(a.fit_model.get_weights(), b.fit_model.get_weights()):
        np.testing.assert_allclose(x, y, atol=ATOL)


def free_restarts(monkeypatch):
    """A pass that goes on without its stopped heads as soon as they hold half its weights, as it does where a start
    costs less than the epochs ahead would spend on them (large heads, many rows)."""
    monkeypatch.setattr(Restarts, "now", lambda self, seconds, stopped, ahead: stopped >= 0.5)


@pytest.mark.slow
def test_heads_trained_together_follow_each_heads_trajectory_alone_and_stop_on_their_own(monkeypatch):
    free_restarts(monkeypatch)   # the live heads go on as smaller models, their Adam state carried
    data = blob_data(n=3000, noise=3.0)
    cs = configs(epochs=12, batch_size=32)
    tr, va = split_indices(data.y_train, 0.1, 0, data.class_names)
    together = fit_together(data, cs, tr, va)
    for a, b in zip(alone(data, cs, tr, va), together):
        assert_same_fit(a, b)
    runs = [len(f.history["val_loss"]) for f in together]
    assert runs[0] == 12 and runs[1] < 12, runs   # the impatient head stopped while the others went on
    # after it stopped, fewer heads shared each epoch
    assert together[0].history["shared_by"][-1] < together[0].history["shared_by"][0]
    for f in together:   # each restored its own best epoch's weights (the validation loss it reports)
        assert f.history["val_loss"][f.best] == min(f.history["val_loss"][:len(f.history["val_loss"])])


def test_heads_that_grow_overconfident_score_validation_loss_as_each_alone():
    # a rate far too high: validation rows get probabilities below 1e-7 for their class. A head alone scores its
    # loss from its logits on TensorFlow (from clipped probabilities on JAX); the joint model clipped the heads'
    # probabilities on TensorFlow, and reported 10.2 where the head alone reported 6.65e9
    data = blob_data(n=200, noise=4.0)
    cs = [TrainConfig(model="dense", units=(16,), lr=lr, epochs=3, patience=10, batch_size=16) for lr in (3.0, 10.0)]
    tr, va = split_indices(data.y_train, 0.2, 0, data.class_names)
    for a, b in zip(alone(data, cs, tr, va), fit_together(data, cs, tr, va)):
        if keras.backend.backend() == "tensorflow":   # JAX clips alone too
            assert max(a.history["val_loss"]) > 20   # beyond -log(1e-7) = 16.1: the case that differed
        np.testing.assert_allclose(a.history["val_loss"], b.history["val_loss"], rtol=1e-4)
        np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-4)


def test_class_weighted_heads_report_their_figures_together_as_each_alone():
    # a pass logs every head's loss and (balanced) accuracy with one metric each: the weighted figures divide by
    # the rows (a loss, as Keras reports it) or by the weights (the balanced accuracy, a weighted metric)
    data = blob_data(n=300, noise=3.0)
    keep = np.flatnonzero((data.y_train != 2) | (np.arange(len(data.y_train)) % 5 == 0))   # class c rare
    data = type(data)(data.x_train[keep], data.y_train[keep], data.x_test, data.y_test, data.class_names,
                      data.kind, provenance=data.provenance)
    cs = [TrainConfig(model="dense", units=(16,), lr=lr, epochs=4, patience=10, batch_size=16,
                      class_weight="balanced") for lr in (1e-3, 1e-2)]
    tr, va = split_indices(data.y_train, 0.2, 0, data.class_names)
    for a, b in zip(alone(data, cs, tr, va), fit_together(data, cs, tr, va)):
        for key in ("loss", "accuracy", "balanced_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy"):
            np.testing.assert_allclose(a.history[key], b.history[key], atol=ATOL, rtol=1e-5, err_msg=key)
        assert a.history["balanced_accuracy"] != a.history["accuracy"]


@pytest.mark.slow
def test_a_pruned_head_stops_moving_while_the_others_train():
    data = blob_data(n=600)
    cs = configs(epochs=6, batch_size=32)
    tr, va = split_indices(data.y_train, 0.1, 0, data.class_names)
    seen = []

    def prune(epoch, figures):
        seen.append((epoch, sorted(figures)))
        return {1} if epoch == 1 else set()

    together = fit_together(data, cs, tr, va, on_epoch=prune)
    # every head still training is asked about at once, each epoch; the pruned head not again
    assert seen[:3] == [(0, [0, 1, 2]), (1, [0, 1, 2]), (2, [0, 2])]
    assert len(together[1].history["val_loss"]) == 2 and len(together[0].history["val_loss"]) == 6
    x = data.x_train[va].astype(np.float32).mean(axis=(1, 2))
    # the pruned head's weights are those its last epoch ended with: its predictions match a head fitted for 2 epochs
    keras.utils.set_random_seed(0)
    short = fit(data, TrainConfig(**{**cs[1].__dict__, "epochs": 2}), tr, va, False)
    for a, b in zip(together[1].fit_model.get_weights(), short.fit_model.get_weights()):   # BatchNorm's too
        np.testing.assert_allclose(a, b, atol=ATOL)
    np.testing.assert_allclose(together[1].fit_model.predict_on_batch(x), short.fit_model.predict_on_batch(x),
                               atol=ATOL)


def test_passes_group_heads_on_the_same_input_and_batches():
    data = blob_data(n=60)
    cs = [TrainConfig(model="dense"), TrainConfig(model="dense", lr=1e-2, units=(8,)),
          TrainConfig(model="dense", pooling="flatten"), TrainConfig(model="conv"),
          TrainConfig(model="dense", batch_size=128), TrainConfig(model="linear"),
          TrainConfig(model="dense", pooling="max")]
    assert groups(cs, data) == [[0, 1], [2, 3], [4], [5], [6]]
    with pytest.raises(ValueError, match="one pass"):
        fit_together(data, [cs[0], cs[2]], np.arange(50), np.arange(50, 60))


@pytest.mark.slow
def test_auto_configurations_fitted_together_choose_as_each_alone():
    data = blob_data(n=400)
    cs = [TrainConfig(model="auto", dropout=d, epochs=5) for d in (0.1, 0.5)]
    many = fit_and_choose_all(data, cs)
    for config, v in zip(cs, many):
        keras.utils.set_random_seed(config.seed)
        one = fit_and_choose(data, config, progress=False)
        assert v.chosen.config.model == one.chosen.config.model
        np.testing.assert_allclose(v.chosen.val_loss, one.chosen.val_loss, atol=ATOL, rtol=1e-5)
    # the probe is the same for both configurations: fitted once
    probes = [f for v in many for f in v.fits if f.config.model == "linear"]
    assert len(probes) == 2 and probes[0] is probes[1]


def test_a_large_head_that_stops_ends_the_segment_though_most_heads_go_on(monkeypatch):
    # where starts are cheap, the pass goes on without it at once: the stopped share is counted by weights (a dense
    # head's arithmetic per row), not by heads (in a grid the large heads stop first)
    free_restarts(monkeypatch)
    data = blob_data(n=300)
    cs = [TrainConfig(model="dense", units=(64, 64), epochs=4, batch_size=32),
          *[TrainConfig(model="dense", units=(4,), lr=lr, epochs=4, batch_size=32) for lr in (1e-3, 3e-3)]]
    tr, va = split_indices(data.y_train, 0.1, 0, data.class_names)
    together = fit_together(data, cs, tr, va, on_epoch=lambda epoch, figures: {0} if epoch == 0 else set())
    assert together[0].history["shared_by"] == [3]
    assert [f.history["shared_by"] for f in together[1:]] == [[3, 2, 2, 2]] * 2


def test_stopped_heads_are_kept_while_a_new_model_would_cost_more_than_they_do():
    # 270 rows: an epoch costs milliseconds, starting a smaller model (tracing, compiling) about a second
    data = blob_data(n=300)
    cs = [TrainConfig(model="dense", units=(64, 64), epochs=4, batch_size=32),
          *[TrainConfig(model="dense", units=(4,), lr=lr, epochs=4, batch_size=32) for lr in (1e-3, 3e-3)]]
    tr, va = split_indices(data.y_train, 0.1, 0, data.class_names)
    together = fit_together(data, cs, tr, va, on_epoch=lambda epoch, figures: {0} if epoch == 0 else set())
    assert [f.history["shared_by"] for f in together] == [[3], [3, 3, 3, 3], [3, 3, 3, 3]]
    keras.utils.set_random_seed(0)   # the stopped head kept the weights it stopped with (BatchNorm's too)
    short = fit(data, TrainConfig(**{**cs[0].__dict__, "epochs": 1}), tr, va, False)
    for a, b in zip(together[0].fit_model.get_weights(), short.fit_model.get_weights()):
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_a_restart_comes_once_half_the_weights_stopped_if_the_epochs_surely_ahead_pay_for_it():
    restarts = Restarts([])
    assert not restarts.now(5.0, 0.0, 10)   # nothing stopped: no restart, whatever a start costs
    assert not restarts.now(1.0, 0.0, 10) and restarts.start_cost == 4.0   # the first epoch traced: a start is 4 s
    assert not restarts.now(1.0, 0.4, 100)   # less than half the weights stopped: no restart, though it would pay
    # half the weights stopped: 0.5 s an epoch; a restart once 8 epochs are sure to come, not 7
    assert not restarts.now(1.0, 0.5, 7) and restarts.now(1.0, 0.5, 8)
    restarts.begin()   # the next model: its start measured again, the last one's cost used until then
    assert not restarts.now(3.0, 0.9, 10) and restarts.start_cost == 4.0   # its first epoch: 0.9 x 0 s to gain
    assert restarts.now(1.1, 0.9, 2) and restarts.start_cost == 1.9   # 0.99 s an epoch, for 2 epochs


def test_stopped_heads_kept_for_longer_than_they_had_to_bring_a_restart_once_they_have_cost_a_start():
    # one epoch at a time is all the live heads' early stopping promises; they train on, and what the stopped
    # heads waste adds up: 0.5 s an epoch against a 4 s start, so the restart comes after 7 epochs wasted
    restarts = Restarts([])
    restarts.now(5.0, 0.0, 10)
    assert [restarts.now(1.0, 0.5, 1) for _ in range(8)] == [False] * 7 + [True]


def test_the_epochs_a_pass_surely_runs_are_those_its_heads_early_stopping_cannot_end():
    watched = _Patience(None, patience=3, start_from=2)
    assert watched.ahead(0) == 5   # epochs 1-5: nothing counts before epoch 2, then 3 epochs without a better loss
    watched.wait = 1
    assert watched.ahead(4) == 2
    watched.patience, watched.wait = 0, 0
    assert watched.ahead(4) == 1   # a live head trains its next epoch


def test_a_pruner_never_judges_auto_by_one_of_its_candidates_epochs():
    # auto's score is the best of its candidates, the probe among them, fitted after the pass: its dense
    # candidate's epochs are not its figures, so a search's pruner is not shown them and cannot stop it
    data = blob_data(n=300)
    cs = [TrainConfig(model="auto", epochs=4, batch_size=32), TrainConfig(model="dense", epochs=4, batch_size=32)]
    shown = []

    def prune_everything(epoch, figures):
        shown.append(set(figures))
        return set(figures)

    auto, dense = fit_and_choose_all(data, cs, on_epoch=prune_everything)
    assert shown and all(s == {1} for s in shown), shown
    assert len(dense.chosen.history["val_loss"]) == 1   # the other trial was pruned after its first epoch
    assert all(len(f.history["val_loss"]) == 4 for f in auto.fits if f.config.model != "linear")
