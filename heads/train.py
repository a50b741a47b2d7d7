"""One training function for every model: heads on cached features and scratch baselines alike.

The validation split is carved from the training split (stratified, seeded, at least one row per
class); early stopping watches validation loss and restores the best epoch's weights (the linear
probe is solved by L-BFGS instead, heads.probe); the default head, "auto", keeps whichever of the
dense head and the probe has the lower validation loss. The test split is predicted exactly once,
after training, and nothing is chosen by it.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from featcache.errors import BadInputError
from featcache.pooled import global_pool
from heads.builders import MODELS, POOLINGS, STANDARDISE
from heads.data import (TrainData, _in_ram_if_it_fits, _streamed_rows, data_from_cache, data_from_caches,
                        data_from_dataset, split_indices, stratified_subset, subset)

#: What a notebook imports from here; the data side lives in heads.data and is re-exported.
__all__ = ["AUTO", "VIEWS_MODES", "RunResult", "TrainConfig", "TrainData", "data_from_cache", "data_from_caches",
           "data_from_dataset", "fit_schedule", "pools_first", "predict", "split_indices", "stratified_subset",
           "subset", "train", "train_baseline", "train_head"]

log = logging.getLogger(__name__)
#: Training steps run per call into TensorFlow: a head step on cached features takes well under a
#: millisecond of compute, so with one step per call Keras' per-call overhead dominates an epoch.
STEPS_PER_EXECUTION = 32
VIEWS_MODES = ("sample", "all", "original")
#: Small training splits: batches shrink so an epoch has at least this many optimiser steps ...
MIN_STEPS_PER_EPOCH = 8
#: ... and early stopping may end a run only after this many steps in all.
MIN_STEPS = 200


#: The default head: the reference dense head or the linear probe, whichever has the lower validation loss.
AUTO = "auto"
AUTO_CANDIDATES = ("dense", "linear")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "dense"              # a name of heads.builders.MODELS, or AUTO
    units: tuple[int, ...] = (400, 256, 256)
    pooling: str = "gap"
    batchnorm: bool = True
    dropout: float = 0.2
    epochs: int = 50
    patience: int = 5
    batch_size: int = 256
    lr: float | None = None          # None: the model's default (MODELS[model].lr)
    val_fraction: float = 0.1
    seed: int = 0
    name: str | None = None
    filters: int = 128                # conv head: channels of its 1x1 convolution
    views_mode: str = "sample"        # with cached views: "sample" one per image per epoch, "all", "original"
    per_class: int | None = None      # train and validate on this many training images per class (stratified)
    subset_seed: int = 0              # which images --per-class draws

    def __post_init__(self):
        if isinstance(self.units, str):   # "400,256,256", as on the command line
            parts = [p.strip() for p in self.units.split(",")]
            if not all(p.isdigit() for p in parts):
                raise BadInputError(f"--units must be positive integers like 400,256,256, got {self.units!r}")
            object.__setattr__(self, "units", tuple(int(p) for p in parts))
        object.__setattr__(self, "units", tuple(self.units))
        checks = [
            (self.model in MODELS or self.model == AUTO,
             f"model must be one of {', '.join((AUTO, *MODELS))}, got {self.model!r}"),
            (len(self.units) > 0 and all(isinstance(u, int) and u > 0 for u in self.units),
             f"--units must be positive integers like 400,256,256, got {self.units}"),
            (self.pooling in POOLINGS, f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1), got {self.val_fraction}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.patience >= 0, f"--patience must be at least 0, got {self.patience}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.filters >= 1, f"--filters must be at least 1, got {self.filters}"),
            (self.per_class is None or (isinstance(self.per_class, int) and self.per_class >= 1),
             f"--per-class must be a positive integer, got {self.per_class}"),
            (self.views_mode in VIEWS_MODES, f"--views-mode must be one of {', '.join(VIEWS_MODES)}, "
                                             f"got {self.views_mode!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(message)

    @property
    def learning_rate(self) -> float | None:
        if self.lr is not None:
            return self.lr
        return MODELS[self.model].lr if self.model in MODELS else None


_PROBE_NEEDS_RAM = ("the linear probe (L-BFGS) needs its training rows in memory, and these maps are streamed from "
                    "the cache (--stream, or more than --memory-budget); fix: --pooling gap or max (vectors pooled "
                    "once), a larger --memory-budget without --stream, or fewer rows with --per-class")


@dataclass
class RunResult:
    run_dir: Path | None
    config: TrainConfig
    metrics: dict
    history: dict
    model: object = field(repr=False, default=None)


@dataclass
class _Fitted:
    config: TrainConfig
    model: object
    fit_model: object                 # the part of `model` fitted (past a global pooling layer, if any)
    history: dict
    best: int
    seconds: float

    @property
    def val_loss(self) -> float:
        return float(self.history["val_loss"][self.best])


def train(data: TrainData, config: TrainConfig = TrainConfig(), *, runs_dir: str | Path | None = "runs",
          progress: bool = True) -> RunResult:
    """Train `config.model` on `data`, evaluate once on the test split, and record the run.

    With `config.model == "auto"` the reference dense head and the linear probe are both fitted on
    the same training rows and the one with the lower validation loss is kept (and alone sees the
    test split). With `config.per_class`, training and validation use that many training images per
    class only. With `runs_dir=None` nothing is written (the result still carries metrics and model).
    """
    import keras

    candidates = [replace(config, model=m) for m in AUTO_CANDIDATES] if config.model == AUTO else [config]
    for c in candidates:
        if MODELS[c.model].input != data.kind:
            raise BadInputError(f"model {c.model!r} trains on {MODELS[c.model].input}, but the data holds {data.kind}")
    if data.random_weights:
        log.warning("WARNING: these features come from RANDOM backbone weights, not ImageNet")
    if runs_dir is not None:
        from heads.reports import check_runs_dir

        check_runs_dir(runs_dir)   # before training, not after it
    if config.per_class is not None:
        data = subset(data, config.per_class, config.subset_seed)
    if _streamed_rows(data.x_train):
        data = _in_ram_if_it_fits(data)
    if _streamed_rows(data.x_train):   # checked before any training, not after the first candidate
        probes = [c for c in candidates if MODELS[c.model].optimizer == "lbfgs"]
        if probes and config.model != AUTO:
            raise BadInputError(_PROBE_NEEDS_RAM)
        if probes:
            log.info("the linear probe needs its rows in memory and these maps are streamed: auto fits the dense "
                     "head alone")
            candidates = [c for c in candidates if c not in probes]
    tr, va = split_indices(data.y_train, config.val_fraction, config.seed, data.class_names)
    fits, pooled = [], {}   # pooled: the maps pooled once per pooling, shared by the candidates
    for c in candidates:
        keras.utils.set_random_seed(c.seed)
        fits.append(_fit(data, c, tr, va, progress, pooled))
    chosen = min(fits, key=lambda fit: fit.val_loss)   # validation only: the test split plays no part
    n_views = data.n_views if config.views_mode != "original" else 1
    history, best, model = chosen.history, chosen.best, chosen.model
    # the one and only look at the test split (pooled vectors go to the model past its pooling layer)
    probs = predict(chosen.fit_model if data.pooled_by else model, data.x_test, config.batch_size)
    metrics = _metrics(probs, data.y_test, data.class_names)
    metrics.update(
        val_accuracy=float(history["val_accuracy"][best]), val_loss=chosen.val_loss,
        best_epoch=best + 1, epochs_run=len(history["val_loss"]), n_train=len(tr), n_val=len(va),
        n_test=len(data.y_test), seconds=round(sum(fit.seconds for fit in fits), 3),
        seconds_per_epoch=round(float(np.mean(history["seconds"])), 4), random_weights=data.random_weights,
        params=int(model.count_params()), n_views=n_views)
    if "C" in history:
        metrics["C"] = history["C"][best]
    else:
        metrics["batch_size"] = history["batch_size"]
    if config.model == AUTO:
        metrics["chosen"] = chosen.config.model
        metrics["candidates"] = {fit.config.model: {"val_loss": fit.val_loss, "seconds": round(fit.seconds, 3),
                                                    "val_accuracy": float(fit.history["val_accuracy"][fit.best])}
                                 for fit in fits}
    result = RunResult(None, config, metrics, history, model)
    if runs_dir is not None:
        from heads.reports import write_run

        result.run_dir = write_run(Path(runs_dir), result, data)
    log.info("%s: val accuracy %.4f (best %s of %d), test accuracy %.4f, %.1f s",
             (config.name or config.model) + (f" (chose {chosen.config.model})" if config.model == AUTO else ""),
             metrics["val_accuracy"], f"C={metrics['C']:.3g}" if "C" in metrics else f"epoch {metrics['best_epoch']}",
             metrics["epochs_run"], metrics["test_accuracy"], metrics["seconds"])
    return result


def _fit(data: TrainData, config: TrainConfig, tr: np.ndarray, va: np.ndarray, progress: bool,
         pooled: dict | None = None) -> _Fitted:
    """Build `config.model` and fit it on rows `tr` of the training split, choosing by rows `va`."""
    spec = MODELS[config.model]
    options = {k: getattr(config, k) for k in spec.options}
    model = spec.build(data.map_shape or data.x_train.shape[1:], len(data.class_names), **options)
    fit_model, (x_fit, views_fit) = _fixed_pooling_split(model, spec, options, [data.x_train, data.x_views],
                                                         pooled, data.pooled_by)
    _set_standardisation(fit_model, x_fit, tr)
    n_views = data.n_views if config.views_mode != "original" else 1
    t0 = time.perf_counter()
    if spec.optimizer == "lbfgs":
        history = _fit_probe(fit_model, x_fit, views_fit if n_views > 1 else None, data.y_train, tr, va,
                             len(data.class_names), config.seed)
    else:
        history = _fit_keras(fit_model, spec, config, x_fit, views_fit, data.y_train, tr, va, n_views, progress,
                             memory_budget=data.source.get("feed", {}).get("memory_budget_bytes"))
    best = history.pop("best")
    return _Fitted(config, model, fit_model, history, best, time.perf_counter() - t0)


def fit_schedule(n_train: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """(batch size, first epoch early stopping may stop at) for a training split of `n_train` rows.

    A small split gets smaller batches, so that an epoch is several optimiser steps, and early
    stopping waits until the head has taken MIN_STEPS steps: validation loss on a few dozen images is
    noisy and rises early (the head grows confident) while test accuracy still improves; on CIFAR-10
    at 100 images per class the floor gave 59.1% instead of 56.2% (3 subsets each), at 10 per class
    it made no difference (37.2% vs 37.8%).
    """
    batch = max(1, min(batch_size, -(-n_train // MIN_STEPS_PER_EPOCH)))
    steps_per_epoch = -(-n_train // batch)
    return batch, min(epochs - 1, max(0, -(-MIN_STEPS // steps_per_epoch) - 1))


def _fit_keras(fit_model, spec, config, x_fit, views_fit, y, tr, va, n_views, progress, *,
               memory_budget: int | None = None) -> dict:
    """Mini-batch training with early stopping on validation loss (best weights restored)."""
    import keras

    optimizer = (keras.optimizers.Adam(config.learning_rate) if spec.optimizer == "adam"
                 else keras.optimizers.SGD(config.learning_rate, momentum=0.9))
    fit_model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                      steps_per_execution=STEPS_PER_EXECUTION, jit_compile=False)   # XLA: 4x slower on CPU here
    batch_size, start_from = fit_schedule(len(tr), config.batch_size, config.epochs)
    if batch_size != config.batch_size:
        log.info("batch size %d for %d training rows (at least %d steps per epoch)", batch_size, len(tr),
                 MIN_STEPS_PER_EPOCH)
    stream = None
    if _streamed_rows(x_fit):   # maps streamed from the cache (heads.feed)
        from heads.feed import Stream

        stream = Stream(x_fit, views_fit, y.astype(np.int64), budget=memory_budget, batch_size=batch_size)
        train_ds = stream.dataset(tr, batch_size, shuffle=True, seed=config.seed, n_views=n_views,
                                  all_views=config.views_mode == "all")
        val_ds = stream.dataset(va, batch_size, shuffle=False)
    else:
        if n_views > 1:   # (n, views, ...): view 0 is the original image
            x_fit = np.concatenate([x_fit[:, None], views_fit], axis=1)
        x_all, y_all = _as_tensors(x_fit, y)
        train_ds = _batches(x_all, y_all, tr, batch_size, shuffle=True, seed=config.seed, n_views=n_views,
                            all_views=config.views_mode == "all")
        val_ds = _batches(x_all, y_all, va, batch_size, shuffle=False, n_views=n_views)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                            restore_best_weights=True, start_from_epoch=start_from)
    timer = _epoch_log(config.epochs, progress)
    try:
        history = fit_model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=[stopper, timer],
                                shuffle=False, verbose=0).history   # shuffled by _batches or the stream
    finally:
        if stream is not None:
            stream.close()
    history["best"] = stopper.best_epoch   # the epoch whose weights were restored (monitored epochs only)
    history["seconds"] = timer.seconds
    history["batch_size"] = batch_size
    return history


def _fit_probe(fit_model, x_fit, views_fit, y, tr, va, n_classes, seed) -> dict:
    """L-BFGS on the standardised vectors the probe's Dense layer sees; views add training rows."""
    from heads.probe import fit_linear_probe

    if _streamed_rows(x_fit):
        raise BadInputError(_PROBE_NEEDS_RAM)
    norm = fit_model.get_layer(STANDARDISE)
    mean, std = _stats_of(norm)

    def z(x):   # in place: three float64 copies of a large split would triple the probe's memory
        out = x.reshape(len(x), -1).astype(np.float64)
        out -= mean
        out /= std
        return out

    x_train, y_train = z(x_fit[tr]), y[tr]
    if views_fit is not None:
        x_train = np.concatenate([x_train, *(z(views_fit[tr, v]) for v in range(views_fit.shape[1]))])
        y_train = np.tile(y_train, 1 + views_fit.shape[1])
    return fit_linear_probe(fit_model, x_train, y_train, z(x_fit[va]), y[va], n_classes=n_classes, seed=seed)


