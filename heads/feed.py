"""How cached features reach a head: pooled vectors, maps in RAM, or maps streamed from disk.

- Heads that start with global pooling (the default head, the linear probe, any `--pooling gap|max`)
  train on pooled vectors, read from a derived cache that pools the maps once (featcache.cache.pooled);
  their memory is the vectors', whatever the cache's size.
- Heads that need the maps (`--pooling flatten`, the conv head) hold them in RAM when the rows they
  need fit the memory budget, and stream them from the cache otherwise (or with `--stream`): each
  epoch reads blocks of contiguous rows in a new seeded order, in worker processes (h5py reads in
  one thread at a time per process), each batch gathers at least 16 blocks, the rows of every
  MIX_BATCHES batches are shuffled together, and only a few batches are ever in memory.

Random single rows are slow to read from HDF5 (each touches a chunk); a few thousand contiguous rows
are not. A block here is up to BLOCK_ROWS consecutive training rows, so a batch of 256 reads 16
short runs of rows, and every training row is seen once per epoch.
"""

from __future__ import annotations

import collections
import os
import re
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from featcache import system
from featcache.cache import digests
from featcache.errors import BadInputError, CacheError, WorkerError
from heads.batches import BLOCK_ROWS, batches_per_epoch, epoch_batches, on_tensorflow, plan_batches

#: Training rows are shuffled across this many consecutive batches (fewer if the budget is small): a block of
#: an image-folder cache usually holds one class, so a batch of 16 blocks alone would hold few classes.
MIX_BATCHES = 8
#: Default memory budget: this share of the memory available when the run starts.
BUDGET_SHARE = 0.5
#: Keeping maps in RAM costs about this many times their stored size (float32 tensors, views joined).
RAM_FACTOR = 3


def parse_bytes(value) -> int:
    """2000000, "2GB", "1.5 GiB", "512M" -> bytes."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(value))
    if not m:
        raise BadInputError(f"--memory-budget must be a size like 2GB or 512MB, got {value!r}")
    scale = 1024 if m.group(3) and m.group(3).lower() == "ib" else 1000
    return int(float(m.group(1)) * scale ** " kmgt".index((m.group(2) or " ").lower()))


def default_budget() -> int:
    return int(system.available_memory() * BUDGET_SHARE)


class CachedRows:
    """Rows of one features dataset of a cache file (a split's maps, or its views), read on demand.

    Behaves enough like an array for the training code: `shape`, `len`, `x[rows]` and `x[a:b]` read
    (as float32), `take(rows)` narrows without reading. The file is opened per read, so an instance
    can be sent to worker processes.
    """

    def __init__(self, path, name: str, rows: np.ndarray | None = None):
        import h5py

        self.path, self.name = str(path), name
        with h5py.File(self.path, "r") as f:
            self.row_shape, self.dtype = tuple(f[name].shape[1:]), f[name].dtype
            n = f[name].shape[0]
            self.file_id = f.attrs.get("file_id")   # checked at every read: the same file, not a rewritten one
        self.rows = np.arange(n) if rows is None else np.asarray(rows, np.int64)

    @property
    def shape(self) -> tuple:
        return (len(self.rows), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * int(np.prod(self.row_shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions) -> "CachedRows":
        out = object.__new__(CachedRows)
        out.__dict__.update(self.__dict__, rows=self.rows[np.asarray(positions, np.int64)])
        return out

    def __getitem__(self, positions) -> np.ndarray:
        if isinstance(positions, slice):
            positions = np.arange(len(self.rows))[positions]
        return self.read(np.asarray(positions, np.int64))

    def _open(self):
        """The cache file, opened again for one read: the same file as at the start, or a CacheError."""
        import h5py

        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise _reopen_failed(self.path, f"could not be opened again ({e.strerror or e})") from e
        if f.attrs.get("file_id") != self.file_id:
            f.close()
            raise _reopen_failed(self.path, "was replaced by another file")
        return f

    def _rows_check(self, f):
        """The digests of this dataset, checked as its rows are read (one per process: its records are hashed
        once); None for a file written before digests, or a joined cache's virtual features (their shards
        carry their own, checked by `info --verify`)."""
        if "_check" not in self.__dict__:
            self._check = None if not digests.has_digests(f) or f[self.name].is_virtual else \
                digests.RowsCheck(f, self.name)
        return self._check

    def read(self, positions: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The rows at `positions` (into this view), in that order, as `dtype`; contiguous runs of file
        rows are read as one slice each."""
        file_rows = self.rows[positions]
        order = np.argsort(file_rows, kind="stable")
        wanted = file_rows[order]
        out = np.empty((len(wanted), *self.row_shape), dtype)
        if len(wanted):
            with self._open() as f:
                data, check = f[self.name], self._rows_check(f)
                try:
                    for run in _runs(wanted):
                        first, last = wanted[run[0]], wanted[run[-1]]
                        rows = data[first:last + 1]
                        problems = check.check(data, int(first), rows) if check else []
                        if problems:
                            raise digests.differs(self.path, problems)
                        out[run] = rows[wanted[run] - first]
                except OSError as e:   # a chunk failing its checksum
                    raise CacheError(f"{self.path}: rows of {self.name} cannot be read back ({e}): damaged on disk; "
                                     "fix: delete it and rerun `featcache extract`") from e
            if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
                raise CacheError(f"{self.path}: rows of {self.name} read as inf or NaN: the fill value of a joined "
                                 "cache whose shard went missing or changed during the run, or a damaged file (no "
                                 "extraction writes them); fix: restore it (or rerun `featcache extract`) and train "
                                 "again")
        result = np.empty_like(out)
        result[order] = out
        return result


