"""Sharded caches: one file per unit of work, joined by HDF5 virtual datasets.

A sharded extraction (`--engine ray`) writes each unit of a cache (`featcache.engine.Unit`: a split
and a row range) as a shard file of its own in the folder ``<cache stem>.shards/`` beside the cache:
a featcache file with the cache's key holding just those rows, written as ``.partial``, resumed from
there, and renamed when complete, so a finished shard is one whose file exists. Once every shard
is there and verified (`verify`: key, row range, row count, progress), `join` writes the cache
itself: labels, paths and metadata copied in, features and views as virtual datasets over the
shards. Nothing else changes: `open_cache` opens it (checking that each shard is still there, with
the size it had when joined) and every reader reads it. `consolidate` copies a joined cache into one
self-contained file, e.g. to move it to another machine.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from featcache import store
from featcache.errors import BadInputError, CacheError

log = logging.getLogger(__name__)

#: About this many shards by default, so that workers finish together (the last shard is a small part of the
#: run: with 2 workers on CIFAR-10 two shards of 50,000 and 10,000 rows left one worker idle for 60% of the run).
TARGET_SHARDS = 256
#: And at most these many bytes of features (a retry redoes at most that) and rows per shard.
SHARD_BYTES = 4 << 30
MAX_SHARD_ROWS = 65536


def folder(final: Path) -> Path:
    """The shard folder of the cache `final`: <stem>.shards beside it."""
    return final.with_name(final.name.removesuffix(".h5") + ".shards")


def shard_path(shards: Path, unit) -> Path:
    return shards / f"{unit.split}-{unit.start:010d}-{unit.stop:010d}.h5"


def default_shard_rows(meta: store.CacheMeta) -> int:
    """Rows per shard: the rows cut into about TARGET_SHARDS shards, in whole thousands of rows (1,024 at least), at
    most 65,536 rows and SHARD_BYTES of features (rows so large that 1,024 of them pass SHARD_BYTES: as many as
    fit). It depends on the cache alone, not on the workers or the batch size, so a rerun with other --workers or
    --batch-size finds the shards already done."""
    row_bytes = sum(int(np.prod(s)) for s in meta.shapes.values()) * np.dtype(meta.dtype).itemsize * meta.views
    cap = min(MAX_SHARD_ROWS, max(1, SHARD_BYTES // row_bytes))
    if cap >= 1024:
        cap = cap // 1024 * 1024
    wanted = -(-(meta.n_train + meta.n_test) // TARGET_SHARDS)
    return min(cap, max(1024, -(-wanted // 1024) * 1024))


def verify(meta: store.CacheMeta, units, shards: Path) -> list[store.FeatureCache]:
    """Every unit's shard, opened and checked against the cache it joins into; the first one missing,
    unreadable, incomplete, foreign or of other rows is refused with a CacheError naming it."""
    out = []
    for unit in units:
        path = shard_path(shards, unit)
        fix = f"fix: delete {path} and rerun the same `featcache extract` command to recompute it"
        if not path.exists():
            raise CacheError(f"shard {path} is missing; fix: rerun the same `featcache extract` command to "
                             "compute it")
        try:
            shard = store.open_cache(path)
        except CacheError as e:
            raise CacheError(f"shard {path} cannot be used ({e}); {fix}") from e
        rows = unit.stop - unit.start
        got = dict(key=shard.meta.key, range=shard.shard, rows=shard.splits[unit.split].n,
                   progress=shard.progress[0 if unit.split == "train" else 1])
        wanted = dict(key=meta.key, range=(unit.split, unit.start, unit.stop), rows=rows, progress=rows)
        diffs = [f"{k}: shard has {got[k]!r}, expected {v!r}" for k, v in wanted.items() if got[k] != v]
        if diffs:
            raise CacheError(f"shard {path} does not belong to this cache ({'; '.join(diffs)}); {fix}")
        out.append(shard)
    return out


def join(path: Path, meta: store.CacheMeta, shards: list[store.FeatureCache], *, labels: dict, paths: dict,
         class_names, extract_seconds: float | None = None) -> None:
    """Write the cache of `meta` at `path`: labels and paths copied, features and views virtual over the
    verified `shards` (source files named relative to `path`'s folder, so the two move together)."""
    import h5py

    base = path.parent
    tmp = path.with_name(f".{path.name}.joining")   # written whole, then renamed: `path` is never half a join
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(meta.to_attrs())
            f.attrs["complete"] = False
            f.create_dataset("class_names", data=np.array(class_names, dtype=h5py.string_dtype()))
            f.create_dataset("progress", data=np.array([meta.n_train, meta.n_test], np.int64))
            for split in store.SPLITS:
                f.create_dataset(f"{split}/labels", data=np.asarray(labels[split], np.int64))
                if paths.get(split) is not None:
                    f.create_dataset(f"{split}/paths", data=np.array(paths[split], dtype=h5py.string_dtype()))
            _virtual_datasets(f, meta, shards, base)
            f.attrs["shards"] = json.dumps([
                {"file": os.path.relpath(s.path, base), "split": s.shard[0], "start": s.shard[1], "stop": s.shard[2],
                 "bytes": s.path.stat().st_size} for s in shards])
            store.finish(f, max_abs_activation=max((s.max_abs_activation or 0.0) for s in shards),
                         extract_seconds=extract_seconds)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _virtual_datasets(f, meta: store.CacheMeta, shards: list[store.FeatureCache], base: Path) -> None:
    """Each features and views dataset of `meta`, in `f`, as a virtual dataset over the shards' own."""
    import h5py

    targets = [(split, layer, False) for split in store.SPLITS for layer in meta.layers]
    if meta.views > 1:
        targets += [("train", layer, True) for layer in meta.layers]
    for split, layer, views in targets:
        name = store.dataset_path(meta, split, layer, views=views)
        row = ((meta.views - 1,) if views else ()) + meta.shapes[layer]
        layout = h5py.VirtualLayout((meta.n_train if split == "train" else meta.n_test, *row), meta.dtype)
        for shard in shards:
            shard_split, start, stop = shard.shard
            if shard_split == split:
                source = os.path.relpath(shard.path, base)
                layout[start:stop] = h5py.VirtualSource(source, name, shape=(stop - start, *row))
        # a source that goes missing later would read as the fill value: NaN, never plausible zeros
        f.create_virtual_dataset(name, layout, fillvalue=np.nan)


def check_sources(cache: store.FeatureCache) -> None:
    """Refuse a joined cache one of whose shards is missing or has changed size since the join."""
    for record in cache.shards:
        shard = cache.path.parent / record["file"]
        fix = (f"fix: restore it, or delete {cache.path} and rerun the same `featcache extract` command "
               "(it recomputes missing shards; delete a damaged one first)")
        if not shard.is_file():
            raise CacheError(f"{cache.path} is missing its shard {shard}; {fix}")
        size = shard.stat().st_size
        if size != record["bytes"]:
            raise CacheError(f"{cache.path}: its shard {shard} has {size} bytes, {record['bytes']} when joined "
                             f"(truncated or replaced); {fix}")


def consolidate(path: str | Path, output: str | Path | None = None, *, block_bytes: int = 64 << 20) -> Path:
    """Copy the joined cache at `path` into one self-contained file at `output` (default: in place of
    `path`, replaced atomically); the shard files are left alone. Returns the new file's path.

    The cache's extraction lock is held meanwhile, so no `extract --force` rewrites the shards under it."""
    import shutil

    import h5py

    from featcache.extract import cache_lock, expected_bytes

    cache = store.open_cache(path)
    if cache.kind != "virtual":
        what = "a shard; consolidate the cache that joins it" if cache.shard else "already one self-contained file"
        raise BadInputError(f"{cache.path} is {what}; nothing to consolidate")
    out = Path(output) if output is not None else cache.path
    if out.is_dir():
        out = out / cache.path.name
    meta = cache.meta
    free = shutil.disk_usage(out.parent).free
    if expected_bytes(meta) > free:
        raise BadInputError(f"the copy needs {expected_bytes(meta) / 1e9:.2f} GB but {out.parent} has "
                            f"{free / 1e9:.2f} GB free; fix: free some space or pass another -o")
    tmp = out.with_name(f".{out.name}.consolidating")
    try:
        with cache_lock(cache.path), h5py.File(cache.path, "r") as src:
            check_sources(cache)
            labels = {s: src[f"{s}/labels"][...] for s in store.SPLITS}
            paths = {s: src[f"{s}/paths"][...].astype(str) if f"{s}/paths" in src else None for s in store.SPLITS}
            with store.create(tmp, meta, labels=labels, paths=paths, class_names=cache.class_names,
                              batch_size=128) as f:
                for name in _feature_datasets(meta):
                    rows = max(1, block_bytes // (int(np.prod(src[name].shape[1:])) * src[name].dtype.itemsize))
                    for s in range(0, len(src[name]), rows):
                        f[name][s:s + rows] = src[name][s:s + rows]
                f["progress"][...] = [meta.n_train, meta.n_test]
                store.finish(f, max_abs_activation=cache.max_abs_activation, extract_seconds=cache.extract_seconds)
            check_sources(cache)   # no shard went missing while it was read (it would have read as NaN)
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("consolidated %s into %s (%.1f MB)", cache.path, out, out.stat().st_size / 1e6)
    return out


def _feature_datasets(meta: store.CacheMeta) -> list[str]:
    names = [store.dataset_path(meta, split, layer) for split in store.SPLITS for layer in meta.layers]
    if meta.views > 1:
        names += [store.dataset_path(meta, "train", layer, views=True) for layer in meta.layers]
    return names
