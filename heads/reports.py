"""Run records on disk (runs/<id>/) and the table that compares runs.

Each run folder holds config.json (enough to rerun it, plus the data's provenance),
metrics.json, history.csv, classification_report.txt, confusion_matrix.png, curves.png and
model.keras. Runs are compared by validation accuracy, never by test accuracy.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from featcache import system
from featcache.errors import BadInputError
from featcache.options import given_or_built, option, validate
from heads.balance import IMBALANCE_RATIO
from heads.builders import fitting_of
from heads.config import RUNS_DIR
from heads.fitting import C_PATH, EPOCHS, VOTE, Fitting
from heads.provenance import Provenance

log = logging.getLogger(__name__)
RANDOM_FLAG = "RANDOM BACKBONE WEIGHTS (not ImageNet features)"


def write_run(runs_dir: Path, result, data, tensorboard: Path | None = None) -> Path:
    """Write every record of `result` into a new folder under `runs_dir` (with the TensorBoard logs written
    during training, moved in as tensorboard/); return the folder.

    The folder is written under a hidden temporary name and renamed when complete, so an
    interrupted write never leaves a folder that looks like a finished run."""
    with staged_run_dir(runs_dir, result.config.name or result.config.model) as stage:
        _write_records(stage.path, result, data, run_id=stage.stem)
        if tensorboard is not None and tensorboard.exists() and any(tensorboard.iterdir()):   # not the probe's
            shutil.move(str(tensorboard), str(stage.path / "tensorboard"))
    return stage.final


def _write_records(run_dir: Path, result, data, *, run_id: str) -> None:
    m = result.metrics
    result.model.save(run_dir / "model.keras")   # first: config.json records its hash, which binds the two
    config = {**asdict(result.config), "units": list(result.config.units), "learning_rate": result.config.learning_rate,
              "data": {**data.provenance.record(), **({"feed": data.feed.record()} if data.feed is not None else {})},
              "random_weights": data.random_weights, "class_names": list(data.class_names),
              "model_sha256": system.file_sha256(run_dir / "model.keras")}
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "metrics.json", {k: v for k, v in m.items() if k != "classification_report"})
    fitting = fitting_of({"model": result.config.model}, m)
    _write_history(run_dir / "history.csv", result.history, fitting)
    chosen = fitting.described(m)
    if m.get("class_weight") == "balanced":
        chosen += (f", classes weighted (training classes {m['train_imbalance']:g}x apart); balanced accuracy "
                   f"{m['test_balanced_accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    header = (f"{RANDOM_FLAG}\n\n" if data.random_weights else "") + \
        (f"Held-out test split, evaluated once after training (n={m['n_test']}); model chosen by validation "
         f"loss at {chosen}" + (f"; then refitted with that setting on training + validation ({m['refit']['rows']} "
                                f"rows), the model tested" if "refit" in m else "") + ".\n"
         f"test accuracy {m['test_accuracy']:.4f}, validation accuracy {m['val_accuracy']:.4f}\n\n")
    (run_dir / "classification_report.txt").write_text(header + m["classification_report"])
    model = (f"auto, chose {m['chosen']}" if "chosen" in m else result.config.model) + (", refitted" if "refit" in m
                                                                                       else "")
    title = f"{run_id}: {model}, test accuracy {m['test_accuracy']:.4f}" + ("\n" + RANDOM_FLAG if data.random_weights
                                                                             else "")
    plot_confusion(m["confusion_matrix"], data.class_names, run_dir / "confusion_matrix.png", title)
    plot_curves(result.history, m["best_epoch"], run_dir / "curves.png", title, fitting)


#: history.csv's columns, where a history has them: per epoch, per C tried (probe) or per setting (kNN).
_HISTORY_COLUMNS = ("C", "k", "temperature", "smoothing", "loss", "accuracy", "balanced_accuracy", "val_loss",
                    "val_accuracy", "val_balanced_accuracy", "learning_rate", "seconds")


def _write_history(path: Path, history: dict, fitting: Fitting) -> None:
    keys = [k for k in _HISTORY_COLUMNS if k in history]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([fitting.steps, *keys])
        for i in range(len(history["val_loss"])):
            w.writerow([i + 1, *(f"{history[k][i]:.6g}" for k in keys)])


def pyplot():
    """matplotlib.pyplot drawing into files (the Agg backend: no display needed, none opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(head: list, rows: list) -> str:
    """A Markdown table of `head` and `rows` (each a list of cells, shown with str)."""
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def plot_confusion(matrix, class_names, path: Path, title: str) -> None:
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
        ax=ax, xticks_rotation=45, colorbar=False, values_format="d")
    ax.set_title(f"{title}\nconfusion matrix, held-out test split", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(history: dict, best_epoch: int, path: Path, title: str, fitting: Fitting = EPOCHS) -> None:
    plt = pyplot()
    if fitting is VOTE:
        return _plot_knn(history, best_epoch - 1, path, title)
    by_c = fitting is C_PATH   # the linear probe: one point per L2 strength, not per epoch
    x = history["C"] if by_c else range(1, len(history["loss"]) + 1)
    best = x[best_epoch - 1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(x, history[key], marker="." if by_c else None, label=f"train {key}")
        ax.plot(x, history[f"val_{key}"], marker="." if by_c else None, label=f"validation {key}")
        ax.axvline(best, color="grey", linestyle=":", label=f"chosen C={best:.3g}" if by_c else f"best epoch ({best})")
        if by_c:
            ax.set_xscale("log")
        elif key == "loss" and max(history["val_loss"]) > 10 * min(history["val_loss"]):
            ax.set_yscale("log")   # a huge first-epoch loss would flatten the rest of the curve
        ax.set_xlabel("C (inverse L2 strength)" if by_c else "epoch")
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_knn(history: dict, best: int, path: Path, title: str) -> None:
    """Validation loss and accuracy against k, one line per temperature, at the smoothing chosen."""
    plt = pyplot()

    smoothing = history["smoothing"][best]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key in zip(axes, ("val_loss", "val_accuracy")):
        for t in dict.fromkeys(history["temperature"]):
            rows = [i for i, (ti, si) in enumerate(zip(history["temperature"], history["smoothing"]))
                    if ti == t and si == smoothing]
            ax.plot([history["k"][i] for i in rows], [history[key][i] for i in rows], marker=".", label=f"T={t:g}")
        ax.plot([history["k"][best]], [history[key][best]], "k*", markersize=10, label="chosen")
        ax.set_xscale("log")
        ax.set_xlabel(f"k (smoothing {smoothing:g})")
        ax.set_title(key.replace("_", " "))
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class RunsTable:
    """How `featcache runs` shows the runs, every option declared once (the command line's options are built
    from it)."""

    runs_dir: str = option(RUNS_DIR, "The folder of run folders to compare.", kind="path", path=True)
    json: bool = option(False, "A JSON list on stdout.", kind="bool", flag=True)
    markdown: bool = option(False, "A Markdown table.", kind="bool", flag=True)

    def __post_init__(self):
        validate(self)
        if self.json and self.markdown:
            raise BadInputError("--json and --markdown are two formats; fix: pass one of them")


def runs_table(*, config: RunsTable | None = None, **fields) -> str:
    """The runs under `runs_dir`, best validation accuracy first, as an aligned table, a Markdown table or a JSON
    list; "" where there is none. Options: a RunsTable, or its fields as keywords."""
    config = given_or_built(RunsTable, config, fields)
    rows = collect_runs(config.runs_dir)
    if config.json:
        return json.dumps(rows, indent=2, allow_nan=False)
    return format_table(rows, markdown=config.markdown) if rows else ""


def collect_runs(runs_dir: str | Path) -> list[dict]:
    """One row per finished run under `runs_dir` (and each search's winner, in its search folder, with the
    search's name in "search"), best validation accuracy first.

    A folder whose records are missing, truncated or of another layout is left out with a warning
    naming it, so that one damaged run never hides the others."""
    rows = []
    searched = [m for m in Path(runs_dir).glob("*/*/metrics.json") if (m.parent.parent / "search.json").exists()]
    for run in sorted([*Path(runs_dir).glob("*/metrics.json"), *searched]):
        if run.parent.name.startswith("."):   # a run being written (staged_run_dir)
            continue
        try:
            rows.append({**_row(run), "search": run.parent.parent.name if run in searched else ""})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("skipping %s: unreadable run records (%s: %s); fix: delete the folder or rerun it",
                        run.parent, type(e).__name__, str(e)[:100])
    return sorted(rows, key=_best_first)


def _best_first(row: dict):
    """Validation accuracy, best first; runs without a finite number there come last (and are flagged)."""
    value = row["val_accuracy"]
    return (0, -value) if value is not None else (1, 0)


def _number(value) -> float | None:
    """A finite number from a run's records, or None: NaN, infinities, booleans and text are not figures."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _row(run: Path) -> dict:
    fix = "delete the folder or rerun it"
    m, c = system.read_json(run, fix=fix), system.read_json(run.parent / "config.json", fix=fix)
    units = ",".join(map(str, c.get("units", [])))
    opts = {"dense": f"{c['pooling']} bn={'on' if c['batchnorm'] else 'off'} units={units} drop={c['dropout']}",
            "linear": f"{c['pooling']}", "knn": f"{c['pooling']}", "cnn": f"drop={c['dropout']}",
            "conv": f"filters={c.get('filters')} units={units} drop={c['dropout']}",
            }.get(m.get("chosen", c["model"]), "")
    if m.get("n_views", 1) > 1:
        opts += f" views={m['n_views']} ({c.get('views_mode')})"
    opts = " ".join([opts, *_changed(c)]).strip()
    model = f"auto ({m['chosen']})" if c["model"] == "auto" else c["model"]
    fitting = fitting_of(c, m)
    capped = fitting.by_epochs and m["epochs_run"] == c.get("epochs") and m["best_epoch"] == m["epochs_run"]
    setting = None if fitting.by_epochs else fitting.setting(m)
    imbalanced = max(m.get("train_imbalance", 1), m.get("test_imbalance", 1)) >= IMBALANCE_RATIO
    return {"run": run.parent.name, "model": model, "options": opts, "data": _data_label(c),
            "epochs": setting or f"{m['epochs_run']}/{m['best_epoch']}" + (" (cap: still improving)" if capped else ""),
            **{k: _number(m.get(k)) for k in ("val_accuracy", "test_accuracy", "seconds", "seconds_per_epoch")},
            **{k: _number(m.get(k)) if imbalanced else None for k in ("test_balanced_accuracy", "macro_f1")},
            "imbalanced": imbalanced, "random_weights": m.get("random_weights", False)}


#: Training options the table shows where a run set them to other than the default.
_SHOWN_IF_CHANGED = {"lr": "lr", "batch_size": "bs", "patience": "patience", "epochs": "epochs",
                     "val_fraction": "val", "seed": "seed", "l2": "l2", "class_weight": "class_weight"}


def _changed(config: dict) -> list[str]:
    """'lr=0.01', 'bs=64', ...: the training options of `config` that differ from TrainConfig's defaults."""
    from dataclasses import fields

    from heads.config import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return [f"{short}={config[k]:g}" if isinstance(config[k], float) else f"{short}={config[k]}"
            for k, short in _SHOWN_IF_CHANGED.items() if k in config and config[k] != defaults[k]]


def _data_label(config: dict) -> str:
    """What a run trained on, so that runs on different data never look comparable: dataset, limit, subset."""
    source = Provenance.of_record(config.get("data", {}))
    metas = source.metas
    name = metas[0].get("dataset_name", "?") if metas else source.other.get("dataset_name", "?")
    limit = metas[0].get("limit") if metas else source.other.get("limit")
    keys = [part.cache_key[:12] for part in source.layers if part.cache_key]
    per_class = config.get("per_class")
    return name + (f" limit={limit}" if limit else "") + \
        (f" {per_class}/class seed={config.get('subset_seed', 0)}" if per_class else "") + \
        (f" [{'+'.join(keys)}]" if keys else "")


def format_table(rows: list[dict], *, markdown: bool = False) -> str:
    """The runs table; where a run's training or test classes are imbalanced, with its test balanced accuracy and
    macro-F1 (plain accuracy there mostly counts the large classes)."""
    balance, searches = any(r.get("imbalanced") for r in rows), any(r.get("search") for r in rows)
    head = [*(["search"] if searches else []), "run", "model", "data", "options", "epochs run/best", "val acc",
            "test acc", *(["test bal. acc", "macro-F1"] if balance else []), "seconds", "s/epoch"]
    body = [[*([r.get("search", "")] if searches else []),
             r["run"] + (" [RANDOM WEIGHTS]" if r["random_weights"] else ""), r["model"], r["data"], r["options"],
             r["epochs"], _shown(r["val_accuracy"], ".4f"), _shown(r["test_accuracy"], ".4f"),
             *([_shown(r["test_balanced_accuracy"], ".4f", "-"), _shown(r["macro_f1"], ".4f", "-")] if balance
               else []),
             _shown(r["seconds"], ".1f"), _shown(r["seconds_per_epoch"], ".2f")] for r in rows]
    if markdown:
        return markdown_table(head, body) + "\n\nOrdered by validation accuracy; test accuracy is the held-out split, used once.\n"
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row) for row in [head, *body])


