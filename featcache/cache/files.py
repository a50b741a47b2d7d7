"""The files beside a cache and the protocol around them: the partial file, the lock, the resume point.

A cache is built as ``<name>.partial`` by the one process holding ``<name>.lock`` and renamed to
``<name>`` when complete, so a finished name is never half-written. A partial of the same key
(and, for a shard, the same rows) is resumed from its `/progress`; any other partial is deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from pathlib import Path

from featcache.cache.format import CacheMeta
from featcache.errors import first_line

log = logging.getLogger(__name__)


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def lock_path(final: Path) -> Path:
    return final.with_name(final.name + ".lock")


def final_path(path: Path) -> Path:
    """The finished name of `path` (itself, or the cache a partial becomes)."""
    return path.with_name(path.name.removesuffix(".partial"))


@contextlib.contextmanager
def cache_lock(final: Path):
    """The exclusive lock that one process building (or rewriting) the cache `final` holds; others wait
    for it, and say so."""
    with lock_path(final).open("a") as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another featcache process is extracting %s; waiting for it to finish", final)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def being_written(path: Path) -> bool:
    """Whether another process holds the lock of this cache (or of the cache this partial becomes)."""
    lock = lock_path(final_path(path))
    if not lock.exists():
        return False
    try:
        with lock.open("rb") as fd:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def resume_point(partial: Path, meta: CacheMeta, *, shard: tuple | None = None) -> tuple[int, int] | None:
    """Rows of (train, test) already written in `partial` when it is a partial of `meta`'s cache (and of
    the rows `shard`, for a shard); otherwise the file is deleted and None returned (also when absent)."""
    import h5py

    if not partial.exists():
        return None
    try:
        with h5py.File(partial, "r") as f:
            old = CacheMeta.from_attrs(f.attrs)
            progress = tuple(int(v) for v in f["progress"][...])
            old_shard = tuple(json.loads(f.attrs["shard"])) if "shard" in f.attrs else None
    except (OSError, KeyError, ValueError, TypeError) as e:
        log.warning("discarding unusable partial file %s (%s)", partial, first_line(e))
    else:
        if old.key == meta.key and old_shard == (tuple(shard) if shard is not None else None):
            return progress
    partial.unlink()
    return None
