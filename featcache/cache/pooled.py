"""Global pooling of cached maps, computed once and kept as a derived cache beside its source.

Heads that start with global average (or max) pooling only ever see one vector per image, so a
repeated experiment on a large cache should read 256-wide rows, not 4x4x256 maps (or 28x28x256 at
224 px). `pooled(cache, layer, pooling)` reads the source in blocks of rows (memory stays a few
blocks), pools each in float32, and writes ``<source stem>.<layer>.<pooling>.pooled.h5``::

    /                 attributes: source (file name), source_key, source_stamp, layer, pooling, views
    /<split>/features (n, channels) float32
    /<split>/labels   (n,) int64
    /train/views      (n, views - 1, channels) float32   (only when the source has views)

A derived file is reused while its source is the same file it was made from (same key, size and
modification time); otherwise it is made again. It is written to a temporary name, re-read and renamed
(`featcache.cache.files.publish`), so a reader never sees half a file and two processes making the same
one cannot clash; a temporary file a killed process left is removed by the next. Where the source's
folder is read-only, the pooled arrays are computed in memory and not kept.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from featcache.cache import digests
from featcache.cache.files import sweep, writing
from featcache.cache.format import dataset_path
from featcache.errors import BadInputError, CacheError

log = logging.getLogger(__name__)
#: The poolings over the whole map (no weights), computed once and kept: the one list of them.
GLOBAL_POOLINGS = ("gap", "max")
#: Bytes of maps read per block while pooling.
BLOCK_BYTES = 64 << 20


def global_pool(x: np.ndarray | None, pooling: str, rows: int = 4096) -> np.ndarray | None:
    """Pool the two spatial axes of (..., h, w, c) maps ("gap": mean, "max"), in float32, `rows` rows at
    a time; None passes through. The one numpy pooling of featcache and its heads."""
    if x is None:
        return None
    reduce = {"gap": np.mean, "max": np.max}[pooling]
    axes = (x.ndim - 3, x.ndim - 2)
    if len(x) == 0:
        return np.zeros((0, *x.shape[1:x.ndim - 3], x.shape[-1]), np.float32)
    return np.concatenate([reduce(np.asarray(x[i:i + rows], np.float32), axis=axes) for i in range(0, len(x), rows)])


def pooled_path(cache, layer: str, pooling: str) -> Path:
    return Path(cache.path).with_name(f"{Path(cache.path).stem}.{layer}.{pooling}.pooled.h5")


def _stamp(cache) -> str:
    st = os.stat(cache.path)
    return f"{cache.meta.key}:{st.st_size}:{st.st_mtime_ns}"


def pooled(cache, layer: str | None, pooling: str) -> dict:
    """{"train": (n, c), "test": (n, c), "views": (n, views - 1, c) or None} float32 pooled features of
    `layer`, read from the derived cache (made first when missing, stale or damaged)."""
    if pooling not in GLOBAL_POOLINGS:
        raise BadInputError(f"pooling must be one of {', '.join(GLOBAL_POOLINGS)}, got {pooling!r}")
    layer = cache.select_layer(layer)
    path = pooled_path(cache, layer, pooling)
    arrays = _kept(cache, path)
    if arrays is not None:
        return arrays
    arrays = pool_source(cache, layer, pooling)
    if not os.access(path.parent, os.W_OK):
        log.warning("cannot write in %s: pooled features are kept in memory only", path.parent)
        return arrays
    sweep(path.parent, path.name)   # what a killed run left (GBs on a large cache)
    _write(path, cache, layer, pooling, arrays)
    log.info("pooled %s (%s) into %s", Path(cache.path).name, pooling, path.name)
    return arrays


def _kept(cache, path: Path) -> dict | None:
    """The arrays of the derived file at `path` if it is complete and made from this very source, else None."""
    import h5py

    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("source_stamp") == _stamp(cache) and f.attrs.get("complete"):
                log.debug("pooled features from %s", path)
                return _read(f)
        log.warning("%s was made from another version of %s; pooling again", path.name, Path(cache.path).name)
    except (OSError, KeyError) as e:   # unreadable, a dataset missing, or other than written
        log.warning("%s is unreadable, incomplete or changed (%s); pooling again", path, e)
    return None


def _write(path: Path, cache, layer: str, pooling: str, arrays: dict) -> None:
    """The derived file, through featcache's one write path: a temporary name, checked close, re-read, renamed."""
    with writing(path, "pooling", lambda written: _check_written(written, arrays)) as f:
        f.attrs.update(source=Path(cache.path).name, source_key=cache.meta.key, source_stamp=_stamp(cache),
                       layer=layer, pooling=pooling, views=cache.meta.views)
        for split in ("train", "test"):
            digests.record_whole(f, f"{split}/features", arrays[split])
            digests.record_whole(f, f"{split}/labels", arrays[f"{split}_labels"])
        if arrays["views"] is not None:
            digests.record_whole(f, "train/views", arrays["views"])
        f.attrs["complete"] = True


