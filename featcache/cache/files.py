"""The files beside a cache and the protocol around them: the partial file, the lock, the resume point.

A cache is built as ``<name>.partial`` by the one process holding ``<name>.lock`` and renamed to
``<name>`` when complete, so a finished name is never half-written. A partial of the same key
(and, for a shard, the same rows) is resumed from its `/progress`; any other partial is deleted.

Every file featcache writes takes one path to its name (`publish`): written under a temporary name,
flushed and closed with their errors raised (`close_checked`: h5py only prints write errors it meets
while closing), re-opened and checked by the caller's `verify`, then renamed. Temporary files of
featcache's own naming that a killed process left behind are removed by the next run (`sweep`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Callable

from featcache import system
from featcache.cache.format import FORMAT_VERSION, CacheMeta, feature_datasets
from featcache.errors import CacheError, first_line

log = logging.getLogger(__name__)


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def lock_path(final: Path) -> Path:
    return final.with_name(final.name + ".lock")


def final_path(path: Path) -> Path:
    """The finished name of `path` (itself, or the cache a partial becomes)."""
    return path.with_name(path.name.removesuffix(".partial"))


def cache_lock(final: Path):
    """The exclusive lock that one process building (or rewriting) the cache `final` holds; others wait
    for it, and say so."""
    return system.file_lock(lock_path(final), waiting=f"another featcache process is extracting {final}; waiting "
                                                      "for it to finish")


def being_written(path: Path) -> bool:
    """Whether another process holds the lock of this cache (or of the cache this partial becomes)."""
    return system.is_locked(lock_path(final_path(path)))


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
            whole = int(f.attrs["format_version"]) <= FORMAT_VERSION and all(   # a create() cut short lacks some
                d.path in f and tuple(f[d.path].shape[1:]) == d.row_shape for d in feature_datasets(meta))
    except (OSError, KeyError, ValueError, TypeError) as e:
        log.warning("discarding unusable partial file %s (%s)", partial, first_line(e))
    else:
        if old.key == meta.key and old_shard == (tuple(shard) if shard is not None else None) and whole:
            return progress
        if not whole:
            log.warning("discarding partial file %s: its datasets were not all created", partial)
    partial.unlink()
    return None


def close_checked(f) -> None:
    """Flush and close an open h5py.File, raising the write errors (a full disk) that a plain close only prints."""
    try:
        f.flush()
    finally:
        f.close()


def publish(tmp: Path, final: Path, verify: Callable[[Path], None] | None = None) -> Path:
    """Give the closed file `tmp` its name `final`, once it is on the device (fsync) and `verify(tmp)` (re-opening
    it) has passed; then the rename is made durable too (fsync of the folder). A file shown wrong (a CacheError) is
    deleted, and `final` is left as it was. An interruption or a read error while checking
    leaves `tmp` too (a resume of a partial then redoes nothing)."""
    try:
        system.fsync_path(tmp)
        if verify is not None:
            verify(tmp)
    except CacheError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as e:   # the disk refused to keep it (full, failing): said in one line, the file kept to resume
        raise CacheError(f"{tmp} could not be made durable ({first_line(e)}): a full disk or a failing device; fix: "
                         "free some space or check the disk, then rerun the same command") from e
    os.replace(tmp, final)
    system.fsync_path(final.parent)
    return final





@contextlib.contextmanager
def writing(final: Path, purpose: str, verify: Callable[[Path], None], opener=None):
    """`with writing(final, "joining", verify) as f:` an h5py.File open on a temporary name beside `final`; when the
    block succeeds it is closed with its errors raised, verified and renamed to `final` (`publish`); whatever
    happens the temporary name is gone afterwards. `opener(tmp)` opens it (default: a new empty file)."""
    import h5py

    tmp = temporary_path(final, purpose)
    try:
        f = opener(tmp) if opener is not None else h5py.File(tmp, "w")
        try:
            yield f
        finally:
            close_checked(f)
        publish(tmp, final, verify)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_path(final: Path, purpose: str) -> Path:
    """A hidden name beside `final` for writing it, carrying this host's name and this process's id so that
    `sweep` can tell a leftover of a killed process from a file another process (here, or on another machine
    sharing the folder) is writing right now."""
    return final.with_name(f".{final.name}.{purpose}.{_host()}.{os.getpid()}.tmp")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


_TEMPORARY = re.compile(r"^\.(?P<final>.+)\.(?P<purpose>[a-z]+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.tmp$")


def sweep(folder: Path, final_name: str | None = None) -> list[Path]:
    """Remove the temporary files (`temporary_path`) in `folder` (of `final_name` only, if given) that a process of
    this host left and that is gone; returns what was removed. Files of running processes, and of other hosts
    (whose processes cannot be seen from here), are left alone."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        m = _TEMPORARY.match(path.name)
        if not m or (final_name is not None and m["final"] != final_name) or m["host"] != _host() \
                or _alive(int(m["pid"])):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed.append(path)
        log.warning("removed %s (%.1f MB), left by a featcache process that was killed", path, size / 1e6)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True
