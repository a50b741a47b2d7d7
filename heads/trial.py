"""One search trial, the same on every engine: the data it trains on (read once per layer set and pooling for
all the trials of a process) and its fit, scored on the validation split only."""

from __future__ import annotations

import time
from pathlib import Path

from heads import search as hs
from heads.config import TrainConfig, pools_first, reads_maps_if_they_fit


def data_key(config: TrainConfig, layers) -> tuple:
    """What the data a trial trains on depends on: its layers, pooling, and whether it reads pooled vectors and
    (auto) maps where they fit."""
    return layers, config.pooling, pools_first(config), reads_maps_if_they_fit(config)


class SearchData:
    """The training data of a search, read once per (layer set, pooling) and pooled once, for every trial.

    `caches` are paths (or opened caches); `layer` is the fixed layer set (None: every layer) that a
    searched `layers` parameter replaces. Maps are held in RAM within `memory_budget` (bytes; default half the
    available memory), streamed beyond it or always with `stream`, as by `heads.train.train_head`;
    `memory_share` is the part of that budget this process may use, where several searchers share a machine
    (heads.trials.Searcher). Pickled (to a Ray actor), it travels as the caches' absolute paths and reads them
    again there."""

    def __init__(self, caches: list, layer=None, *, memory_budget: int | None = None, stream: bool = False):
        self.caches, self.layer, self.data, self.pooled = caches, layer, {}, {}
        self.memory_budget, self.stream, self.memory_share = memory_budget, stream, 1.0

    def __getstate__(self) -> dict:
        paths = [Path(getattr(c, "path", c)).absolute() for c in self.caches]
        return {"caches": paths, "layer": self.layer, "data": {}, "pooled": {}, "memory_budget": self.memory_budget,
                "stream": self.stream, "memory_share": 1.0}

    def get(self, config: TrainConfig, layers=None):
        """(TrainData, pooled-vectors memo) of `config` on `layers` (default: the search's fixed layer set)."""
        from heads import feed
        from heads.data import data_from_caches

        layers = self.layer if layers is None else layers
        key = data_key(config, layers)
        if key not in self.data:   # auto, as on train-head: one layer's maps where they fit (its conv head)
            budget = feed.default_budget() if self.memory_budget is None else feed.parse_bytes(self.memory_budget)
            self.data[key] = data_from_caches(self.caches, config.pooling, layers, prepooled=key[2],
                                              maps_if_they_fit=key[3], stream=self.stream,
                                              memory_budget=int(budget * self.memory_share))
            self.pooled[key] = {}
        return self.data[key], self.pooled[key]

    def opened(self) -> list:
        """The caches opened and checked, once per process (the checks before a search's first trial ask thrice)."""
        from heads.data import open_caches

        if "_opened" not in self.__dict__:   # not pickled: __getstate__ sends paths
            self._opened = open_caches(self.caches)
        return self._opened

    def streams_maps(self, config: TrainConfig) -> bool:
        """Whether `config` would train on maps streamed from the cache, decided as `data_from_caches` decides
        (and `in_ram_if_it_fits` for a --per-class subset), without reading them."""
        from featcache.cache import expected_bytes
        from heads import feed
        from heads.config import pools_first
        from heads.data import layer_sources

        if pools_first(config):
            return False   # pooled vectors
        if self.stream:
            return True
        sources = layer_sources(self.opened(), self.layer)
        if len(sources) != 1 or config.per_class is not None:   # several layers: pooled; a subset: read if it fits
            return False
        budget = feed.default_budget() if self.memory_budget is None else feed.parse_bytes(self.memory_budget)
        return not feed.keeps_in_ram(expected_bytes(sources[0][0].meta, [sources[0][1]]),
                                     int(budget * self.memory_share))

    def cache_keys(self) -> list[str]:
        """The keys of the caches (what identifies their contents, whatever their paths)."""

        return [c.meta.key for c in self.opened()]

    def check_layers(self, params: list) -> None:
        """Every layer set a `layers` parameter names is held by the caches: refused now, not at a trial."""
        from heads.data import layer_sources

        opened = self.opened()
        for p in params:
            if p.name == hs.LAYERS:
                for choice in p.choices:
                    layer_sources(opened, choice)


