"""TensorBoard logs: Keras' per-epoch scalars of every run and search trial, and the HParams plugin's summaries
of a search, so that `tensorboard --logdir <runs or search folder>` shows the curves, the trials' table and the
parallel-coordinates view."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def written() -> bool:
    """Whether logs are written: Keras' TensorBoard callback and the HParams summaries write through TensorFlow, so
    with Keras on JAX or PyTorch (where TensorFlow is not imported, and may not be installed) they are skipped,
    said once."""
    import keras

    if keras.backend.backend() == "tensorflow":
        return True
    log.info("TensorBoard logs are skipped: they are written with Keras on TensorFlow, and Keras runs on %s",
             keras.backend.backend())
    return False


def epochs_callback(folder: Path) -> list:
    """[Keras' TensorBoard callback writing each epoch's loss and metrics under `folder` (train/, validation/)], or
    [] where logs are not written."""
    import keras

    if not written():
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(folder), write_graph=False, histogram_freq=0, profile_batch=0)]


def write_epochs(folder: Path, history: dict) -> None:
    """A history's per-epoch figures as Keras' TensorBoard callback writes them (train/ and validation/, tags
    epoch_NAME), for models trained where that callback could not watch them (heads trained together)."""
    if not written():
        return
    import tensorflow as tf

    for split, prefix in (("train", ""), ("validation", "val_")):
        with tf.summary.create_file_writer(str(folder / split)).as_default():
            for name in ("loss", "accuracy", "balanced_accuracy"):
                for epoch, value in enumerate(history.get(prefix + name, ())):
                    tf.summary.scalar(f"epoch_{name}", float(value), step=epoch)


def write_trial(folder: Path, params: dict, metrics: dict) -> None:
    """One trial's parameters (labelled as Optuna keeps them: heads.search.labelled) and final validation figures,
    for the HParams plugin, into `folder`."""
    if not written():
        return
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    with tf.summary.create_file_writer(str(folder)).as_default():
        hp.hparams(params, trial_id=folder.name)
        for name, value in metrics.items():
            if value is not None:
                tf.summary.scalar(name, float(value), step=0)


def write_search(folder: Path, params: list, metrics: tuple) -> None:
    """The search's HParams table: which parameters and metrics its trials report (once, at its root)."""
    if not written():
        return
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    def domain(p):
        if p.choices is not None:
            return hp.Discrete(p.labels())
        return hp.IntInterval(int(p.low), int(p.high)) if p.integer else hp.RealInterval(float(p.low), float(p.high))

    with tf.summary.create_file_writer(str(folder)).as_default():
        hp.hparams_config(hparams=[hp.HParam(p.name, domain(p)) for p in params],
                          metrics=[hp.Metric(m) for m in metrics])