def _shown(value, spec: str, missing: str = "n/a (not a number)") -> str:
    return missing if value is None else format(value, spec)


def check_runs_dir(runs_dir: str | Path) -> Path:
    """Create `runs_dir` if needed and make sure a run can be written there, before any training."""
    return system.writable_folder(runs_dir, what="runs folder", fix="pass a writable --runs-dir")


class staged_run_dir:
    """`with staged_run_dir(runs_dir, name) as stage:` write into `stage.path`; on success it is renamed to
    `stage.final` (<time>-<name>, a free name); on an error or Ctrl-C it is removed."""

    def __init__(self, runs_dir: Path, name: str):
        self.runs_dir = check_runs_dir(runs_dir)
        self.stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}"
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.stem}.", dir=self.runs_dir))
        self.final = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            room = system.no_room(error, self.path, "free some space, or pass another --runs-dir") \
                if isinstance(error, OSError) else None
            if room:
                raise room from error
            return False
        for i in range(1000):
            final = self.runs_dir / (self.stem if i == 0 else f"{self.stem}-{i}")
            try:
                os.rename(self.path, final)   # fails if `final` exists and is not empty
            except OSError:
                if final.exists():
                    continue
                raise
            self.final = final
            return False
        raise FileExistsError(f"could not find a free run folder name under {self.runs_dir}")


def write_json(path: Path, obj) -> None:
    """`obj` as strict JSON: a figure that is not finite (a diverged trial's loss) is written null, not NaN."""
    path.write_text(json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
