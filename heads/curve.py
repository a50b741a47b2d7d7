"""Data-efficiency curve: test accuracy of the default head and the linear probe against the
number of training images per class, from one cache read once.

Each point trains on `repeats` seeded stratified subsets of the training split (validation carved
from the subset, test on the whole test split, once per run), as in VISSL's low-shot linear
benchmarks and the few-shot probe curves of the CLIP paper. Writes curve.json, curve.md and
curve.png into a new folder under `runs_dir`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import system
from featcache.errors import BadInputError
from featcache.options import declared, option, validate
from heads.config import RUNS_DIR, TrainConfig, pools_first, reads_maps_if_they_fit

log = logging.getLogger(__name__)

DEFAULT_SIZES = (5, 10, 25, 50, 100, 250, 500, 1000, None)   # None: the whole training split
CURVE_HEADS = ("auto", "linear", "knn")   # the default head (dense or probe, chosen on validation), the probe, kNN
#: How the curve's plots and tables name each head.
HEAD_LABELS = {"auto": "default head (auto: dense or probe on validation)", "dense": "dense head",
               "linear": "linear probe (L-BFGS)", "knn": "kNN vote (cosine, k and T on validation)"}


def parse_sizes(text: str) -> tuple[int | None, ...]:
    """'5,10,all' -> (5, 10, None); 'all' (or 'full') is the whole training split."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if part in ("all", "full"):
            out.append(None)
        elif part.isdigit() and int(part) >= 2:
            out.append(int(part))
        else:
            raise BadInputError(f"--sizes must be images per class (integers >= 2) or 'all', separated by "
                                f"commas, got {text!r}")
    if not out or len(set(out)) != len(out):
        raise BadInputError(f"--sizes must list distinct sizes, got {text!r}")
    return tuple(out)


def parse_ratios(text) -> tuple[float, ...]:
    """'10,50' (or numbers) -> (10.0, 50.0): largest/smallest class ratios of at least 1."""
    try:
        out = tuple(float(p) for p in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        out = ()
    if not out or any(not r >= 1 for r in out):
        raise BadInputError(f"--long-tail must be ratios of at least 1 separated by commas (e.g. 10,50), got {text!r}")
    return out


@dataclass(frozen=True)
class CurveConfig:
    """The options of `featcache curve` besides training's (TrainConfig), declared once: the command line is built
    from them, and `data_efficiency_curve` and `long_tail_table` check their arguments with the same validator."""

    sizes: tuple = option("5,10,25,50,100,250,500,1000,all", "Training images per class of each point ('all': the "
                          "whole training split); sizes above the smallest class are skipped.", kind="any")
    repeats: int = option(3, "Seeded subsets per size (mean and standard deviation are reported).", kind="int",
                          low=1)
    long_tail: tuple | None = option(None, "Instead of --sizes: long-tailed subsets of the training split with these "
                                     "largest/smallest class ratios (e.g. 10,50), in two shapes (exp: sizes falling "
                                     "geometrically, as CIFAR-10-LT; step: half the classes small); compares the "
                                     "default head, the probe with and without class weights and kNN by test "
                                     "balanced accuracy; writes longtail.json and longtail.md.", kind="any")
    tail_max: int = option(500, "With --long-tail: training images of the largest class.", kind="int", low=2)

    def __post_init__(self):
        validate(self)
        text = self.sizes if isinstance(self.sizes, str) else ",".join(
            "all" if s is None else str(s) for s in self.sizes)   # (5, 10, None) is checked as "5,10,all" is
        object.__setattr__(self, "sizes", parse_sizes(text))
        if self.long_tail is not None:
            object.__setattr__(self, "long_tail", parse_ratios(self.long_tail))


def curve_options() -> list:
    """The declared fields of CurveConfig (what `featcache curve` turns into options)."""
    return declared(CurveConfig)


def data_efficiency_curve(cache, *, layer=None, sizes=DEFAULT_SIZES, repeats: int = 3, heads=CURVE_HEADS,
                          runs_dir: str | Path = RUNS_DIR, progress: bool = True, **options) -> Path:
    """Train each head of `heads` on `repeats` subsets of each size; write the curve; return its folder.

    `cache` is a path, a FeatureCache or a list of them (as for `train_head`); `options` are
    TrainConfig fields shared by every run (e.g. epochs, val_fraction).
    """
    from heads.data import data_from_caches
    from heads.reports import check_runs_dir

    checked = CurveConfig(sizes=sizes, repeats=repeats)
    sizes, repeats = checked.sizes, checked.repeats
    for bad in ("model", "per_class", "subset_seed", "seed"):
        if bad in options:
            raise BadInputError(f"{bad} is set by the curve itself")
    configs = {h: TrainConfig(model=h, **options) for h in heads}   # validates the options once, up front
    check_runs_dir(runs_dir)
    caches = list(cache) if isinstance(cache, (list, tuple)) else [cache]
    data = data_from_caches(caches, configs[heads[0]].pooling, layer,   # the only read of the cache
                            prepooled=all(pools_first(c) for c in configs.values()),
                            maps_if_they_fit=any(reads_maps_if_they_fit(c) for c in configs.values()))
    kept = _sizes_that_fit(sizes, data)
    rows = _runs(data, configs, kept, repeats, progress)
    return _write_curve(Path(runs_dir), rows, data, heads=heads, kept=kept, repeats=repeats, options=options)


def _sizes_that_fit(sizes, data) -> list:
    """The sizes at most the smallest class (None, the whole split, always fits); the others are skipped."""
    smallest = int(np.bincount(data.y_train, minlength=len(data.class_names)).min())
    kept = [n for n in sizes if n is None or n <= smallest]
    for n in sizes:
        if n not in kept:
            log.info("skipping %d per class: the smallest class has %d training images", n, smallest)
    if not kept:
        raise BadInputError(f"every size in --sizes is above the {smallest} training images of the smallest class")
    return kept


def _runs(data, configs: dict, kept: list, repeats: int, progress: bool) -> list[dict]:
    """One row per (size, repeat, head): its validation and test figures."""
    from heads.train import train

    rows = []
    with system.progress_bar(len(kept) * repeats * len(configs), unit="run", desc="curve", enabled=progress) as bar:
        for n in kept:
            for r in range(repeats):
                for head, base in configs.items():
                    config = TrainConfig(**{**base.__dict__, "per_class": n, "subset_seed": r, "seed": r})
                    m = train(data, config, runs_dir=None, progress=False).metrics
                    rows.append({"per_class": n, "repeat": r, "head": head, **run_row(m)})
                    bar.update(1)
    return rows


def run_row(m: dict) -> dict:
    """What a curve keeps of one run's metrics."""
    keys = ("n_train", "n_val", "val_accuracy", "val_loss", "test_accuracy", "test_balanced_accuracy", "macro_f1",
            "chosen", "best_epoch", "epochs_run", "C", "k", "temperature", "class_weight", "seconds")
    return {k: m.get(k) for k in keys}


def _write_curve(runs_dir: Path, rows: list[dict], data, *, heads, kept, repeats: int, options: dict) -> Path:
    from heads.reports import staged_run_dir, write_json

    summary = summarise(rows, heads)
    source = data.provenance.brief()
    with staged_run_dir(runs_dir, "curve") as stage:
        write_json(stage.path / "curve.json", {
            "heads": list(heads), "sizes": [n or "all" for n in kept], "repeats": repeats,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}, "data": source,
            "n_train_split": len(data.y_train), "n_test": len(data.y_test), "random_weights": data.random_weights,
            "summary": summary, "runs": rows})
        (stage.path / "curve.md").write_text(format_curve(summary, heads, repeats, len(data.y_test)))
        plot_curve(summary, heads, stage.path / "curve.png", len(data.class_names), len(data.y_train))
    return stage.final


