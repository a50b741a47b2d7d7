"""How a kind of head is fitted, and what validation chooses for it: by epochs (Keras' optimisers; early stopping
picks the epoch), along a path of L2 strengths (the linear probe's L-BFGS picks C), or by a vote's setting (kNN picks
k, temperature and smoothing). Fitting, refitting, run records and the runs table ask a head's Fitting
(`MODELS[name].fitting`, or `of_record` for a run on disk) instead of guessing it from optimizer names or from
which keys its history holds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fitting:
    name: str
    chooses: tuple[str, ...]   # the record keys validation chooses; () where it chooses the epoch
    steps: str                 # what one row of its history is, as history.csv's first column names it

    @property
    def by_epochs(self) -> bool:
        return not self.chooses

    def chosen(self, history: dict, best: int) -> dict:
        """What validation chose, from a fit's history and its best row: {"C": ...}, {"k", "temperature",
        "smoothing"}, or {"epochs": best + 1} (the epochs a refit trains)."""
        if self.by_epochs:
            return {"epochs": best + 1}
        return {key: history[key][best] for key in self.chooses}

    def setting(self, metrics: dict) -> str:
        """The chosen setting in a few characters ("C=0.1", "k=20 T=0.07", "epoch 7"), from a run's metrics."""
        if self is C_PATH:
            return f"C={metrics['C']:.3g}"
        if self is VOTE:
            return f"k={metrics['k']} T={metrics['temperature']:g}"
        return f"epoch {metrics['best_epoch']}"

    def described(self, metrics: dict) -> str:
        """What validation chose, in words, for a run's classification report."""
        tried = f"({metrics['best_epoch']} of {metrics['epochs_run']}"
        if self is C_PATH:
            return f"L2 strength C={metrics['C']:.3g} {tried} tried)"
        if self is VOTE:
            return (f"k={metrics['k']}, temperature {metrics['temperature']:g}, smoothing {metrics['smoothing']:g} "
                    f"{tried} settings tried)")
        return f"epoch {metrics['best_epoch']} of {metrics['epochs_run']}"


EPOCHS = Fitting("epochs", (), "epoch")
C_PATH = Fitting("L2 path", ("C",), "C_tried")
VOTE = Fitting("vote", ("k", "temperature", "smoothing"), "setting")


def of_optimizer(optimizer: str) -> Fitting:
    """The Fitting of a ModelSpec's optimizer: "lbfgs" (the probe), "knn", or a Keras optimiser's name."""
    return {"lbfgs": C_PATH, "knn": VOTE}.get(optimizer, EPOCHS)
