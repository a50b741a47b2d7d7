"""The feed: the one owner of how cached rows reach a model, on every Keras backend.

It decides whether maps are held in RAM or streamed (`keeps_in_ram`, one rule for the whole run and for a
subset read later), tells which heads can fit on the rows as they are (`is_streamed`: the linear probe needs
them in RAM), and hands batches planned by `heads.batches` to Keras (`keras_batches`): a tf.data pipeline on
TensorFlow, a `keras.utils.PyDataset` of numpy arrays on JAX and PyTorch.

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
import contextlib
import os
import re
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from featcache import system
from featcache.cache import digests
from featcache.cache.read import steady
from featcache.errors import BadInputError, CacheError, WorkerError
from heads.batches import BLOCK_ROWS, batches_per_epoch, epochs_of_plans, plan_batches

#: Training rows are shuffled across this many consecutive batches (fewer if the budget is small): a block of
#: an image-folder cache usually holds one class, so a batch of 16 blocks alone would hold few classes.
MIX_BATCHES = 8
#: Default memory budget: this share of the memory available when the run starts.
BUDGET_SHARE = 0.5
#: Keeping maps in RAM costs about this many times their stored size (float32 tensors, views joined).
RAM_FACTOR = 3


def parse_bytes(value) -> int:
    """2000000, "2GB", "1.5 GiB", "512M" -> bytes."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    m = None if isinstance(value, (bool, int, np.integer)) else \
        re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(value))
    if not m:
        raise BadInputError(f"--memory-budget must be a size like 2GB or 512MB, got {value!r}")
    scale = 1024 if m.group(3) and m.group(3).lower() == "ib" else 1000
    return int(float(m.group(1)) * scale ** " kmgt".index((m.group(2) or " ").lower()))


def checked_feed(memory_budget, stream) -> tuple[int | None, bool]:
    """The one check of how maps are fed (--memory-budget, --stream): (bytes or None for the default, stream)."""
    if not isinstance(stream, (bool, np.bool_)):   # "no" would be true
        raise BadInputError(f"--stream (stream=) must be True or False, got {stream!r}")
    return (None if memory_budget is None else parse_bytes(memory_budget)), bool(stream)


def default_budget() -> int:
    return int(system.available_memory() * BUDGET_SHARE)


def keeps_in_ram(nbytes: int, budget: int, *, stream: bool = False) -> bool:
    """The one rule for maps: held in RAM when RAM_FACTOR times their stored bytes fit the memory budget (and
    `stream`, --stream, was not asked for); streamed from the cache otherwise."""
    return not stream and RAM_FACTOR * nbytes <= budget


def is_streamed(x) -> bool:
    """Whether rows `x` are read from the cache as needed (CachedRows) rather than held in RAM."""
    return isinstance(x, CachedRows)


#: Why a head fitted on all its rows at once cannot train on streamed rows, and what to do.
NEEDS_RAM = ("the linear probe (L-BFGS) needs its training rows in memory, and these maps are streamed from "
             "the cache (--stream, or more than --memory-budget); fix: --pooling gap or max (vectors pooled "
             "once), a larger --memory-budget without --stream, or fewer rows with --per-class")


@contextlib.contextmanager
def keras_batches(x, views, y, rows: tuple, batch_size: int, *, seed: int, n_views: int = 1,
                  all_views: bool = False, weights=(None, None), budget: int | None = None):
    """`with keras_batches(x, views, y, (tr, va), ...) as (train, val):` what Keras fits on: training batches
    (shuffled, a new seeded order each epoch) and validation batches (in order, view 0) of rows in RAM or
    streamed from the cache, each with its row weight where class `weights` (training, validation) are given.
    Validation rows None: no validation batches (None). Reading processes of a stream are stopped on leaving
    the block."""
    tr, va = rows
    if is_streamed(x):
        with Stream(x, views, np.asarray(y, np.int64), budget=budget, batch_size=batch_size) as stream:
            yield (stream.dataset(tr, batch_size, shuffle=True, seed=seed, n_views=n_views, all_views=all_views,
                                  class_weights=weights[0]),
                   None if va is None else stream.dataset(va, batch_size, shuffle=False, class_weights=weights[1]))
        return
    if n_views > 1:   # (n, views, ...): view 0 is the original image
        x = np.concatenate([x[:, None], views], axis=1)
    yield (in_ram_dataset(x, y, tr, batch_size, shuffle=True, seed=seed, n_views=n_views, all_views=all_views,
                          class_weights=weights[0]),
           None if va is None else in_ram_dataset(x, y, va, batch_size, shuffle=False, n_views=n_views,
                                                  class_weights=weights[1]))


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
            self._check = digests.RowsCheck.of(f, self.name)
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
                        if check:
                            check.verify(data, int(first), rows)
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
    nothing of TensorFlow is copied into them) when the first dataset is made, and stopped on leaving the block."""

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

    def start(self) -> None:
        """Start the reading processes, if not yet started (none with one worker). Called in the caller's thread
        when a dataset is made: started from TensorFlow's generator thread, a failed start reached the caller as
        TensorFlow's UnknownError, with the WorkerError inside."""
        if self._pool is None and self.workers > 1:
            self._pool = system.spawn_pool(self.workers, _start_reader, self.source, what="cache reading")

    def reader_pids(self) -> list[int]:
        """The process ids of the reader processes running now (none before a dataset is made, or with one worker)."""
        return system.pool_pids(self._pool) if self._pool is not None else []

    def batches(self, plan):
        """Read the batches of `plan` (lists of pairs) in order."""
        if self.workers == 1:
            for pairs in plan:
                yield read_batch(*self.source, pairs, dtype=self.source[0].dtype)
            return
        self.start()
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
        self.start()

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
        return steady(ds, prefetch=1)


