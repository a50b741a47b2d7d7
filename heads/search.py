"""`featcache search`: many head experiments in one process, on Optuna, resumable.

Every trial trains on features read once (pooled once per pooling) in this process, on the same
validation split (carved from train with the fixed --seed), and is scored on validation only: the
objective is validation loss (or accuracy). Bad trials are pruned from their per-epoch validation
loss (Optuna's median pruner, or successive halving: heads.halving). The study lives in an SQLite file in the search
folder: a search killed and started again with the same --name continues from its finished trials (a
trial left running by a killed process is failed once its heartbeat is stale, and run again), and two
processes on one study share its trials. When the trials are done, only the best trial's head is evaluated on
the test split, as a normal run folder inside the search folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

from featcache import system
from featcache.cluster import ENGINES
from featcache.errors import BadInputError, first_line
from featcache.options import declared, given_or_built, option, validate
from heads.config import HEAD, TrainConfig, options

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "asha", "none")
OBJECTIVES = ("val_loss", "val_accuracy")
#: Trials the local engine asks the sampler for at once and fits together (heads.together).
TOGETHER = 8


@dataclass(frozen=True)
class SearchConfig:
    """How a search runs, every option declared once (default, help, bounds): the command line's search options
    are built from these fields and checked by the one validator. What each trial trains with is a TrainConfig,
    what it varies a list of Params."""

    sampler: str | None = option(None, "Optuna sampler [default: grid when every parameter is a choice, else tpe].",
                                 kind="str", choices=SAMPLERS)
    trials: int | None = option(20, "Trials in all (a continued search counts its finished ones; a grid stops when "
                                "it is done).", kind="int", low=1, optional=True)
    timeout: float | None = option(None, "Seconds to search at most.", kind="float", low=0, low_open=True)
    pruner: str = option("median", "Stop bad trials early from their per-epoch validation loss.", kind="str",
                         choices=PRUNERS)
    objective: str = option("val_loss", "What trials are ranked by: validation loss (lower is better) or "
                            "validation accuracy.", kind="str", choices=OBJECTIVES)
    name: str = option("search", "The search: runs-dir/search-NAME/; the same name continues it.", kind="str")
    storage: str | None = option(None, "An Optuna storage URL (e.g. postgresql://...) to share the study between "
                                 "machines [default: SQLite in the search folder].", kind="str")
    engine: str = option("local", "Who runs the trials: this process (local), or searchers on Ray actors sharing the "
                         "study, on the cluster at --ray-address or on a local one featcache starts and stops (ray; "
                         "pip install 'featcache[ray]'); the same trials either way.", kind="str", choices=ENGINES)
    ray_address: str | None = option(None, "--engine ray: the cluster (e.g. ray://head:10001 or auto) [default: "
                                     "$RAY_ADDRESS, else a local cluster of this machine's CPUs].", kind="str")
    workers: int | None = option(None, "--engine ray: searchers at once, each fitting --together trials at a time "
                                 "[default: one per CPU of the cluster].", kind="int", low=1)
    together: int = option(TOGETHER, "Trials asked for at once and fitted together, their dense and conv heads on the "
                           "same input in one pass (1: one trial at a time).", kind="int", low=1)

    def __post_init__(self):
        validate(self)
        system.check_name(self.name)   # one folder inside --runs-dir, never a path out of it
        if self.engine == "local" and (self.ray_address or self.workers):
            raise BadInputError("--ray-address and --workers need --engine ray")
        if self.trials is not None:
            self.warn_unprunable(self.trials)

    def warn_unprunable(self, trials: int) -> None:
        """Say so where the median pruner can prune nothing: it compares a trial with finished ones, and trials
        fitted together finish together (`trials`: --trials, or a grid's points)."""
        if self.pruner == "median" and self.together >= trials:
            log.warning("--pruner median prunes against finished trials, and with --together %d of %d trials "
                        "none finishes while the others train: nothing will be pruned; fix: a smaller --together "
                        "or --pruner asha", self.together, trials)

    def chosen_sampler(self, params: list) -> str:
        """The sampler asked for, else grid when every parameter is a list of choices, else TPE."""
        return self.sampler or ("grid" if all(p.choices is not None for p in params) else "tpe")


def search_options() -> list:
    """The declared fields of SearchConfig, in order (what `featcache search` turns into options)."""
    return declared(SearchConfig)


def configs(search: SearchConfig | None, config: TrainConfig | None, options: dict) -> tuple:
    """(SearchConfig, TrainConfig) of a search: the objects given, or built from keyword `options`, each field to
    the option set that declares it (a name in neither is refused by TrainConfig)."""
    names = {f.name for f in search_options()}
    return (given_or_built(SearchConfig, search, {k: v for k, v in options.items() if k in names}),
            given_or_built(TrainConfig, config, {k: v for k, v in options.items() if k not in names}))
_SAME_ROWS = "it changes the rows every trial is compared on; fix: pass --{option} once, for every trial"
#: Not searchable, and why (with the fix).
FIXED = {"seed": _SAME_ROWS, "val_fraction": _SAME_ROWS, "per_class": _SAME_ROWS, "subset_seed": _SAME_ROWS,
         "name": "it names the run; fix: --name names the search",
         "refit": "a trial is scored on validation before any refit, so every value scores the same; fix: leave it "
                  "out and pass --refit to refit the winner"}
#: The one searched value that is not a training option: which cached layers (comma-separated) to train on.
LAYERS = "layers"
#: Seconds between a running trial's heartbeats, and without one before it counts as dead.
HEARTBEAT_S, GRACE_S = 10, 30


@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple | None = None          # categorical
    low: float | None = None              # or a range
    high: float | None = None
    log: bool = False
    integer: bool = False

    def labels(self) -> list:
        """The choices as Optuna stores them (layer sizes as text: '400,256,256')."""
        return [label(c) for c in self.choices]


def label(value):
    """A value as Optuna and TensorBoard keep it: numbers, booleans and text as they are, layer sizes as text."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value


def labelled(values: dict) -> dict:
    """A trial's values as Optuna and TensorBoard keep them (`label` of each)."""
    return {name: label(value) for name, value in values.items()}


def searchable() -> dict:
    """Field name -> field, for every training option of train-head (and the head) that a search may vary."""
    out = {f.name: f for f in options(HEAD) if f.name not in FIXED}
    out["model"] = next(f for f in fields(TrainConfig) if f.name == "model")
    return out


def parse_param(text: str) -> Param:
    """'units=256|512|400,256,256', 'dropout=0.1:0.6', 'lr=1e-4:1e-2:log', 'head=dense|linear'."""
    name, sep, value = str(text).partition("=")
    name = name.strip().replace("-", "_")
    name = {"head": "model", "layer": LAYERS}.get(name, name)
    fields_ = searchable()
    if name in FIXED:
        raise BadInputError(f"--param {name} cannot be searched: "
                            + FIXED[name].format(option=name.replace("_", "-")))
    if not sep or name not in (*fields_, LAYERS):
        raise BadInputError(f"--param must be NAME=a|b|c or NAME=low:high[:log] for one of {', '.join(sorted(fields_))} "
                            f"(head for the model) or {LAYERS}, got {text!r}")
    if name == LAYERS:   # layer sets: block3_pool|block4_pool|block3_pool,block4_pool
        return Param(name, choices=tuple(tuple(x.strip() for x in v.split(",")) for v in value.split("|")))
    kind = fields_[name].metadata.get("kind")
    if "|" in value or kind in ("str", "bool", "units") or ":" not in value:
        return Param(name, choices=tuple(_typed(kind, v.strip(), text) for v in value.split("|")))
    parts = value.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        raise BadInputError(f"--param {name}: a range is low:high or low:high:log, got {value!r}")
    low, high = (_typed(kind, p, text) for p in parts[:2])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise BadInputError(f"--param {name}: a range needs finite bounds, got {value!r}")
    if not low < high or (len(parts) == 3 and low <= 0):
        raise BadInputError(f"--param {name}: the range needs low < high (and low > 0 on a log scale), got {value!r}")
    return Param(name, low=low, high=high, log=len(parts) == 3, integer=kind == "int")


def _typed(kind: str | None, value: str, text: str):
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            return {"true": True, "false": False, "on": True, "off": False}[value.lower()]
        if kind == "units":
            return tuple(int(u) for u in value.split(","))
        return value
    except (ValueError, KeyError):
        what = {"units": "list of layer sizes (256 or 400,256,256)", "bool": "true or false"}.get(kind, kind)
        raise BadInputError(f"--param {text!r}: {value!r} is not a {what}") from None


def load_space(path: str | Path) -> list[Param]:
    """A TOML search space: `[params]` with `units = ["256", "400,256,256"]` (choices) or
    `lr = {low = 1e-4, high = 1e-2, log = true}` (a range)."""
    import tomllib

    fix = "fix: a UTF-8 TOML file with a [params] table"
    try:
        table = tomllib.loads(Path(path).read_bytes().decode("utf-8")).get("params", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BadInputError(f"cannot read the search space {path} ({type(e).__name__}: {first_line(e)}); {fix}") from e
    if not isinstance(table, dict):
        raise BadInputError(f"{path}: params is a {type(table).__name__}, expected a table of NAME = choices or "
                            f"{{low, high}}; {fix}")
    out = []
    for name, spec in table.items():
        if isinstance(spec, list):
            out.append(parse_param(f"{name}={'|'.join(str(v) for v in spec)}"))
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec):
            out.append(parse_param(f"{name}={spec['low']}:{spec['high']}" + (":log" if spec.get("log") else "")))
        else:
            raise BadInputError(f"{path}: params.{name} must be a list of choices or {{low, high[, log]}}")
    return out


def suggest(trial, p: Param):
    """This trial's value of `p` (units travel as text through Optuna's storage)."""
    if p.choices is not None:
        return p.choices[p.labels().index(trial.suggest_categorical(p.name, p.labels()))]
    if p.integer:
        return trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(p.name, p.low, p.high, log=p.log)


def grid_of(space: list[Param]) -> dict:
    if any(p.choices is None for p in space):
        raise BadInputError("--sampler grid needs every --param as choices (a|b|c), not ranges")
    return {p.name: p.labels() for p in space}


def make_study(folder: Path, name: str, space: list[Param], *, sampler: str, pruner: str, objective: str,
               storage: str | None, seed: int, samples: bool = True):
    """The Optuna study of this search, created or continued (same name, same storage); `samples=False` for a
    process that only reads it (the driver of searchers), which then leaves the processes' count alone."""
    import optuna

    from heads.halving import Halving

    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
               "asha": lambda: Halving(min_resource=2),   # Optuna's depends on the order a pass reports in
               "none": lambda: optuna.pruners.NopPruner()}
    from heads.grid import locked

    with locked(folder):   # Optuna's schema creation races when two processes start on one new SQLite file
        try:
            study = optuna.create_study(study_name=name, storage=open_storage(folder, storage), load_if_exists=True,
                                        pruner=pruners[pruner](), direction=DIRECTIONS[objective])
        except BadInputError:
            raise
        except Exception as e:   # SQLAlchemy's OperationalError while creating tables: a full disk, say
            raise _storage_error(storage or "", storage, folder, e) from e
        # the k-th process to open the study samples with seed + k: processes sharing it draw different trials,
        # and a search run once from scratch draws the same trials for the same seed
        opened = study.user_attrs.get(OPENED, 0)
        if samples:
            study.set_user_attr(OPENED, opened + 1)
    study.sampler = make_sampler(sampler, space, seed + opened, folder)
    return study


