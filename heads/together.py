"""Many heads in one pass: K heads fitted on the same batches, each batch read once and fed to all of them.

One Keras model holds the K heads side by side (their logits stacked, then one softmax); its loss is the sum of
theirs, each head's cross-entropy computed as Keras computes it for the head alone (from its logits on
TensorFlow, from its clipped probabilities on JAX), so that a head whose probabilities underflow scores the same
loss and gets the same gradient as alone. The heads
share no weights, so the gradient each head's weights get is that of its own loss, and Adam, which works weight by
weight, moves each head as it would move it alone, at the head's own learning rate (a per-head factor of the
optimizer's rate, which also follows a cosine schedule). Each head has its own early stopping with its own best
weights, the rule of Keras' EarlyStopping for one model. A head that stops (or that a search prunes) gets a
learning rate of 0, so its weights stay as they were; its arithmetic is still done until the live heads go on as a
smaller model, once that pays for its start (`Restarts`; each head's history records how many heads shared each
epoch). With the same seeds, heads trained together
follow the trajectory each follows alone (tests/heads/test_together.py); the one figure that differs is the training
loss of a head with weight decay, whose penalty is added at the epoch's end rather than averaged over its batches.

Heads share a pass when they are Adam-trained heads on cached features (dense, conv) fitted on the same input
(the same global pooling computed once, or the maps), with the same batches (batch size, seed, views, class
weights) and the same number of epochs; `groups` sorts candidates into passes.
"""

from __future__ import annotations

import math
import time

import numpy as np

from featcache import system
from heads import balance, feed, optimizers
from heads.builders import MODELS
from heads.config import TrainConfig
from heads.data import TrainData
from heads.fit import Fitted, built, fit, fit_schedule, interruptible, step_options


def pass_key(config: TrainConfig, data: TrainData) -> tuple | None:
    """What heads must have in common to share a pass (None: `config` trains alone)."""
    spec = MODELS[config.model]
    if spec.optimizer != "adam" or spec.tunes_backbone or spec.input != "features":
        return None
    fed = spec.prepooled({k: getattr(config, k) for k in spec.options})
    return (fed or "maps", config.batch_size, config.epochs, config.views_mode, config.seed, config.class_weight,
            config.lr_schedule, config.per_class, config.subset_seed, config.val_fraction)


def groups(configs: list[TrainConfig], data: TrainData) -> list[list[int]]:
    """The indices of `configs` in passes: those with the same `pass_key` together, in order; the rest alone."""
    passes: dict = {}
    for i, c in enumerate(configs):
        key = pass_key(c, data)
        passes.setdefault(("alone", i) if key is None else key, []).append(i)
    return list(passes.values())


def fit_together(data: TrainData, configs: list[TrainConfig], tr: np.ndarray, va: np.ndarray, *,
                 progress: bool = False, pooled: dict | None = None, on_epoch=None) -> list[Fitted]:
    """Fit `configs` (one group of `groups`) in one pass on rows `tr`, each choosing its epoch by rows `va`.

    `on_epoch(epoch, figures)`, called after each epoch with the figures of every head still training ({k: its
    validation figures}), returns the heads to stop there (a search's pruning): the heads of a pass report
    together, so that a pruner compares them at the same epoch whatever their order. The Fitted of head k is
    what `fit` would give (its `seconds`: its share of the pass)."""
    import keras

    if len({pass_key(c, data) for c in configs}) != 1 or pass_key(configs[0], data) is None:
        raise ValueError("fit_together needs heads of one pass (heads.together.groups)")
    if len(configs) == 1 and on_epoch is None:
        return [fit(data, configs[0], tr, va, progress, pooled)]
    pooled = {} if pooled is None else pooled
    heads = []
    for c in configs:   # each head's weights as `fit` draws them for it alone
        keras.utils.set_random_seed(c.seed)
        heads.append(built(data, c, tr, pooled))
    first = configs[0]
    weights = balance.split_weights(first.class_weight, data.y_train, tr, va, len(data.class_names))
    batch_size, start_from = fit_schedule(len(tr), first.batch_size, first.epochs)
    named = [keras.Model(h[2].inputs[0], h[2].outputs[0], name=f"head_{k}") for k, h in enumerate(heads)]
    watch = _watch(named, configs, start_from, on_epoch, progress)
    x_fit, views_fit = heads[0][3]
    n_views = data.n_views if first.views_mode != "original" else 1
    t0 = time.perf_counter()
    with feed.keras_batches(x_fit, views_fit, data.y_train, (tr, va), batch_size, seed=first.seed,
                            n_views=n_views, all_views=first.views_mode == "all", weights=weights,
                            budget=data.feed.memory_budget_bytes if data.feed is not None else None) as batches:
        _segments(watch, named, configs, batches, (len(tr), batch_size, data, weights[0] is not None))
    watch.finish()
    seconds = time.perf_counter() - t0
    return [Fitted(c, h[1], h[2], {**watch.histories[k], "batch_size": batch_size}, watch.patience[k].best_epoch,
                   seconds / len(configs)) for k, (c, h) in enumerate(zip(configs, heads))]


