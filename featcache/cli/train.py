"""Commands on heads: `train-head` (on a cache), `train-baseline` (on raw pixels), `curve` (the data-efficiency
curve) and `runs` (the table of runs). Their training options come from `heads.config.TrainConfig`."""

from __future__ import annotations

import click

from featcache.cli.cache import selection, selection_options
from featcache.cli.group import main, needs_backend
from featcache.cli.options import add_options
from featcache.extract.spec import KEY_OPTIONS
from featcache.extract.spec import options as spec_options
from featcache.options import declared
from heads.builders import BASELINES, HEADS
from heads.config import AUTO, BASELINE, CURVE, HEAD, RUNS_DIR, TrainConfig
from heads.config import options as config_options
from heads.curve import curve_options
from heads.reports import RunsTable
from heads.search import search_options

_MODEL = next(f for f in config_options() if f.name == "model")


def run_options(f):
    """Where runs go and whether a progress bar shows: every command that trains."""
    f = click.option("--no-progress", is_flag=True, help="No progress bar (and no progress lines on a non-terminal "
                                                         "stderr).")(f)
    return click.option("--runs-dir", type=click.Path(file_okay=False), default=RUNS_DIR, show_default=True,
                        help="Each run writes a new folder in here.")(f)


def cache_option(f):
    return click.option("--cache", "cache_paths", type=click.Path(dir_okay=False), multiple=True,
                        help="A cache file (repeat to join layers kept in separate files of the same images); "
                             "every layer in it unless --layer picks some. Default: the cache the selection "
                             "options below lead to (built if missing).")(f)


def _config(command: str, kw: dict, **given) -> TrainConfig:
    """The TrainConfig of a command's options (popped from `kw`), validated before any work."""
    return TrainConfig(**given, **{f.name: kw.pop(f.name) for f in config_options(command)})


