"""Beyond one layer and one view: several layers in one pass, cached augmentation views, their heads."""

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache import augment as aug
from featcache import backbones as bb
from featcache.cli import main
from featcache.errors import BadInputError
from featcache.extract import extract
from heads import train as ht
from heads.builders import MODELS
from heads.feed import in_ram_dataset
from tests.featcache.extract.test_extract import count_calls


@pytest.mark.slow
def test_several_layers_in_one_pass_and_one_file_equal_separate_extractions(image_folder, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        calls = count_calls(m)
        both = extract(data=image_folder, weights="random", layer="block3_pool,block4_pool", batch_size=6,
                       cache_dir=tmp_path / "both", progress=False)
    assert len(calls) == 3, "one forward pass per batch for both layers"
    assert [p.name for p in (tmp_path / "both").glob("*.h5")] == [both.name]
    c = featcache.open_cache(both)
    assert c.layers == ("block3_pool", "block4_pool") and "block3_pool+block4_pool" in both.name
    for layer in c.layers:
        alone = featcache.open_cache(extract(data=image_folder, weights="random", layer=layer,
                                             cache_dir=tmp_path / layer, progress=False))
        for split in ("train", "test"):
            np.testing.assert_allclose(c.load(split, layer)[0].astype(np.float32),
                                       alone.load(split)[0].astype(np.float32), rtol=1e-2, atol=1e-2)


def test_single_layer_caches_are_combined_without_a_forward_pass(image_folder, cache_dir, monkeypatch):
    singles = [featcache.open_cache(extract(data=image_folder, weights="random", layer=layer, views=2,
                                            cache_dir=cache_dir, progress=False))
               for layer in ("block3_pool", "block4_pool")]
    monkeypatch.setattr(bb, "build", lambda **kw: pytest.fail("no model may be built"))
    path = extract(data=image_folder, weights="random", layer="block3_pool,block4_pool", views=2,
                   cache_dir=cache_dir, progress=False)
    c = featcache.open_cache(path)
    assert c.meta.key == extract_plan_key(image_folder, "block3_pool,block4_pool", views=2)
    for single in singles:
        layer = single.meta.layer
        for split in ("train", "test"):
            np.testing.assert_array_equal(c.load(split, layer)[0], single.load(split)[0])
        np.testing.assert_array_equal(c.load_views(layer), single.load_views())
    assert all(s.path.exists() for s in singles), "the single-layer files are left in place"


def extract_plan_key(data, layer, **options) -> str:
    from featcache.extract import plan

    return plan(data=data, weights="random", layer=layer, **options)[1].key


def test_views_are_seeded_augmentations_of_the_training_split_only(image_folder, cache_dir):
    plain = featcache.open_cache(extract(data=image_folder, weights="random", cache_dir=cache_dir, progress=False))
    path = extract(data=image_folder, weights="random", views=3, augment="flip,crop", augment_seed=7,
                   cache_dir=cache_dir, progress=False)
    c = featcache.open_cache(path)
    assert c.meta.views == 3 and c.meta.augment == "flip,crop" and c.meta.augment_seed == 7
    views = c.load_views()
    assert views.shape == (12, 2, 4, 4, 256) and plain.load_views() is None
    for split in ("train", "test"):
        np.testing.assert_array_equal(c.load(split)[0], plain.load(split)[0])
    ds = featcache.load_dataset(image_folder)
    images = ds.train.load(0, 12, (32, 32))
    expected = bb.build(weights="random")(aug.views(images, range(12), 2, "flip,crop", 7))[0]
    np.testing.assert_allclose(views[:, 1].astype(np.float32), expected, rtol=1e-3, atol=1e-2)
    assert not np.array_equal(views[:, 0], views[:, 1])


def test_augmentations_are_deterministic_per_row_and_view():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a = aug.views(images, range(4), 1, "flip,crop", 0)
    np.testing.assert_array_equal(a, aug.views(images, range(4), 1, "flip,crop", 0))
    assert not np.array_equal(a, aug.views(images, range(4), 2, "flip,crop", 0))
    assert not np.array_equal(a, aug.views(images, range(4), 1, "flip,crop", 1))
    flipped = aug.views(images, range(4), 1, "flip", 0)
    for img, out in zip(images, flipped):
        assert np.array_equal(out, img) or np.array_equal(out, img[:, ::-1])
    with pytest.raises(BadInputError, match="--augment must name some of flip, crop"):
        aug.parse("flip,rotate")


def test_cache_that_cannot_fit_is_refused_before_any_work(image_folder, cache_dir, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    monkeypatch.setattr(bb, "build", lambda **kw: pytest.fail("no model may be built"))
    with caplog.at_level("INFO"), pytest.raises(BadInputError, match=r"needs .* MB more .* but .* has 0.0 MB free"):
        extract(data=image_folder, weights="random", views=2, cache_dir=cache_dir, progress=False)
    assert "expected cache size: 0.2 MB" in caplog.text
    assert not list(cache_dir.glob("*.h5")) + list(cache_dir.glob("*.partial"))


def test_batches_give_validation_the_original_and_training_every_view():
    import tensorflow as tf

    n, k = 40, 3
    x = np.zeros((n, k, 2), np.float16)
    x[:, :, 0] = np.arange(n)[:, None]            # row number
    x[:, :, 1] = np.arange(k)[None, :]            # view number
    xt, yt = tf.constant(x), tf.constant(np.arange(n))
    idx = np.arange(0, n, 2)
    val = np.concatenate([b[0].numpy() for b in in_ram_dataset(xt, yt, idx, 7, shuffle=False, n_views=k)])
    assert (val[:, 1] == 0).all() and sorted(val[:, 0]) == list(idx)
    every = np.concatenate([b[0].numpy() for b in in_ram_dataset(xt, yt, idx, 7, shuffle=True, n_views=k,
                                                              all_views=True)])
    assert sorted(map(tuple, every.tolist())) == sorted((float(i), float(v)) for i in idx for v in range(k))
    sampled = in_ram_dataset(xt, yt, idx, 7, shuffle=True, n_views=k)
    epochs = [np.concatenate([b[0].numpy() for b in sampled]) for _ in range(2)]
    for e in epochs:
        assert sorted(e[:, 0]) == list(idx) and set(e[:, 1]) <= {0, 1, 2}
    assert set(epochs[0][:, 1]) | set(epochs[1][:, 1]) == {0, 1, 2}
    labels = np.concatenate([b[1].numpy() for b in sampled])
    assert sorted(labels) == list(idx)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sample", "all", "original"])
def test_heads_train_on_views(image_folder, cache_dir, mode):
    path = extract(data=image_folder, weights="random", views=3, cache_dir=cache_dir, progress=False)
    for head in ("dense", "conv"):
        r = ht.train_head(path, model=head, units=(8,), epochs=2, views_mode=mode, runs_dir=None, progress=False)
        assert r.metrics["n_views"] == (1 if mode == "original" else 3) and r.metrics["n_test"] == 6


@pytest.mark.slow
def test_concatenated_layers(image_folder, cache_dir, tmp_path):
    path = extract(data=image_folder, weights="random", layer="block3_pool,block4_pool", cache_dir=cache_dir,
                   progress=False)
    data = ht.data_from_caches([path], "gap")
    assert data.x_train.shape == (12, 256 + 512) and data.x_test.shape == (6, 768)
    assert [part.layer for part in data.provenance.layers] == ["block3_pool", "block4_pool"]
    r = ht.train_head(path, units=(8,), epochs=2, runs_dir=None, progress=False)
    assert r.model.input_shape == (None, 768)
    r = ht.train_head(path, layer="block4_pool", units=(8,), epochs=1, runs_dir=None, progress=False)
    assert r.model.input_shape == (None, 2, 2, 512)
    with pytest.raises(BadInputError, match="needs --pooling gap or max"):
        ht.data_from_caches([path], "flatten")
    with pytest.raises(BadInputError, match="no cache given holds block5_pool"):
        ht.data_from_caches([path], "gap", "block5_pool")
    other = extract(data=image_folder, weights="random", layer="block5_pool", limit=5, cache_dir=cache_dir,
                    progress=False)
    with pytest.raises(BadInputError, match="hold different images"):
        ht.data_from_caches([path, other], "gap")
    again = extract(data=image_folder, weights="random", layer="block4_pool", cache_dir=cache_dir, progress=False)
    with pytest.raises(BadInputError, match="block4_pool is in more than one cache"):
        ht.data_from_caches([path, again], "gap")


def test_conv_head_shape():
    model = MODELS["conv"].build((4, 4, 256), 10, filters=32, units=(64,), dropout=0.1)
    assert [type(x).__name__ for x in model.layers] == ["InputLayer", "Normalization", "BatchNormalization", "Conv2D",
                                                        "Flatten", "Dropout", "Dense", "Dropout", "Dense"]
    assert model.count_params() == (2 * 256 + 1) + 4 * 256 + (256 * 32 + 32) + (4 * 4 * 32 * 64 + 64) + (64 * 10 + 10)


@pytest.mark.slow
def test_cli_several_layers_and_views(image_folder, cache_dir, tmp_path):
    r = CliRunner().invoke(main, ["extract", "--data", str(image_folder), "--weights", "random", "--layer",
                                  "block3_pool,block4_pool", "--views", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    path = r.stdout.strip()
    assert "block3_pool+block4_pool" in path and "expected cache size" in r.stderr
    runs = ["--runs-dir", str(tmp_path / "runs"), "--no-progress", "--epochs", "1"]
    r = CliRunner().invoke(main, ["train-head", "--cache", path, "--views-mode", "all", *runs])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train-head", "--cache", path, "--layer", "block4_pool", "--pooling", "flatten",
                                  *runs])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train-head", "--cache", path, "--layer", "block5_pool", *runs])
    assert r.exit_code == 2 and "block5_pool" in r.stderr and path in r.stderr
    r = CliRunner().invoke(main, ["extract", "--data", str(image_folder), "--layer", "block3_pool,block3_pool"])
    assert r.exit_code == 2 and "distinct" in r.stderr