#: The study's count of the processes that have opened it.
OPENED = "processes_opened"
#: The study's searched space, as the run that started it described it (`described`).
SPACE = "space"


def described(p: Param) -> str:
    """A searched parameter as --param spells it: name=a|b, or name=low:high[:log]."""
    if p.choices is not None:
        return f"{p.name}={'|'.join(str(c) for c in p.labels())}"
    return f"{p.name}={p.low:g}:{p.high:g}" + (":log" if p.log else "")


def check_same_space(study, space: list[Param], name: str) -> None:
    """Refuse to go on with a study started with another space (an earlier run of search `name`): its trials and
    the new ones would not compare, and Optuna failed mid-search on a parameter of another kind."""
    wanted = sorted(described(p) for p in space)
    earlier = study.user_attrs.get(SPACE)
    if earlier is None:   # a study from before the space was recorded: its trials' parameter names at least
        names = {k for t in study.get_trials(deepcopy=False) for k in t.params}
        earlier = wanted if not names or names == {p.name for p in space} else sorted(names)
        study.set_user_attr(SPACE, earlier)
    if earlier != wanted:
        raise BadInputError(f"search {name!r} was started with the space {', '.join(earlier)}, not "
                            f"{', '.join(wanted)}; fix: the same --param (or --space) as before, or another --name")