def evaluate(values: dict, base: TrainConfig, data: SearchData, logs: Path, callbacks=()) -> tuple[dict, object]:
    """Fit one trial's `values` (over the fixed options `base`); return its validation figures, epochs run, the
    model chosen and seconds, and what it chose (heads.train.Validated, its fitted head: a winner is tested as it
    is). Keras `callbacks` see every epoch (pruning, reporting). The test split is not touched. TensorBoard logs,
    with the trial's HParams, go to `logs`."""
    from heads.logs import epochs_callback, write_trial
    from heads.train import fit_and_choose

    config = hs.trial_config(base, values)
    train_data, pooled = data.get(config, values.get(hs.LAYERS))
    t0 = time.perf_counter()
    v = fit_and_choose(train_data, config, progress=False, pooled=pooled if config.per_class is None else None,
                       callbacks=[*callbacks, *epochs_callback(logs)])
    history, best = v.chosen.history, v.chosen.best
    figures = {k: float(history[k][best]) for k in hs.OBJECTIVES}
    write_trial(logs, hs.labelled(values), figures)
    return {**figures, "epochs_run": len(history["val_loss"]), "chosen": v.chosen.config.model,
            "seconds": round(time.perf_counter() - t0, 3)}, v


def evaluate_together(batch: list[dict], base: TrainConfig, data: SearchData, logs: list[Path],
                      on_epoch) -> list[tuple[dict, object]]:
    """`evaluate` for several trials' `batch` of values: the trials on the same data are fitted together
    (heads.train.fit_and_choose_all: their heads that can share a pass in one). `on_epoch(epoch, figures)` sees
    each epoch's figures of the trials still training ({i: figures}) and returns those to stop (pruned). A
    trial's seconds: its share of the batch."""
    from heads.logs import write_epochs, write_trial
    from heads.train import fit_and_choose_all

    configs = [hs.trial_config(base, values) for values in batch]
    by_data: dict = {}
    for i, (values, config) in enumerate(zip(batch, configs)):
        key = (data_key(config, values.get(hs.LAYERS)), config.per_class, config.subset_seed, config.val_fraction,
               config.seed)   # trials on the same data and rows (heads.train.fit_and_choose_all)
        by_data.setdefault(key, []).append(i)
    out: list = [None] * len(batch)
    for trials in by_data.values():
        train_data, pooled = data.get(configs[trials[0]], batch[trials[0]].get(hs.LAYERS))
        t0 = time.perf_counter()
        chosen = fit_and_choose_all(train_data, [configs[i] for i in trials], pooled=pooled,
                                    on_epoch=lambda epoch, figures, t=trials: _stopped(on_epoch, epoch, figures, t))
        seconds = (time.perf_counter() - t0) / len(trials)
        for i, v in zip(trials, chosen):
            history, best = v.chosen.history, v.chosen.best
            figures = {k: float(history[k][best]) for k in hs.OBJECTIVES}
            write_epochs(logs[i], history)
            write_trial(logs[i], hs.labelled(batch[i]), figures)
            out[i] = {**figures, "epochs_run": len(history["val_loss"]), "chosen": v.chosen.config.model,
                      "seconds": round(seconds, 3)}, v
    return out


def _stopped(on_epoch, epoch: int, figures: dict, trials: list) -> set:
    """`on_epoch` for the trials of one data group, numbered j there and trials[j] in the batch."""
    stopped = set(on_epoch(epoch, {trials[j]: f for j, f in figures.items()}))
    return {j for j in figures if trials[j] in stopped}