def _segments(watch, named: list, configs: list, batches: tuple, shape: tuple) -> None:
    """Train the live heads as one model until `Restarts` says that a smaller model pays for its start, then the
    live ones as that smaller model (the same batches, epochs and Adam state going on), until no head is live."""
    optimizer, epoch = None, 0
    while watch.live and epoch < configs[0].epochs:
        active = list(watch.live)
        joint = _joint([named[k] for k in active])
        optimizer = _compile(joint, [named[k] for k in active], [configs[k] for k in active], *shape,
                             carried=optimizer)
        watch.active = active
        watch.restarts.begin()
        joint.fit(batches[0], validation_data=batches[1], initial_epoch=epoch, epochs=configs[0].epochs,
                  callbacks=[watch, interruptible()], shuffle=False, verbose=0)
        epoch = watch.epochs_done


def _joint(named: list):
    """One model whose output is the heads' class probabilities, (batch, heads, classes): one softmax over their
    stacked logits, which Keras' cross-entropy then takes its logits from, as from a head's own softmax."""
    import keras

    inputs = keras.Input(tuple(named[0].inputs[0].shape[1:]), name="features")
    logits, to_logits = [], _logits_class()
    for m in named:
        # the head's last layer as called in this head's graph (a head fitted on pooled vectors calls its layers
        # on its own input too): every head of a pass ends in Dense(classes, softmax) (heads.builders)
        last, node, _ = m.outputs[0]._keras_history
        if not isinstance(last, keras.layers.Dense) or last.activation is not keras.activations.softmax:
            raise ValueError(f"heads trained together end in a softmax Dense layer, not {last.name}")
        body = keras.Model(m.inputs, last._inbound_nodes[node].input_tensors[0], name=f"{m.name}_body")
        logits.append(to_logits(last, name=f"{m.name}_logits")(body(inputs)))
    return keras.Model(inputs, keras.layers.Activation("softmax")(keras.ops.stack(logits, axis=1)),
                       name="heads_together")


def _logits_class():
    import keras

    class Logits(keras.layers.Layer):
        """A softmax Dense layer's logits, from that layer's own weights (their owner, its head, keeps them)."""

        def __init__(self, dense, name: str):
            super().__init__(dtype=dense.dtype_policy, name=name)
            self.dense = dense

        def call(self, x):
            return keras.ops.add(keras.ops.matmul(x, self.dense.kernel), self.dense.bias)

    return Logits