def _caches(ctx, cache_paths, selected: dict, *, progress: bool):
    """(cache paths, layers to train on) from --cache or from the selection options (extracting if needed)."""
    from featcache.extract import check_cache, extract

    if not cache_paths:
        return [extract(progress=progress, **selected)], None
    comparable = set(KEY_OPTIONS) - {"layer"} | {"skip_bad_images"}   # --cache-dir, --fingerprint: how, not what
    given = {k: v for k, v in selected.items() if k in comparable
             and ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    pick = None   # the layers to train on; None: every layer of the caches
    if ctx.get_parameter_source("layer") != click.core.ParameterSource.DEFAULT:
        pick = selected["layer"]
        if len(cache_paths) == 1:
            given["layer"] = pick
    for path in cache_paths:
        check_cache(path, **given)
    return list(cache_paths), pick


def feed_options(f):
    """--memory-budget and --stream: how heads on maps get them (train-head, and every trial of a search)."""
    f = click.option("--stream", is_flag=True, help="Stream the maps from the cache even if they fit the memory "
                                                    "budget.")(f)
    return click.option(
        "--memory-budget", default=None, metavar="SIZE",
        help="Memory for feature maps, e.g. 2GB [default: half the available memory]. Heads on maps (--pooling "
             "flatten, conv) keep them in RAM within it and stream them from the cache beyond it; heads that pool "
             "first read pooled vectors, made once per cache and kept beside it. A search's searchers on Ray each "
             "take their CPUs' share of it.")(f)


def _budget(memory_budget: str | None) -> int | None:
    """--memory-budget in bytes: a bad size is refused before any work."""
    from heads.feed import parse_bytes

    return None if memory_budget is None else parse_bytes(memory_budget)


@main.command("train-head")
@cache_option
@selection_options
@click.option("--head", type=click.Choice((AUTO, *HEADS)), default=AUTO, show_default=True,
              help=_MODEL.metadata["help"])
@add_options(config_options(HEAD))
@feed_options
@run_options
@click.pass_context
@needs_backend
def train_head(ctx, cache_paths, head, memory_budget, stream, runs_dir, no_progress, **kw):
    """Train a head on cached features; evaluate once on the test split; print the run folder.

    The features are standardised with statistics of the training rows (kept in the saved model)
    and small training splits get smaller batches, so the default head works from a few images per
    class to the whole split without changing an option.
    """
    from heads.train import train_head as run

    memory_budget = _budget(memory_budget)
    config = _config(HEAD, kw, model=head)
    caches, pick = _caches(ctx, cache_paths, selection(kw), progress=not no_progress)
    result = run(caches, layer=pick, config=config, runs_dir=runs_dir, progress=not no_progress,
                 memory_budget=memory_budget, stream=stream)
    click.echo(str(result.run_dir))


@main.command()
@cache_option
@selection_options
@add_options(curve_options())
@add_options(config_options(CURVE))
@run_options
@click.pass_context
@needs_backend
def curve(ctx, cache_paths, runs_dir, no_progress, **kw):
    """Data-efficiency curve: test accuracy of the default head, the linear probe and kNN vs images per class.

    Reads the cache once; trains the heads on REPEATS seeded stratified subsets of each size;
    writes curve.json, curve.md and curve.png into a new folder under --runs-dir and prints it.
    With --long-tail, the same on long-tailed subsets (longtail.json, longtail.md).
    """
    from heads.curve import CurveConfig, data_efficiency_curve
    from heads.longtail import long_tail_table

    how = CurveConfig(**{f.name: kw.pop(f.name) for f in curve_options()})   # refused before any work
    options = {f.name: kw.pop(f.name) for f in config_options(CURVE)}
    caches, pick = _caches(ctx, cache_paths, selection(kw), progress=not no_progress)
    if how.long_tail is not None:
        out = long_tail_table(caches, layer=pick, ratios=how.long_tail, n_max=how.tail_max, repeats=how.repeats,
                              runs_dir=runs_dir, progress=not no_progress, **options)
    else:
        out = data_efficiency_curve(caches, layer=pick, sizes=how.sizes, repeats=how.repeats, runs_dir=runs_dir,
                                    progress=not no_progress, **options)
    click.echo(str(out))


@main.command()
@cache_option
@selection_options
@click.option("--param", "params", multiple=True, metavar="NAME=VALUES",
              help="A searched option: choices a|b|c (units=256|400,256,256, head=dense|linear|knn, pooling=gap|max) "
                   "or a range low:high[:log] (dropout=0.1:0.6, lr=1e-4:1e-2:log). Repeat for more.")
@click.option("--space", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A TOML file with a [params] table: NAME = [choices] or NAME = {low, high, log}.")
@add_options(search_options())
@click.option("--head", type=click.Choice((AUTO, *HEADS)), default=AUTO, show_default=True,
              help="The head of every trial, unless --param head=... searches it.")
@add_options(f for f in config_options(HEAD) if f.name != "name")
@feed_options
@run_options
@click.pass_context
@needs_backend
def search(ctx, cache_paths, params, space, head, memory_budget, stream, runs_dir, no_progress, **kw):
    """Search head options on one cache in one process (Optuna); test only the winner; print the search folder.

    Every trial trains on features read once, is scored on the validation split only and may be
    pruned; the best trial is evaluated once on the test split (trained once more only where another
    process fitted it), as a run folder inside the search folder, beside search.json, search.md and
    Optuna's plots.
    """
    from heads.search import SearchConfig, load_space, parse_param
    from heads.trials import run_search

    memory_budget = _budget(memory_budget)
    space_params = [parse_param(p) for p in params] + (load_space(space) if space else [])
    how = SearchConfig(**{f.name: kw.pop(f.name) for f in search_options()})
    fixed = TrainConfig(model=head, **{f.name: kw.pop(f.name) for f in config_options(HEAD) if f.name != "name"})
    caches, pick = _caches(ctx, cache_paths, selection(kw), progress=not no_progress)   # both refused before this
    folder = run_search(caches, space_params, layer=pick, search=how, config=fixed, runs_dir=runs_dir,
                        progress=not no_progress, memory_budget=memory_budget, stream=stream)
    click.echo(str(folder))


@main.command("train-baseline")
@click.argument("model", type=click.Choice(BASELINES))
@add_options(f for f in spec_options() if f.name in ("data", "limit", "input_size"))
@add_options(config_options(BASELINE))
@run_options
@needs_backend
def train_baseline(model, data, limit, input_size, runs_dir, no_progress, **kw):
    """Train a scratch ANN or CNN on raw pixels (same split and evaluation as heads); print the run folder."""
    from heads.train import train_baseline as run

    config = _config(BASELINE, kw, model=model)
    result = run(model, data=data, limit=limit, input_size=input_size, config=config, runs_dir=runs_dir,
                 progress=not no_progress)
    click.echo(str(result.run_dir))


@main.command()
@add_options(declared(RunsTable))
def runs(**kw):
    """Compare runs, best validation accuracy first (never ordered by test accuracy)."""
    from heads.reports import runs_table

    config = RunsTable(**kw)
    text = runs_table(config=config)
    if text:
        click.echo(text)
    else:
        click.echo(f"no runs in {config.runs_dir}", err=True)
