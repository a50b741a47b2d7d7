"""One batch planner for every feed: which (row, view) pairs each batch of an epoch holds.

Rows held in RAM and rows streamed from the cache (both handed to Keras by `heads.feed`) are
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
