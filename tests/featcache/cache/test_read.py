"""Reading caches without loading them whole: array views and block-shuffled tf.data streams."""

import numpy as np
import pytest

import featcache
from featcache.cache.read import block_order
from featcache.extract import extract


@pytest.fixture
def cache(image_folder, cache_dir):
    return featcache.open_cache(extract(data=str(image_folder), weights="random", progress=False))


def test_array_view_reads_lazily_what_load_reads(cache):
    x, _ = cache.load("train")
    with cache.array("train") as view:
        assert view.shape == x.shape and np.array_equal(view[3:7], x[3:7])
        with pytest.raises((OSError, ValueError, TypeError)):
            view[0] = 0   # read-only


def test_block_order_is_seeded_and_changes_every_epoch():
    a, b = block_order(1000, 64, seed=1, epoch=0), block_order(1000, 64, seed=1, epoch=1)
    assert sorted(a) == sorted(b) and a != b and a == block_order(1000, 64, seed=1, epoch=0)
    assert sum(e - s for s, e in a) == 1000


def test_as_tf_dataset_streams_every_row_once_per_epoch(cache):
    x, y = cache.load("train")
    ds = cache.as_tf_dataset("train", batch_size=5, shuffle=True, seed=3, block_rows=4, shuffle_blocks=2)
    epochs = []
    for _ in range(2):
        rows = [(xb.numpy(), yb.numpy()) for xb, yb in ds]
        xs, ys = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
        assert xs.dtype == np.float32 and xs.shape == (12, 4, 4, 256) and len(rows) == 3
        assert ds.cardinality().numpy() == 3   # known: model.fit warned that it "ran out of data" every epoch
        assert sorted(ys) == sorted(y)
        keys = {row.tobytes(): label for row, label in zip(xs, ys)}   # every row once, with its own label
        assert len(keys) == 12 and all(keys[r.astype(np.float32).tobytes()] == l for r, l in zip(x, y))
        epochs.append(ys)
    assert not np.array_equal(epochs[0], epochs[1])   # another order each epoch
    ordered = np.concatenate([xb.numpy() for xb, _ in cache.as_tf_dataset("test", batch_size=4)])
    np.testing.assert_array_equal(ordered, cache.load("test")[0].astype(np.float32))
    pooled = next(iter(cache.as_tf_dataset("test", batch_size=6, pooling="gap")))[0].numpy()
    np.testing.assert_allclose(pooled, cache.load("test")[0].astype(np.float32).mean(axis=(1, 2)), rtol=1e-6)


def test_as_tf_dataset_runs_without_the_autotuners_stall(cache):
    """tf.data's autotuner stalled the start of an epoch for seconds with the CPUs idle (steady)."""
    assert cache.as_tf_dataset("train", batch_size=5).options().autotune.enabled is False