def _check_written(path: Path, arrays: dict) -> None:
    """The file just written reads back as `arrays` were (their digests were recorded from them as written)."""
    import h5py

    with h5py.File(path, "r") as f:
        _read(f)


_NAMES = {"train": "train/features", "test": "test/features", "train_labels": "train/labels",
          "test_labels": "test/labels", "views": "train/views"}


def _read(f) -> dict:
    """The arrays of an open pooled file, each checked against its digests; an OSError names what differs."""
    problems = digests.foreign_storage(f)
    out = {}
    for key, name in _NAMES.items():
        out[key] = f[name][...] if key != "views" or name in f else None   # a missing one is a KeyError
        if out[key] is not None:
            problems += digests.check(f, name, out[key])
    if problems:
        raise OSError(f"{problems[0]} (changed after it was written, or a full disk)")
    return out


def pool_source(cache, layer: str, pooling: str) -> dict:
    """Pool every row of the source, reading blocks of about BLOCK_BYTES."""
    import h5py

    out = {}
    with h5py.File(cache.path, "r") as f:
        for split, views in (("train", False), ("test", False), ("train", True)):
            name = dataset_path(cache.meta, split, layer, views=views)
            if name not in f:
                out["views"] = None
                continue
            out["views" if views else split] = _finite(_pooled_blocks(f, cache, name, pooling), cache, name)
            if not views:
                out[f"{split}_labels"] = f[f"{split}/labels"][...]
    return out


def _pooled_blocks(f, cache, name: str, pooling: str) -> np.ndarray:
    """Dataset `name` of the open source file pooled block by block (about BLOCK_BYTES each), every block checked
    against the digests recorded when it was written: a damaged source must not be pooled into a file whose own
    digests would then vouch for it."""
    data = f[name]
    block = max(1, BLOCK_BYTES // (int(np.prod(data.shape[1:])) * data.dtype.itemsize))
    check = digests.RowsCheck.of(f, name)
    pooled = []
    for start in range(0, len(data), block):
        rows = data[start:start + block]
        if check:
            check.verify(data, start, rows)
        pooled.append(global_pool(rows, pooling, rows=len(rows)))
    return np.concatenate(pooled) if pooled else global_pool(data[:0], pooling)


def _finite(x: np.ndarray, cache, name: str) -> np.ndarray:
    """Pooled maps that are not finite: a joined cache's fill value (NaN) where a shard went missing while it was
    read, or a damaged source (no extraction writes such values)."""
    if not np.isfinite(x).all():
        why = ("one of its shards went missing or changed while it was read; fix: restore the shard (or rerun "
               "`featcache extract`)" if getattr(cache, "shards", ()) else
               "the file was changed or damaged; fix: delete it and rerun `featcache extract`")
        raise CacheError(f"{cache.path}: {name} holds values that are not finite (inf or NaN): {why}")
    return x
