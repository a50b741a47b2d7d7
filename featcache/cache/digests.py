"""Content digests of what featcache writes, and the checks that a file holds only its own data.

Every dataset featcache writes into a cache, shard or pooled file (features, views, labels, paths, class
names) gets digests of its rows computed from the arrays in memory as they were written, never from the
file: `/digests/<dataset path>` holds records (start, stop, sha256) that tile its rows. Features are
recorded batch by batch, next to the resume point, so a resumed partial keeps the records of the runs before
it; write-once datasets get one record. A file is renamed into place only once every record matches what
is read back (`check`), so a write that never reached the disk (a full disk, a failing device) cannot be
published, and a later edit of any byte is found by the reads that check them (`check`; `RowsCheck` for
streamed reads, which read rows in pieces) and by `featcache info --verify`. (HDF5's Fletcher-32 chunk checksum
was tried and left out: as a filter it turns the raw writes into space allocated when the file is created, which
the kill-and-resume design rests on, into chunks HDF5 places as they are written; a chunk never written then read
back as zeros, not as an error.)

`foreign_storage` refuses what would make a cache read another file's bytes: external storage, soft or
external links, and virtual datasets anywhere but in a joined cache's features (over its own shards).
"""

from __future__ import annotations

import hashlib

import numpy as np

from featcache.errors import CacheError

#: The group of the records; every dataset path under it mirrors a dataset of the file.
GROUP = "digests"
#: sha256 in hex: numpy's fixed-width bytes drop trailing NUL bytes, which one raw digest in 256 ends with.
RECORD = np.dtype([("start", "<i8"), ("stop", "<i8"), ("sha256", "S64")])
#: Datasets that change after they are written (the resume point), so carry no digest.
MUTABLE = ("progress",)


def digest(rows) -> bytes:
    """sha256 (hex, ASCII) of rows as stored: numbers by their bytes (in their own dtype), text by its UTF-8."""
    a = np.asarray(rows)
    h = hashlib.sha256()
    if a.dtype.kind in "OSU":   # one update of the joined text: the same digest as one per value, far fewer calls
        h.update(b"".join((v.encode() if isinstance(v, str) else bytes(v)) + b"\0" for v in a.ravel()))
    else:
        h.update(np.ascontiguousarray(a))   # its buffer: no copy of a block the size of a write batch
    return h.hexdigest().encode()


def has_digests(f) -> bool:
    """Whether the open file was written with digests (files written before them have none)."""
    return GROUP in f


def record(f, path: str, start: int, rows) -> None:
    """Append the digest of `rows` (as written at rows [start, start + len) of dataset `path`) to its records.
    `rows` must have the dataset's dtype (what the file stores, not what was computed before the cast)."""
    name = f"{GROUP}/{path}"
    if name not in f:
        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=RECORD, chunks=(1024,))
    records = f[name]
    n = len(records)
    records.resize((n + 1,))
    records[n] = (start, start + len(rows), digest(rows))


def record_whole(f, path: str, data) -> None:
    """Write dataset `path` from `data` and record its digest: the way to write a write-once dataset."""
    import h5py

    array = np.array(data, dtype=h5py.string_dtype()) if _is_text(data) else np.asarray(data)
    f.create_dataset(path, data=array)
    record(f, path, 0, array)


def _is_text(data) -> bool:
    a = np.asarray(data)
    return a.dtype.kind in "OSU" or (a.size == 0 and not isinstance(data, np.ndarray))


def trim(f, path: str, written: int) -> None:
    """Keep the records of rows below `written` only: a batch written after the last resume point is redone."""
    name = f"{GROUP}/{path}"
    if name in f:
        records = f[name][...]
        f[name].resize((int(np.sum(records["stop"] <= written)),))


def records(f, path: str) -> np.ndarray | None:
    name = f"{GROUP}/{path}"
    return f[name][...] if name in f else None


def check(f, path: str, array: np.ndarray | None = None) -> list[str]:
    """Problems of dataset `path` of the open file against its records: rows not tiled by them, or a block that
    reads back other than written. Given `array` (the whole dataset, just read), that is checked instead of
    reading the dataset again, one record's rows at a time."""
    recs = records(f, path)
    if recs is None:
        return [f"/{path} has no digest"]
    data = f[path] if array is None else array
    problems = _tiling(recs, len(data), path)
    for start, stop, sha in recs[["start", "stop", "sha256"]]:
        if not problems and digest(data[start:stop]) != sha:
            problems.append(f"/{path} rows {start}-{stop} differ from what was written")
    return problems


