"""The search's grid shared by processes: the search folder's lock, and Optuna's grid sampler made to run each
point once however many processes share the study."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from featcache import system


def locked(folder: Path):
    """An exclusive lock of the search folder, held while a process opens (and perhaps creates) its study, and
    while the grid sampler picks a point, so that processes sharing the study never pick the same one. Reentrant
    (a batch of trials is asked for under it, and the grid sampler takes it again for each)."""
    return system.file_lock(folder / "study.lock", reentrant=True)


class OncePerPoint(optuna.samplers.GridSampler):
    """Optuna's grid sampler, made safe for processes sharing a study: every process orders the grid the same way
    (a point is stored in the study by its place in the sampler's seeded shuffle, so processes with different seeds
    (seed + k for the k-th, or another --seed) ran each other's points again); a point is picked under the search
    folder's lock; and a trial asked for once every point has been started (in any process) is marked SURPLUS,
    where Optuna's would run a started point a second time. The local engine stops on a SURPLUS trial."""

    def __init__(self, grid: dict, *, folder: Path):
        super().__init__(grid, seed=0)
        self._folder = folder

    def before_trial(self, study, trial) -> None:
        with locked(self._folder):
            fresh = "grid_id" not in trial.system_attrs and "fixed_params" not in trial.system_attrs
            if fresh and trial.number >= len(self._all_grids) and self._all_started(study, trial):
                study._storage.set_trial_user_attr(trial._trial_id, SURPLUS, True)
            super().before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        # Optuna's grid stops Study.optimize when the grid is done; a search fitting trials in batches (ask and tell,
        # outside that loop, where Study.stop raises) stops on a SURPLUS trial instead
        if study._thread_local.in_optimize_loop:
            super().after_trial(study, trial, state, values)

    def _all_started(self, study, trial) -> bool:
        started = {t.system_attrs["grid_id"] for t in study.get_trials(deepcopy=False)
                   if t.number != trial.number and "grid_id" in t.system_attrs and t.state != TrialState.WAITING}
        return len(started) >= len(self._all_grids)


#: The user attribute of a grid trial asked for once every point had been started: not run, not recorded.
SURPLUS = "surplus"
