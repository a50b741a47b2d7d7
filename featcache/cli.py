"""The `featcache` command: a thin click layer over featcache and heads.

Results meant for scripts (a cache path, a run folder, JSON) go to stdout; messages and progress
bars go to stderr. Errors a user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from pathlib import Path

import click
import numpy as np

from featcache.errors import FeatcacheError
from heads.builders import BASELINES, HEADS, POOLINGS
from heads.train import AUTO, VIEWS_MODES

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # keep TensorFlow's start-up chatter off stderr


def start_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow and find its devices with the C++ start-up chatter (oneDNN, CUDA stubs, absl) kept
    off stderr; it is printed after all if the import fails. GPUs are found and used as before."""
    if verbose or "tensorflow" in sys.modules:
        return
    from featcache.native_log import quiet_stderr

    with quiet_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()


FORCED = "featcache.force"   # ctx.meta key: `extract --force` restarts from zero, so nothing resumes


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FeatcacheError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            if ctx.invoked_subcommand != "extract":
                hint = "; no run folder was written"
            elif ctx.meta.get(FORCED):
                hint = "; a rerun with --force starts again from the first batch"
            else:
                hint = "; rerun the same command to resume where it stopped"
            click.echo("interrupted" + hint, err=True)
            ctx.exit(130)
        except OSError as e:
            resumes = ctx.invoked_subcommand == "extract" and not ctx.meta.get(FORCED)
            click.echo(f"error: {e}" + ("; rerun the same command to resume the extraction" if resumes else ""),
                       err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="featcache", prog_name="featcache")