def _reopen_failed(path: str, why: str) -> CacheError:
    return CacheError(f"{path} {why} during the run (deleted, or rewritten by `extract --force`); fix: wait for or "
                      "redo the extraction, then train again")


def _runs(rows: np.ndarray) -> list[np.ndarray]:
    """Indices of sorted `rows` grouped into runs read as one slice each: rows less than BLOCK_ROWS apart,
    a run spanning at most 4 * BLOCK_ROWS rows (sparse rows, such as validation rows spread through the
    split, would otherwise make one slice of thousands of rows)."""
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] - rows[i - 1] > BLOCK_ROWS or rows[i] - rows[start] >= 4 * BLOCK_ROWS:
            runs.append(np.arange(start, i))
            start = i
    return runs


def read_batch(x: CachedRows, views: CachedRows | None, y: np.ndarray, pairs: np.ndarray, dtype=np.float32):
    """(features as `dtype`, labels) of (row, view) `pairs`; view 0 is the original image."""
    out = np.empty((len(pairs), *x.row_shape), dtype)
    originals = pairs[:, 1] == 0
    if originals.any():
        out[originals] = x.read(pairs[originals, 0], dtype)
    for v in np.unique(pairs[~originals, 1]):
        pick = pairs[:, 1] == v
        out[pick] = views.read(pairs[pick, 0], dtype)[:, v - 1]
    return out, y[pairs[:, 0]]


_WORKER_SOURCE = None   # a reading process's (x, views, y), set once when it starts


def _start_reader(source) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _read_in_worker(pairs):
    x = _WORKER_SOURCE[0]
    return read_batch(*_WORKER_SOURCE, pairs, dtype=x.dtype)   # stored dtype: half the bytes back, if float16


def _mixed(batches, window: int, batch_size: int, rng):
    """The rows of each `window` consecutive batches, shuffled together and cut into batches again."""
    def flush(buffer):
        features = np.concatenate([b[0] for b in buffer])
        labels = np.concatenate([b[1] for b in buffer])
        order = rng.permutation(len(labels))
        for s in range(0, len(order), batch_size):
            yield features[order[s:s + batch_size]], labels[order[s:s + batch_size]]

    buffer = []
    for batch in batches:
        buffer.append(batch)
        if len(buffer) == window:
            yield from flush(buffer)
            buffer = []
    if buffer:
        yield from flush(buffer)


