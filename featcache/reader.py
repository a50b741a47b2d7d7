"""Reading a cache without loading it whole: a read-only array view, and block-shuffled tf.data streams.

Random single-row reads from HDF5 are slow (each touches a chunk); contiguous blocks of rows are
fast. A training stream therefore shuffles the order of blocks each epoch and mixes rows in a
bounded buffer, so every row is seen once per epoch while memory holds a few blocks at a time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

#: Rows per block read from HDF5 (a few chunks: chunks hold up to one batch, capped at 1 MiB).
BLOCK_ROWS = 256


@contextlib.contextmanager
def array_view(cache, split: str, layer: str | None = None):
    """`with array_view(cache, "train") as x:` a read-only h5py dataset of that split's features:
    slice it like a numpy array (`x[1000:2000]`), nothing is read until you do."""
    import h5py

    from featcache.store import dataset_path

    with h5py.File(cache.path, "r") as f:
        yield f[dataset_path(cache.meta, split, cache.select_layer(layer))]


def block_order(n_rows: int, block_rows: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """(start, stop) of every block of `n_rows`, in a seeded order that differs from epoch to epoch."""
    blocks = [(s, min(s + block_rows, n_rows)) for s in range(0, n_rows, block_rows)]
    order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
    return [blocks[i] for i in order]


def as_tf_dataset(cache, split: str, *, layer: str | None = None, batch_size: int = 256, shuffle: bool = False,
                  seed: int = 0, pooling: str | None = None, block_rows: int = BLOCK_ROWS,
                  shuffle_blocks: int = 8):
    """A tf.data.Dataset of (features as float32, labels) batches of one split, read from disk as it goes.

    With `shuffle`, blocks of `block_rows` contiguous rows are read in a new seeded order each epoch
    and their rows mixed in a buffer of `shuffle_blocks` blocks; without it, rows come in order.
    `pooling` ("gap" or "max") pools each feature map to a vector as it is read.
    """
    import tensorflow as tf

    from featcache.errors import BadInputError
    from featcache.pooled import global_pool
    from featcache.store import dataset_path

    if pooling not in (None, "gap", "max"):
        raise BadInputError(f"pooling must be None, 'gap' or 'max', got {pooling!r}")
    name = dataset_path(cache.meta, split, cache.select_layer(layer))
    path, n = str(Path(cache.path)), cache.splits[split].n
    shape = cache.splits[split].shapes[cache.select_layer(layer)][1:]
    out_shape = (shape[-1],) if pooling else tuple(shape)
    epoch = [-1]

    def blocks():
        import h5py

        epoch[0] += 1
        order = block_order(n, block_rows, seed, epoch[0]) if shuffle else \
            [(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]
        with h5py.File(path, "r") as f:   # opened per epoch, in the reading thread: h5py objects do not fork
            for s, e in order:
                x = global_pool(f[name][s:e], pooling) if pooling else f[name][s:e].astype(np.float32)
                yield x, f[f"{split}/labels"][s:e]

    ds = tf.data.Dataset.from_generator(blocks, output_signature=(
        tf.TensorSpec((None, *out_shape), tf.float32), tf.TensorSpec((None,), tf.int64))).unbatch()
    if shuffle:
        ds = ds.shuffle(shuffle_blocks * block_rows, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
