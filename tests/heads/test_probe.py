"""heads.probe: the linear probe's L-BFGS path over C, and what its history records."""

import numpy as np

from heads import probe


class _NoLayer:
    """fit_linear_probe writes its solution into the model's "classes" layer; not needed here."""

    def get_layer(self, name):
        return type("Layer", (), {"set_weights": lambda self, weights: None})()


def test_the_history_counts_the_solvers_evaluations():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))
    y = rng.integers(0, 3, 240)
    x = (centres[y] + rng.normal(0, 1, (240, 8))).astype(np.float32)
    h = probe.fit_linear_probe(_NoLayer(), x[:180], y[:180], x[180:], y[180:], n_classes=3)
    assert len(h["C"]) >= 2 and h["evaluations"] >= len(h["C"])   # at least one per C tried
    assert 0.8 < h["val_accuracy"][h["best"]] <= 1.0
