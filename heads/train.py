"""One training function for every model: heads on cached features and scratch baselines alike.

The validation split is carved from the training split (stratified, seeded, at least one row per
class); early stopping watches validation loss and restores the best epoch's weights (the linear
probe is solved by L-BFGS instead, heads.probe); the default head, "auto", keeps whichever of its
candidates (`auto_grid`: the conv head on maps in RAM or else the dense head, and the probe) has the lower
validation loss. The test split is predicted exactly once,
after training, and nothing is chosen by it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from featcache.errors import BadInputError, DivergedError
from featcache.options import given_or_built
from heads import balance, feed
from heads.builders import MODELS
from heads.config import AUTO, AUTO_CANDIDATES, RUNS_DIR, VIEWS_MODES, TrainConfig, pools_first, reads_maps_if_they_fit
from heads.data import (
    TrainData,
    data_from_cache,
    data_from_caches,
    data_from_dataset,
    in_ram_if_it_fits,
    split_indices,
    stratified_subset,
    subset,
)
from heads.fit import Fitted, fit, fit_schedule, refit
from heads.fitting import C_PATH, VOTE
from heads.metrics import evaluate, predict
from heads.probe import clearly_behind

#: What a notebook imports from here; the data side lives in heads.data and heads.config, re-exported.
__all__ = ["AUTO", "VIEWS_MODES", "RunResult", "TrainConfig", "TrainData", "Validated", "choose", "data_from_cache",
           "data_from_caches", "data_from_dataset", "fit_and_choose", "fit_and_choose_all", "fit_schedule",
           "pools_first", "predict", "split_indices", "stratified_subset", "subset", "train", "train_baseline",
           "train_head"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path | None
    config: TrainConfig
    metrics: dict
    history: dict
    model: object = field(repr=False, default=None)


def train(data: TrainData, config: TrainConfig | None = None, *, runs_dir: str | Path | None = RUNS_DIR,
          progress: bool = True, validated: Validated | None = None) -> RunResult:
    """Train `config.model` on `data`, evaluate once on the test split, and record the run.

    With `config.model == "auto"` the candidates of `auto_grid` (the conv head or the dense head, and the
    linear probe) are fitted on the same training rows and the one with the lower validation loss is kept
    (and alone sees the test split). With `config.per_class`, training and validation use that many training images per
    class only. With `runs_dir=None` nothing is written (the result still carries metrics and model).
    `validated`: what `fit_and_choose` (or `fit_and_choose_all`) already chose for `config` on `data` (a search's
    winning trial): it is tested and recorded as it is, not trained again.
    """
    config = TrainConfig() if config is None else config
    if data.random_weights:
        log.warning("WARNING: these features come from RANDOM backbone weights, not ImageNet")
    logs = None
    if runs_dir is not None:
        from heads.reports import check_runs_dir

        logs = Path(tempfile.mkdtemp(prefix=".tensorboard-", dir=check_runs_dir(runs_dir)))   # before training
    try:
        return _train_and_test(data, config, runs_dir, logs, progress, validated)
    finally:
        if logs is not None:
            shutil.rmtree(logs, ignore_errors=True)   # moved into the run folder, unless training failed


def _train_and_test(data: TrainData, config: TrainConfig, runs_dir, logs: Path | None, progress: bool,
                    validated: Validated | None) -> RunResult:
    from heads.logs import epochs_callback, write_epochs

    if validated is None:
        validated = fit_and_choose(data, config, progress=progress,
                                   callbacks=epochs_callback(logs) if logs is not None else ())
    elif logs is not None:   # its epochs, as the TensorBoard callback would have written them
        write_epochs(logs, validated.chosen.history)
    data, chosen, fits, (tr, va) = validated.data, validated.chosen, validated.fits, validated.rows
    tested = refit(data, chosen, (tr, va), progress) if config.refit else chosen
    # the one and only look at the test split (pooled vectors go to the model past its pooling layer)
    probs = predict(tested.fit_model if data.pooled_by else tested.model, data.x_test, config.batch_size)
    metrics = {**evaluate(probs, data.y_test, data.class_names), **_fit_metrics(chosen, fits, data, config, tr, va),
               **_balance_metrics(config, data, tr), **(_refit_metrics(tested, tr, va) if config.refit else {})}
    result = RunResult(None, config, metrics, chosen.history, tested.model)
    if runs_dir is not None:
        from heads.reports import write_run

        result.run_dir = write_run(Path(runs_dir), result, data, tensorboard=logs)
    log.info("%s: val accuracy %.4f (best %s of %d), test accuracy %.4f%s, %.1f s",
             (config.name or config.model) + (f" (chose {chosen.config.model})" if config.model == AUTO else "")
             + (f", refitted on {len(tr) + len(va)} rows" if config.refit else ""),
             metrics["val_accuracy"], MODELS[chosen.config.model].fitting.setting(metrics), metrics["epochs_run"], metrics["test_accuracy"],
             f" (balanced {metrics['test_balanced_accuracy']:.4f})" if metrics["class_weight"] == "balanced" else "",
             metrics["seconds"])
    return result


@dataclass
class Validated:
    """What training chose on the validation rows, before any look at the test split."""

    data: TrainData             # the data trained on (a --per-class subset, maps read into RAM)
    chosen: Fitted
    fits: list[Fitted]          # every candidate fitted (auto: those of auto_grid)
    rows: tuple                 # (training rows, validation rows) of data's training split


def fit_and_choose(data: TrainData, config: TrainConfig, *, progress: bool = True, pooled: dict | None = None,
                   callbacks=()) -> Validated:
    """Fit `config.model` (or auto's candidates) and choose by validation loss; the test split is not touched.

    `pooled` keeps the maps pooled once per pooling across calls on the same data (search trials);
    `callbacks` are Keras callbacks of the models trained by epochs (a search's pruning)."""
    import keras

    data, pooled = _rows_of(data, config, pooled)
    candidates = _candidates(config, data)   # checked before any training, not after the first candidate
    tr, va = split_indices(data.y_train, config.val_fraction, config.seed, data.class_names)
    fits = []
    for c in candidates:   # auto: the conv or dense head first, so that the probe can stop once it cannot win
        keras.utils.set_random_seed(c.seed)
        rival = _best(fits).val_rows if fits else None
        fits.append(fit(data, c, tr, va, progress, pooled, rival=rival, keep_rows=len(candidates) > 1,
                        callbacks=callbacks))
    chosen = choose(fits)   # validation only: the test split plays no part
    if not np.isfinite(chosen.val_loss):
        raise DivergedError(f"training diverged: the validation loss of {', '.join(f.config.model for f in fits)} is "
                            f"not finite (learning rate {chosen.config.learning_rate}); fix: a lower --lr")
    return Validated(data, chosen, fits, (tr, va))


def _rows_of(data: TrainData, config: TrainConfig, pooled: dict | None) -> tuple[TrainData, dict]:
    """What `config` trains on: its --per-class subset of `data` (maps read into RAM where they fit), and the memo
    of maps pooled once per pooling, shared across calls on the same rows (a new one for a subset: other rows)."""
    if config.per_class is not None:
        data, pooled = subset(data, config.per_class, config.subset_seed), None
    return in_ram_if_it_fits(data), {} if pooled is None else pooled


def fit_and_choose_all(data: TrainData, configs: list[TrainConfig], *, progress: bool = False,
                       pooled: dict | None = None, on_epoch=None) -> list[Validated]:
    """`fit_and_choose` for many configurations on the same rows: their candidates (auto's too) that can share a
    pass are trained together (heads.together), the others after them, each distinct one once (the probe of
    every auto configuration with the same pooling is one fit). `on_epoch(epoch, figures)` sees each epoch's
    figures of the configurations still training ({i: figures}; those of a pass together) and returns the
    configurations to stop there (a search's pruning); a configuration of several candidates (auto) is not shown,
    since no one candidate's epochs are its score (its probe, fitted after the passes, may win). The test split is
    not touched."""
    if len({(c.per_class, c.subset_seed, c.val_fraction, c.seed) for c in configs}) != 1:
        raise ValueError("fit_and_choose_all trains configurations on the same rows (per_class, seeds, val_fraction)")
    data, pooled = _rows_of(data, configs[0], pooled)
    owners, candidates = zip(*[(i, c) for i, config in enumerate(configs) for c in _candidates(config, data)])
    rows = split_indices(data.y_train, configs[0].val_fraction, configs[0].seed, data.class_names)
    fits = _fit_candidates(data, list(candidates), owners, rows, progress, pooled, on_epoch)
    out = []
    for i in range(len(configs)):
        mine = [fits[n] for n in range(len(candidates)) if owners[n] == i]
        out.append(Validated(data, choose(mine), mine, rows))
    return out


def _fit_candidates(data: TrainData, candidates: list, owners: tuple, rows: tuple, progress: bool, pooled: dict,
                    on_epoch) -> dict:
    """Candidate index -> Fitted: Adam heads in the passes of heads.together.groups, then the rest."""
    import keras

    from heads.together import fit_together, groups, pass_key, stopping_when

    fits, alone = {}, {}
    judged = {o for o in owners if owners.count(o) == 1}   # auto's score is no one candidate's epochs
    for group in groups(candidates, data):
        if pass_key(candidates[group[0]], data) is None:
            continue
        stop = None if on_epoch is None else (
            lambda e, f, g=group: _by_owner(on_epoch, e, f, [owners[n] for n in g], judged))
        fits.update(zip(group, fit_together(data, [candidates[g] for g in group], *rows, progress=progress,
                                            pooled=pooled, on_epoch=stop)))
    for n, c in enumerate(candidates):
        if n not in fits:
            spec = MODELS[c.model]   # a probe or kNN depends on these alone: auto's probes are one fit
            key = ((c.model, *(getattr(c, k) for k in spec.options), c.class_weight, c.views_mode, c.seed)
                   if not spec.fitting.by_epochs else repr(c))
            if key not in alone:
                keras.utils.set_random_seed(c.seed)
                stop = [] if on_epoch is None or owners[n] not in judged else [
                    stopping_when(lambda e, f, i=owners[n]: i in on_epoch(e, {i: f}))]
                alone[key] = fit(data, c, *rows, progress, pooled, callbacks=stop)
            fits[n] = alone[key]
    return fits


def _by_owner(on_epoch, epoch: int, figures: dict, owner_of: list, judged: set) -> set:
    """The heads of a pass that `on_epoch` stops, asked with the figures of the `judged` configurations owning
    them (those of one candidate)."""
    by_owner = {owner_of[k]: f for k, f in figures.items() if owner_of[k] in judged}
    stopped = set(on_epoch(epoch, by_owner)) if by_owner else set()
    return {k for k in figures if owner_of[k] in stopped}


#: A candidate is kept over the linear probe only when its validation loss is lower by more than this many
#: standard errors of their row-by-row difference.
STANDARD_ERRORS = 1.0


def choose(fits: list):
    """The fit of least validation loss, but the linear probe, the simplest candidate, stays unless another's loss
    is lower by more than STANDARD_ERRORS standard errors of their row-by-row difference: the one-standard-error
    rule (Breiman et al.'s CART, Hastie et al.'s ESL 7.10). On a few dozen validation images a lower loss by less
    than that is noise, and the larger head then tested worse (docs/guides/heads.md, "Small datasets")."""
    best = _best(fits)
    probe = next((f for f in fits if MODELS[f.config.model].fitting is C_PATH), None)
    if (probe is None or best is probe or not np.isfinite(probe.val_loss) or best.val_rows is None
            or probe.val_rows is None):
        return best
    if len(best.val_rows) < 2:
        return best
    return best if clearly_behind(probe.val_rows - best.val_rows, errors=STANDARD_ERRORS) else probe


def _best(fits: list):
    """The fit of least validation loss; a loss that is not finite (a diverged fit) never wins over one that is."""
    return min(fits, key=lambda f: f.val_loss if np.isfinite(f.val_loss) else np.inf)


def _candidates(config: TrainConfig, data: TrainData) -> list[TrainConfig]:
    """The configurations to fit: one, or auto's candidates (less the probe where the maps are streamed)."""
    candidates = auto_grid(config, data) if config.model == AUTO else [config]
    for c in candidates:
        if MODELS[c.model].input != data.kind:
            raise BadInputError(f"model {c.model!r} trains on {MODELS[c.model].input}, but the data holds {data.kind}")
    if feed.is_streamed(data.x_train):
        probes = [c for c in candidates if MODELS[c.model].fitting is C_PATH]
        if probes and config.model != AUTO:
            raise BadInputError(feed.NEEDS_RAM)
        if probes:
            log.info("the linear probe needs its rows in memory and these maps are streamed: auto fits the dense "
                     "head alone")
            candidates = [c for c in candidates if c not in probes]
    return candidates


#: The conv head in auto's grid flattens about this many values a row: its 1x1 convolution's filters are this
#: over the map's cells (32 for a 4x4 VGG16 block3_pool map of CIFAR-10), within CONV_FILTERS_RANGE.
CONV_FLAT_VALUES = 512
CONV_FILTERS_RANGE = (8, 128)


def auto_grid(config: TrainConfig, data: TrainData) -> list[TrainConfig]:
    """auto's candidates, fitted in this order (the probe last, racing the other): on one layer's maps held in RAM,
    the conv head, which keeps where in the image a feature fired (the dense head's global pooling throws that
    away); else the dense head; and the linear probe, which wins on small splits. docs/guides/heads.md says why
    the grid is not larger."""
    shape = tuple(data.x_train.shape[1:])
    on_maps = (data.pooled_by is None and not feed.is_streamed(data.x_train) and len(shape) == 3
               and shape[0] * shape[1] > 1)
    if not on_maps:
        return [replace(config, model=m) for m in AUTO_CANDIDATES]
    low, high = CONV_FILTERS_RANGE
    filters = min(high, max(low, CONV_FLAT_VALUES // (shape[0] * shape[1])))
    return [replace(config, model="conv", filters=filters), replace(config, model="linear")]


def _refit_metrics(refitted, tr, va) -> dict:
    """What --refit trained on and what it kept from validation's choice (the run's `seconds` are the choosing fits')."""
    fitting = MODELS[refitted.config.model].fitting
    kept = fitting.chosen(refitted.history, refitted.best)   # the setting refitted, or the epochs it trained
    return {"refit": {"rows": len(tr) + len(va), **kept, "seconds": round(refitted.seconds, 3)}}


def _balance_metrics(config: TrainConfig, data: TrainData, tr) -> dict:
    """The class weighting used and how imbalanced the training rows and the test split are."""
    n_classes = len(data.class_names)
    return {"class_weight": balance.resolve(config.class_weight, data.y_train[tr], n_classes),
            "train_imbalance": round(balance.imbalance(data.y_train[tr], n_classes), 3),
            "test_imbalance": round(balance.imbalance(data.y_test, n_classes), 3)}


def _fit_metrics(chosen: Fitted, fits: list[Fitted], data: TrainData, config: TrainConfig, tr, va) -> dict:
    """What the run records of its fit: validation figures, epochs, sizes, seconds (and auto's candidates)."""
    history, best = chosen.history, chosen.best
    out = dict(
        val_accuracy=float(history["val_accuracy"][best]), val_loss=chosen.val_loss,
        best_epoch=best + 1, epochs_run=len(history["val_loss"]), n_train=len(tr), n_val=len(va),
        n_test=len(data.y_test), seconds=round(sum(f.seconds for f in fits), 3),
        seconds_per_epoch=round(float(np.mean(history["seconds"])), 4), random_weights=data.random_weights,
        params=int(chosen.model.count_params()),
        n_views=data.n_views if config.views_mode != "original" and MODELS[chosen.config.model].fitting is not VOTE
        else 1)   # the kNN head's bank holds the original images only
    if "val_balanced_accuracy" in history:
        out["val_balanced_accuracy"] = float(history["val_balanced_accuracy"][best])
    for key in ("C", "k", "temperature", "smoothing"):   # the probe's and the kNN vote's chosen setting
        if key in history:
            out[key] = history[key][best]
    for key in ("warmup_epochs", "tune_to"):   # a fine-tuned backbone's
        if key in history:
            out[key] = history[key]
    if "batch_size" in history:
        out["batch_size"] = history["batch_size"]
    if config.model == AUTO:
        out["chosen"] = chosen.config.model
        if chosen.val_loss > _best(fits).val_loss:   # choose's rule kept the probe
            out["probe_kept_within_standard_errors"] = STANDARD_ERRORS
        out["candidates"] = {f.config.model: {"val_loss": f.val_loss, "seconds": round(f.seconds, 3),
                                              "val_accuracy": float(f.history["val_accuracy"][f.best]),
                                              **({"stopped_early": True} if f.history.get("raced") else {}),
                                              **_set_by_auto(f.config, config)}
                             for f in fits}
    return out


def _set_by_auto(candidate: TrainConfig, config: TrainConfig) -> dict:
    """{"options": the candidate's options that auto set, not the run's config (the conv head's filters)}."""
    options = {k: getattr(candidate, k) for k in MODELS[candidate.model].options
               if getattr(candidate, k) != getattr(config, k)}
    return {"options": options} if options else {}


def train_head(cache, *, layer=None, config: TrainConfig | None = None, runs_dir=RUNS_DIR, progress=True,
               memory_budget=None, stream: bool = False, **options) -> RunResult:
    """Train a head on a cache path or FeatureCache: `model="auto"` (default: the conv head on one layer's maps
    that fit the memory budget, else the dense head, or the linear probe: whichever has the lower validation
    loss), `"dense"`, `"linear"` or `"conv"`. The training options
    come as a TrainConfig (`config`) or as its fields (`units=(256,)`), validated once.

    `layer` picks the cached layers to train on (default: all). Several layers, from one cache or
    a list of caches of the same images, train on their pooled features, concatenated. Heads that pool
    first read pooled vectors (made once per cache, layer and pooling); heads on maps hold them in RAM
    within `memory_budget` (bytes or "2GB"; default half the available memory) and stream them from
    disk beyond it, or always with `stream=True`.
    """
    config = given_or_built(TrainConfig, config, options, model=AUTO)
    caches = list(cache) if isinstance(cache, (list, tuple)) else [cache]
    data = data_from_caches(caches, config.pooling, layer, prepooled=pools_first(config),
                            maps_if_they_fit=reads_maps_if_they_fit(config), memory_budget=memory_budget, stream=stream,
                            lazy=config.per_class is not None)   # a subset reads its own rows only
    return train(data, config, runs_dir=runs_dir, progress=progress)


def train_baseline(model: str, *, data="cifar10", limit=None, input_size=None, config: TrainConfig | None = None,
                   runs_dir=RUNS_DIR, progress=True, **options) -> RunResult:
    """Train a scratch baseline (`ann` or `cnn`) on the raw pixels of a dataset source, with the training options
    of `config` (a TrainConfig) or given as its fields."""
    from featcache.backbones import check_input_size
    from featcache.sources import load_dataset

    config = given_or_built(TrainConfig, config, options, model=model)
    if config.model != model:
        raise TypeError(f"train_baseline({model!r}) was given a TrainConfig of model {config.model!r}")
    check_input_size(input_size)
    ds = load_dataset(data, limit=limit)
    return train(data_from_dataset(ds, input_size), config, runs_dir=runs_dir, progress=progress)
