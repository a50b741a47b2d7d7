"""make bench, part 7: the linear probe's solver, side by side on the same standardised GAP vectors: scikit-learn's
LogisticRegression (L-BFGS, the path the probe used before: 15 C values warm-started from 1e-4, stopped two past
the best) against heads.probe (our float32 evaluation of the same objective, decade walk and refinement), with one
and two BLAS threads.

    python bench/probe.py --cache cache/<the block3_pool cache> [--out docs/results]

Reported per side: seconds for the whole path, L-BFGS iterations, milliseconds per iteration, the C chosen, its
validation loss and accuracy (validation: the same 10% carved from train as every head).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np
from common import ROOT, out_folder, write_sections


def vectors(cache: str):
    from featcache.cache import open_cache, pooled
    from heads.data import split_indices

    c = open_cache(cache)
    p = pooled.pooled(c, "block3_pool", "gap")
    x, y = p["train"], p["train_labels"]
    tr, va = split_indices(y, 0.1, 0, c.class_names)
    x = x.astype(np.float64)
    x = (x - x[tr].mean(0)) / x[tr].std(0)
    return x[tr], y[tr], x[va], y[va], len(c.class_names)


def sklearn_path(xt, yt, xv, yv, k):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from heads.probe import C_GRID

    clf, rows, iters = LogisticRegression(max_iter=1000, warm_start=True), [], 0
    for c in C_GRID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.set_params(C=c).fit(xt, yt)
        iters += int(clf.n_iter_.max())
        p = clf.predict_proba(xv)
        rows.append((c, log_loss(yv, p, labels=np.arange(k)), float(np.mean(p.argmax(1) == yv))))
        best = min(range(len(rows)), key=lambda i: rows[i][1])
        if len(rows) - 1 - best >= 2:
            break
    return rows[best], iters


def ours(xt, yt, xv, yv, k, threads: int):
    from heads import probe

    class Stub:   # fit_linear_probe writes its solution into a Keras layer; not needed here
        def get_layer(self, name):
            return type("L", (), {"set_weights": lambda self, w: None})()

    probe.BLAS_THREADS = threads
    try:
        h = probe.fit_linear_probe(Stub(), xt, yt, xv, yv, n_classes=k)
    finally:
        probe.BLAS_THREADS = 1
    b = h["best"]
    return (h["C"][b], h["val_loss"][b], h["val_accuracy"][b]), h["evaluations"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    args = p.parse_args()
    data = vectors(args.cache)
    results = {}
    for name, run in (("scikit-learn, float64", lambda: sklearn_path(*data)),
                      ("heads.probe, 1 BLAS thread", lambda: ours(*data, threads=1)),
                      ("heads.probe, 2 BLAS threads", lambda: ours(*data, threads=2))):
        t0 = time.perf_counter()
        (c, loss, acc), iters = run()
        seconds = time.perf_counter() - t0
        results[name] = dict(seconds=round(seconds, 2), iterations=iters, ms_per_iteration=round(1000 * seconds / iters, 1),
                             C=c, val_loss=round(loss, 4), val_accuracy=round(acc, 4))
        print(name, results[name], flush=True)
    (args.out / "benchmarks-probe.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["## 10. The linear probe's solver", "",
             "`python bench/probe.py --cache <the block3_pool cache>`: the probe's whole path of C values on the "
             f"45,000 standardised GAP vectors (256 features, 10 classes), one after the other in one process. Host: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs. Iterations: L-BFGS "
             "iterations (scikit-learn's n_iter_) or objective evaluations (ours, one or a few more per iteration).",
             "", "| solver | path s | iterations | ms each | C chosen | val loss | val acc |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['seconds']} | {r['iterations']} | {r['ms_per_iteration']} | {r['C']:.3g} | {r['val_loss']} | "
              f"{r['val_accuracy']} |" for n, r in results.items()]
    write_sections(args.out / "benchmarks.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
