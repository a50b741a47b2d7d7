"""`--pruner asha`: successive halving that holds for trials reaching an epoch together (the heads of one pass)
as well as one by one.

At the rung epochs min_resource x reduction_factor^k a trial goes on only if its value there is among the best
1/reduction_factor (at least one) of the values the study's trials reported at that epoch, as in Li et al.'s
asynchronous successive halving (ASHA). Optuna's SuccessiveHalvingPruner applies that rule as each trial arrives,
against the trials that reached the rung before it, which suits trials arriving one by one at random; the heads of
a pass report each epoch one after another in the pass's order, so there the first to report competed with itself
alone and was always kept: with eight heads in a pass it pruned all but one when they reported best first and
none when worst first. Here a search reports every head of a pass before asking about any, and a trial is
judged against every value reported at its rung, so the order does not matter.
"""

from __future__ import annotations

import math

import optuna
from optuna.study import StudyDirection


class Halving(optuna.pruners.BasePruner):
    """Successive halving on the values reported at each rung epoch (steps counted from 0, as Keras counts)."""

    def __init__(self, min_resource: int = 2, reduction_factor: int = 4):
        if min_resource < 1 or reduction_factor < 2:
            raise ValueError("min_resource >= 1 and reduction_factor >= 2")
        self.min_resource, self.reduction_factor = min_resource, reduction_factor

    def is_rung(self, step: int) -> bool:
        rung = self.min_resource
        while rung < step:
            rung *= self.reduction_factor
        return rung == step

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or not self.is_rung(step):
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        values = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                  if step in t.intermediate_values and not math.isnan(t.intermediate_values[step])]
        kept = max(1, len(values) // self.reduction_factor)
        best_first = sorted(values, reverse=study.direction == StudyDirection.MAXIMIZE)
        last_kept = best_first[kept - 1]
        return value < last_kept if study.direction == StudyDirection.MAXIMIZE else value > last_kept
