"""Commands on caches: `extract` builds one, `info` describes one, `consolidate` makes a joined one a single
file, `backbones` lists what extraction can cut."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from featcache.cli.group import FORCED, main, needs_backend
from featcache.cli.options import add_options
from featcache.extract.spec import options as spec_options


def selection_options(f):
    """The options that select a cache (ExtractSpec's fields): shared by `extract`, `train-head`, `curve`."""
    return add_options(x for x in spec_options() if x.metadata.get("cli", True) is True)(f)


def selection(kw: dict) -> dict:
    """The ExtractSpec options among a command's keyword arguments (popped from `kw`)."""
    return {x.name: kw.pop(x.name) for x in spec_options() if x.name in kw}


@main.command()
@selection_options
@add_options(f for f in spec_options() if f.metadata.get("cli") == "extract")
@click.option("--force", is_flag=True, help="Recompute even if a matching cache exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
@needs_backend
def extract(ctx, force, no_progress, **kw):
    """Run the frozen backbone over DATA once and cache the features; print the cache path.

    Several layers (--layer block3_pool,block4_pool) share one forward pass and one file. A complete
    matching cache is reused at once; an interrupted run resumes where it stopped. With --engine ray,
    shards of rows run on Ray workers and the cache joins them (`featcache consolidate` makes it one
    self-contained file).
    """
    from featcache.extract import extract as run

    ctx.meta[FORCED] = force
    path = run(force=force, progress=not no_progress, **selection(kw))
    click.echo(str(path))


@main.command()
@click.argument("name", required=False)
@click.option("--input-size", type=int, default=None,
              help="Input size for the shapes [default: the backbone's own (a preset's), else its minimum, 32].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@needs_backend
def backbones(name, input_size, as_json):
    """List the backbones (Keras applications, and the KerasHub vision presets when keras-hub is installed), or
    one backbone's layers with their output shapes and bytes per image (NAME: vgg16, hub:NAME or hub:PATH)."""
    from featcache import backbones as registry

    names = [registry.get(name).name] if name else list(registry.BACKBONES)
    table = {n: _backbone_row(registry, n, input_size) for n in names}
    presets = _hub_presets() if not name else ()
    if as_json:
        click.echo(json.dumps({**table, **{f"hub:{p}": {"application": "keras_hub", "downloaded_on_use": True}
                                           for p in presets}}, indent=2))
        return
    for n, t in table.items():
        click.echo(f"{n}  ({t['application']}, input {t['input_size']}x{t['input_size']}, "
                   f"min {t['min_input_size']}; {t['preprocessing']})")
        for layer, x in t["layers"].items():
            mark = "  (default)" if layer == t["default_layer"] else ""
            click.echo(f"  {layer:42s} {'x'.join(map(str, x['shape'])):>14s}  {x['float16_bytes']:>9,d} B{mark}")
    if presets:
        click.echo("KerasHub vision presets (downloaded on first use; `featcache backbones hub:NAME` shows their "
                   "cut points: cls, patch_mean, cls_patch_mean, patch_tokens, pooled):")
        click.echo("\n".join(f"  hub:{p}" for p in presets))


def _backbone_row(registry, name: str, input_size) -> dict:
    spec = registry.get(name)
    size = input_size or spec.native_input_size or spec.min_input_size
    shapes = registry.output_shapes(name, (size, size))
    return {"application": spec.application, "default_layer": spec.default_layer, "input_size": size,
            "min_input_size": spec.min_input_size, "preprocessing": spec.preprocessing,
            "weights_file": spec.weights_file,
            "layers": {layer: {"shape": list(shape), "float16_bytes": 2 * int(np.prod(shape))}
                       for layer, shape in shapes.items()}}


def _hub_presets() -> tuple:
    """The KerasHub vision presets, or none where keras-hub is not installed (an optional extra)."""
    from featcache.backbones import hub
    from featcache.errors import BadInputError

    try:
        return hub.vision_presets()
    except BadInputError:
        return ()


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--verify", is_flag=True, help="Also check the stored shapes against the backbone's own at its layers, "
                                             "and read the whole file (and every shard of a joined cache) to compare "
                                             "its content with the digests recorded when it was written.")
def info(path, as_json, verify):
    """Show what produced a cache, its shapes, size and completeness."""
    from featcache.cache import open_cache

    c = open_cache(path, require_complete=False)
    if verify:
        _verify(c)
    summary = {
        "path": str(c.path), "kind": c.kind, "shards": len(c.shards), "complete": c.complete, "layer": c.meta.layer, "dtype": c.meta.dtype,
        "size_bytes": c.size_bytes, "random_weights": c.meta.random_weights,
        "progress": {"train": c.progress[0], "test": c.progress[1]},
        "max_abs_activation": c.max_abs_activation, "extract_seconds": c.extract_seconds,
        "extract_stages": c.extract_stages,
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
        f"weights       {m.weights} ({_weights_source(m)})" + ("   RANDOM WEIGHTS: not ImageNet features" if m.random_weights else ""),
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


def _verify(c) -> None:
    """`info --verify`: the shapes against the backbone's own, and every byte against the digests."""
    from featcache import backbones
    from featcache.cache.read import verify_content
    from featcache.cli.group import VERBOSE, start_backend

    start_backend(click.get_current_context().meta.get(VERBOSE, False))   # the backbone's shapes need Keras

    backbones.hub.recall(c.meta.backbone, c.meta.backbone_config)   # a preset folder that has moved
    backbones.check_cached_shapes(c.path, c.meta.backbone, c.meta.input_shape[:2], c.meta.shapes)
    checked = verify_content(c)
    shards = f"every block of the file and {checked} shard digests match" if c.shards else \
        "every block matches the digests recorded when it was written"
    click.echo(f"content: shapes are {c.meta.backbone}'s at {c.meta.layer}; {shards}", err=True)


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
              help="Where to write the self-contained file, a file or an existing folder [default: in place of PATH].")
@click.option("--force", is_flag=True, help="Replace an existing -o file that is not this cache.")
def consolidate(path, output, force):
    """Copy a cache joined from shards (--engine ray) into one self-contained file, e.g. to move it to
    another machine; print its path. The shard files are left alone: delete PATH's .shards folder once
    the copy replaced PATH."""
    from featcache.cache.shards import consolidate as run

    click.echo(str(run(path, output, force=force)))


def _weights_source(meta) -> str:
    """What --weights was; 'imagenet' of a KerasHub preset is the preset's own weights."""
    if meta.weights_source == "imagenet" and meta.backbone.startswith("hub:"):
        return "the preset's own"
    return meta.weights_source