class Stream:
    """tf.data datasets of batches read from a cache by `workers` processes, `ahead` batches at most in
    flight: `with Stream(x, views, y, workers=2) as s: model.fit(s.dataset(tr, ...), ...)`.

    Processes, because h5py reads in one thread at a time per process. They are started (spawned:
    nothing of TensorFlow is copied into them) at the first batch and stopped on leaving the block."""

    def __init__(self, x: CachedRows, views: CachedRows | None, y: np.ndarray, *, workers: int | None = None,
                 budget: int | None = None, batch_size: int = 256):
        self.source = (x, views, np.asarray(y))
        # a script read from standard input cannot start reading processes: it reads in this process then
        self.workers = 1 if system.unspawnable_main() else workers or max(1, min(4, os.cpu_count() or 1))
        batch_bytes = batch_size * int(np.prod(x.row_shape)) * 4
        # batches read ahead: two per worker, fewer when that would not fit a quarter of the budget
        budget = 1 << 62 if budget is None else budget
        self.ahead = int(max(1, min(2 * self.workers, budget // (4 * batch_bytes))))
        # rows are mixed across this many batches read in a row (blocks of one class would make batches of one)
        self.mix = int(max(1, min(MIX_BATCHES, budget // (4 * batch_bytes))))
        self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def batches(self, plan):
        """Read the batches of `plan` (lists of pairs) in order."""
        if self.workers == 1:
            for pairs in plan:
                yield read_batch(*self.source, pairs, dtype=self.source[0].dtype)
            return
        if self._pool is None:
            self._pool = system.spawn_pool(self.workers, _start_reader, self.source, what="cache reading")
        pending = collections.deque()
        try:
            for pairs in plan:
                pending.append(self._pool.submit(_read_in_worker, pairs))
                if len(pending) >= self.ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as e:
            raise WorkerError("a process reading the cache died (out of memory or killed; or featcache was called "
                               "from a script without `if __name__ == '__main__':`, which processes started by "
                               "spawning need)") from e

    def dataset(self, positions, batch_size: int, *, shuffle: bool, seed: int = 0, n_views: int = 1,
                all_views: bool = False, class_weights=None):
        """A tf.data.Dataset of (float32 features, int64 labels), with row weights from `class_weights`
        ((n_classes,)) when given; each pass over it is one epoch, with a new
        block order when `shuffle`. Batches travel from the readers in the stored dtype (half the bytes, for
        float16) and are cast here. Nothing is buffered beyond the batches read ahead and one in TensorFlow."""
        n_batches = batches_per_epoch(positions, batch_size, shuffle=shuffle, n_views=n_views, all_views=all_views)

        def batches_of(epoch):
            batches = self.batches(plan_batches(positions, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                                n_views=n_views, all_views=all_views))
            if shuffle:
                batches = _mixed(batches, self.mix, batch_size, np.random.default_rng([seed, epoch, 2]))
            for features, labels in batches:
                if class_weights is None:
                    yield features.astype(np.float32, copy=False), labels
                else:
                    yield features.astype(np.float32, copy=False), labels, class_weights[labels]

        if not on_tensorflow():
            return epoch_batches(batches_of, n_batches)
        import tensorflow as tf

        epoch = [-1]

        def generate():
            epoch[0] += 1
            yield from batches_of(epoch[0])

        x = self.source[0]
        signature = (tf.TensorSpec((None, *x.row_shape), tf.float32), tf.TensorSpec((None,), self.source[2].dtype))
        if class_weights is not None:
            signature += (tf.TensorSpec((None,), tf.float32),)
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
        ds = ds.apply(tf.data.experimental.assert_cardinality(n_batches))   # Keras knows the epoch
        options = tf.data.Options()
        options.autotune.enabled = False   # AUTOTUNE may buffer up to half the machine's memory
        return ds.prefetch(1).with_options(options)
