"""Heads on long-tailed training splits: seeded long-tailed subsets of a balanced cache, and the
table that compares the heads on them by test balanced accuracy.

Two shapes, as in the long-tailed recognition literature (CIFAR-10-LT, Cui et al. 2019; the step
profile of Buda et al. 2018): "exp", where class i of k keeps n_max * ratio^(-i / (k - 1)) images,
and "step", where half the classes keep n_max and the other half n_max / ratio. Which classes are the
large ones is drawn anew for each repeat. The test split stays whole (balanced for CIFAR-10), so
balanced accuracy is what the heads are compared by. Writes longtail.json and longtail.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featcache import system
from featcache.errors import BadInputError
from heads.config import RUNS_DIR, TrainConfig, pools_first, reads_maps_if_they_fit
from heads.curve import CurveConfig

log = logging.getLogger(__name__)

SHAPES = ("exp", "step")
DEFAULT_RATIOS = (10, 50)
#: Each compared head: its label and the TrainConfig fields that make it. "default" is what a user gets
#: without an option; "default, unweighted" is the same head without class weights (the default before).
TAIL_HEADS = {"default": {"model": "auto"}, "default, unweighted": {"model": "auto", "class_weight": "none"},
              "probe, class-balanced": {"model": "linear", "class_weight": "balanced"},
              "probe, unweighted": {"model": "linear", "class_weight": "none"}, "knn": {"model": "knn"}}


def tail_counts(n_max: int, n_classes: int, ratio: float, shape: str, order: np.ndarray) -> np.ndarray:
    """Images per class: class `order[i]` is the i-th largest."""
    if shape == "exp":
        sizes = n_max * float(ratio) ** (-np.arange(n_classes) / max(1, n_classes - 1))
    elif shape == "step":
        sizes = np.where(np.arange(n_classes) < (n_classes + 1) // 2, n_max, n_max / float(ratio))
    else:
        raise BadInputError(f"long-tail shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    counts = np.empty(n_classes, np.int64)
    counts[order] = np.maximum(2, np.floor(sizes)).astype(np.int64)   # a validation row and a training row
    return counts


def long_tail_table(cache, *, layer=None, ratios=DEFAULT_RATIOS, shapes=SHAPES, n_max: int = 500,
                    repeats: int = 3, heads: dict | None = None, runs_dir: str | Path = RUNS_DIR,
                    progress: bool = True, **options) -> Path:
    """Train each head of `heads` on `repeats` long-tailed subsets of each shape and ratio; write the table
    into a new folder under `runs_dir`; return the folder. `options` are TrainConfig fields for every run."""
    from heads.data import data_from_caches
    from heads.reports import check_runs_dir

    heads = TAIL_HEADS if heads is None else heads
    for bad in ("model", "per_class", "subset_seed", "seed"):
        if bad in options:
            raise BadInputError(f"{bad} is set by the long-tail table itself")
    configs = {label: TrainConfig(**{**options, **fields}) for label, fields in heads.items()}   # validated up front
    checked = CurveConfig(long_tail=ratios, tail_max=n_max, repeats=repeats)
    ratios, n_max, repeats = checked.long_tail, checked.tail_max, checked.repeats
    check_runs_dir(runs_dir)
    caches = list(cache) if isinstance(cache, (list, tuple)) else [cache]
    data = data_from_caches(caches, next(iter(configs.values())).pooling, layer,
                            prepooled=all(pools_first(c) for c in configs.values()),
                            maps_if_they_fit=any(reads_maps_if_they_fit(c) for c in configs.values()))
    smallest = int(np.bincount(data.y_train, minlength=len(data.class_names)).min())
    if n_max > smallest:
        raise BadInputError(f"--tail-max {n_max} is more than the {smallest} training images of the smallest class")
    rows = _runs(data, configs, [(s, r) for s in shapes for r in ratios], n_max, repeats, progress)
    return _write(Path(runs_dir), rows, data, configs, n_max=n_max, repeats=repeats)


def _runs(data, configs: dict, points: list, n_max: int, repeats: int, progress: bool) -> list[dict]:
    from heads.curve import run_row
    from heads.data import subset
    from heads.train import train

    rows, k = [], len(data.class_names)
    with system.progress_bar(len(points) * repeats * len(configs), unit="run", desc="long tail",
                             enabled=progress) as bar:
        for shape, ratio in points:
            for r in range(repeats):
                counts = tail_counts(n_max, k, ratio, shape, np.random.default_rng([r, 7]).permutation(k))
                part = subset(data, counts, r)
                for label, base in configs.items():
                    config = TrainConfig(**{**base.__dict__, "seed": r})
                    m = train(part, config, runs_dir=None, progress=False).metrics
                    rows.append({"shape": shape, "ratio": ratio, "repeat": r, "head": label,
                                 "counts": [int(c) for c in counts], **run_row(m)})
                    bar.update(1)
    return rows


def summarise(rows: list[dict], labels) -> list[dict]:
    """One row per (shape, ratio): per head the mean and standard deviation of test balanced accuracy."""
    out = []
    for shape, ratio in dict.fromkeys((r["shape"], r["ratio"]) for r in rows):
        here = [r for r in rows if r["shape"] == shape and r["ratio"] == ratio]
        row = {"shape": shape, "ratio": ratio, "n_train": int(np.mean([r["n_train"] for r in here])),
               "largest": max(here[0]["counts"]), "smallest": min(here[0]["counts"])}
        for label in labels:
            acc = np.array([r["test_balanced_accuracy"] for r in here if r["head"] == label])
            row[label] = {"mean": float(acc.mean()), "std": float(acc.std()), "n": len(acc)}
        chosen = [r["chosen"] for r in here if r["head"] == "default" and r.get("chosen")]
        if chosen:
            row["default_chose"] = {name: chosen.count(name) for name in dict.fromkeys(chosen)}
        out.append(row)
    return out


def format_table(summary: list[dict], labels, *, repeats: int, n_test: int) -> str:
    head = ["shape", "largest / smallest class", "training rows", *labels, "default chose"]
    from heads.reports import markdown_table

    body = [[row["shape"], f"{row['largest']} / {row['smallest']}", str(row["n_train"]),
             *(f"{row[label]['mean']:.4f} ± {row[label]['std']:.4f}" for label in labels),
             ", ".join(f"{name} x{k}" for name, k in row.get("default_chose", {}).items())] for row in summary]
    return (markdown_table(head, body) + f"\n\nTest balanced accuracy (mean recall over classes), mean ± standard deviation over "
            f"{repeats} seeded long-tailed subsets of the training split (which classes are large is drawn per "
            f"repeat); the whole held-out test split ({n_test} images), once per run. Training rows exclude the "
            "validation rows carved from each subset.\n")


def _write(runs_dir: Path, rows: list[dict], data, configs: dict, *, n_max: int, repeats: int) -> Path:
    from heads.reports import staged_run_dir, write_json

    summary = summarise(rows, list(configs))
    source = data.provenance.brief()
    with staged_run_dir(runs_dir, "longtail") as stage:
        write_json(stage.path / "longtail.json", {
            "heads": {label: {k: v for k, v in c.__dict__.items() if k in ("model", "class_weight")}
                      for label, c in configs.items()},
            "n_max": n_max, "repeats": repeats, "data": source, "n_test": len(data.y_test),
            "random_weights": data.random_weights, "summary": summary, "runs": rows})
        (stage.path / "longtail.md").write_text(format_table(summary, list(configs), repeats=repeats,
                                                             n_test=len(data.y_test)))
    return stage.final
