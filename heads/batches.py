"""One batch planner for every feed: which (row, view) pairs each batch of an epoch holds.

Rows held in RAM (`in_ram_dataset`) and rows streamed from the cache (`heads.feed.Stream`) are
batched by the same plan: training rows in a new seeded order each epoch, each with a random view
(or every view once, `all_views`), evaluation rows in order with view 0, the original image; every
row comes once per epoch. Streamed rows are shuffled in blocks of consecutive rows (contiguous reads
are fast in HDF5, single rows slow), rows in RAM one by one.
"""

from __future__ import annotations

import numpy as np

from featcache.cache.read import block_order

#: Consecutive training rows a streamed batch reads together (at most; a batch gathers at least 16 blocks).
BLOCK_ROWS = 16


def stream_block_rows(batch_size: int) -> int:
    """Rows per block for streamed reads: BLOCK_ROWS, fewer for batches under 256 (at least 16 blocks a batch)."""
    return max(1, min(BLOCK_ROWS, batch_size // 16))


def plan_batches(positions: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                 n_views: int = 1, all_views: bool = False, block_rows: int | None = None) -> list[np.ndarray]:
    """One epoch's batches of rows `positions`, each an array of (row, view) pairs.

    Training (`shuffle`): blocks of `block_rows` consecutive rows (default `stream_block_rows`; 1 for rows
    in RAM) in an order seeded by (seed, epoch), each row with a random view (or every view once,
    `all_views`); evaluation: rows in order, view 0."""
    rows = np.sort(np.asarray(positions, np.int64))
    if n_views > 1 and all_views and shuffle:
        pairs = np.stack([np.repeat(rows, n_views), np.tile(np.arange(n_views), len(rows))], axis=1)
    elif n_views > 1 and shuffle:
        pairs = np.stack([rows, np.random.default_rng([seed, epoch, 1]).integers(0, n_views, len(rows))], axis=1)
    else:
        pairs = np.stack([rows, np.zeros_like(rows)], axis=1)
    if shuffle:   # the same seeded block order as cache.as_tf_dataset
        block = stream_block_rows(batch_size) if block_rows is None else block_rows
        if block == 1:   # block_order's permutation, without a list of one-row blocks
            pairs = pairs[np.random.default_rng([seed, epoch]).permutation(len(pairs))]
        else:
            pairs = np.concatenate([pairs[s:e] for s, e in block_order(len(pairs), block, seed, epoch)] or [pairs])
    return [pairs[s:s + batch_size] for s in range(0, len(pairs), batch_size)]


def epochs_of_plans(positions, batch_size: int, *, shuffle: bool, seed: int = 0, n_views: int = 1,
                    all_views: bool = False, block_rows: int | None = None):
    """A generator function: each call plans the next epoch (epoch 0, 1, ...) and yields its batches of pairs."""
    epoch = [-1]

    def generate():
        epoch[0] += 1
        yield from plan_batches(positions, batch_size, shuffle=shuffle, seed=seed, epoch=epoch[0], n_views=n_views,
                                all_views=all_views, block_rows=block_rows)

    return generate


def batches_per_epoch(positions, batch_size: int, *, shuffle: bool, n_views: int = 1, all_views: bool = False) -> int:
    rows = len(positions) * (n_views if n_views > 1 and all_views and shuffle else 1)
    return -(-rows // batch_size)


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
    return ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def epoch_batches(batches_of, n_batches: int):
    """A keras.utils.PyDataset over epochs: `batches_of(epoch)` iterates epoch `epoch`'s `n_batches` batches (tuples
    of numpy arrays), which Keras trains on with every backend. Keras asks for batches in order, and may ask for
    the last one again (to look at its shapes); asking for batch 0 after the last starts the next epoch, so epoch
    k is planned with the same seed on every backend."""
    import keras

    class EpochBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch, self.batches, self.next, self.last = -1, None, 0, None

        def __len__(self):
            return n_batches

        def __getitem__(self, index):
            if index == self.next - 1:
                return self.last
            if self.batches is None or (index == 0 and self.next >= n_batches):
                self.epoch += 1
                self.batches, self.next = iter(batches_of(self.epoch)), 0
            if index != self.next:
                raise IndexError(f"batches are read in order: asked for {index}, next is {self.next}")
            self.last, self.next = next(self.batches), self.next + 1
            return self.last

        def on_epoch_end(self):
            if self.next:
                self.batches, self.next = None, 0

    return EpochBatches()
