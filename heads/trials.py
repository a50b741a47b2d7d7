"""Running a search (heads.search): the trials in one process on features read once, the winner's one look
at the test split, and the search folder's records (search.json, search.md, Optuna's plots)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from featcache import system
from featcache.errors import BadInputError
from heads import search as hs
from heads.config import TrainConfig, pools_first

log = logging.getLogger(__name__)
TEST_LINE = ("Only the winner was evaluated on the test split, once, after the search: every trial was chosen and "
             "compared on the validation split carved from train (seed {seed}), so its test accuracy is the "
             "search's only test figure.")


def run_search(cache, params: list, *, layer=None, sampler: str | None = None, trials: int | None = 20,
               timeout: float | None = None, pruner: str = "median", objective: str = "val_loss",
               name: str = "search", storage: str | None = None, runs_dir="runs", progress: bool = True,
               **options) -> Path:
    """Search `params` (heads.search.Param) on a cache path (or list of caches); return the search folder."""
    import optuna

    sampler = sampler or ("grid" if all(p.choices is not None for p in params) else "tpe")
    hs.check(params, sampler=sampler, pruner=pruner, objective=objective, trials=trials, timeout=timeout)
    base = TrainConfig(**options).__dict__   # the fixed options, validated once
    hs.check_values(params, base)
    folder = system.writable_folder(Path(runs_dir) / f"search-{name}", what="search folder",
                                    fix="pass a writable --runs-dir")
    study = hs.make_study(folder, name, params, sampler=sampler, pruner=pruner, objective=objective,
                          storage=storage, seed=base["seed"])
    feeds = _Feeds(cache if isinstance(cache, (list, tuple)) else [cache], layer)
    from heads.logs import write_search

    write_search(folder / "tensorboard", params, hs.OBJECTIVES)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = len([t for t in study.trials if t.state.is_finished()])
    left = None if trials is None else max(0, trials - done)
    if left:
        bar = system.progress_bar(left, unit="trial", desc="search", enabled=progress)
        study.optimize(lambda t: _trial(t, params, base, feeds, objective, folder / "tensorboard"), n_trials=left,
                       timeout=timeout,
                       callbacks=[lambda s, t: bar.update(1)], catch=(FloatingPointError,))
        bar.close()
    return _finish(folder, study, params, base, feeds, dict(sampler=sampler, pruner=pruner, objective=objective,
                                                            name=name, storage=storage or "sqlite (study.db)"))


class _Feeds:
    """The training data, read once per pooling (and pooled once) for every trial of the search."""

    def __init__(self, caches: list, layer):
        self.caches, self.layer, self.data, self.pooled = caches, layer, {}, {}

    def get(self, config: TrainConfig):
        from heads.data import data_from_caches

        key = (config.pooling, pools_first(config))
        if key not in self.data:
            self.data[key] = data_from_caches(self.caches, config.pooling, self.layer, prepooled=key[1])
            self.pooled[key] = {}
        return self.data[key], self.pooled[key]


def _trial(trial, params: list, base: dict, feeds: _Feeds, objective: str, logs: Path) -> float:
    from heads.logs import epochs_callback, write_trial
    from heads.train import fit_and_choose

    values = {p.name: hs.suggest(trial, p) for p in params}
    config = hs.trial_config(base, values)
    data, pooled = feeds.get(config)
    t0 = time.perf_counter()
    here = logs / f"trial-{trial.number}"
    v = fit_and_choose(data, config, progress=False, pooled=pooled if config.per_class is None else None,
                       callbacks=[hs.pruning_callback(trial, objective), epochs_callback(here)])
    h, best = v.chosen.history, v.chosen.best
    write_trial(here, values, {k: h[k][best] for k in hs.OBJECTIVES})
    trial.set_user_attr("val_loss", float(h["val_loss"][best]))
    trial.set_user_attr("val_accuracy", float(h["val_accuracy"][best]))
    trial.set_user_attr("epochs_run", len(h["val_loss"]))
    trial.set_user_attr("chosen", v.chosen.config.model)
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
    return float(h[objective][best])


def _finish(folder: Path, study, params: list, base: dict, feeds: _Feeds, settings: dict) -> Path:
    """Train the winner once more and test it, then write the records; the search folder is returned."""
    from heads.reports import write_json
    from heads.train import train

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        raise BadInputError(f"no trial of search {settings['name']!r} finished (see the log); nothing to test")
    best = study.best_trial
    config = hs.trial_config(base, {p.name: _value(p, best.params[p.name]) for p in params})
    data, _ = feeds.get(config)
    winner = train(data, TrainConfig(**{**config.__dict__, "name": f"{settings['name']}-winner"}),
                   runs_dir=folder, progress=False)
    rows = [_row(t) for t in study.trials]
    record = {**settings, "space": [p.__dict__ for p in params], "fixed": _jsonable(base), "trials": rows,
              "best_trial": best.number, "winner": {"run": winner.run_dir.name, "params": best.params,
                                                    "test_accuracy": winner.metrics["test_accuracy"],
                                                    "val_loss": winner.metrics["val_loss"]},
              "data": {k: v for k, v in data.source.items() if k != "cache_meta"}}
    write_json(folder / "search.json", record)
    (folder / "search.md").write_text(_markdown(rows, record, base["seed"]))
    _plots(study, folder)
    return folder


def _value(p, shown):
    """A parameter's value from what Optuna stored."""
    return shown if p.choices is None else p.choices[p.labels().index(shown)]


def _row(t) -> dict:
    return {"trial": t.number, "state": t.state.name.lower(), "params": t.params, "value": t.value,
            "pruned": t.state.name == "PRUNED", "epochs": t.user_attrs.get("epochs_run",
                                                                        len(t.intermediate_values) or None),
            **{k: t.user_attrs.get(k) for k in ("val_loss", "val_accuracy", "chosen", "seconds")}}


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _markdown(rows: list[dict], record: dict, seed: int) -> str:
    sign = 1 if record["objective"] == "val_loss" else -1
    ordered = sorted(rows, key=lambda r: (r["value"] is None, sign * (r["value"] or 0)))
    names = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = ["trial", *names, record["objective"], "val acc", "epochs (C, kNN settings)", "state", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ordered:
        cells = [str(r["trial"]), *(str(r["params"].get(n, "")) for n in names),
                 "" if r["value"] is None else f"{r['value']:.4f}",
                 "" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}", str(r["epochs"] or ""),
                 r["state"], "" if r["seconds"] is None else f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    w = record["winner"]
    return (f"# search {record['name']}: {record['sampler']} sampler, {record['pruner']} pruner\n\n" +
            "\n".join(lines) + f"\n\nWinner: trial {record['best_trial']} ({w['params']}), run {w['run']}: "
            f"test accuracy **{w['test_accuracy']:.4f}**.\n\n" + TEST_LINE.format(seed=seed) + "\n")


def _plots(study, folder: Path) -> None:
    """Optuna's own matplotlib views: history, each parameter's slice and (with 2+ parameters) importances."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