def _compile(joint, named: list, configs: list, n_train: int, batch_size: int, data: TrainData, weighted: bool,
             carried=None):
    """Adam with a learning rate per head, the sum of the heads' cross-entropies, and each head's figures; the
    Adam state of `carried` (the optimizer of a segment before) goes on. Returns the optimizer."""
    import keras

    from heads.batches import batches_per_epoch

    first = configs[0]
    rate = 1.0   # times each head's own rate
    if first.lr_schedule == "cosine":
        steps = first.epochs * batches_per_epoch(np.arange(n_train), batch_size, shuffle=True,
                                                 n_views=data.n_views if first.views_mode != "original" else 1,
                                                 all_views=first.views_mode == "all")
        rate = keras.optimizers.schedules.CosineDecay(1.0, steps)
    optimizer = optimizers.adam(rate, {id(v): k for k, m in enumerate(named) for v in m.trainable_variables})
    n = len(named)
    balanced = [_PerHead(n, "balanced_accuracy", _head_hits, by_weight=True)] if weighted else []
    joint.compile(optimizer=optimizer, loss=_SumOfHeads(n), metrics=[_PerHead(n, "accuracy", _head_hits)],
                  weighted_metrics=[_PerHead(n, "loss", _head_losses), *balanced], **step_options())
    optimizer.build(joint.trainable_variables)
    optimizer.head_rates.assign(np.array([c.learning_rate for c in configs], np.float32))
    if carried is not None:
        _carry(carried, optimizer, joint.trainable_variables)
    return optimizer


def _carry(old, new, variables: list) -> None:
    """Adam's step count and each weight's moments from `old` into `new` (built on a subset of its weights)."""
    new.iterations.assign(old.iterations)
    for v in variables:
        i, j = old._get_variable_index(v), new._get_variable_index(v)   # Keras' Adam keeps them by weight
        new._momentums[j].assign(old._momentums[i])
        new._velocities[j].assign(old._velocities[i])


def _sum_of_heads_class():
    import keras

    class SumOfHeads(keras.losses.Loss):
        """The sum over heads of each head's sparse categorical cross-entropy, per row."""

        def __init__(self, n_heads: int):
            super().__init__(name="sum_of_heads")
            self.n_heads = n_heads

        def call(self, y_true, y_pred):
            return keras.ops.sum(_head_losses(y_true, y_pred), axis=1)

    return SumOfHeads


def _SumOfHeads(n_heads: int):   # noqa: N802 - builds a class defined with Keras imported
    return _sum_of_heads_class()(n_heads)


def _head_losses(y_true, y_pred):
    """Each row's cross-entropy under each head, (batch, heads), from the joint model's (batch, heads, classes)
    softmax: all heads in one op, and on TensorFlow from their logits, as Keras scores a softmax model."""
    import keras

    labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1, 1))
    return keras.losses.sparse_categorical_crossentropy(keras.ops.repeat(labels, y_pred.shape[1], axis=1), y_pred)


def _head_hits(y_true, y_pred):
    """Whether each row's class is each head's most probable one, (batch, heads) of 0 and 1."""
    import keras

    labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1, 1))
    return keras.ops.cast(keras.ops.equal(keras.ops.cast(keras.ops.argmax(y_pred, axis=-1), "int32"), labels),
                          "float32")


def _PerHead(n_heads: int, name: str, per_row, *, by_weight: bool = False):   # noqa: N802 - builds a Keras class
    """One metric for every head of a pass, logged as h{k}_{name}: each head's mean over the epoch of `per_row`
    ((batch, heads) values), each row weighted by its sample weight if any, divided by the rows (as Keras reports a
    model's loss) or, `by_weight`, by the weights (as a weighted metric: the balanced accuracy). One metric's few ops
    a step rather than a metric per head."""
    import keras

    class PerHead(keras.metrics.Metric):
        def __init__(self):
            super().__init__(name=f"heads_{name}")
            self.total = self.add_variable((n_heads,), initializer="zeros", name="total")
            self.count = self.add_variable((), initializer="zeros", name="count")

        def update_state(self, y_true, y_pred, sample_weight=None):
            values = per_row(y_true, y_pred)
            count = keras.ops.cast(keras.ops.shape(values)[0], self.count.dtype)
            if sample_weight is not None:
                weights = keras.ops.cast(keras.ops.reshape(sample_weight, (-1, 1)), values.dtype)
                values = values * weights
                count = keras.ops.sum(weights) if by_weight else count
            self.total.assign_add(keras.ops.sum(values, axis=0))
            self.count.assign_add(count)

        def result(self):
            mean = keras.ops.divide_no_nan(self.total, self.count)
            return {f"h{k}_{name}": mean[k] for k in range(n_heads)}

        def reset_state(self):
            self.total.assign(keras.ops.zeros((n_heads,)))
            self.count.assign(0.0)

    return PerHead()


