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

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np

from featcache import system
from featcache.cache.files import cache_lock, sweep, writing
from featcache.cache.format import SPLITS, CacheMeta, expected_bytes, feature_datasets, row_bytes
from featcache.cache.read import FeatureCache, check_sources, open_cache
from featcache.cache.read import verify as verify_written
from featcache.cache.write import copy_rows, create, finish, read_labels_and_paths, write_header
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
    verified `shards` (source files named relative to `path`'s folder, so the two move together). Each shard is
    recorded by its size and identity (key, rows, file id, content digest), which every open checks."""
    import h5py

    base = path.parent
    # written whole, checked, then renamed: `path` is never half a join
    with writing(path, "joining", lambda written: verify_written(written, meta)) as f:
        # a new file id: a reader during a run knows this join from a later one
        write_header(f, meta, labels=labels, paths=paths, class_names=class_names,
                     progress=(meta.n_train, meta.n_test))
        _virtual_datasets(f, meta, shards, base)
        f.attrs["shards"] = json.dumps([_record(s, base) for s in shards])
        finish(f, max_abs_activation=max((s.max_abs_activation or 0.0) for s in shards),
               extract_seconds=extract_seconds)


def _record(shard: FeatureCache, base: Path) -> dict:
    """What the join keeps of a shard to know it again: its file, rows, size, file id and content digest."""
    import h5py

    with h5py.File(shard.path, "r") as f:
        ids = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items() if k in ("file_id", "digest")}
    return {"file": os.path.relpath(shard.path, base), "split": shard.shard[0], "start": shard.shard[1],
            "stop": shard.shard[2], "bytes": shard.path.stat().st_size, **ids}


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


def consolidate(path: str | Path, output: str | Path | None = None, *, force: bool = False,
                block_bytes: int = 64 << 20) -> Path:
    """Copy the joined cache at `path` into one self-contained file at `output` (default: in place of
    `path`, replaced atomically); the shard files are left alone. Returns the new file's path.

    The copy is written under a temporary name, flushed, re-read and compared with what was copied (content
    digest) before it takes its name; an existing `output` that is not this cache is kept unless `force`. The
    cache's lock is held meanwhile (where its folder can be written), so no `extract --force` rewrites the
    shards under it."""
    cache = open_cache(path)
    if cache.kind != "virtual":
        what = "a shard; consolidate the cache that joins it" if cache.shard else "already one self-contained file"
        raise BadInputError(f"{cache.path} is {what}; nothing to consolidate")
    out = _output(cache, output, force)
    need = cache.path.stat().st_size + expected_bytes(cache.meta) + (1 << 20)   # the whole file, not its features
    system.check_free_space(out.parent, need, what="the copy", fix="free some space or pass another -o")
    sweep(out.parent, out.name)
    writable = os.access(cache.path.parent, os.W_OK)   # a read-only shared cache: nobody can rewrite its shards
    digest = hashlib.sha256()   # of the rows as copied; the copy is read back and compared before it takes its name
    labels, paths = read_labels_and_paths(cache.path)
    opener = lambda tmp: create(tmp, cache.meta, labels=labels, paths=paths,  # noqa: E731
                                class_names=cache.class_names, batch_size=128)
    with cache_lock(cache.path) if writable else contextlib.nullcontext(), \
            writing(out, "consolidating", lambda copy: verify_written(copy, cache.meta, digest=digest.hexdigest()),
                    opener) as f:
        _copy(cache, f, block_bytes, digest)
        check_sources(cache)   # no shard went missing while it was read (it would have read as NaN)
    log.info("consolidated %s into %s (%.1f MB)", cache.path, out, out.stat().st_size / 1e6)
    return out


def _output(cache: FeatureCache, output, force: bool) -> Path:
    """Where the copy goes: `output` (a file, or a folder to put it in), refused where it would replace a file
    that is not this cache without `force`."""
    out = Path(output) if output is not None else cache.path
    if out.is_dir():
        out = out / cache.path.name
    if not out.parent.is_dir():
        raise BadInputError(f"no folder {out.parent} to write the copy in; fix: create it, or pass an existing "
                            "folder with -o")
    if out.exists() and out.resolve() != cache.path.resolve() and not force:
        try:
            same = open_cache(out).meta.key == cache.meta.key
        except CacheError:
            same = False
        if not same:
            raise BadInputError(f"{out} exists and is not this cache; fix: pass another -o, or --force to "
                                "replace it")
    return out


def _copy(cache: FeatureCache, f, block_bytes: int, digest) -> None:
    """Copy every row of `cache` into the open new file `f`, and into `digest` as copied; then mark it complete."""
    import h5py

    with h5py.File(cache.path, "r") as src:
        for d in feature_datasets(cache.meta):
            copy_rows(src[d.path], f[d.path], block_bytes, digest=digest)
    f["progress"][...] = [cache.meta.n_train, cache.meta.n_test]
    finish(f, max_abs_activation=cache.max_abs_activation, extract_seconds=cache.extract_seconds)
