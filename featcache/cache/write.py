"""Writing a cache: create a file with every dataset allocated, write batches behind the model, finish it.

Every dataset is allocated in full when the file is created, so extraction only ever writes raw
feature rows and the progress counter: a process killed mid-batch leaves a file that reopens and
resumes (`featcache.cache.files.resume_point`). `combine` writes one-layer caches of the same images
as one file of several layers, by copying rows.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featcache import system
from featcache.cache import digests
from featcache.cache.format import SPLITS, CacheMeta, chunk_rows, dataset_path, feature_datasets
from featcache.errors import CacheError

#: Bytes of rows copied at a time between files (combine, consolidate).
COPY_BLOCK_BYTES = 64 << 20


def create(path: Path, meta: CacheMeta, *, labels: dict, paths: dict, class_names, batch_size: int,
           compression: str | None = None, shard=None):
    """Create a cache file with every dataset allocated; returns the open h5py.File (mode r+).

    Chunks hold whole rows: up to one batch (`batch_size`), capped at 1 MiB. A shard (`shard`: its
    split, start and stop) gets the labels and paths of its rows only, and the other split none."""
    import h5py

    f = h5py.File(path, "w")
    try:
        write_header(f, meta, labels=labels, paths=paths, class_names=class_names, progress=(0, 0))
        if shard is not None:
            f.attrs["shard"] = json.dumps(list(dataclasses.astuple(shard) if dataclasses.is_dataclass(shard)
                                               else shard))
        for d in feature_datasets(meta):
            n = len(labels[d.split])
            per_row = d.row_shape[0] if d.views else 1   # a views row holds views - 1 maps
            rows = max(1, min(n, chunk_rows(meta.shapes[d.layer], meta.dtype, batch_size) // per_row))
            _allocate(f, d.path, (n, *d.row_shape), (rows, *d.row_shape) if n else None, meta.dtype,
                      None if d.views else compression)
        f.flush()
    except BaseException:
        f.close()
        raise
    return f


def write_header(f, meta: CacheMeta, *, labels: dict, paths: dict, class_names, progress: tuple) -> None:
    """What every cache file has besides its features: the metadata, a new file id, the class names, the resume
    point, and each split's labels (and image paths), those with their digests."""
    f.attrs.update(meta.to_attrs())
    f.attrs["complete"] = False
    f.attrs["file_id"] = uuid.uuid4().hex   # which file this is: a joined shard is checked by it
    digests.record_whole(f, "class_names", [str(c) for c in class_names])
    f.create_dataset("progress", data=np.asarray(progress, np.int64))
    for split in SPLITS:
        digests.record_whole(f, f"{split}/labels", np.asarray(labels[split], np.int64))
        if paths.get(split) is not None:
            digests.record_whole(f, f"{split}/paths", [str(p) for p in paths[split]])


def reopen(partial: Path, meta: CacheMeta, start: tuple[int, int]):
    """The partial file of `meta` open for writing (mode r+), resumed at `start` (train, test rows): the digests of
    rows past it (a batch written but not yet counted when the run stopped) are dropped, as it is redone."""
    import h5py

    f = h5py.File(partial, "r+")
    for d in feature_datasets(meta):
        digests.trim(f, d.path, start[0] if d.split == "train" else start[1])
    return f