def on_tensorflow() -> bool:
    """Whether Keras runs on TensorFlow (its default backend), where batches travel as tf.data pipelines; on JAX and
    PyTorch they travel as a keras.utils.PyDataset of numpy arrays (`epoch_batches`)."""
    import keras

    return keras.backend.backend() == "tensorflow"


def in_ram_dataset(x, y, positions, batch_size: int, *, shuffle: bool, seed: int = 0, n_views: int = 1,
                   all_views: bool = False, class_weights=None):
    """Batches of (float32 features, labels) gathered from arrays held in RAM in their stored dtype (x: (n, ...)
    or, with views, (n, n_views, ...) with view 0 the original), cast per batch; with `class_weights`
    ((n_classes,)), (features, labels, row weights). Each pass is one epoch of `plan_batches` (rows shuffled one
    by one): one gather per batch. A tf.data.Dataset on TensorFlow, a PyDataset on the other backends."""
    n_batches = batches_per_epoch(positions, batch_size, shuffle=shuffle, n_views=n_views, all_views=all_views)
    if not on_tensorflow():
        x, y = np.asarray(x), np.asarray(y, np.int64)
        weights = None if class_weights is None else np.asarray(class_weights, np.float32)

        def gather(pairs):
            features = x[pairs[:, 0], pairs[:, 1]] if n_views > 1 else x[pairs[:, 0]]
            labels = y[pairs[:, 0]]
            out = (features.astype(np.float32, copy=False), labels)
            return out if weights is None else (*out, weights[labels])

        return epoch_batches(lambda epoch: map(gather, plan_batches(
            positions, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, n_views=n_views, all_views=all_views,
            block_rows=1)), n_batches)
    import tensorflow as tf

    plans = epochs_of_plans(positions, batch_size, shuffle=shuffle, seed=seed, n_views=n_views,
                            all_views=all_views, block_rows=1)
    x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(np.asarray(y, np.int64))
    class_weights = None if class_weights is None else tf.constant(class_weights, tf.float32)

    @tf.autograph.experimental.do_not_convert   # plain tensor ops: nothing for AutoGraph to convert
    def gather(pairs):
        labels = tf.gather(y, pairs[:, 0])
        features = tf.gather_nd(x, pairs) if n_views > 1 else tf.gather(x, pairs[:, 0])
        if class_weights is None:
            return tf.cast(features, tf.float32), labels
        return tf.cast(features, tf.float32), labels, tf.gather(class_weights, labels)

    ds = tf.data.Dataset.from_generator(plans, output_signature=tf.TensorSpec((None, 2), tf.int64))
    ds = ds.apply(tf.data.experimental.assert_cardinality(n_batches))
    return steady(ds.map(gather, num_parallel_calls=2))   # a gather takes milliseconds: two at once keep up


def epoch_batches(batches_of, n_batches: int):
    """A keras.utils.PyDataset over epochs: `batches_of(epoch)` iterates epoch `epoch`'s `n_batches` batches (tuples
    of numpy arrays), which Keras trains on with every backend. Keras asks for batches in order, and may ask for
    the last one again (to look at its shapes); asking for batch 0 after the last starts the next epoch, so epoch
    k is planned with the same seed on every backend. An epoch of which Keras only looked at batch 0 (JAX's
    `fit` does, to build its step) is served again from its start: a model fitted on the same batches in
    several `fit` calls (heads.together) sees the epochs one `fit` would."""
    import keras

    class EpochBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch, self.batches, self.next, self.last, self.peeked = -1, None, 0, None, False

        def __len__(self):
            return n_batches

        def __getitem__(self, index):
            if index == self.next - 1:
                return self.last
            if self.batches is None or (index == 0 and self.next >= n_batches):
                self.epoch += 0 if self.peeked else 1
                self.batches, self.next, self.peeked = iter(batches_of(self.epoch)), 0, False
            if index != self.next:
                raise IndexError(f"batches are read in order: asked for {index}, next is {self.next}")
            self.last, self.next = next(self.batches), self.next + 1
            return self.last

        def on_epoch_end(self):
            if self.next:
                self.peeked = self.next == 1 and n_batches > 1
                self.batches, self.next = None, 0

    return EpochBatches()
