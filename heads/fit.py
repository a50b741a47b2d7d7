"""Fitting one model on the training rows, choosing by the validation rows: the one training loop.

Keras models train by mini-batches with early stopping on validation loss (best weights restored);
the linear probe is solved to convergence by L-BFGS instead (`heads.probe`). Models that start with a
global pooling are fitted past it, on vectors pooled once. Features are standardised with statistics
of the training rows only, kept in the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from featcache import system
from featcache.cache.pooled import global_pool
from featcache.errors import BadInputError
from heads import balance, feed, optimizers
from heads.batches import batches_per_epoch
from heads.builders import MODELS, STANDARDISE, tuned_layers
from heads.config import TrainConfig
from heads.data import TrainData
from heads.fitting import C_PATH, EPOCHS, VOTE

log = logging.getLogger(__name__)
#: Training steps run per call into TensorFlow: a head step on cached features takes well under a
#: millisecond of compute, so with one step per call Keras' per-call overhead dominates an epoch.
STEPS_PER_EXECUTION = 32
#: Small training splits: batches shrink so an epoch has at least this many optimiser steps ...
MIN_STEPS_PER_EPOCH = 8
#: ... and early stopping may end a run only after this many steps in all.
MIN_STEPS = 200


@dataclass
class Fitted:
    config: TrainConfig
    model: object
    fit_model: object                 # the part of `model` fitted (past a global pooling layer, if any)
    history: dict
    best: int
    seconds: float
    val_rows: np.ndarray | None = None   # per-row (weighted) validation losses, when asked for (a rival's)

    @property
    def val_loss(self) -> float:
        return float(self.history["val_loss"][self.best])


def fit(data: TrainData, config: TrainConfig, tr: np.ndarray, va: np.ndarray, progress: bool,
        pooled: dict | None = None, rival: np.ndarray | None = None, keep_rows: bool = False,
        callbacks=()) -> Fitted:
    """Build `config.model` and fit it on rows `tr` of the training split, choosing by rows `va`. `pooled`,
    when given, keeps the pooled arrays by pooling for the next model fitted on the same data; `rival`, the
    per-row validation losses of the best model fitted before, lets the probe stop once it is clearly
    behind; `keep_rows` records this model's per-row validation losses, to be a rival; `callbacks` are
    more Keras callbacks for a model trained by epochs."""
    job = _job(data, config, (tr, va), pooled, progress, rival=rival, callbacks=callbacks)
    t0 = time.perf_counter()
    history = _FITS[job.spec.fitting.name](job)
    best, seconds = history.pop("best"), time.perf_counter() - t0
    rows = None
    if keep_rows:
        from heads.metrics import predict, row_losses

        rows = row_losses(predict(job.fit_model, job.x_fit[va], config.batch_size), data.y_train[va],
                          job.weights[1])
    return Fitted(config, job.model, job.fit_model, history, best, seconds, rows)


def refit(data: TrainData, fitted: Fitted, rows: tuple, progress: bool) -> Fitted:
    """`fitted`'s setting trained again on its training and validation `rows` together (--refit): its epochs (and
    batch size), the probe's C, the kNN vote's k, temperature and smoothing; nothing is chosen again. The Fitted's
    history is the refit's: training figures only."""
    import keras

    config, spec = fitted.config, MODELS[fitted.config.model]
    chosen = spec.fitting.chosen(fitted.history, fitted.best)
    if spec.fitting.by_epochs:
        config = replace(config, epochs=chosen["epochs"], batch_size=fitted.history.get("batch_size", config.batch_size))
    keras.utils.set_random_seed(config.seed)
    job = _job(data, config, (np.sort(np.concatenate(rows)), None), None, progress, chosen=chosen,
               weighted_by=rows[1])
    t0 = time.perf_counter()
    history = _FITS[spec.fitting.name](job)
    best = history.pop("best")
    return Fitted(config, job.model, job.fit_model, history, best, time.perf_counter() - t0)


@dataclass
class _Job:
    """One fit of a built head: what each way of fitting (_FITS) reads. rows = (fitted, validation); validation
    None for a refit, which fits `chosen`, the setting validation chose before."""

    data: TrainData
    config: TrainConfig
    spec: object
    model: object
    fit_model: object
    x_fit: np.ndarray
    views_fit: np.ndarray | None
    rows: tuple
    weights: tuple
    n_views: int
    progress: bool
    chosen: dict | None = None
    rival: np.ndarray | None = None
    callbacks: tuple = ()