#: The study's fixed setting, as the run that started it recorded it (`setting`).
SETTING = "setting"
#: Options a continued search may change: no trial's figures depend on them.
CHANGEABLE = ("name", "refit")


def setting(cache_keys: list[str], layer, objective: str, base, space: list[Param]) -> dict:
    """What every trial of a search is trained on and with, besides its searched values: the caches (by key), the
    fixed layer set, the objective and the fixed training options, as --option spells them."""
    searched = {p.name for p in space}
    fixed = {f"--{k.replace('_', '-')}": v for k, v in dataclasses.asdict(base).items()
             if k not in searched and k not in CHANGEABLE}
    layer = layer if layer is None or isinstance(layer, str) else ",".join(layer)
    return json.loads(json.dumps({"caches": sorted(cache_keys), "--layer": layer, "--objective": objective, **fixed},
                                 default=str))   # as the study stores it: lists for tuples


def check_same_setting(study, now: dict, name: str) -> None:
    """Refuse to go on with a study whose trials were trained on other caches or with other fixed options (an
    earlier run of search `name`): its trials and the new ones would be ranked together, and the records would
    describe them all by the new setting."""
    earlier = study.user_attrs.get(SETTING)
    if earlier is None:   # a new study, or one from before the setting was recorded: recorded from now on
        study.set_user_attr(SETTING, now)
        return
    changed = [f"{k} {_said(earlier.get(k))} then, {_said(now.get(k))} now" for k in sorted({*earlier, *now})
               if earlier.get(k) != now.get(k)]
    if changed:
        raise BadInputError(f"search {name!r} was started with another setting ({'; '.join(changed)}): its trials "
                            "and new ones would be ranked together; fix: the same caches and options as before, "
                            "or another --name")


