"""Commands that use a trained head: `predict` classifies image files, `export` writes one end-to-end model."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

import click

from featcache import system
from featcache.cli.group import main, needs_backend
from featcache.cli.options import add_options
from featcache.errors import BadInputError
from featcache.options import declared
from heads.export import export_options
from heads.mistakes import InspectConfig
from heads.predict import predict_options


def _rows(result, k: int) -> list[dict]:
    return [{"path": str(f), "predictions": [{"class": c, "probability": p} for c, p in top]}
            for f, top in zip(result.files, result.top(k))]


def format_predictions(result, *, k: int, fmt: str) -> str:
    """The predictions as a table, CSV (path,class_1,probability_1,...) or a JSON list."""
    rows = _rows(result, k)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["path"] + [f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "probability")])
        for r in rows:
            w.writerow([r["path"]] + [x for p in r["predictions"] for x in (p["class"], f"{p['probability']:.6f}")])
        return out.getvalue().rstrip("\n")
    width = max([len(r["path"]) for r in rows] + [4])
    lines = [f"{'path':<{width}}  " + "  ".join(f"top {i}" for i in range(1, k + 1))]
    lines += [f"{r['path']:<{width}}  " + "  ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
              for r in rows]
    return "\n".join(lines)


def _report_if_labelled(result) -> None:
    """Images in folders named after the classes (ROOT/<class>/...): their accuracy and most confused pairs."""
    import numpy as np

    from heads.mistakes import confused_table, most_confused

    names = list(result.class_names)
    truth = [f.parent.name for f in result.files]
    if not truth or not all(t in names for t in truth):
        return
    y = np.array([names.index(t) for t in truth])
    matrix = np.zeros((len(names), len(names)), np.int64)
    np.add.at(matrix, (y, result.indices), 1)
    click.echo(f"labelled by their folders: accuracy {np.mean(result.indices == y):.4f} on {len(y)} images; most "
               "confused:\n" + confused_table(most_confused(matrix, names, 5)).rstrip(), err=True)


@main.command()
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="Classes shown per image.")
@click.option("--format", "fmt", type=click.Choice(("table", "csv", "json")), default=None,
              help="Output format [default: table on a terminal, csv otherwise].")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the results to this file (new, or replaced with --force), not stdout.")
@click.option("--force", is_flag=True, help="Replace an existing -o file.")
@add_options(predict_options())
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@needs_backend
def predict(run, images, top_k, fmt, output, force, no_progress, **kw):
    """Classify IMAGES (files, or folders walked recursively) with the head of RUN (a run folder, or a folder
    `featcache export` wrote): the top classes of each image with their probabilities, on stdout (or -o).

    Images are decoded and resized exactly as `extract` does, then go through the same backbone, weights
    (checked by hash) and precision as the cache the head was trained on."""
    from heads.predict import PredictConfig
    from heads.predict import predict as run_predict

    config = PredictConfig(**kw)
    if output and Path(_outside_runs(output)).exists() and not force:   # before any work
        raise BadInputError(f"{output} exists; fix: pass another -o, or --force to replace it")
    # unreadable images are always collected, then listed; --skip-bad-images decides whether they fail the run
    result = run_predict(run, list(images), config=dataclasses.replace(config, skip_bad_images=True),
                         progress=not no_progress)
    for _, why in result.bad:
        click.echo(f"error: {why}", err=True)
    k = min(top_k, len(result.class_names))
    text = format_predictions(result, k=k, fmt=fmt or ("table" if sys.stdout.isatty() else "csv"))
    if output:
        system.staged_file(Path(output), text + "\n", force=force)
    else:
        click.echo(text)
    _report_if_labelled(result)
    if result.bad and not config.skip_bad_images:
        click.echo(f"error: {len(result.bad)} unreadable images (above); fix: replace or remove them, or pass "
                   "--skip-bad-images", err=True)
        sys.exit(2)


def _outside_runs(output) -> Path:
    """-o of predict: a file in a folder that is not a run or an export (whose records it could replace)."""
    path = Path(output)
    if any((path.parent / name).exists() for name in ("config.json", "export.json", "model.keras")):
        raise BadInputError(f"-o {path} is inside a run or export folder, which predict never writes into; fix: pass "
                            "a file elsewhere")
    if not path.parent.is_dir():
        raise BadInputError(f"-o {path}: no folder {path.parent}; fix: create it, or pass another -o")
    return path


@main.command()
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder to write the model and export.json into.")
@add_options(export_options())
@needs_backend
def export(run, output, **kw):
    """Write RUN's head with its backbone as one model, from uint8 images at the cache's input size to class
    probabilities, plus export.json (class names, input size, the cache's and weights' provenance); print the
    folder."""
    from heads.export import ExportConfig
    from heads.export import export as run_export

    click.echo(str(run_export(run, output, config=ExportConfig(**kw))))


@main.command()
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@add_options(declared(InspectConfig))
@needs_backend
def inspect(run, **kw):
    """Look at RUN's mistakes: write mistakes.md (the most confused class pairs on the test split) and
    top_losses.png (the test images it got most confidently wrong) into the run folder; print the table."""
    from heads.mistakes import confused_table
    from heads.mistakes import inspect as run_inspect

    written = run_inspect(run, config=InspectConfig(**kw))
    click.echo(confused_table(written["pairs"]).rstrip())
    click.echo(f"wrote {', '.join(written['files'])} in {run}", err=True)
