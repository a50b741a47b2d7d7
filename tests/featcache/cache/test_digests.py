"""Digests recorded as featcache writes, checked before a file takes its name and when it is read back; a cache
holds only its own data. Each test fails on the code before digests (it published or read what it did not write)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.cache import pooled as pooled_cache
from featcache.cache.read import verify_content
from featcache.cli import main
from featcache.errors import CacheError
from featcache.extract import extract

from tests.support import ROOT


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def cache(image_folder, cache_dir) -> Path:
    return extract(data=image_folder, weights="random", batch_size=4, progress=False)


def edit(path, name, change):
    """Change dataset `name` of the cache at `path` in place, as a tool other than featcache would."""
    with h5py.File(path, "r+") as f:
        x = f[name][...]
        f[name][...] = change(x)


def test_a_write_that_never_reached_the_disk_is_not_published(image_folder, cache_dir, monkeypatch):
    real = h5py.Dataset.__setitem__
    writes = []

    def lost(self, key, value):   # the fourth features write is lost, as on a device that drops it silently
        if self.name == "/train/features":
            writes.append(key)
            if len(writes) == 4:
                return None
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", lost)
    with pytest.raises(CacheError, match="differ from what was written"):
        extract(data=image_folder, weights="random", batch_size=1, progress=False)
    assert not list(cache_dir.glob("*.h5")), "nothing may take the cache's name"


@pytest.fixture
def full_disk(tmp_path):
    from tests.support import small_disk

    yield from small_disk(tmp_path / "full", "2m")


@pytest.mark.slow
def test_extracting_onto_a_disk_that_fills_up_is_one_line_and_no_cache(tmp_path, full_disk):
    from tests.support import write_folder

    data = write_folder(tmp_path / "d", n_train=30, n_test=6)   # 108 rows of 8 kB features: 0.9 MB
    (full_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(full_disk).free - (960 << 10)))
    env = {**os.environ, "FEATCACHE_CACHE_DIR": str(full_disk), "TF_CPP_MIN_LOG_LEVEL": "2"}
    p = subprocess.run([sys.executable, "-m", "featcache.cli", "extract", "--data", str(data), "--weights", "random",
                        "--no-progress"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])   # was SIGSEGV (139) after HDF5's failed write
    assert "Traceback" not in p.stderr and "error:" in p.stderr and "free" in p.stderr, p.stderr[-2000:]
    assert not list(full_disk.glob("*.h5")), "a cache that did not fit must not take its name"


def test_a_disk_that_fills_during_the_run_stops_it_before_hdf5_fails(image_folder, cache_dir, monkeypatch):
    from featcache.cache import write

    real = write.shutil.disk_usage
    checks = []

    def filling(path):   # plenty of room for the check before the run and the first batch or two, then none
        checks.append(path)
        usage = real(path)
        return usage._replace(free=usage.free if len(checks) <= 2 else 4096)

    monkeypatch.setattr(write.shutil, "disk_usage", filling)
    r = run("extract", "--data", image_folder, "--weights", "random", "--batch-size", "4", "--no-progress")
    assert r.exit_code == 2 and "is full" in r.output and "rerun the same command to resume" in r.output, r.output
    assert not list(cache_dir.glob("*.h5"))
    partial = next(cache_dir.glob("*.partial"))
    assert featcache.open_cache(partial, require_complete=False).progress[0] in (4, 8)   # kept, to resume
    monkeypatch.setattr(write.shutil, "disk_usage", real)
    assert run("extract", "--data", image_folder, "--weights", "random", "--batch-size", "4",
               "--no-progress").exit_code == 0


@pytest.mark.parametrize("damage", ["flip", "inf", "nan"])
def test_changed_features_of_one_file_are_found_on_load_and_by_verify(cache, damage):
    def change(x):
        x = x.copy()
        if damage == "flip":   # exponent bits of one value in the middle
            x.view(np.uint16).reshape(-1)[x.size // 2] ^= 0x3C00
        else:
            x.reshape(-1)[x.size // 2] = np.inf if damage == "inf" else np.nan
        return x

    edit(cache, "train/features", change)
    c = featcache.open_cache(cache)
    with pytest.raises(CacheError, match="differs from what was written|not finite"):
        c.load("train")
    with pytest.raises(CacheError, match="differs from what was written"):
        verify_content(c)
    r = run("info", "--verify", cache)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output


def test_verify_reads_a_sound_file_whole(cache):
    r = run("info", "--verify", cache)
    assert r.exit_code == 0 and "every block matches the digests" in r.output, r.output


@pytest.mark.parametrize("name, change", [
    ("class_names", lambda x: x[::-1]),
    ("train/labels", lambda x: np.where(np.arange(len(x)) == 0, (x[0] + 1) % 3, x)),
    ("train/paths", lambda x: x[::-1]),
])
def test_edited_records_are_refused_on_open(cache, name, change):
    edit(cache, name, change)
    with pytest.raises(CacheError, match="was changed after it was written"):
        featcache.open_cache(cache)


@pytest.mark.parametrize("label", [9, -1])
def test_labels_that_are_not_class_numbers_are_refused(cache, label):
    with h5py.File(cache, "r+") as f:   # digests gone as well: the label check stands on its own
        del f["digests"]
        f["train/labels"][0] = label
    with pytest.raises(CacheError, match="expected class numbers 0..2"):
        featcache.open_cache(cache)


def test_features_stored_in_another_file_are_refused(cache, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(range(256)) * 400)
    with h5py.File(cache, "r+") as f:
        shape, dtype = f["train/features"].shape, f["train/features"].dtype
        del f["train/features"]
        f.create_dataset("train/features", shape=shape, dtype=dtype, external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    with pytest.raises(CacheError, match="reads data from outside itself.*secret"):
        featcache.open_cache(cache)


def test_an_external_link_in_a_cache_is_refused(cache, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copy(cache, other)
    with h5py.File(cache, "r+") as f:
        del f["test/features"]
        f["test/features"] = h5py.ExternalLink(str(other), "/test/features")
    with pytest.raises(CacheError, match="ExternalLink"):
        featcache.open_cache(cache)


def test_a_pooled_file_with_its_rows_reordered_is_pooled_again(cache, caplog):
    c = featcache.open_cache(cache)
    first = pooled_cache.pooled(c, None, "gap")
    edit(pooled_cache.pooled_path(c, c.layers[0], "gap"), "train/features", lambda x: x[::-1])
    again = pooled_cache.pooled(c, None, "gap")
    np.testing.assert_array_equal(again["train"], first["train"])
    assert "pooling again" in caplog.text


@pytest.mark.parametrize("reader", ["stream", "tf.data", "pooled"])
def test_rows_read_in_pieces_are_checked_against_the_digests(cache, reader):
    """Reads of blocks of rows (a streamed head, the tf.data adapter, pooling) checked only that the values were
    finite: train rows put in another order were trained on, or pooled into a file whose digests vouched for them."""
    edit(cache, "train/features", lambda x: x[::-1])   # every value finite, every record's rows changed
    c = featcache.open_cache(cache)   # the cheap checks on open see nothing: sizes and records are intact
    if reader == "stream":
        r = run("train-head", "--cache", cache, "--stream", "--pooling", "flatten", "--head", "dense", "--epochs",
                "1", "--units", "8", "--no-progress", "--runs-dir", cache.parent / "runs")
        assert r.exit_code == 2 and "differs from what was written" in r.output, r.output
        assert "Traceback" not in r.output and not list((cache.parent / "runs").glob("*/model.keras"))
    elif reader == "tf.data":
        with pytest.raises(Exception, match="differs from what was written"):
            next(iter(c.as_tf_dataset("train")))
    else:
        with pytest.raises(CacheError, match="differs from what was written"):
            pooled_cache.pooled(c, None, "gap")


def test_a_streamed_read_hashes_each_record_once(cache, monkeypatch):
    from featcache.cache import digests
    from heads.feed import CachedRows

    hashed = []
    real = digests.digest
    monkeypatch.setattr(digests, "digest", lambda rows: hashed.append(len(rows)) or real(rows))
    rows = CachedRows(cache, "train/features")
    first = rows[0:len(rows)]
    np.testing.assert_array_equal(rows[np.arange(len(rows))[::-1]], first[::-1])   # a second pass: no hashing
    with h5py.File(cache) as f:
        assert sum(hashed) == len(rows) == f["train/features"].shape[0]
        assert len(hashed) == len(f["digests/train/features"])