def _job(data, config, rows: tuple, pooled, progress, *, chosen=None, rival=None, callbacks=(), weighted_by=None):
    """The head of `config` built on rows[0] (heads.fit.built) with the class weights of those rows and of the
    validation rows (`weighted_by`, a refit's former validation rows, where rows[1] is None)."""
    spec, model, fit_model, (x_fit, views_fit) = built(data, config, rows[0], pooled)
    n_classes = len(data.class_names)
    weights = balance.split_weights(config.class_weight, data.y_train, rows[0],
                                    rows[1] if rows[1] is not None else weighted_by, n_classes)
    n_views = data.n_views if config.views_mode != "original" else 1
    return _Job(data, config, spec, model, fit_model, x_fit, views_fit, rows, weights, n_views, progress, chosen,
                rival, tuple(callbacks))


def _by_epochs(job: _Job) -> dict:
    """Keras' optimiser, epoch after epoch, early stopping on validation (a finetune head in two stages)."""
    budget = job.data.feed.memory_budget_bytes if job.data.feed is not None else None

    def train(c: TrainConfig) -> dict:
        return _fit_keras(job.fit_model, job.spec, c, (job.x_fit, job.views_fit, job.data.y_train), job.rows,
                          job.n_views, job.progress, memory_budget=budget, weights=job.weights,
                          callbacks=job.callbacks)

    return _fit_stages(job.fit_model, job.config, train) if job.spec.tunes_backbone else train(job.config)


def _along_c(job: _Job) -> dict:
    """The probe's L-BFGS along its path of C (or at the C chosen, for a refit)."""
    return _fit_probe(job.fit_model, job.x_fit, job.views_fit if job.n_views > 1 else None, job.data.y_train,
                      job.rows, len(job.data.class_names), job.weights, job.rival,
                      at=None if job.chosen is None else job.chosen["C"])


def _by_vote(job: _Job) -> dict:
    """The kNN vote's bank filled, its setting chosen on validation (or the chosen one, for a refit)."""
    from heads.knn import fit_knn, refit_knn

    n_classes = len(job.data.class_names)
    if job.chosen is not None:
        return refit_knn(job.fit_model, job.x_fit, job.data.y_train, job.rows[0], n_classes=n_classes,
                         weights=job.weights, setting=job.chosen)
    return fit_knn(job.fit_model, job.x_fit, job.data.y_train, *job.rows, n_classes=n_classes, weights=job.weights)


#: How each Fitting (heads.fitting) is carried out: the one place a head's way of fitting picks its code.
_FITS = {EPOCHS.name: _by_epochs, C_PATH.name: _along_c, VOTE.name: _by_vote}


def built(data: TrainData, config: TrainConfig, tr: np.ndarray, pooled: dict | None = None) -> tuple:
    """(spec, model, the part of it fitted, its training inputs (x, views)) of `config` on `data`, built with the
    weights Keras' global seed gives, standardised on rows `tr`: the one way a model is made ready to fit."""
    spec = MODELS[config.model]
    options = {k: getattr(config, k) for k in spec.options}
    if spec.fitting is VOTE:   # the vote's bank holds the training rows
        options["bank_size"] = len(tr)
        _check_bank_fits(data, config, len(tr))
    if spec.tunes_backbone:
        options["provenance"] = data.provenance
    model = spec.build(data.map_shape or data.x_train.shape[1:], len(data.class_names), **options)
    fit_model, inputs = fixed_pooling_split(model, spec, options, [data.x_train, data.x_views], pooled, data.pooled_by)
    if spec.tunes_backbone:
        _standardise_head(fit_model, inputs[0], tr, config.seed)
    else:
        set_standardisation(fit_model, inputs[0], tr)
    return spec, model, fit_model, inputs


def _check_bank_fits(data: TrainData, config: TrainConfig, rows: int) -> None:
    """The kNN head holds its training rows, pooled, in RAM and in model.keras: refused beyond the memory budget."""
    shape = data.map_shape or data.x_train.shape[1:]
    dim = int(np.prod(shape)) if config.pooling == "flatten" or len(shape) < 3 else int(shape[-1])
    budget = data.feed.memory_budget_bytes if data.feed is not None else None
    if budget is not None and rows * dim * 4 > budget:
        raise BadInputError(f"the kNN head keeps its {rows} training rows of {dim} features in memory and in "
                            f"model.keras ({rows * dim * 4 / 1e9:.1f} GB), more than the memory budget "
                            f"({budget / 1e9:.1f} GB); fix: --pooling gap or max, fewer rows (--per-class), or a "
                            "larger --memory-budget")