def _allocate(f, name: str, shape: tuple, chunks: tuple, dtype: str, compression: str | None = None) -> None:
    """A features dataset; uncompressed ones get all their space now (compressed chunks are sized on write)."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if compression is None:
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compression=compression,
                     shuffle=compression == "gzip" or None, dcpl=dcpl,
                     fill_time="never" if compression is None else None)


def write_rows(f, path: str, start: int, rows) -> None:
    """Write `rows` at rows [start, start + len) of the features (or views) dataset `path` of the open file `f`, and
    record their digest as stored (in the dataset's dtype): the one way feature rows get into a file."""
    data = f[path]
    rows = np.asarray(rows, data.dtype)
    data[start:start + len(rows)] = rows
    digests.record(f, path, start, rows)


def copy_rows(source, target, block_bytes: int = COPY_BLOCK_BYTES, *, digest=None) -> None:
    """Copy every row of the h5py dataset `source` into `target`, about `block_bytes` at a time, recording their
    digests (and into the hashlib object `digest`, as `featcache.cache.read.features_digest` reads them)."""
    rows = max(1, block_bytes // max(1, int(np.prod(source.shape[1:])) * source.dtype.itemsize))
    for s in range(0, len(source), rows):
        block = np.ascontiguousarray(source[s:s + rows])
        write_rows(target.file, target.name.lstrip("/"), s, block)
        if digest is not None:
            digest.update(block)


def combine(sources, path: Path, *, batch_size: int = 128) -> CacheMeta:
    """Write the single-layer caches `sources` (FeatureCache, same images and options) as one file at `path`.

    No forward pass: rows are copied. Featcache before format 2 wrote one file per layer even from
    one pass; this turns those into what `extract --layer a,b` writes now. Returns the new meta.
    """
    import h5py

    first = sources[0].meta
    meta = dataclasses.replace(first, layer=",".join(c.meta.layer for c in sources),
                               feature_shape={c.meta.layer: tuple(c.meta.feature_shape) for c in sources})
    labels, paths = read_labels_and_paths(sources[0].path)
    # `created` is stamped once per extraction (to the second): equal stamps mean one pass, timed in each file
    one_pass = len({c.meta.created for c in sources}) == 1
    seconds = [c.extract_seconds for c in sources]
    with create(path, meta, labels=labels, paths=paths, class_names=sources[0].class_names,
                batch_size=batch_size) as f:
        for c in sources:
            with h5py.File(c.path, "r") as src:
                for d in feature_datasets(c.meta):
                    copy_rows(src[d.path], f[dataset_path(meta, d.split, d.layer, views=d.views)])
        f["progress"][...] = [first.n_train, first.n_test]
        finish(f, max_abs_activation=max(c.max_abs_activation for c in sources),
               extract_seconds=None if None in seconds else (max(seconds) if one_pass else sum(seconds)))
    return meta


def read_labels_and_paths(path: Path) -> tuple[dict, dict]:
    """({split: labels}, {split: row paths or None}) of the cache file at `path`."""
    import h5py

    with h5py.File(path, "r") as src:
        labels = {s: src[f"{s}/labels"][...] for s in SPLITS}
        paths = {s: src[f"{s}/paths"][...].astype(str) if f"{s}/paths" in src else None for s in SPLITS}
    return labels, paths


def finish(f, *, max_abs_activation: float, extract_seconds: float | None = None, stages: dict | None = None) -> None:
    """Mark the open file `f` complete, with its largest |activation|, the seconds its extraction took and where
    they went (`stages`: waiting for decoding, the model, waiting for writes)."""
    f.attrs["max_abs_activation"] = max_abs_activation
    if extract_seconds is not None:   # of the run that completed the file (a resumed run: its part only)
        f.attrs["extract_seconds"] = extract_seconds
    if stages is not None:
        f.attrs["extract_stages"] = json.dumps(stages)
    f.attrs["complete"] = True
    f.flush()


def written_peak(f, meta: CacheMeta, start: tuple[int, int], batch_size: int) -> float:
    """Largest |activation| among the rows of (train, test) already written (only a resumed file has any)."""
    peak = 0.0
    for d in feature_datasets(meta):
        rows = start[0] if d.split == "train" else start[1]
        for s in range(0, rows, batch_size):
            peak = max(peak, float(np.abs(f[d.path][s:min(s + batch_size, rows)]).max()))
    return peak


class BatchWriter:
    """Writes batches of features behind the model in one thread, at most `depth` batches pending.

    A batch (its originals, then each cached view, per layer) counts as done in the file's `/progress`
    once it is written. After a failed write (disk full, say) nothing more is written, so the rows on
    disk stay a prefix, ready to resume; the failure is raised by the next `submit` or by `drain`."""

    def __init__(self, f, meta: CacheMeta, depth: int = 2):
        self.f, self.meta, self.depth = f, meta, depth
        self.pending, self.failed = collections.deque(), threading.Event()
        self.pool = ThreadPoolExecutor(1)

    def submit(self, split: str, s: int, e: int, outputs: list) -> None:
        self.pending.append(self.pool.submit(self._write, split, s, e, outputs))
        while len(self.pending) > self.depth or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()

    def _check_room(self, nbytes: int) -> None:
        """Stop before a write the disk cannot take: HDF5 fails it while closing the file and crashes the process
        (SIGSEGV), where this stops with the rows written so far kept to resume."""
        folder = Path(self.f.filename).parent
        free = shutil.disk_usage(folder).free
        if nbytes + system.HEADROOM_BYTES > free:
            raise CacheError(f"{folder} is full ({system.megabytes(free)} free, the next batch needs "
                             f"{system.megabytes(nbytes)} and {system.megabytes(system.HEADROOM_BYTES)} of headroom); "
                             f"the rows written so far stay in {self.f.filename}; fix: free some space, then rerun the "
                             "same command to resume")

    def drain(self) -> None:
        """Wait for every pending write; the first failure is raised after all have finished."""
        done = list(self.pending)
        self.pending.clear()
        for w in done:
            w.exception()
        for w in done:
            w.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _write(self, split: str, s: int, e: int, outputs: list) -> None:
        if self.failed.is_set():
            return
        try:
            self._check_room(sum(np.asarray(x).nbytes for views in outputs for x in views))
            for i, layer in enumerate(self.meta.layers):
                write_rows(self.f, dataset_path(self.meta, split, layer), s, outputs[0][i])
                if len(outputs) > 1:   # the views of these rows, as the file holds them: (rows, views - 1, ...)
                    write_rows(self.f, dataset_path(self.meta, split, layer, views=True), s,
                               np.stack([v[i] for v in outputs[1:]], axis=1))
            self.f["progress"][0 if split == "train" else 1] = e
            self.f.flush()
        except BaseException:
            self.failed.set()
            raise