@click.option("-q", "--quiet", is_flag=True, help="Only print results and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Also show TensorFlow's own start-up messages.")
@click.pass_context
def main(ctx, quiet: bool, verbose: bool) -> None:
    """Cache a frozen Keras backbone's features (VGG16 by default) once in HDF5, then train heads on them
    in seconds.

    \b
    featcache extract --data ROOT --weights FILE     build (or reuse) a feature cache
    featcache info cache/NAME.h5                     what produced a cache
    featcache train-head --cache cache/NAME.h5       train the default head on it
    featcache backbones [NAME]                       the backbones, their layers and shapes
    featcache consolidate cache/NAME.h5              a cache joined from Ray shards, as one file
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    if ctx.invoked_subcommand in ("extract", "train-head", "train-baseline", "curve", "backbones"):
        start_tensorflow(verbose)


def _spec_option(field, *, ignore_env: bool = False):
    """A click option built from one ExtractSpec field: its default, help, choices, bounds and env var."""
    meta = field.metadata
    name = "--" + field.name.replace("_", "-")
    kw = {"help": meta["help"]}
    if meta.get("flag"):
        return click.option(name, is_flag=True, **kw)
    kw["default"] = field.default
    kw["show_default"] = field.default is not None and "default:" not in meta["help"]
    if "choices" in meta:
        kw["type"] = click.Choice(meta["choices"])
    elif "min" in meta:
        kw["type"] = click.IntRange(min=meta["min"])
    elif field.name in ("input_size", "augment_seed"):
        kw["type"] = int
    if field.name == "cache_dir":
        kw["type"] = click.Path(file_okay=False)
    if "env" in meta and not ignore_env:
        kw["envvar"] = meta["env"]
    return click.option(name, **kw)


def spec_field(name: str):
    from featcache.spec import options

    return next(x for x in options() if x.name == name)


def selection_options(f):
    """The options that select a cache (ExtractSpec's fields): shared by `extract`, `train-head`, `curve`."""
    from featcache.spec import options

    for field in reversed([x for x in options() if x.metadata.get("cli", True) is True]):
        f = _spec_option(field)(f)
    return f


def _selection(kw: dict) -> dict:
    """The ExtractSpec options among a command's keyword arguments (popped from `kw`)."""
    from featcache.spec import options

    return {x.name: kw.pop(x.name) for x in options() if x.name in kw}


@main.command()
@selection_options
@_spec_option(spec_field("batch_size"))
@_spec_option(spec_field("decode_workers"))
@_spec_option(spec_field("decoder"))
@_spec_option(spec_field("engine"))
@_spec_option(spec_field("ray_address"))
@_spec_option(spec_field("workers"))
@_spec_option(spec_field("shard_rows"))
@click.option("--force", is_flag=True, help="Recompute even if a matching cache exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def extract(ctx, force, no_progress, **kw):
    """Run the frozen backbone over DATA once and cache the features; print the cache path.

    Several layers (--layer block3_pool,block4_pool) share one forward pass and one file. A complete
    matching cache is reused at once; an interrupted run resumes where it stopped. With --engine ray,
    shards of rows run on Ray workers and the cache joins them (`featcache consolidate` makes it one
    self-contained file).
    """
    from featcache.extract import extract as run

    ctx.meta[FORCED] = force
    path = run(force=force, progress=not no_progress, **_selection(kw))
    click.echo(str(path))


@main.command()
@click.argument("name", required=False)
@click.option("--input-size", type=int, default=None, help="Input size for the shapes [default: the minimum, 32].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def backbones(name, input_size, as_json):
    """List the backbones, or one backbone's layers with their output shapes and bytes per image."""
    from featcache import backbones as registry

    names = [registry.get(name).name] if name else list(registry.BACKBONES)
    table = {}
    for n in names:
        spec = registry.get(n)
        size = input_size or spec.min_input_size
        shapes = registry.output_shapes(n, (size, size))
        table[n] = {"application": spec.application, "default_layer": spec.default_layer, "input_size": size,
                    "min_input_size": spec.min_input_size, "preprocessing": spec.preprocessing,
                    "weights_file": spec.weights_file,
                    "layers": {layer: {"shape": list(shape), "float16_bytes": 2 * int(np.prod(shape))}
                               for layer, shape in shapes.items()}}
    if as_json:
        click.echo(json.dumps(table, indent=2))
        return
    for n, t in table.items():
        click.echo(f"{n}  ({t['application']}, input {t['input_size']}x{t['input_size']}, "
                   f"min {t['min_input_size']}; {t['preprocessing']})")
        for layer, x in t["layers"].items():
            mark = "  (default)" if layer == t["default_layer"] else ""
            click.echo(f"  {layer:42s} {'x'.join(map(str, x['shape'])):>14s}  {x['float16_bytes']:>9,d} B{mark}")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def info(path, as_json):
    """Show what produced a cache, its shapes, size and completeness."""
    from featcache.store import open_cache

    c = open_cache(path, require_complete=False)
    summary = {
        "path": str(c.path), "kind": c.kind, "shards": len(c.shards), "complete": c.complete, "layer": c.meta.layer, "dtype": c.meta.dtype,
        "size_bytes": c.size_bytes, "random_weights": c.meta.random_weights,
        "progress": {"train": c.progress[0], "test": c.progress[1]},
        "max_abs_activation": c.max_abs_activation, "extract_seconds": c.extract_seconds,
        "class_names": list(c.class_names),
        "splits": {s: {"n": i.n, "shapes": {k: list(v) for k, v in i.shapes.items()}} for s, i in c.splits.items()},
        "meta": c.meta.to_dict(),
    }
    summary["meta"]["key"] = c.meta.key
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    m = c.meta
    lines = [
        f"path          {c.path}",
        f"kind          {_kind(c)}",
        f"complete      {'yes' if c.complete else f'NO (train {c.progress[0]}/{m.n_train}, test {c.progress[1]}/{m.n_test}; rerun extract to resume)'}",
        f"dataset       {m.dataset_name} ({m.dataset_source}), limit {m.limit or 'none'}",
        f"fingerprint   {m.dataset_fingerprint[:16]}...",
        f"backbone      {m.backbone} -> {m.layer}, input {m.input_shape}",
        f"weights       {m.weights} ({m.weights_source})" + ("   RANDOM WEIGHTS: not ImageNet features" if m.random_weights else ""),
        f"preprocessing {m.preprocessing}; resize {m.resize}; computed in {m.precision}",
        *(f"features      {layer}: {m.dtype}, train {c.splits['train'].shapes[layer]}, "
          f"test {c.splits['test'].shapes[layer]}" for layer in m.layers),
        f"views         {m.views} per training image" + (f" (augment {m.augment}, seed {m.augment_seed})"
                                                          if m.views > 1 else " (originals only)"),
        f"max |act|     {c.max_abs_activation}",
        *([f"skipped       {len(m.skipped_images)} unreadable images: "
           + "; ".join(f"{p} ({why})" for p, why in m.skipped_images[:5])
           + (" ..." if len(m.skipped_images) > 5 else "")] if m.skipped_images else []),
        f"classes       {', '.join(c.class_names)}",
        f"size          {c.size_bytes / 1e6:.1f} MB",
        f"created       {m.created} with " + ", ".join(f"{k} {v}" for k, v in m.versions.items()),
        f"key           {m.key}",
    ]
    click.echo("\n".join(lines))


def _kind(c) -> str:
    if c.kind == "virtual":
        return (f"virtual: joins {len(c.shards)} shard files in {Path(c.shards[0]['file']).parent}/ "
                "(`featcache consolidate` makes it one file)")
    if c.kind == "shard":
        return f"shard: rows {c.shard[1]}-{c.shard[2]} of the {c.shard[0]} split"
    return "one self-contained file"


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Where to write the self-contained file [default: in place of PATH].")
def consolidate(path, output):
    """Copy a cache joined from shards (--engine ray) into one self-contained file, e.g. to move it to
    another machine; print its path. The shard files are left alone: delete PATH's .shards folder once
    the copy replaced PATH."""
    from featcache.join import consolidate as run

    click.echo(str(run(path, output)))


class UnitsType(click.ParamType):
    """`400,256,256` -> (400, 256, 256): positive integers, at least one."""

    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        if not parts or any(not p.isdigit() or int(p) <= 0 for p in parts):
            self.fail(f"expected positive integers separated by commas such as 400,256,256, got {value!r}",
                      param, ctx)
        return tuple(int(p) for p in parts)


def training_options(f):
    """The options of heads.train.TrainConfig, shared by `train-head` and `train-baseline`."""
    options = [
        click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True,
                     help="Most epochs to train; early stopping usually ends sooner."),
        click.option("--patience", type=click.IntRange(min=0), default=5, show_default=True,
                     help="Early stopping: epochs without a better validation loss (best weights restored); never "
                          "before 200 optimiser steps."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Largest batch; a small training split gets smaller ones (at least 8 steps per epoch)."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Learning rate [default: 1e-3 for Adam models, 1e-2 for the SGD ann]."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
                     show_default=True, help="Share of the training split held out for validation (stratified)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the validation split, weight initialisation and shuffling."),
        click.option("--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True,
                     help="Each run writes a new folder in here."),
        click.option("--name", default=None, help="Run name (default: the model name)."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _train_config(**kw):
    from heads.train import TrainConfig

    return TrainConfig(**kw)


def cache_option(f):
    return click.option("--cache", "cache_paths", type=click.Path(dir_okay=False), multiple=True,
                        help="A cache file (repeat to join layers kept in separate files of the same images); "
                             "every layer in it unless --layer picks some. Default: the cache the selection "
                             "options below lead to (built if missing).")(f)


def subset_options(f):
    f = click.option("--subset-seed", type=int, default=0, show_default=True,
                     help="Which images --per-class draws.")(f)
    return click.option("--per-class", type=click.IntRange(min=1), default=None,
                        help="Train and validate on N training images per class, drawn from the cache "
                             "(stratified, seeded by --subset-seed); the test split stays whole.")(f)


def _caches(ctx, cache_paths, selection: dict, *, progress: bool):
    """(cache paths, layers to train on) from --cache or from the selection options (extracting if needed)."""
    from featcache.extract import check_cache, extract

    if not cache_paths:
        return [extract(progress=progress, **selection)], None
    given = {k: v for k, v in selection.items() if k not in ("layer", "cache_dir")
             and ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    pick = None   # the layers to train on; None: every layer of the caches
    if ctx.get_parameter_source("layer") != click.core.ParameterSource.DEFAULT:
        pick = selection["layer"]
        if len(cache_paths) == 1:
            given["layer"] = pick
    for path in cache_paths:
        check_cache(path, **given)
    return list(cache_paths), pick


@main.command("train-head")
@cache_option
@selection_options
@subset_options
@click.option("--head", type=click.Choice((AUTO, *HEADS)), default=AUTO, show_default=True,
              help="auto: the dense head or the linear probe, whichever has the lower validation loss (the "
                   "probe wins on small splits); dense: pooling -> standardise -> BatchNorm -> Dense(units) -> "
                   "Dropout -> softmax; linear: a linear probe (logistic regression solved by L-BFGS, L2 strength "
                   "chosen on validation); "
                   "conv: BatchNorm -> 1x1 Conv(filters) -> Flatten -> Dense(units) -> softmax.")
@click.option("--filters", type=click.IntRange(min=1), default=128, show_default=True, help="conv head only.")
@click.option("--views-mode", type=click.Choice(VIEWS_MODES), default="sample",
              show_default=True, help="With cached views: one random view per image per epoch, every view, or "
                                      "the originals only.")
@click.option("--units", type=UnitsType(), default="400,256,256", show_default=True,
              help="Dense layer sizes of the dense and conv heads.")
@click.option("--pooling", type=click.Choice(POOLINGS), default="gap", show_default=True,
              help="How feature maps become vectors: global average, flatten, or global max.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Dropout rate before the classifier (dense and conv heads).")
@click.option("--no-batchnorm", is_flag=True, help="Leave out the dense head's BatchNormalization.")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Memory for feature maps, e.g. 2GB [default: half the available memory]. Heads on maps "
                   "(--pooling flatten, conv) keep them in RAM within it and stream them from the cache beyond it; "
                   "heads that pool first read pooled vectors, made once per cache and kept beside it.")
@click.option("--stream", is_flag=True, help="Stream the maps from the cache even if they fit the memory budget.")
@training_options
@click.pass_context
def train_head(ctx, cache_paths, per_class, subset_seed, head, filters, views_mode, units, pooling, dropout,
               no_batchnorm, memory_budget, stream, epochs, patience, batch_size, lr, val_fraction, seed, runs_dir,
               name, no_progress, **kw):
    """Train a head on cached features; evaluate once on the test split; print the run folder.

    The features are standardised with statistics of the training rows (kept in the saved model)
    and small training splits get smaller batches, so the default head works from a few images per
    class to the whole split without changing an option.
    """
    from heads.feed import parse_bytes
    from heads.train import train_head as run

    if memory_budget is not None:
        memory_budget = parse_bytes(memory_budget)   # a bad size is refused before any work
    config = _train_config(model=head, units=units, pooling=pooling, dropout=dropout, batchnorm=not no_batchnorm,
                           epochs=epochs, patience=patience, batch_size=batch_size, lr=lr, filters=filters,
                           views_mode=views_mode, val_fraction=val_fraction, seed=seed, name=name,
                           per_class=per_class, subset_seed=subset_seed)
    caches, pick = _caches(ctx, cache_paths, _selection(kw), progress=not no_progress)
    result = run(caches, layer=pick, runs_dir=runs_dir, progress=not no_progress, memory_budget=memory_budget,
                 stream=stream, **config.__dict__)
    click.echo(str(result.run_dir))


@main.command()
@cache_option
@selection_options
@click.option("--sizes", default="5,10,25,50,100,250,500,1000,all", show_default=True,
              help="Training images per class of each point ('all': the whole training split); sizes above the "
                   "smallest class are skipped.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Seeded subsets per size (mean and standard deviation are reported).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
              show_default=True, help="Share of each subset held out for validation (at least one per class).")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Most epochs of each dense-head run; early stopping usually ends sooner.")
@click.option("--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True,
              help="The curve's folder is created in here.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def curve(ctx, cache_paths, sizes, repeats, val_fraction, epochs, runs_dir, no_progress, **kw):
    """Data-efficiency curve: test accuracy of the default head and the linear probe vs images per class.

    Reads the cache once; trains both heads on REPEATS seeded stratified subsets of each size;
    writes curve.json, curve.md and curve.png into a new folder under --runs-dir and prints it.
    """
    from heads.curve import data_efficiency_curve, parse_sizes

    points = parse_sizes(sizes)
    caches, pick = _caches(ctx, cache_paths, _selection(kw), progress=not no_progress)
    out = data_efficiency_curve(caches, layer=pick, sizes=points, repeats=repeats, runs_dir=runs_dir,
                                progress=not no_progress, val_fraction=val_fraction, epochs=epochs)
    click.echo(str(out))


@main.command("train-baseline")
@click.argument("model", type=click.Choice(BASELINES))
@click.option("--data", default="cifar10", show_default=True, help="Dataset source, as for `extract`.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N images of each split.")
@click.option("--input-size", type=int, default=None,
              help="Resize images to NxN (N >= 32); needed when they differ in size. Default: their own size.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="cnn only.")
@training_options
def train_baseline(model, data, limit, input_size, dropout, epochs, patience, batch_size, lr, val_fraction, seed,
                   runs_dir, name, no_progress):
    """Train a scratch ANN or CNN on raw pixels (same split and evaluation as heads); print the run folder."""
    from heads.train import train_baseline as run

    config = _train_config(model=model, dropout=dropout, epochs=epochs, patience=patience, batch_size=batch_size,
                           lr=lr, val_fraction=val_fraction, seed=seed, name=name)
    result = run(model, data=data, limit=limit, input_size=input_size, runs_dir=runs_dir, progress=not no_progress,
                 **{k: v for k, v in config.__dict__.items() if k != "model"})
    click.echo(str(result.run_dir))


@main.command()
@click.option("--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON list on stdout.")
@click.option("--markdown", is_flag=True, help="A Markdown table.")
def runs(runs_dir, as_json, markdown):
    """Compare runs, best validation accuracy first (never ordered by test accuracy)."""
    from heads.reports import collect_runs, format_table

    rows = collect_runs(runs_dir)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"no runs in {runs_dir}", err=True)
    else:
        click.echo(format_table(rows, markdown=markdown))


if __name__ == "__main__":
    main()