def fit_schedule(n_train: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """(batch size, first epoch early stopping may stop at) for a training split of `n_train` rows.

    A small split gets smaller batches, so that an epoch is several optimiser steps, and early
    stopping waits until the head has taken MIN_STEPS steps: validation loss on a few dozen images is
    noisy and rises early (the head grows confident) while test accuracy still improves (docs/guides/heads.md's
    small-data section and docs/results/curve.md show the default head across dataset sizes).
    """
    batch = max(1, min(batch_size, -(-n_train // MIN_STEPS_PER_EPOCH)))
    steps_per_epoch = -(-n_train // batch)
    return batch, min(epochs - 1, max(0, -(-MIN_STEPS // steps_per_epoch) - 1))


def compile_for_training(fit_model, spec, learning_rate: float, *, weighted: bool = False,
                         decay_steps: int | None = None) -> None:
    """Adam or SGD on sparse categorical cross-entropy, at `learning_rate` (cosine-decayed to 0 over `decay_steps`
    optimiser steps where given). `weighted`: batches carry class weights, which the loss uses; "accuracy" stays
    plain argmax accuracy and "balanced_accuracy" is its class-weighted mean."""
    import keras

    if decay_steps:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    optimizer = (optimizers.adam(learning_rate) if spec.optimizer == "adam"
                 else keras.optimizers.SGD(learning_rate, momentum=0.9))
    weighted_metrics = [keras.metrics.SparseCategoricalAccuracy(name="balanced_accuracy")] if weighted else None
    fit_model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                      weighted_metrics=weighted_metrics, **step_options())


def step_options() -> dict:
    """How every model trained by epochs compiles its step."""
    import keras

    # TensorFlow's XLA was 4x slower on this CPU; JAX and PyTorch compile their step as they do best
    return dict(steps_per_execution=STEPS_PER_EXECUTION,
                jit_compile=False if keras.backend.backend() == "tensorflow" else "auto")


def _fit_keras(fit_model, spec, config, arrays: tuple, rows: tuple, n_views: int, progress: bool, *,
               memory_budget: int | None = None, weights=(None, None), callbacks=()) -> dict:
    """Mini-batch training on `arrays` (x, views, y) rows `rows` (train, validation), with early stopping on
    validation loss (class-weighted with `weights`; best weights restored). Validation rows None: all
    `config.epochs`, nothing chosen (a refit)."""
    import keras

    (x_fit, views_fit, y), (tr, va) = arrays, rows
    batch_size, start_from = fit_schedule(len(tr), config.batch_size, config.epochs)
    steps = config.epochs * batches_per_epoch(tr, batch_size, shuffle=True, n_views=n_views,
                                              all_views=config.views_mode == "all")
    compile_for_training(fit_model, spec, config.learning_rate, weighted=weights[0] is not None,
                         decay_steps=steps if config.lr_schedule == "cosine" else None)
    if batch_size != config.batch_size:
        log.info("batch size %d for %d training rows (at least %d steps per epoch)", batch_size, len(tr),
                 MIN_STEPS_PER_EPOCH)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                            restore_best_weights=True, start_from_epoch=start_from)
    timer = epoch_log(config.epochs, progress)
    with feed.keras_batches(x_fit, views_fit, y, (tr, va), batch_size, seed=config.seed, n_views=n_views,
                            all_views=config.views_mode == "all", weights=weights, budget=memory_budget) as batches:
        history = fit_model.fit(batches[0], validation_data=batches[1], epochs=config.epochs,
                                callbacks=[*([stopper] if va is not None else []), timer, interruptible(),
                                           *callbacks],
                                shuffle=False, verbose=0).history   # shuffled by the batch planner
    # the epoch whose weights were restored (monitored epochs only), or a refit's last
    history["best"] = stopper.best_epoch if va is not None else config.epochs - 1
    history["seconds"] = timer.seconds
    history["learning_rate"] = timer.learning_rates   # at each epoch's end
    history["batch_size"] = batch_size
    return history


#: Training rows whose tuned-layer outputs set a fine-tuned head's standardisation (a seeded sample: each row
#: costs a forward pass through the tuned layers).
STANDARDISE_ROWS = 2048


def _standardise_head(model, x, tr: np.ndarray, seed: int) -> None:
    """A fine-tuned model's head standardises what the tuned layers give at the start, on sampled training rows."""
    tuned, head = tuned_layers(model), model.layers[-1]
    rows = np.sort(np.random.default_rng(seed).choice(tr, min(len(tr), STANDARDISE_ROWS), replace=False))
    outputs = np.concatenate([np.asarray(tuned.predict_on_batch(x[rows[i:i + 256]].astype(np.float32)))
                              for i in range(0, len(rows), 256)])
    set_standardisation(head, outputs, np.arange(len(outputs)))


def _fit_stages(model, config: TrainConfig, train) -> dict:
    """Fine-tuning in the Keras guide's two stages: `config.warmup_epochs` of the head alone at --lr, the tuned
    layers frozen; then all of it at --finetune-lr, with early stopping (best weights restored). `train(config)`
    is the one training loop; the histories are joined, epochs counted across both stages."""
    from dataclasses import replace

    tuned = tuned_layers(model)
    stages = []
    warmup = min(config.warmup_epochs, config.epochs - 1)
    if warmup > 0:
        tuned.trainable = False
        stages.append(train(replace(config, epochs=warmup, patience=warmup, lr_schedule="constant")))
    tuned.trainable = True
    for layer in tuned.layers:   # the backbone's BatchNormalization stays in inference mode
        layer.trainable = not _is_batchnorm(layer)
    stages.append(train(replace(config, epochs=config.epochs - warmup, lr=config.finetune_lr)))
    first, last = (stages[0], stages[-1]) if len(stages) == 2 else ({}, stages[0])
    joined = {k: list(first.get(k, [])) + list(v) for k, v in last.items() if isinstance(v, list)}
    joined.update(best=len(first.get("val_loss", [])) + last["best"], batch_size=last["batch_size"],
                  warmup_epochs=len(first.get("val_loss", [])), tune_to=tuned.layers[-1].name)
    return joined


def _is_batchnorm(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def _fit_probe(fit_model, x_fit, views_fit, y, rows, n_classes, weights, rival, at: float | None = None) -> dict:
    """L-BFGS on the standardised vectors the probe's Dense layer sees; views add training rows. `at`: the one C
    to fit at (a refit: validation rows None)."""
    from heads.probe import fit_at, fit_linear_probe

    if feed.is_streamed(x_fit):
        raise BadInputError(feed.NEEDS_RAM)
    mean, std = _stats_of(fit_model.get_layer(STANDARDISE))

    def z(x):   # float32, in place: the probe's products are memory-bound, and copies multiply its memory
        out = x.reshape(len(x), -1).astype(np.float32)
        out -= mean.astype(np.float32)
        out /= std.astype(np.float32)
        return out

    tr, va = rows
    x_train, y_train = z(x_fit[tr]), y[tr]
    if views_fit is not None:
        x_train = np.concatenate([x_train, *(z(views_fit[tr, v]) for v in range(views_fit.shape[1]))])
        y_train = np.tile(y_train, 1 + views_fit.shape[1])
    if at is not None:
        return fit_at(fit_model, x_train, y_train, at, n_classes=n_classes, weights=weights)
    return fit_linear_probe(fit_model, x_train, y_train, z(x_fit[va]), y[va], n_classes=n_classes, weights=weights,
                            rival=rival)


def set_standardisation(fit_model, x: np.ndarray, rows: np.ndarray) -> None:
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
        features = keras.Model(fit_model.inputs[0], norm.input).predict_on_batch
    total, total_sq, count = 0.0, 0.0, 0
    step = max(1, min(4096, (16 << 20) // (4 * int(np.prod(x.shape[1:])))))   # ~16 MB of float32 at a time
    for i in range(0, len(rows), step):   # never a copy of the whole split
        v = np.asarray(features(x[rows[i:i + step]].astype(np.float32)), np.float32)
        v = v.reshape(-1, v.shape[-1])   # summed in float64 with no float64 copy of the chunk (streamed maps)
        total, count = total + v.sum(0, np.float64), count + len(v)
        total_sq = total_sq + np.einsum("ij,ij->j", v, v, dtype=np.float64)
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


def fixed_pooling_split(model, spec, options: dict, arrays: list, pooled: dict | None = None,
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


def interruptible():
    """A Keras callback raising, before each call into the training or validation steps (STEPS_PER_EXECUTION at a
    time), a Ctrl-C Python dropped (`system.interrupts_kept`): calls begin in the main thread, where batch ends may
    be dispatched to another (JAX)."""
    import keras

    class Interruptible(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            system.stop_if_interrupted()

        def on_test_batch_begin(self, batch, logs=None):
            system.stop_if_interrupted()

    return Interruptible()


def epoch_log(epochs: int, progress: bool):
    """A Keras callback recording per-epoch seconds and the learning rate at each epoch's end, with a progress
    bar of epochs on stderr.

    Built in a function so that importing heads.fit does not import Keras.
    """
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds, self.learning_rates = [], []
            self.bar = system.progress_bar(epochs, unit="epoch", desc="train", enabled=progress)

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.t0)
            self.learning_rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
            shown = {"loss": "loss", "val_loss": "val_loss", "val_acc": "val_accuracy"}   # a refit has no val_
            self.bar.set_postfix({k: f"{logs[key]:.3f}" for k, key in shown.items() if key in logs}, refresh=False)
            self.bar.update(1)

        def on_train_end(self, logs=None):
            self.bar.close()

    return EpochLog()
