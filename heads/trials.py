"""Running a search (heads.search): searchers sharing the study (this process, or Ray actors, handed batches of
trials by the one distributor), each on features it reads once; the winner's one look at the test split; and the
search folder's records (search.json, search.md, Optuna's plots)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from featcache import cluster, system
from featcache.errors import BadInputError, DivergedError
from heads import feed
from heads import search as hs
from heads.config import RUNS_DIR, TrainConfig
from heads.grid import SURPLUS, locked
from heads.trial import SearchData, evaluate, evaluate_together

log = logging.getLogger(__name__)
TEST_LINE = ("Only the winner was evaluated on the test split, once, after the search: every trial was chosen and "
             "compared on the validation split carved from train (seed {seed}), so its test accuracy is the "
             "search's only test figure.")


def run_search(cache, params: list, *, layer=None, search: hs.SearchConfig | None = None,
               config: TrainConfig | None = None, runs_dir=RUNS_DIR, progress: bool = True,
               memory_budget=None, stream: bool = False, **options) -> Path:
    """Search `params` (heads.search.Param, or text as --param spells it: "dropout=0.1|0.3") on a cache path (or
    list of caches); return the search folder.

    `search` (a heads.search.SearchConfig: sampler, trials, pruner, objective, name, engine...) says how the
    search runs, `config` (a TrainConfig) what every trial trains with besides its parameters; or pass their
    fields as keywords (`run_search(cache, params, trials=20, epochs=30)`), each validated once.

    The local engine asks the sampler for `together` trials at a time and fits them together: their heads that
    can share a pass (heads.together) train in one (1: one trial at a time, in Optuna's own loop).

    `engine="ray"` hands the same batches to searchers on Ray actors (featcache.cluster.distribute), on the cluster
    at `ray_address` or one of its own: each is what the local engine is, a process sharing the study.

    Trials on maps hold them in RAM within `memory_budget` (bytes or "2GB"; default half the available memory; a
    searcher on Ray its CPUs' share of it) and stream them beyond it, or always with `stream=True`, as
    `heads.train.train_head` does."""
    memory_budget, stream = feed.checked_feed(memory_budget, stream)   # refused before any work
    params = hs.params_of(params)
    search, base = hs.configs(search, config, options)
    sampler = search.chosen_sampler(params)
    hs.check(params, sampler=sampler)
    hs.check_values(params, base)
    data = SearchData(list(cache) if isinstance(cache, (list, tuple)) else [cache], layer,
                      memory_budget=memory_budget, stream=stream)
    data.check_layers(params)
    _check_probes_have_their_rows(data, params, base)
    folder = system.writable_folder(Path(runs_dir) / f"search-{search.name}", what="search folder",
                                    fix="pass a writable --runs-dir").absolute()
    study = hs.make_study(folder, search.name, params, sampler=sampler, pruner=search.pruner,
                          objective=search.objective, storage=search.storage, seed=base.seed, samples=False)
    hs.check_same_space(study, params, search.name)
    hs.check_same_setting(study, hs.setting(data.cache_keys(), layer, search.objective, base, params),
                          search.name)
    if sampler == "grid" and (search.trials is None or search.trials > hs.grid_size(params)):
        search.warn_unprunable(hs.grid_size(params))   # a grid's points are its trials (said once all is checked)
    from heads.logs import write_search

    write_search(folder / "tensorboard", params, hs.OBJECTIVES)
    left, job = _left(study, params, sampler, search.trials), SearchJob(data, params, base, search, sampler, folder)
    if left is None or left > 0:
        _distributed(job, left, progress=progress)
    return _finish(folder, study, params, base, data, job.kept,
                   dict(sampler=sampler, pruner=search.pruner, objective=search.objective, name=search.name,
                        engine=search.engine, storage=search.storage or "sqlite (study.db)"))


def _check_probes_have_their_rows(data: SearchData, params: list, base: TrainConfig) -> None:
    """A searched linear probe on maps that are streamed is refused before any trial (it stopped the search at its
    first probe trial, others done or running): the probe needs its rows in memory (heads.feed.NEEDS_RAM)."""
    from heads.builders import MODELS
    from heads.fitting import C_PATH

    choices = {p.name: p.choices for p in params if p.name in ("model", "pooling") and p.choices is not None}
    for model in choices.get("model", (base.model,)):
        if MODELS.get(model) is None or MODELS[model].fitting is not C_PATH:
            continue
        for pooling in choices.get("pooling", (base.pooling,)):
            config = hs.trial_config(base, {"model": model, "pooling": pooling})
            if data.streams_maps(config):
                raise BadInputError(f"{feed.NEEDS_RAM}, or leave {model} out of the searched heads")


@dataclass(frozen=True)
class SearchJob:
    """What every searcher of a search works from; it travels to Ray actors (SearchData without its arrays)."""

    data: SearchData
    params: list
    base: TrainConfig
    search: hs.SearchConfig
    sampler: str
    folder: Path
    kept: Kept = dataclasses.field(default_factory=lambda: Kept())


class Kept:
    """The best trial this process fitted, with what it chose (heads.train.Validated), so that a search tests its
    winner as the trial trained it rather than training it again. A copy in another process (a Ray actor's job)
    starts empty: a winner fitted there, or before a search was resumed, is trained again."""

    def __init__(self):
        self.lock, self.trial, self.value, self.validated = threading.Lock(), None, None, None

    def offer(self, trial: int, value: float, validated, objective: str) -> None:
        """Keep trial number `trial` (value `value` of `objective`) if it beats the one kept."""
        sign = 1 if hs.DIRECTIONS[objective] == "minimize" else -1
        with self.lock:
            if not math.isfinite(value):   # Optuna fails such a trial
                return
            if self.trial is None or sign * value < sign * self.value:
                self.trial, self.value, self.validated = trial, value, validated

    def of(self, trial: int):
        """The Validated of trial number `trial`, or None where it is not the one kept."""
        with self.lock:
            return self.validated if self.trial == trial else None

    def __reduce__(self):   # what is kept stays in this process
        return Kept, ()


def _distributed(job: SearchJob, left: int | None, *, progress: bool) -> None:
    """The trials still to run, handed out by the one distributor: tasks of `together` trials (each one batch,
    fitted together) to searchers in this process (local) or on Ray actors; with no trial count, one task per
    searcher that runs batches until the timeout."""
    search = job.search
    if search.engine == "ray":   # a driver killed outright left its cluster's processes, recorded in the folder
        cluster.stop_leftovers(job.folder)
    deadline = None if search.timeout is None else time.time() + search.timeout   # wall clock: Ray actors share it
    if left is None:
        tasks = [(deadline, None)] * (1 if search.engine == "local" else search.workers or os.cpu_count() or 1)
    else:
        tasks = [(deadline, search.together)] * -(-left // search.together)
    with contextlib.redirect_stdout(sys.stderr), \
            system.progress_bar(left, unit="trial", desc=f"search ({search.engine})", enabled=progress) as bar, \
            cluster.distribute(Searcher, lambda threads: (job, None if search.engine == "local" else threads), tasks,
                               engine=search.engine, ordered=False, address=search.ray_address, workers=search.workers,
                               record=job.folder / cluster.PROCESSES_FILE,
                               after_death="the trials it ran are failed and run again: rerun the same command") \
            as done:
        for ran in done:
            bar.update(ran)


class Searcher:
    """One process's part of a search: it opens the study (its sampler seeded seed + k, k counting the processes
    that opened it), then each task asks for a batch of trials, fits it and tells the results, as every process
    sharing the study does. The distributor's worker: this process with the local engine, a Ray actor with ray.

    A Ray actor given `threads` of its node's CPUs holds maps in RAM within that share of the memory budget: the
    searchers of a node each see the same free memory, and would otherwise each take the whole budget."""

    def __init__(self, job: SearchJob, threads: int | None = None):
        self.error, self.job = None, job
        if threads is not None:
            job.data.memory_share = min(1.0, threads / (os.cpu_count() or threads))
        try:
            self.study = hs.make_study(job.folder, job.search.name, job.params, sampler=job.sampler,
                                       pruner=job.search.pruner, objective=job.search.objective,
                                       storage=job.search.storage, seed=job.base.seed)
        except Exception as e:  # noqa: BLE001  (handed to the driver by ready(), which raises it there, once)
            self.error = e
        self.batch = Batch(job.params, job.base, job.data, job.search.objective, job.folder / "tensorboard", job.kept)

    def ready(self):
        return self.error

    def run(self, deadline: float | None, share: int | None) -> int:
        """Run `share` trials (None: until `deadline`), fewer where the study has its count; how many ran."""
        timeout = None if deadline is None else deadline - time.time()
        if timeout is not None and timeout <= 0:
            return 0
        ran = _Count()
        run = _in_batches if self.job.search.together > 1 else _one_at_a_time
        run(self.study, self.batch, left=share, together=self.job.search.together, timeout=timeout,
            trials=self.job.search.trials, bar=ran)
        return ran.n


class _Count:
    """The progress bar a searcher's loop updates: a count of the trials it ran."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += int(n)


@dataclass
class Batch:
    """What every batch of a search fits its trials on."""

    params: list
    base: TrainConfig
    data: SearchData
    objective: str
    logs: Path
    kept: Kept


def _one_at_a_time(study, batch: Batch, *, left: int | None, together: int, timeout: float | None,
                   trials: int | None, bar) -> None:
    """Optuna's own loop, one trial at a time."""
    # every process on the study stops once the study holds `trials` ended trials in all
    in_all = [] if trials is None else [optuna.study.MaxTrialsCallback(trials, states=ENDED)]
    study.optimize(lambda t: _trial(t, batch),
                   n_trials=left, timeout=timeout, callbacks=[lambda s, t: bar.update(not _surplus(t)), *in_all],
                   catch=(FloatingPointError,))


def _in_batches(study, batch: Batch, *, left: int | None, together: int, timeout: float | None,
                trials: int | None, bar) -> None:
    """Optuna's ask and tell, `together` trials at a time, each batch fitted together (heads.trial.evaluate_together)
    under heartbeats, so that a batch left by a killed process is failed and run again, as in Study.optimize."""
    with warnings.catch_warnings():   # the caller's filters as they were afterwards
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)   # fail_stale_trials
        warnings.filterwarnings("ignore", message="Heartbeat of storage")   # sent here, not by Study.optimize
        _batch_after_batch(study, batch, left=left, together=together, timeout=timeout, trials=trials, bar=bar)


def _batch_after_batch(study, batch: Batch, *, left: int | None, together: int, timeout: float | None,
                       trials: int | None, bar) -> None:
    end = None if timeout is None else time.monotonic() + timeout
    idle_since = None
    while (left is None or left > 0) and (end is None or time.monotonic() < end):
        optuna.storages.fail_stale_trials(study)
        asked: list = []
        with _failed_if_raised(study, asked):
            with locked(batch.logs.parent):   # processes sharing the study take --trials between them
                taken = len([t for t in study.get_trials(deepcopy=False, states=(*ENDED, TrialState.RUNNING))
                             if not _surplus(t)])
                wanted = min([together, *(n for n in (left, None if trials is None else trials - taken)
                                          if n is not None)])
                _ask(study, wanted, asked)
            if asked:
                with _heartbeats(study, asked):
                    _fit_batch(study, asked, batch)
        if asked:
            idle_since = None
            bar.update(len(asked))
            left = None if left is None else left - len(asked)
        if len(asked) < wanted or wanted <= 0:   # the rest is other processes' (or a grid has every point started)
            # trials still running may be those of a process killed moments ago: they are failed once their
            # heartbeat is stale, then run here (a rerun at once stopped short of --trials); a live one's end
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > hs.GRACE_S + hs.HEARTBEAT_S or not _running(study):
                return
            time.sleep(1)


def _running(study) -> bool:
    """Whether the study has trials running (with heartbeats: a dead process's are failed once stale)."""
    storage = study._storage
    if not hasattr(storage, "get_heartbeat_interval") or storage.get_heartbeat_interval() is None:
        return False
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


@contextlib.contextmanager
def _failed_if_raised(study, asked: list):
    """A batch that raises (bad input, Ctrl-C, a Ray actor stopped): its trials (`asked`, as it is then) not yet
    told are failed rather than left running (where a rerun waited for their heartbeat to go stale), and retried
    with the same parameters as stale ones are (a grid point failed without its retry was never run again)."""
    try:
        yield
    except BaseException:
        storage = study._storage
        # the storage's stale-trial callback (open_storage's retry), on storages that keep one
        retry = (storage.get_heartbeat_stale_trial_callback()
                 if hasattr(storage, "get_heartbeat_stale_trial_callback") else None)
        for t in asked:
            if study.get_trials(deepcopy=False)[t.number].state == TrialState.RUNNING:
                study.tell(t, state=TrialState.FAIL)
                if retry is not None:
                    retry(study, study.get_trials(deepcopy=False)[t.number])
        raise


def _ask(study, n: int, asked: list) -> None:
    """Up to `n` new trials into `asked` (fewer once a grid has every point started: its surplus trial ends
    unrecorded), each as soon as it is asked (an interrupted batch fails every trial it asked)."""
    for _ in range(n):
        trial = study.ask()
        if _surplus_asked(trial):
            study.tell(trial, state=TrialState.PRUNED)
            break
        asked.append(trial)


def _fit_batch(study, asked: list, batch: Batch) -> None:
    """Fit the asked trials together; tell Optuna each one's value, or that it was pruned or failed."""
    values = [{p.name: hs.suggest(t, p) for p in batch.params} for t in asked]
    pruned, reported, last = set(), set(), {}

    def report(epoch: int, figures: dict) -> set:
        """Report every trial's figure of `epoch` first, then ask the pruner about each: trials that reach an
        epoch together are judged together, in no order."""
        now = []
        for i, f in figures.items():
            value = f.get(batch.objective)
            if value is not None and math.isfinite(value) and (i, epoch) not in reported:   # a stage restarts
                reported.add((i, epoch))
                asked[i].report(value, epoch)
                now.append(i)
                last[i] = {"epochs_run": epoch + 1, **{k: float(f[k]) for k in hs.OBJECTIVES if k in f}}
        pruned.update(i for i in now if asked[i].should_prune())
        return pruned & figures.keys()

    try:
        fitted = evaluate_together(values, batch.base, batch.data,
                                   [batch.logs / f"trial-{t.number}" for t in asked], report)
    except FloatingPointError as e:
        log.warning("trials %s failed: %s", [t.number for t in asked], e)
        for t in asked:
            study.tell(t, state=TrialState.FAIL)
        return
    for i, (t, (f, validated)) in enumerate(zip(asked, fitted)):
        if i in pruned:   # its figures of the epoch it was pruned at, whose value Optuna records for it
            f = {**f, **last[i]}
        for key, value in f.items():
            t.set_user_attr(key, value)
        if i in pruned:
            study.tell(t, state=TrialState.PRUNED)
        elif not math.isfinite(f[batch.objective]):
            log.warning("trial %d failed: training diverged (%s %s); fix: a lower --lr", t.number, batch.objective,
                        f[batch.objective])
            study.tell(t, state=TrialState.FAIL)
        else:
            study.tell(t, f[batch.objective])
            batch.kept.offer(t.number, f[batch.objective], validated, batch.objective)


@contextlib.contextmanager
def _heartbeats(study, asked: list):
    """The asked trials' heartbeats every HEARTBEAT_S while they train (Optuna's loop sends them per trial)."""
    storage = study._storage
    if not hasattr(storage, "record_heartbeat") or storage.get_heartbeat_interval() is None:
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            for t in asked:
                storage.record_heartbeat(t._trial_id)
            if stop.wait(hs.HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _surplus_asked(trial) -> bool:
    """Whether OncePerPoint marked this live trial SURPLUS (read from the storage: the trial's own copy of its
    attributes was taken before the sampler saw it)."""
    return bool(trial.study.get_trials(deepcopy=False)[trial.number].user_attrs.get(SURPLUS))


def _surplus(t) -> bool:
    """A grid trial that was not run (OncePerPoint): left out of every count and record."""
    return bool(t.user_attrs.get(SURPLUS)) and t.state == TrialState.PRUNED and not t.intermediate_values


def _left(study, params: list, sampler: str, trials: int | None) -> int | None:
    """Trials still to run: `trials` less those run to an end, completed or pruned (a grid: no more than its points
    not yet run). A failed trial does not count: it is run again."""
    done = len([t for t in study.get_trials(deepcopy=False, states=ENDED) if not _surplus(t)])
    left = None if trials is None else max(0, trials - done)
    if sampler == "grid":
        left = max(0, hs.grid_size(params) - done) if left is None else min(left, max(0, hs.grid_size(params) - done))
    return left


#: The trials `--trials` counts: run to an end (failed ones are run again).
ENDED = (TrialState.COMPLETE, TrialState.PRUNED)


def _trial(trial, batch: Batch) -> float:
    if _surplus_asked(trial):   # another process sharing the study started the grid's last point
        trial.study.stop()
        raise optuna.TrialPruned()
    values = {p.name: hs.suggest(trial, p) for p in batch.params}
    try:
        figures, validated = evaluate(values, batch.base, batch.data, batch.logs / f"trial-{trial.number}",
                                      [hs.pruning_callback(trial, batch.objective)])
    except DivergedError as e:   # this trial's failure, not the search's: Optuna records it failed and goes on
        log.warning("trial %d failed: %s", trial.number, e)
        return math.nan
    for key, value in figures.items():
        trial.set_user_attr(key, value)
    batch.kept.offer(trial.number, figures[batch.objective], validated, batch.objective)   # returned: complete
    return figures[batch.objective]


def _finish(folder: Path, study, params: list, base: TrainConfig, data: SearchData, kept: Kept,
            settings: dict) -> Path:
    """Test the winner, as its trial trained it where this process fitted it (else trained once more), then write
    the records; the search folder is returned."""
    from heads.reports import write_json
    from heads.train import train

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        raise BadInputError(f"no trial of search {settings['name']!r} finished ({_states(study)}); nothing to test; "
                            "fix: a longer --timeout, or the cause the log gives for failed trials")
    best = study.best_trial
    values = {p.name: hs.value_of(p, best.params[p.name]) for p in params}
    config = hs.trial_config(base, values)
    train_data, _ = data.get(config, values.get(hs.LAYERS))
    tested = _tested_before(folder, best.number)
    if tested is None:
        validated = kept.of(best.number)
        winner = train(train_data, dataclasses.replace(config, name=f"{settings['name']}-winner"),
                       runs_dir=folder, progress=False, validated=validated)
        refit = winner.metrics.get("refit")   # --refit: the chosen setting trained on train + validation
        tested = {"run": winner.run_dir.name, "params": best.params, "test_accuracy": winner.metrics["test_accuracy"],
                  "val_loss": winner.metrics["val_loss"], "trained_again": validated is None or refit is not None,
                  **({"refit": refit} if refit is not None else {})}
    else:
        log.info("the winner, trial %d, was tested by an earlier run of this search (%s): not tested again",
                 best.number, tested["run"])
    rows = [_row(t) for t in study.trials if not _surplus(t)]
    record = {**settings, "space": [p.__dict__ for p in params], "fixed": _jsonable(base.__dict__), "trials": rows,
              "best_trial": best.number, "winner": tested, "data": train_data.provenance.brief()}
    write_json(folder / "search.json", record)
    (folder / "search.md").write_text(_markdown(rows, record, base.seed))
    _plots(study, folder)
    return folder


def _states(study) -> str:
    """How many trials are in each state: '2 pruned, 1 failed'."""
    counts = collections.Counter(t.state.name.lower() for t in study.trials)
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "none started"


def _tested_before(folder: Path, best: int) -> dict | None:
    """The winner an earlier run of this search tested, if it is still trial `best` and its run folder is there:
    the test split is looked at once per winner, not once per run of the command."""
    try:
        earlier = json.loads((folder / "search.json").read_text())
    except (OSError, ValueError):
        return None
    winner = earlier.get("winner") or {}
    run = winner.get("run")
    return winner if earlier.get("best_trial") == best and run and (folder / run / "metrics.json").is_file() else None


def _row(t) -> dict:
    """One trial's record, from what its searcher stored with it."""
    attrs = t.user_attrs
    pruned = t.state.name == "PRUNED"
    return {"trial": t.number, "state": "pruned" if pruned else t.state.name.lower(), "params": t.params,
            "value": t.value, "pruned": pruned,
            "epochs": attrs.get("epochs_run", len(t.intermediate_values) or None),
            **{k: attrs.get(k) for k in ("val_loss", "val_accuracy", "chosen", "seconds")}}


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _markdown(rows: list[dict], record: dict, seed: int) -> str:
    from heads.reports import markdown_table

    sign = 1 if record["objective"] == "val_loss" else -1
    # finished trials by value, then pruned ones (their value is that of the epoch they were stopped at)
    ordered = sorted(rows, key=lambda r: (r["state"] != "complete", r["value"] is None, sign * (r["value"] or 0)))
    names = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = ["trial", *names, record["objective"], "val acc", "epochs (C, kNN settings)", "state", "seconds"]
    body = [[str(r["trial"]), *(_shown(r["params"].get(n, "")) for n in names),
             "" if r["value"] is None else f"{r['value']:.4f}",
             "" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}", str(r["epochs"] or ""),
             r["state"], "" if r["seconds"] is None else f"{r['seconds']:.1f}"] for r in ordered]
    w = record["winner"]
    return (f"# search {record['name']}: {record['sampler']} sampler, {record['pruner']} pruner\n\n" +
            markdown_table(head, body) + f"\n\nWinner: trial {record['best_trial']} ({w['params']}), run {w['run']} "
            f"({_how_trained(w)}): "
            f"test accuracy **{w['test_accuracy']:.4f}**.\n\n" + TEST_LINE.format(seed=seed) + "\n")


def _how_trained(winner: dict) -> str:
    if "refit" in winner:
        return f"refitted on training + validation ({winner['refit']['rows']} rows) with its trial's setting"
    return "trained again" if winner.get("trained_again", True) else "the head its trial trained"


def _shown(value) -> str:
    """A searched value in the table: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(study, folder: Path) -> None:
    """Optuna's own matplotlib views: history, each parameter's slice and (with 2+ parameters) importances."""
    import warnings

    from heads.reports import pyplot

    plt = pyplot()   # Agg before Optuna's views import pyplot
    logging.getLogger("matplotlib").setLevel(logging.WARNING)   # not its notes on categorical axes of numbers
    from optuna.visualization import matplotlib as views

    wanted = [("history.png", views.plot_optimization_history), ("slice.png", views.plot_slice)]
    if len(study.best_trial.params) > 1 and len([t for t in study.trials if t.state.name == "COMPLETE"]) > 1:
        wanted.append(("importances.png", views.plot_param_importances))
    for file, view in wanted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # Optuna's views are experimental; categorical axes of numbers
            try:
                ax = view(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:   # e.g. importances of constant values
                log.info("no %s: %s", file, e)
                continue
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            figure.savefig(folder / file)
        plt.close(figure)
