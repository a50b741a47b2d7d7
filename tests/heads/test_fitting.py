"""heads.fitting: each kind of head says how it is fitted and what validation chose, so that refits, records and
the runs table never guess it from optimizer names or history keys."""

import pytest

from heads.builders import MODELS, fitting_of
from heads.fitting import C_PATH, EPOCHS, VOTE


@pytest.mark.parametrize("model, fitting", [("dense", EPOCHS), ("conv", EPOCHS), ("finetune", EPOCHS),
                                            ("ann", EPOCHS), ("cnn", EPOCHS), ("linear", C_PATH), ("knn", VOTE)])
def test_every_head_declares_its_fitting(model, fitting):
    assert MODELS[model].fitting is fitting


def test_what_validation_chose_and_how_it_reads():
    probe = {"C": [0.01, 0.1, 1.0], "val_loss": [0.9, 0.7, 0.8]}
    vote = {"k": [10, 20], "temperature": [0.07, 0.1], "smoothing": [0.0, 0.1], "val_loss": [0.5, 0.4]}
    assert C_PATH.chosen(probe, 1) == {"C": 0.1} and VOTE.chosen(vote, 1) == {"k": 20, "temperature": 0.1,
                                                                               "smoothing": 0.1}
    assert EPOCHS.chosen({"val_loss": [0.9, 0.8, 0.85]}, 1) == {"epochs": 2}   # a refit trains to the best epoch
    metrics = {"C": 0.1, "k": 20, "temperature": 0.1, "smoothing": 0.1, "best_epoch": 2, "epochs_run": 3}
    assert [f.setting(metrics) for f in (EPOCHS, C_PATH, VOTE)] == ["epoch 2", "C=0.1", "k=20 T=0.1"]
    assert C_PATH.described(metrics) == "L2 strength C=0.1 (2 of 3 tried)"
    assert [f.steps for f in (EPOCHS, C_PATH, VOTE)] == ["epoch", "C_tried", "setting"]


def test_a_run_on_disk_is_read_by_the_head_it_trained():
    assert fitting_of({"model": "auto"}, {"chosen": "linear"}) is C_PATH   # auto: the head it chose
    assert fitting_of({"model": "knn"}, {}) is VOTE
    assert fitting_of({"model": "a-head-of-a-later-version"}, {}) is EPOCHS