def _said(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


#: Optuna's direction of each objective.
DIRECTIONS = {"val_loss": "minimize", "val_accuracy": "maximize"}


def make_sampler(sampler: str, space: list[Param], seed: int, folder: Path):
    import optuna

    from heads.grid import OncePerPoint

    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "grid": lambda: OncePerPoint(grid_of(space), folder=folder)}[sampler]()


def open_storage(folder: Path, storage: str | None, *, heartbeats: bool = True):
    """The study's RDB storage (SQLite in the search folder unless a URL is given), with heartbeats: a trial
    whose process died is failed GRACE_S after its last heartbeat and run again (Study.optimize sends them;
    the Ray engine's trials do not)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or f"sqlite:///{folder / 'study.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)   # heartbeats: experimental since 2.8
        try:
            if not heartbeats:
                return optuna.storages.RDBStorage(url)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
        except Exception as e:   # SQLAlchemy's many: no such dialect, no driver, cannot connect, not a database
            raise _storage_error(url, storage, folder, e) from e


def _storage_error(url: str, storage: str | None, folder: Path, e: Exception) -> BadInputError:
    """One line for a study storage that cannot be opened: the URL given was wrong, or (no --storage) the search
    folder's SQLite file could not be written (a full disk, a read-only folder)."""
    why = f"{type(e).__name__}: {first_line(e)}"
    if storage is None:
        return BadInputError(f"cannot create the search's study in {folder / 'study.db'} ({why[:200]}): a full disk or "
                             "a folder that cannot be written; fix: free some space, or pass another --runs-dir")
    return BadInputError(f"cannot open the study storage {url} ({why[:200]}); fix: a SQLAlchemy URL such as "
                         "postgresql://user@host/db, or no --storage (SQLite in the search folder)")


def pruning_callback(trial, objective: str):
    """A Keras callback reporting each epoch's validation figure to Optuna and stopping a pruned trial."""
    import keras
    import optuna

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(objective)
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch + 1}: {objective} {value:.4f}")

    return Report()


def params_of(given) -> list[Param]:
    """Searched parameters given as Param objects or as --param spells them ("dropout=0.1|0.3")."""
    if isinstance(given, (str, Param)):
        given = [given]
    out = []
    for p in given:
        if not isinstance(p, (str, Param)):
            raise BadInputError(f"a searched parameter is a heads.search.Param or text like 'dropout=0.1|0.3', "
                                f"not {type(p).__name__} {p!r}")
        out.append(parse_param(p) if isinstance(p, str) else p)
    return out


def check(params: list[Param], *, sampler: str) -> None:
    """One-line errors for the searched parameters, before any data is read (the search's own options are checked
    by SearchConfig)."""
    if not params:
        raise BadInputError("a search needs at least one --param (or --space FILE)")
    if len({p.name for p in params}) != len(params):
        raise BadInputError("each parameter may be searched once")
    if sampler == "grid":
        grid_of(params)


def check_values(params: list[Param], base: TrainConfig) -> None:
    """Every choice and both ends of every range make a valid TrainConfig: refused now, not at a trial."""
    for p in params:
        for value in p.choices if p.choices is not None else (p.low, p.high):
            trial_config(base, {p.name: value})   # layer sets: checked against the caches (SearchData)


def trial_config(base: TrainConfig, values: dict) -> TrainConfig:
    """The TrainConfig of a trial: the fixed options with this trial's values (validated as any config)."""
    return dataclasses.replace(base, **{k: v for k, v in values.items() if k != LAYERS})


def value_of(p: Param, stored):
    """A parameter's value from what Optuna stored (a label, for choices)."""
    return stored if p.choices is None else p.choices[p.labels().index(stored)]


def grid_size(space: list[Param]) -> int:
    return math.prod(len(p.choices) for p in space)
