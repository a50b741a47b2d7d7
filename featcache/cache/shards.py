"""Sharded caches: one file per unit of work, joined by HDF5 virtual datasets.

A sharded extraction (`--engine ray`) writes each unit of a cache (`featcache.extract.planner.Unit`: a
split and a row range) as a shard file of its own in the folder ``<cache stem>.shards/`` beside the cache:
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

from featcache import system
from featcache.cache.files import cache_lock
from featcache.cache.format import SPLITS, CacheMeta, expected_bytes, feature_datasets, row_bytes
from featcache.cache.read import FeatureCache, check_sources, open_cache
from featcache.cache.write import copy_rows, create, finish, read_labels_and_paths
from featcache.errors import BadInputError, CacheError

log = logging.getLogger(__name__)

#: About this many shards by default, so that workers finish together (the last shard is a small part of the
#: run; a few large shards leave workers idle while the last ones run).
TARGET_SHARDS = 256
#: And at most these many bytes of features (a retry redoes at most that) and rows per shard.
SHARD_BYTES = 4 << 30
MAX_SHARD_ROWS = 65536


def folder(final: Path) -> Path:
    """The shard folder of the cache `final`: <stem>.shards beside it."""
    return final.with_name(final.name.removesuffix(".h5") + ".shards")


def shard_path(shards: Path, unit) -> Path:
    return shards / f"{unit.split}-{unit.start:010d}-{unit.stop:010d}.h5"


def default_shard_rows(meta: CacheMeta) -> int:
    """Rows per shard: the rows cut into about TARGET_SHARDS shards, in whole thousands of rows (1,024 at least), at
    most 65,536 rows and SHARD_BYTES of features (rows so large that 1,024 of them pass SHARD_BYTES: as many as
    fit). It depends on the cache alone, not on the workers or the batch size, so a rerun with other --workers or
    --batch-size finds the shards already done."""
    cap = min(MAX_SHARD_ROWS, max(1, SHARD_BYTES // (row_bytes(meta) * meta.views)))
    if cap >= 1024:
        cap = cap // 1024 * 1024
    wanted = -(-(meta.n_train + meta.n_test) // TARGET_SHARDS)
    return min(cap, max(1024, -(-wanted // 1024) * 1024))


def verify(meta: CacheMeta, units, shards: Path) -> list[FeatureCache]:
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
            shard = open_cache(path)
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


def join(path: Path, meta: CacheMeta, shards: list[FeatureCache], *, labels: dict, paths: dict,
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
            for split in SPLITS:
                f.create_dataset(f"{split}/labels", data=np.asarray(labels[split], np.int64))
                if paths.get(split) is not None:
                    f.create_dataset(f"{split}/paths", data=np.array(paths[split], dtype=h5py.string_dtype()))
            _virtual_datasets(f, meta, shards, base)
            f.attrs["shards"] = json.dumps([
                {"file": os.path.relpath(s.path, base), "split": s.shard[0], "start": s.shard[1], "stop": s.shard[2],
                 "bytes": s.path.stat().st_size} for s in shards])
            finish(f, max_abs_activation=max((s.max_abs_activation or 0.0) for s in shards),
                         extract_seconds=extract_seconds)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _virtual_datasets(f, meta: CacheMeta, shards: list[FeatureCache], base: Path) -> None:
    """Each features and views dataset of `meta`, in `f`, as a virtual dataset over the shards' own."""
    import h5py

    for d in feature_datasets(meta):
        layout = h5py.VirtualLayout((meta.n_train if d.split == "train" else meta.n_test, *d.row_shape), meta.dtype)
        for shard in shards:
            shard_split, start, stop = shard.shard
            if shard_split == d.split:
                source = os.path.relpath(shard.path, base)
                layout[start:stop] = h5py.VirtualSource(source, d.path, shape=(stop - start, *d.row_shape))
        # a source that goes missing later would read as the fill value: NaN, never plausible zeros
        f.create_virtual_dataset(d.path, layout, fillvalue=np.nan)


def consolidate(path: str | Path, output: str | Path | None = None, *,
                block_bytes: int = 64 << 20) -> Path:
    """Copy the joined cache at `path` into one self-contained file at `output` (default: in place of
    `path`, replaced atomically); the shard files are left alone. Returns the new file's path.

    The cache's extraction lock is held meanwhile, so no `extract --force` rewrites the shards under it."""
    import h5py

    cache = open_cache(path)
    if cache.kind != "virtual":
        what = "a shard; consolidate the cache that joins it" if cache.shard else "already one self-contained file"
        raise BadInputError(f"{cache.path} is {what}; nothing to consolidate")
    out = Path(output) if output is not None else cache.path
    if out.is_dir():
        out = out / cache.path.name
    system.check_free_space(out.parent, expected_bytes(cache.meta), what="the copy",
                            fix="free some space or pass another -o")
    tmp = out.with_name(f".{out.name}.consolidating")
    try:
        with cache_lock(cache.path), h5py.File(cache.path, "r") as src:
            check_sources(cache)
            labels, paths = read_labels_and_paths(cache.path)
            with create(tmp, cache.meta, labels=labels, paths=paths, class_names=cache.class_names,
                        batch_size=128) as f:
                for d in feature_datasets(cache.meta):
                    copy_rows(src[d.path], f[d.path], block_bytes)
                f["progress"][...] = [cache.meta.n_train, cache.meta.n_test]
                finish(f, max_abs_activation=cache.max_abs_activation, extract_seconds=cache.extract_seconds)
            check_sources(cache)   # no shard went missing while it was read (it would have read as NaN)
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("consolidated %s into %s (%.1f MB)", cache.path, out, out.stat().st_size / 1e6)
    return out