def summarise(rows: list[dict], heads) -> list[dict]:
    """One row per size: per head the mean and (population) standard deviation over repeats."""
    out = []
    for n in dict.fromkeys(r["per_class"] for r in rows):
        row = {"per_class": n or "all"}
        for head in heads:
            acc = np.array([r["test_accuracy"] for r in rows if r["per_class"] == n and r["head"] == head])
            row[head] = {"mean": float(acc.mean()), "std": float(acc.std()), "n": len(acc)}
        row["n_train"] = next(r["n_train"] for r in rows if r["per_class"] == n)
        chosen = [r["chosen"] for r in rows if r["per_class"] == n and r.get("chosen")]
        if chosen:
            row["auto_chose"] = {name: chosen.count(name) for name in dict.fromkeys(chosen)}
        out.append(row)
    return out


def format_curve(summary: list[dict], heads, repeats: int, n_test: int) -> str:
    chose = any("auto_chose" in row for row in summary)
    head = ["images per class", "training rows"] + [f"{h} test acc" for h in heads] + (["auto chose"] if chose else [])
    from heads.reports import markdown_table

    body = []
    for row in summary:
        cells = [str(row["per_class"]), str(row["n_train"])]
        cells += [f"{row[h]['mean']:.4f} ± {row[h]['std']:.4f}" for h in heads]
        if chose:
            cells.append(", ".join(f"{name} x{k}" for name, k in row.get("auto_chose", {}).items()))
        body.append(cells)
    return (markdown_table(head, body) + f"\n\nMean ± standard deviation over {repeats} seeded subsets; test accuracy on the "
            f"whole held-out test split ({n_test} images), measured once per run. Training rows exclude the "
            "validation rows carved from each subset.\n")


def plot_curve(summary: list[dict], heads, path: Path, n_classes: int, n_train_split: int) -> None:
    from heads.reports import pyplot

    plt = pyplot()
    x = [r["per_class"] if r["per_class"] != "all" else n_train_split / n_classes for r in summary]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    # where auto chose the probe the two lines coincide: drawn apart by style and a small shift, never hidden
    styles = [dict(marker="o", linestyle="-", zorder=3), dict(marker="s", linestyle="--", mfc="none", zorder=2),
              dict(marker="^", linestyle=":", zorder=1)]
    for k, head in enumerate(heads):
        shift = 1.0 + 0.03 * (k - (len(heads) - 1) / 2)   # a few percent along the log axis
        ax.errorbar([v * shift for v in x], [r[head]["mean"] for r in summary], yerr=[r[head]["std"] for r in summary],
                    capsize=3, **styles[k % len(styles)],
                    label=HEAD_LABELS.get(head, head))
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log scale; last point: whole split)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("data efficiency on cached features", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