def _penalty(model) -> float:
    """The weight decay a head's own loss adds (Keras adds it to a model's validation loss)."""
    import keras

    return float(sum(float(keras.ops.convert_to_numpy(v)) for v in model.losses)) if model.losses else 0.0


def _watch(named: list, configs: list, start_from: int, on_epoch, progress: bool):
    """A Keras callback over the pass's segments: each head's history, early stopping (Keras' rule, best weights
    kept and, by `finish`, restored), the search's `on_epoch`, stopped heads' rates 0, the ends of segments."""
    import keras

    class Watch(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            n = len(named)
            self.histories, self.left_with, self.live = [{} for _ in range(n)], [None] * n, list(range(n))
            self.patience = [_Patience(m, c.patience, start_from) for m, c in zip(named, configs)]
            self.bar = system.progress_bar(configs[0].epochs, unit="epoch", desc=f"train {n} heads", enabled=progress)
            self.active, self.epochs_done = [], 0   # position j of a segment's model is head active[j]
            self.restarts = Restarts([m.count_params() for m in named])

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds, rate = time.perf_counter() - self.t0, _rate_now(self.model.optimizer)
            going_on = {}   # the heads early stopping kept, with their figures, for the search's pruning
            for k, figures in {k: _figures(logs, j, _penalty(named[k])) for j, k in enumerate(self.active)
                               if k in self.live}.items():
                _append(self.histories[k], {**figures, "seconds": seconds / len(self.active), "shared_by":
                                            len(self.active), "learning_rate": rate * configs[k].learning_rate})
                if self.patience[k].stops(epoch, figures["val_loss"]):
                    self._stop(k)
                else:
                    going_on[k] = figures
            if on_epoch is not None and going_on:
                for k in sorted(set(on_epoch(epoch, going_on)) & going_on.keys()):
                    self._stop(k)
            self.model.optimizer.head_rates.assign(
                np.array([configs[k].learning_rate if k in self.live else 0.0 for k in self.active], np.float32))
            self.epochs_done = epoch + 1
            ahead = min(configs[0].epochs - epoch - 1,
                        max((self.patience[k].ahead(epoch) for k in self.live), default=0))
            self.model.stop_training = self.restarts.after(seconds, self.active, self.live, ahead)
            self.bar.set_postfix(heads=len(self.live), refresh=False)
            self.bar.update(1)

        def _stop(self, k):
            self.live.remove(k)   # its weights as they are now: later steps would move its BatchNorm
            self.left_with[k] = named[k].get_weights()

        def finish(self):
            self.bar.close()
            _restore(named, self.patience, self.left_with)

    return Watch()


def _restore(named: list, patience: list, left_with: list) -> None:
    """Each head's best weights, as Keras' EarlyStopping restores them; else the weights where it stopped."""
    for head, watched, last in zip(named, patience, left_with):
        if watched.best_weights is not None or last is not None:
            head.set_weights(watched.best_weights if watched.best_weights is not None else last)


def _append(history: dict, values: dict) -> None:
    """One epoch's `values` onto a head's `history` (Keras' History layout: a list per figure)."""
    for key, value in values.items():
        history.setdefault(key, []).append(value)


class Restarts:
    """When a pass should go on without its stopped heads. A stopped head still costs its share of each epoch's
    arithmetic; leaving it out costs a new model's start (tracing and compiling its steps: 1-7 s here for 1-12 dense
    heads, more than an epoch of small heads on a few hundred images). The pass restarts once the stopped heads hold
    half the model's weights (each model then has at most half the arithmetic of the one before: few starts), and
    only once what they have wasted since, with what the epochs the pass is sure to run yet (those the live heads'
    early stopping cannot end sooner) would waste, reaches what a start costs: on a large split as soon as half the
    weights stop, on a small one seldom or never. Counting the waste already paid bounds what waiting can lose (at
    most a start's worth, the rule of renting skis) where the heads train on for longer than they must. (A
    search's pruner can end a head sooner than its early stopping: then a restart may not pay back.)

    A start's cost is measured on each model: its first epoch (which traces and compiles) less its quickest (the
    first model's first epoch stands for it until its second is timed); an epoch's waste is its time without the
    start times the stopped heads' share of the weights."""

    def __init__(self, sizes: list[int]):
        self.sizes, self.start_cost = sizes, None   # each head's weights
        self.begin()

    def begin(self) -> None:
        """A new model: its epochs timed afresh, nothing wasted yet."""
        self.epochs, self.wasted = [], 0.0

    def after(self, seconds: float, active: list, live: list, ahead: int) -> bool:
        """Whether the model of heads `active` ends after an epoch of `seconds`: none of them `live`, or a restart
        due (`ahead`: the epochs the pass will surely run yet)."""
        # a dense head's arithmetic per row is its weights: by weights, not by count (a grid's large heads stop first)
        stopped = 1 - sum(self.sizes[k] for k in live) / sum(self.sizes[k] for k in active)
        return not live or self.now(seconds, stopped, ahead)

    def now(self, seconds: float, stopped: float, ahead: int) -> bool:
        """Whether to restart after an epoch of `seconds`, `stopped` (0-1) being the share of the model's weights
        whose heads have stopped, and `ahead` the epochs the pass will surely run yet."""
        self.epochs.append(seconds)
        if len(self.epochs) > 1:
            self.start_cost = max(self.epochs[0] - min(self.epochs[1:]), 0.0)
        cost = self.epochs[0] if self.start_cost is None else self.start_cost
        waste = stopped * (min(self.epochs[1:]) if len(self.epochs) > 1 else max(self.epochs[0] - cost, 0.0))
        if stopped < 0.5 or self.wasted + waste * ahead >= cost:
            return stopped >= 0.5
        self.wasted += waste   # the next epoch's, paid by going on
        return False


class _Patience:
    """keras.callbacks.EarlyStopping's rule (on val_loss, best weights kept) for one head of a pass."""

    def __init__(self, head, patience: int, start_from: int):
        self.head, self.patience, self.start_from = head, patience, start_from
        self.best, self.best_epoch, self.wait, self.best_weights = math.inf, 0, 0, None

    def ahead(self, epoch: int) -> int:
        """The epochs after `epoch` that the head will surely train (its early stopping cannot end it sooner)."""
        return self.start_from + self.patience - epoch if epoch < self.start_from else max(self.patience - self.wait, 1)

    def stops(self, epoch: int, current: float) -> bool:
        """Whether the head stops after `epoch`, whose validation loss is `current`."""
        if epoch < self.start_from:
            return False
        if self.best_weights is None:
            self.best_weights, self.best_epoch = self.head.get_weights(), epoch
        self.wait += 1
        if current < self.best:
            self.best, self.best_epoch, self.wait = current, epoch, 0
            self.best_weights = self.head.get_weights()
            return False
        return self.wait >= self.patience and epoch > 0


def stopping_when(on_epoch):
    """A Keras callback for a head trained alone: `on_epoch(epoch, figures)` returning True stops it there."""
    import keras

    class StoppingWhen(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            figures = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}
            if on_epoch(epoch, figures):
                self.model.stop_training = True

    return StoppingWhen()


def _figures(logs: dict, k: int, penalty: float) -> dict:
    """Head k's figures of an epoch, named as a model trained alone names them."""
    out = {"loss": logs[f"h{k}_loss"] + penalty, "accuracy": logs[f"h{k}_accuracy"],
           "val_loss": logs[f"val_h{k}_loss"] + penalty, "val_accuracy": logs[f"val_h{k}_accuracy"]}
    if f"h{k}_balanced_accuracy" in logs:
        out.update(balanced_accuracy=logs[f"h{k}_balanced_accuracy"],
                   val_balanced_accuracy=logs[f"val_h{k}_balanced_accuracy"])
    return {key: float(v) for key, v in out.items()}


def _rate_now(optimizer) -> float:
    """The optimizer's rate factor now (1, or the cosine schedule's value)."""
    import keras

    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