def _set_standardisation(fit_model, x: np.ndarray, rows: np.ndarray) -> None:
    """Set the model's standardise layer to the mean and variance of what it sees on `x[rows]`.

    Statistics come from the training rows only (never validation or test). A feature that is
    constant on them keeps unit variance, so that it cannot blow up on other rows.
    """
    import keras

    try:
        norm = fit_model.get_layer(STANDARDISE)
    except ValueError:
        return
    if fit_model.layers.index(norm) == 1:   # right after the input
        features = lambda x: x   # noqa: E731
    else:
        below = keras.Model(fit_model.inputs[0], norm.input)
        features = below.predict_on_batch
    total, total_sq, count = 0.0, 0.0, 0
    step = max(1, min(4096, (16 << 20) // (4 * int(np.prod(x.shape[1:])))))   # ~16 MB of float32 at a time
    for i in range(0, len(rows), step):   # never a copy of the whole split
        v = np.asarray(features(x[rows[i:i + step]].astype(np.float32)), np.float64)
        v = v.reshape(-1, v.shape[-1])
        total, total_sq, count = total + v.sum(0), total_sq + (v * v).sum(0), count + len(v)
    mean = total / count
    var = np.maximum(total_sq / count - mean * mean, 0.0)
    var[var <= 1e-12 * np.maximum(1.0, mean * mean)] = 1.0
    norm.adapt_mean.assign(mean.astype(np.float32))
    norm.adapt_variance.assign(var.astype(np.float32))
    norm.finalize_state()


def _stats_of(norm) -> tuple[np.ndarray, np.ndarray]:
    import keras

    mean = np.asarray(norm.adapt_mean, np.float64)
    std = np.maximum(np.sqrt(np.asarray(norm.adapt_variance, np.float64)), keras.backend.epsilon())
    return mean, std


def train_head(cache, *, layer=None, runs_dir="runs", progress=True, **options) -> RunResult:
    """Train a head on a cache path or FeatureCache: `model="auto"` (default: the dense head or the linear
    probe, whichever has the lower validation loss), `"dense"`, `"linear"` or `"conv"`.

    `layer` picks the cached layers to train on (default: all). Several layers, from one cache or
    a list of caches of the same images, train on their pooled features, concatenated. Heads that pool
    first read pooled vectors (made once per cache, layer and pooling); heads on maps hold them in RAM
    within `memory_budget` (bytes or "2GB"; default half the available memory) and stream them from
    disk beyond it, or always with `stream=True`.
    """
    options.setdefault("model", AUTO)
    memory_budget, stream = options.pop("memory_budget", None), options.pop("stream", False)
    config = TrainConfig(**options)
    caches = list(cache) if isinstance(cache, (list, tuple)) else [cache]
    data = data_from_caches(caches, config.pooling, layer, prepooled=pools_first(config),
                            memory_budget=memory_budget, stream=stream)
    return train(data, config, runs_dir=runs_dir, progress=progress)


def pools_first(config: TrainConfig) -> bool:
    """Whether every model `config` fits starts with a global pooling (then it trains on pooled vectors)."""
    models = AUTO_CANDIDATES if config.model == AUTO else (config.model,)
    return all(MODELS[m].prepooled({k: getattr(config, k) for k in MODELS[m].options}) is not None for m in models)


def train_baseline(model: str, *, data="cifar10", limit=None, input_size=None, runs_dir="runs", progress=True,
                   **options) -> RunResult:
    """Train a scratch baseline (`ann` or `cnn`) on the raw pixels of a dataset source."""
    from featcache.backbones import check_input_size
    from featcache.data import load_dataset

    config = TrainConfig(model=model, **options)
    check_input_size(input_size)
    ds = load_dataset(data, limit=limit)
    return train(data_from_dataset(ds, input_size), config, runs_dir=runs_dir, progress=progress)


def predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities, cast to float32 batch by batch (x may be float16 or uint8)."""
    out = [model.predict_on_batch(x[i:i + batch_size].astype(np.float32)) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def _metrics(probs: np.ndarray, y: np.ndarray, class_names) -> dict:
    from sklearn.metrics import classification_report, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = np.arange(len(class_names))
    pred = probs.argmax(axis=1)
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "test_accuracy": float(np.mean(pred == y)),
        "test_loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)))),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "classification_report": classification_report(y, pred, labels=labels, target_names=list(class_names),
                                                       digits=4, zero_division=0),
    }


def _fixed_pooling_split(model, spec, options: dict, arrays: list, pooled: dict | None = None,
                         pooled_by: str | None = None):
    """(model to fit, its inputs): global pooling has no weights, so pool the features once.

    When the model spec says the model starts with a global pooling layer (`spec.prepooled`), the
    rest of it is fitted on pooled vectors (computed here once instead of every epoch, or read from a
    derived cache: `pooled_by` says the arrays are those vectors already); it shares its layers with
    `model`, which still takes feature maps for evaluation and saving. `arrays` are (n, h, w, c) maps or
    (n, views, h, w, c) views; None passes through. `pooled`, when given, keeps the pooled arrays by
    pooling for the next model fitted on the same arrays.
    """
    import keras

    pooling = spec.prepooled(options)
    if pooled_by is not None and pooling != pooled_by:
        raise BadInputError(f"these features were pooled by {pooled_by}, but the model pools by {pooling}")
    if pooling is None or (pooled_by is None and len(arrays[0].shape) < 4):   # vectors of concatenated layers
        return model, arrays
    layer = model.get_layer(f"pool_{pooling}")
    if pooled_by is None:
        pooled = {} if pooled is None else pooled
        if pooling not in pooled:
            pooled[pooling] = [global_pool(x, pooling) for x in arrays]
        arrays = pooled[pooling]
    return keras.Model(layer.output, model.output), arrays


def _as_tensors(x, y):
    import tensorflow as tf

    return tf.convert_to_tensor(x), tf.convert_to_tensor(y.astype(np.int64))


def _batches(x, y, idx, batch_size, *, shuffle, seed=0, n_views=1, all_views=False):
    """Batches gathered from tensors held in RAM in their stored dtype, cast to float32 per batch.

    Shuffling row indices (not rows) keeps the per-epoch cost to one gather per batch. With views,
    x is (n, n_views, ...): training rows get a fresh random view each epoch (or every view once,
    `all_views`); evaluation rows (shuffle=False) always get view 0, the original image.
    """
    import tensorflow as tf

    idx = np.asarray(idx, np.int64)
    if n_views > 1 and all_views:
        pairs = np.stack([np.repeat(idx, n_views), np.tile(np.arange(n_views), len(idx))], axis=1)
        ds = tf.data.Dataset.from_tensor_slices(pairs)
    elif n_views > 1 and shuffle:
        @tf.autograph.experimental.do_not_convert   # plain tensor ops: nothing for AutoGraph to convert
        def pair(i, r):   # a fresh random view for row i each epoch
            return tf.stack([i, r % n_views])

        randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(idx), randoms).map(pair)
    elif n_views > 1:
        ds = tf.data.Dataset.from_tensor_slices(np.stack([idx, np.zeros_like(idx)], axis=1))
    else:
        ds = tf.data.Dataset.from_tensor_slices(idx)
    if shuffle:
        ds = ds.shuffle(len(idx) * (n_views if all_views else 1), seed=seed, reshuffle_each_iteration=True)
    @tf.autograph.experimental.do_not_convert
    def gather(i):   # i: row indices, or (row, view) pairs
        if n_views > 1:
            return tf.cast(tf.gather_nd(x, i), tf.float32), tf.gather(y, i[:, 0])
        return tf.cast(tf.gather(x, i), tf.float32), tf.gather(y, i)

    return ds.batch(batch_size).map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _epoch_log(epochs: int, progress: bool):
    """A Keras callback recording per-epoch seconds, with a one-line tqdm bar of epochs on stderr.

    Built in a function so that importing heads.train does not import Keras.
    """
    import keras
    from tqdm import tqdm

    class EpochLog(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []
            self.bar = tqdm(total=epochs, unit="epoch", desc="train", disable=None if progress else True,
                            file=sys.stderr, dynamic_ncols=True)

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.t0)
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", val_loss=f"{logs['val_loss']:.3f}",
                                 val_acc=f"{logs['val_accuracy']:.3f}", refresh=False)
            self.bar.update(1)

        def on_train_end(self, logs=None):
            self.bar.close()

    return EpochLog()
