import dataclasses

import h5py
import numpy as np
import pytest

from featcache.cache import FORMAT_VERSION, CacheMeta, cache_filename, dataset_path, differences, open_cache
from featcache.cache.format import chunk_rows
from featcache.cache.write import combine, create, finish, write_rows
from featcache.errors import CacheError


def make_meta(**changes) -> CacheMeta:
    meta = CacheMeta(
        backbone="vgg16", layer="block3_pool", weights="random:seed=0", weights_source="random",
        input_shape=(32, 32, 3), feature_shape=(4, 4, 256), preprocessing="caffe", resize="PIL bilinear, uint8",
        dtype="float16", dataset_name="tiny", dataset_source="folder:/tmp/tiny", dataset_fingerprint="ab" * 32,
        limit=0, n_train=3, n_test=2, versions={"numpy": "2"}, created="2026-01-01T00:00:00+00:00")
    return dataclasses.replace(meta, **changes)


def write_cache(path, meta=None, complete=True, value=1.0, seconds=None):
    meta = meta or make_meta()
    f = create(path, meta, labels={"train": [0, 1, 2], "test": [1, 0]},
                     paths={"train": ["a", "b", "c"], "test": None}, class_names=["x", "y", "z"], batch_size=2)
    with f:
        for split, n in (("train", 3), ("test", 2)):
            write_rows(f, dataset_path(meta, split, meta.layer), 0, np.full((n, *meta.feature_shape), value))
        f["progress"][...] = (3, 2)
        if complete:
            finish(f, max_abs_activation=value, extract_seconds=seconds)
    return path


def test_meta_round_trip(tmp_path):
    meta = make_meta()
    path = write_cache(tmp_path / "c.h5", meta)
    c = open_cache(path)
    assert c.meta == meta and c.meta.key == meta.key
    assert c.class_names == ("x", "y", "z") and c.complete and c.progress == (3, 2)
    assert c.splits["train"].shapes == {"block3_pool": (3, 4, 4, 256)}
    x, y = c.load("train")
    assert x.dtype == np.float16 and (x == 1).all() and list(y) == [0, 1, 2]
    assert c.paths("train") == ["a", "b", "c"] and c.paths("test") is None


def test_key_depends_on_key_fields_only():
    base = make_meta()
    assert make_meta(created="2030-01-01", versions={"numpy": "3"}).key == base.key
    for change in (dict(layer="block2_pool"), dict(dtype="float32"), dict(limit=10), dict(weights="sha256:1"),
                   dict(input_shape=(64, 64, 3)), dict(dataset_fingerprint="cd" * 32)):
        assert make_meta(**change).key != base.key, change


def test_single_layer_keys_are_unchanged_by_format_2():
    # the keys featcache wrote before files could hold several layers: existing caches keep their names
    assert make_meta().format_version == 1
    assert make_meta().key == "8aa5a0d2e6e0361629a48703da95c6d972887e58858e906627a4cf84a4ff0976"
    assert make_meta(views=3, augment="flip", augment_seed=1).key.startswith("88e69d671896")
    from featcache.sources import RESIZE_DCT  # JPEGs decoded at a DCT scale: another key

    assert make_meta(resize=RESIZE_DCT).key != make_meta().key


def test_several_layers_in_one_file(tmp_path):
    from featcache.errors import BadInputError

    meta = make_meta(layer="block3_pool,block4_pool", feature_shape={"block3_pool": (4, 4, 256),
                                                                     "block4_pool": (2, 2, 512)})
    assert meta.format_version == 2 and meta.layers == ("block3_pool", "block4_pool")
    assert cache_filename(meta).startswith("tiny-block3_pool+block4_pool-")
    assert meta.key != make_meta().key
    with create(tmp_path / "c.h5", meta, labels={"train": [0, 1, 2], "test": [1, 0]}, paths={},
                      class_names=["x", "y", "z"], batch_size=2) as f:
        for split, n in (("train", 3), ("test", 2)):
            for layer, shape in meta.shapes.items():
                write_rows(f, f"{split}/features/{layer}", 0, np.full((n, *shape), 1 if layer == "block3_pool" else 2))
        finish(f, max_abs_activation=2.0)
    c = open_cache(tmp_path / "c.h5")
    assert c.meta == meta and c.layers == meta.layers
    assert c.splits["test"].shapes == {"block3_pool": (2, 4, 4, 256), "block4_pool": (2, 2, 2, 512)}
    assert (c.load("train", "block3_pool")[0] == 1).all() and (c.load("train", "block4_pool")[0] == 2).all()
    with pytest.raises(BadInputError, match="holds block3_pool, block4_pool; fix: name one"):
        c.load("train")
    with pytest.raises(BadInputError, match="not block5_pool"):
        c.load("train", "block5_pool")


@pytest.mark.parametrize("same_pass", [True, False])
def test_combine_copies_each_layer_and_counts_one_pass_once(tmp_path, same_pass):
    b3 = write_cache(tmp_path / "b3.h5", make_meta(), value=1.0, seconds=10.0)
    other_pass = {} if same_pass else {"created": "2026-01-02T00:00:00+00:00"}
    b4 = write_cache(tmp_path / "b4.h5", make_meta(layer="block4_pool", feature_shape=(2, 2, 512), **other_pass),
                     value=3.0, seconds=12.0)
    meta = combine([open_cache(b3), open_cache(b4)], tmp_path / "both.h5")
    c = open_cache(tmp_path / "both.h5")
    assert c.meta == meta and c.layers == ("block3_pool", "block4_pool") and c.complete
    assert (c.load("train", "block3_pool")[0] == 1).all() and (c.load("train", "block4_pool")[0] == 3).all()
    assert c.load("test", "block4_pool")[1].tolist() == [1, 0] and c.paths("train") == ["a", "b", "c"]
    assert c.max_abs_activation == 3.0
    assert c.extract_seconds == (12.0 if same_pass else 22.0)   # one pass timed in each file, or two passes


def test_differences_name_the_field():
    assert differences(make_meta(), {"layer": "block3_pool"}) == []
    assert differences(make_meta(), {"weights": "sha256:9"}) == [
        "weights: cache has 'random:seed=0', asked for 'sha256:9'"]


def test_chunks_hold_whole_rows_within_1mib():
    assert chunk_rows((4, 4, 256), "float16", 128) == 128          # 1 MiB exactly
    assert chunk_rows((8, 8, 256), "float32", 128) == 16
    assert chunk_rows((4, 4, 256), "float16", 32) == 32


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a readable HDF5 file"),
    (lambda p: p.write_bytes(p.read_bytes()[:3000]), "not a readable HDF5 file|damaged"),
    (lambda p: h5py.File(p, "w").close(), "HDF5 file but not a featcache cache"),
])
def test_foreign_or_corrupt_files_are_refused(tmp_path, damage, message):
    path = write_cache(tmp_path / "c.h5")
    damage(path)
    with pytest.raises(CacheError, match=f"c.h5.*({message}).*--force"):
        open_cache(path)


def test_future_format_is_refused(tmp_path):
    path = write_cache(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CacheError, match="cache format 3, this featcache reads up to 2; fix: upgrade"):
        open_cache(path)


def test_incomplete_cache_is_refused_unless_asked(tmp_path):
    path = write_cache(tmp_path / "c.h5", complete=False)
    with pytest.raises(CacheError, match="incomplete.*resume"):
        open_cache(path)
    assert not open_cache(path, require_complete=False).complete


def test_missing_cache_file(tmp_path):
    with pytest.raises(CacheError, match="no cache file at .*nope.h5"):
        open_cache(tmp_path / "nope.h5")