def differs(path, problems: list[str]) -> CacheError:
    """The one error for a file whose content is not what featcache wrote (`problems`: from `check`)."""
    return CacheError(f"{path} differs from what was written ({'; '.join(problems[:3])}); fix: delete it and rerun "
                      "the same `featcache extract` command")


class RowsCheck:
    """The records of one dataset, checked as its rows are read in pieces (a streamed read): a record is hashed
    once per instance, from the rows just read where they cover it, else read whole once (the rows at a piece's
    edges), so an epoch's reads cost one hash of the dataset, and later epochs none."""

    def __init__(self, f, path: str):
        recs = records(f, path)
        self.path, self.problems = path, [] if recs is not None else [f"/{path} has no digest"]
        if recs is not None:
            recs = np.sort(recs[recs["stop"] != recs["start"]], order="start")
            self.problems = _tiling(recs, len(f[path]), path)
            self.starts, self.stops, self.shas = recs["start"], recs["stop"], recs["sha256"]
            self.done = np.zeros(len(recs), bool)

    @classmethod
    def of(cls, f, path: str) -> "RowsCheck | None":
        """The check of dataset `path` of the open file; None where there is nothing to check: a file written
        before digests, or a joined cache's virtual features (their shards carry their own)."""
        return cls(f, path) if has_digests(f) and not f[path].is_virtual else None

    def verify(self, data, first: int, rows: np.ndarray) -> np.ndarray:
        """`rows` (see `check`), or the one error for a file that differs from what was written."""
        problems = self.check(data, first, rows)
        if problems:
            raise differs(data.file.filename, problems)
        return rows

    def check(self, data, first: int, rows: np.ndarray) -> list[str]:
        """Problems of `rows`, just read as rows [first, first + len(rows)) of `data` (the open dataset)."""
        if self.problems:
            return self.problems
        last = first + len(rows)
        for i in range(np.searchsorted(self.stops, first, "right"), np.searchsorted(self.starts, last, "left")):
            if self.done[i]:
                continue
            start, stop = int(self.starts[i]), int(self.stops[i])
            block = rows[start - first:stop - first] if first <= start and stop <= last else data[start:stop]
            if digest(block) != self.shas[i]:
                return [f"/{self.path} rows {start}-{stop} differ from what was written"]
            self.done[i] = True
        return []


def _tiling(recs: np.ndarray, n: int, path: str) -> list[str]:
    recs = recs[recs["stop"] != recs["start"]]   # an empty split's one record
    order = np.argsort(recs["start"], kind="stable")
    starts, stops = recs["start"][order], recs["stop"][order]
    ok = (len(recs) == 0 and n == 0) or (len(recs) and starts[0] == 0 and stops[-1] == n
                                         and np.array_equal(starts[1:], stops[:-1]) and bool(np.all(stops > starts)))
    return [] if ok else [f"/{path}: its digests do not cover its {n} rows once each"]


def written_datasets(f) -> list[str]:
    """Paths of every dataset of the open file that featcache wrote and digested (all but the mutable ones and
    the records themselves)."""
    import h5py

    out = []
    f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) and name not in MUTABLE
                 and not name.startswith(GROUP + "/") else None)
    return out


def foreign_storage(f, *, virtual_ok=frozenset(), sources=frozenset()) -> list[str]:
    """What in the open file points outside it: soft and external links, datasets with external storage, virtual
    datasets (allowed only at the paths `virtual_ok`, over files named in `sources`)."""
    import h5py

    problems = []

    def visit(name, link):
        if not isinstance(link, h5py.HardLink):
            problems.append(f"/{name} is a {type(link).__name__}")
            return
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset):
            if obj.external:
                problems.append(f"/{name} stores its data in {obj.external[0][0]!r}")
            elif obj.is_virtual:
                foreign = {m.file_name for m in obj.virtual_sources()} - set(sources)
                if name not in virtual_ok or foreign:
                    problems.append(f"/{name} is a virtual dataset over {sorted(foreign) or 'other files'}")

    f.visititems_links(visit)
    return problems
