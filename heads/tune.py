"""`featcache search --engine ray`: the same trials as Ray Tune trials on a cluster.

Optuna's sampler proposes the trials through Ray Tune's OptunaSearch, into the same study storage as
the local engine; Ray Tune's ASHA (or median stopping) scheduler stops bad trials from the validation
figure each epoch reports. The search's data is put in Ray's object store once (`tune.with_parameters`)
and every trial reads it from there, on the cluster handling of `extract --engine ray`
(featcache.cluster: a cluster of its own when no address is given, no process left after it).
Each trial is the local engine's (heads.trial.evaluate), seeded the same, so a grid gives the same
figures on both engines.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from pathlib import Path

from featcache import cluster, system
from featcache.errors import BadInputError
from heads import search as hs
from heads.config import TrainConfig
from heads.trial import SearchData, evaluate

log = logging.getLogger(__name__)
#: The Optuna trial number each Ray trial carries in its config, so that records join on it.
NUMBER = "optuna_trial"
#: The running best of the objective, which OptunaSearch records (the restored weights' figure).
BEST = "best_so_far"


def optimize(study, params: list, base: TrainConfig, data: SearchData, *, pruner: str, objective: str,
             trials: int, timeout: float | None, folder: Path, storage: str | None, address: str | None,
             workers: int | None, progress: bool) -> dict:
    """Run `trials` trials of `study` on Ray; {Optuna trial number: what its last report said}."""
    ray = cluster.import_ray()
    tune, OptunaSearch = _import_tune()
    from ray.tune.logger import JsonLoggerCallback

    _fail_left_running(study)
    _load_all(data, params, base)   # the arrays travel to the object store whole, once
    with cluster.owned_cluster(ray, address, folder / cluster.PROCESSES_FILE) as owned, \
            contextlib.redirect_stdout(sys.stderr):   # Ray Tune's messages are not the CLI's result
        n_workers, threads, _ = cluster.plan_workers(ray, workers, trials)
        owned.record()
        searcher = OptunaSearch(space=functools.partial(_suggest, params=params), metric=BEST,
                                mode="min" if objective == "val_loss" else "max", study_name=study.study_name,
                                storage=hs.open_storage(folder, storage, heartbeats=False), sampler=study.sampler)
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, params=params, base=base, data=data, objective=objective,
                                 logs=str((folder / "tensorboard").absolute()), env=cluster.worker_env(threads)),
            {"cpu": threads})
        bar = system.progress_bar(trials, unit="trial", desc="search (ray)", enabled=progress)
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=_scheduler(tune, pruner, objective, base.epochs), num_samples=trials,
            max_concurrent_trials=n_workers, time_budget_s=timeout),
            run_config=tune.RunConfig(name=study.study_name, storage_path=str((folder / "ray").absolute()),
                                      verbose=0, callbacks=[_progress(tune, bar), JsonLoggerCallback()]))
        grid = tuner.fit()
        bar.close()
    return _reports(grid)


def _import_tune():
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")   # the trials write TensorBoard logs themselves
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # with verbose=0: no tables of Ray Tune's own on the console
    try:
        from ray import tune
        from ray.tune.search.optuna import OptunaSearch, optuna_search
    except ImportError as e:
        raise BadInputError(f"--engine ray needs Ray Tune ({e}); fix: pip install 'featcache[ray]' (or use "
                            "--engine local)") from e
    if not any(isinstance(f, _GridDone) for f in optuna_search.logger.filters):
        optuna_search.logger.addFilter(_GridDone())
    return tune, OptunaSearch


class _GridDone(logging.Filter):
    """Drops the warning OptunaSearch logs when the grid sampler, its grid run, asks the study to stop (which
    only Study.optimize can): the search ends by its trial count."""

    def filter(self, record):
        return "Study.stop" not in record.getMessage()


def _suggest(trial, params: list) -> dict:
    """OptunaSearch's define-by-run space: the local engine's suggestions, plus the trial's number."""
    for p in params:
        hs.suggest(trial, p)
    return {NUMBER: trial.number}


def _scheduler(tune, pruner: str, objective: str, epochs: int):
    """Ray Tune's counterpart of each Optuna pruner, on each epoch's validation figure (from epoch 2 on)."""
    mode = "min" if objective == "val_loss" else "max"
    if pruner == "asha":
        return tune.schedulers.ASHAScheduler(metric=objective, mode=mode, max_t=epochs + 1, grace_period=2,
                                             reduction_factor=4)
    if pruner == "median":
        return tune.schedulers.MedianStoppingRule(metric=objective, mode=mode, grace_period=2, min_samples_required=3)
    return tune.schedulers.FIFOScheduler()


def _trainable(config: dict, *, params: list, base: TrainConfig, data: SearchData, objective: str, logs: str, env: dict):
    """One Ray Tune trial: the trial's values from `config`, fitted as the local engine fits them, each epoch
    and the end reported to Ray Tune."""
    os.environ.update(env)   # before this worker imports TensorFlow: threads sized to the trial's CPUs
    import keras
    from ray import tune

    number, running = config[NUMBER], []
    better = min if objective == "val_loss" else max

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(objective)
            if value is not None and math.isfinite(value):
                running[:] = [better(running + [float(value)])]
                tune.report({**{k: float(logs[k]) for k in hs.OBJECTIVES if k in logs}, BEST: running[0],
                             "final": False, NUMBER: number})

    values = {p.name: hs.value_of(p, config[p.name]) for p in params}
    figures = evaluate(values, base, data, Path(logs) / f"trial-{number}", [Report()])
    tune.report({**figures, BEST: figures[objective], "final": True, NUMBER: number})


def _load_all(data: SearchData, params: list, base: TrainConfig) -> None:
    """Read every (layer set, pooling) the space can ask for, so that the trials never read the caches."""
    import itertools

    from heads.feed import is_streamed

    choices = {p.name: p.choices for p in params if p.choices is not None and p.name in (hs.LAYERS, "pooling",
                                                                                          "model")}
    for combo in itertools.product(*choices.values()):
        values = dict(zip(choices, combo))
        try:
            config = hs.trial_config(base, values)
        except BadInputError:
            continue   # a combination no trial can run (its trials fail as on the local engine)
        if is_streamed(data.get(config, values.get(hs.LAYERS))[0].x_train):
            raise BadInputError("--engine ray places the features in Ray's object store, but these maps are "
                                "streamed from disk (bigger than the memory budget); fix: a pooling head (gap, "
                                "max), or --engine local")


def _fail_left_running(study) -> None:
    """Trials a killed driver left running are failed (Ray trials send no heartbeats), so they are run again."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def _progress(tune, bar):
    """A Ray Tune callback advancing `bar` as each trial ends (Ray Tune is imported only where this engine runs)."""
    class Progress(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            bar.update(1)

        on_trial_error = on_trial_complete

    return Progress()


def _reports(grid) -> dict:
    """{Optuna trial number: the last report} of every Ray trial; errors logged in one line each."""
    out = {}
    for result in grid:
        if result.error is not None:
            log.warning("a Ray trial failed: %s", cluster.one_line(result.error))
        if result.metrics and NUMBER in result.metrics:
            out[result.metrics[NUMBER]] = result.metrics
    return out
