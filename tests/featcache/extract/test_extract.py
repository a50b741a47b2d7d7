import numpy as np
import pytest

import featcache
from featcache import backbones as bb
from featcache import cache as store
from featcache.errors import BadInputError, CacheError
from featcache.extract import extract, plan
from featcache.sources import load_dataset
from tests.support import REAL_DATA, REAL_WEIGHTS, needs_shared, write_folder


def direct_features(data, layer="block3_pool", size=32, weights="random", limit=None):
    """Reference: a plain Keras VGG16 forward pass, built independently of featcache."""
    import keras

    ds = load_dataset(data, limit=limit)
    if weights == "random":
        keras.utils.set_random_seed(0)
        base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
    else:
        base = keras.applications.VGG16(weights=str(weights), include_top=False, input_shape=(size, size, 3))
    model = keras.Model(base.input, base.get_layer(layer).output)
    out = {}
    for name, split in (("train", ds.train), ("test", ds.test)):
        x = split.load(0, len(split), (size, size))
        out[name] = model.predict(keras.applications.vgg16.preprocess_input(x.astype("float32")), verbose=0)
    return out


def test_features_equal_a_direct_forward_pass(image_folder, cache_dir):
    path = extract(data=image_folder, weights="random", dtype="float32", batch_size=5, cache_dir=cache_dir,
                   progress=False)
    expected = direct_features(image_folder)
    c = featcache.open_cache(path)
    for split in ("train", "test"):
        x, y = c.load(split)
        np.testing.assert_allclose(x, expected[split], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(y, load_dataset(image_folder).__getattribute__(split).labels)
    assert c.paths("train")[0] == "train/ant/00.png"
    assert c.meta.random_weights and c.meta.feature_shape == (4, 4, 256)


def test_float16_within_rounding_and_resized_input(image_folder, cache_dir):
    path = extract(data=image_folder, weights="random", input_size=40, cache_dir=cache_dir, progress=False)
    x, _ = featcache.open_cache(path).load("test")
    expected = direct_features(image_folder, size=40)["test"]
    assert x.dtype == np.float16 and x.shape == (6, 5, 5, 256)
    np.testing.assert_allclose(x.astype(np.float32), expected, rtol=1e-3, atol=1e-3)


def test_every_source_extracts(npz_file, cifar_py, cache_dir):
    for data in (npz_file, cifar_py):
        c = featcache.open_cache(extract(data=data, weights="random", layer="block1_pool", cache_dir=cache_dir,
                                         progress=False))
        assert c.splits["train"].shapes["block1_pool"][1:] == (16, 16, 64) and c.complete


def test_second_run_is_a_cache_hit_and_force_recomputes(image_folder, cache_dir, monkeypatch):
    path = extract(data=image_folder, weights="random", cache_dir=cache_dir, progress=False)
    stamp = path.stat().st_mtime_ns
    with monkeypatch.context() as m:
        m.setattr(bb, "build", lambda **kw: pytest.fail("a cache hit must not build the backbone"))
        assert extract(data=image_folder, weights="random", cache_dir=cache_dir, progress=False) == path
    assert path.stat().st_mtime_ns == stamp
    assert extract(data=image_folder, weights="random", cache_dir=cache_dir, force=True, progress=False) == path
    assert path.stat().st_mtime_ns != stamp
    assert sorted(p.name for p in cache_dir.iterdir()) == [path.name, path.name + ".lock"]


def count_calls(monkeypatch, stop_after=None):
    calls = []
    original = bb.Backbone.forward_stored

    def counted(self, images, dtype):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(len(images))
        return original(self, images, dtype)

    monkeypatch.setattr(bb.Backbone, "forward_stored", counted)
    return calls


def test_interrupted_run_resumes_without_recomputing(image_folder, tmp_path, monkeypatch):
    reference = extract(data=image_folder, weights="random", batch_size=4, cache_dir=tmp_path / "a",
                        progress=False)
    with monkeypatch.context() as m:
        count_calls(m, stop_after=4)          # train has 12 rows: 3 batches, then 1 of test
        with pytest.raises(KeyboardInterrupt):
            extract(data=image_folder, weights="random", batch_size=4, cache_dir=tmp_path / "b", progress=False)
    partial = next((tmp_path / "b").glob("*.partial"))
    assert featcache.open_cache(partial, require_complete=False).progress == (12, 4)
    with monkeypatch.context() as m:
        calls = count_calls(m)
        resumed = extract(data=image_folder, weights="random", batch_size=4, cache_dir=tmp_path / "b",
                          progress=False)
    assert calls == [2], "only the last test batch may be computed again"
    assert not partial.exists() and resumed.name == reference.name
    a, b = featcache.open_cache(reference), featcache.open_cache(resumed)
    assert a.meta.key == b.meta.key and a.max_abs_activation == b.max_abs_activation
    for split in ("train", "test"):
        for x, y in zip(a.load(split), b.load(split)):
            np.testing.assert_array_equal(x, y)


def test_float16_overflow_is_refused_not_stored_as_inf(image_folder, cache_dir, monkeypatch):
    # inputs scaled 1e4 times: the (bias-free, random) convolutions carry activations past float16's 65504
    monkeypatch.setattr(bb.Backbone, "preprocess", lambda self, x: x.astype("float32") * 1e4)
    with pytest.raises(BadInputError, match=r"activations reach \d\.\d+e\+0[5-9], beyond float16.*--dtype float32"):
        extract(data=image_folder, weights="random", cache_dir=cache_dir, progress=False)
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []
    path = extract(data=image_folder, weights="random", dtype="float32", cache_dir=cache_dir, progress=False)
    cache = featcache.open_cache(path)
    assert cache.max_abs_activation > 65504
    assert cache.max_abs_activation == max(float(np.abs(x).max()) for s in ("train", "test") for x in cache.load(s))


def test_foreign_file_at_the_cache_name_is_not_overwritten(image_folder, cache_dir):
    _, meta = plan(data=image_folder, weights="random")
    cache_dir.mkdir()
    target = cache_dir / store.cache_filename(meta)
    target.write_bytes(b"precious")
    with pytest.raises(CacheError, match="not a readable HDF5 file.*--force"):
        extract(data=image_folder, weights="random", cache_dir=cache_dir, progress=False)
    assert target.read_bytes() == b"precious"


def test_changed_inputs_never_reuse_a_cache(image_folder, tmp_path):
    def key(**kw):
        opts = dict(data=image_folder, weights="random")
        return plan(**{**opts, **kw})[1].key

    base = key()
    variants = [key(layer="block2_pool"), key(input_size=48), key(dtype="float32"), key(limit=3),
                key(weights=str(REAL_WEIGHTS)) if REAL_WEIGHTS.exists() else "w", key(seed=1), key(views=2),
                key(views=2, augment="flip"), key(views=2, augment_seed=1), key(views=3)]
    assert key(augment="flip") == base, "augmentation options without views change nothing"
    other = write_folder(tmp_path / "other", seed=0)
    from PIL import Image
    img = other / "train" / "ant" / "00.png"
    Image.fromarray(255 - np.asarray(Image.open(img))).save(img)
    variants.append(key(data=other))
    assert base not in variants and len(set(variants)) == len(variants)


def test_mixed_sizes_need_input_size(tmp_path, cache_dir):
    from PIL import Image

    root = write_folder(tmp_path / "mixed", n_train=2, n_test=1)
    Image.new("RGB", (48, 40)).save(root / "train" / "bee" / "big.png")
    with pytest.raises(BadInputError, match=r"big.png is 48x40.*--input-size"):
        extract(data=root, weights="random", cache_dir=cache_dir, progress=False)
    path = extract(data=root, weights="random", input_size=32, cache_dir=cache_dir, progress=False)
    assert featcache.open_cache(path).splits["train"].n == 7


def test_small_images_are_upsampled_to_32(tmp_path, cache_dir):
    root = write_folder(tmp_path / "small", n_train=1, n_test=1, size=28)
    c = featcache.open_cache(extract(data=root, weights="random", cache_dir=cache_dir, progress=False))
    assert c.meta.input_shape == (32, 32, 3)


def test_bad_batch_size(image_folder, cache_dir):
    with pytest.raises(BadInputError, match="--batch-size must be at least 1"):
        extract(data=image_folder, weights="random", batch_size=0, cache_dir=cache_dir)


@pytest.mark.slow
@needs_shared
def test_real_images_and_weights_match_keras(cache_dir):
    """Integration: 300 real CIFAR-10 images (150 per split) through the real ImageNet weights."""
    path = extract(data=REAL_DATA, weights=str(REAL_WEIGHTS), limit=150, cache_dir=cache_dir, progress=False)
    c = featcache.open_cache(path)
    assert c.meta.weights == "sha256:5ffcc3e2b95af5308e66dbecb80d746dc9161e354eea851fbeab09a6fe1287d2"
    assert c.class_names[:3] == ("airplane", "automobile", "bird")
    expected = direct_features(REAL_DATA, weights=REAL_WEIGHTS, limit=150)
    for split in ("train", "test"):
        x, _ = c.load(split)
        assert np.isfinite(x).all()
        np.testing.assert_allclose(x.astype(np.float32), expected[split], rtol=2e-3, atol=0.05)
    assert 1000 < c.max_abs_activation < 65504


@needs_shared
def test_golden_keys_of_vgg16_caches_are_unchanged():
    """Caches written before the backbone registry and ExtractSpec (pinned from that code) stay cache hits."""
    ds, meta = plan(data=str(REAL_DATA), weights=str(REAL_WEIGHTS), limit=300)
    assert meta.key == "031f114c90d45bad13eb32db8e6daaf6c296469e13bc8b32f9aaa94aa0991291"
    ds, meta = plan(data=ds, weights=str(REAL_WEIGHTS), limit=300, layer="block3_pool,block4_pool", views=2)
    assert meta.key == "426e13e79ee1bf5abca9e20f6c780def40e4654b415074421c9c582bfdd643c4"
    assert store.cache_filename(meta).startswith("cifar10-jpeg-block3_pool+block4_pool-426e13e79ee1")


def test_python_api_honours_the_cache_dir_variable(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(tmp_path / "from-env"))
    path = extract(data=str(image_folder), weights="random", limit=2, progress=False)
    assert path.parent == tmp_path / "from-env"
    assert extract(data=str(image_folder), weights="random", limit=2, progress=False,
                   cache_dir=tmp_path / "given").parent == tmp_path / "given"


def test_every_key_option_is_compared_with_a_given_cache(image_folder, cache_dir):
    from click.testing import CliRunner

    from featcache.cli import main

    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])   # noqa: E731
    path = run("extract", "--data", image_folder, "--weights", "random", "--no-progress").stdout.strip()
    for args, field in [(["--backbone", "resnet50", "--layer", "conv4_block6_out"], "backbone"),
                        (["--views", "2"], "views"), (["--dtype", "float32"], "dtype"), (["--limit", "2"], "limit"),
                        (["--input-size", "40"], "input_shape"), (["--weights", "random", "--limit", "3"], "limit")]:
        r = run("train-head", "--cache", path, *args, "--epochs", "1", "--no-progress")
        assert r.exit_code == 2 and f"{field}: cache has" in r.stderr, (args, r.output)


def test_the_key_options_declare_every_field_of_the_cache_key():
    from featcache.cache.format import KEY_FIELDS, OPTIONAL_KEY_FIELDS
    from featcache.extract import planner

    declared = set(planner.KEY_FIELDS) | {"format_version"}   # the format version follows from the layers
    assert declared == set(KEY_FIELDS) | set(OPTIONAL_KEY_FIELDS)


@pytest.mark.parametrize("options", [
    dict(input_size=32), dict(input_size=40), dict(dtype="float32"), dict(dtype="float16"), dict(limit=2),
    dict(views=2), dict(views=1), dict(precision="float32"), dict(layer="block2_pool"), dict(layer="block3_pool"),
    dict(weights="random"), dict(weights="random", seed=1)])
def test_a_given_cache_is_refused_exactly_when_the_options_lead_to_another_cache(image_folder, cache_dir, options):
    """check_cache and the cache key agree: one declaration (spec.KEY) feeds both. `--input-size 32` on a cache of
    32 px files made without it is another cache (its JPEGs would be DCT-scaled: another resize method), which the
    check once let through."""
    from featcache.extract import check_cache

    path = extract(data=str(image_folder), weights="random", progress=False)
    base = dict(data=str(image_folder), weights="random")
    other_cache = plan(**{**base, **options})[1].key != store.open_cache(path).meta.key
    if other_cache:
        with pytest.raises(CacheError, match="does not match what was asked.*fix: .*drop --"):
            check_cache(path, **options)
    else:
        check_cache(path, **options)


def test_units_cover_every_row_once_and_resume_from_progress():
    from featcache.extract import Unit, units

    class Meta:   # units() reads the row counts only
        n_train, n_test = 10, 3

    cut = units(Meta, shard_rows=4)
    assert cut == [Unit("train", 0, 4), Unit("train", 4, 8), Unit("train", 8, 10), Unit("test", 0, 3)]
    assert [u.done({"train": 8, "test": 0}) for u in cut] == [True, True, False, False]


def test_precision_is_part_of_the_key_and_close_to_float32(image_folder, cache_dir):
    import featcache.backbones.precision as registry

    f32 = extract(data=str(image_folder), weights="random", dtype="float32", progress=False)
    bf16 = extract(data=str(image_folder), weights="random", dtype="float32", precision="bfloat16", progress=False)
    assert f32 != bf16 and featcache.open_cache(bf16).meta.precision == "bfloat16"
    assert featcache.open_cache(f32).meta.key_fields().get("precision") is None   # float32 keys as before
    a, b = featcache.open_cache(f32).load("train")[0], featcache.open_cache(bf16).load("train")[0]
    assert 0 < np.abs(a - b).max() <= 2e-2 * np.abs(a).max()   # bfloat16 keeps 8 bits of mantissa
    with pytest.raises(featcache.BadInputError, match="--precision must be one of float32, bfloat16, float16, auto"):
        extract(data=str(image_folder), weights="random", precision="fp8", progress=False)
    assert registry.resolve_precision("float16") == "float16"


@pytest.mark.parametrize("flags, gpus, chosen", [({"avx2", "avx512f"}, [], "float32"),
                                                 ({"avx512f", "avx512_bf16"}, [], "bfloat16"),
                                                 ({"amx_bf16"}, [], "bfloat16"),
                                                 (set(), [(7, 0)], "float16"), (set(), [(9, 0)], "bfloat16"),
                                                 ({"avx512_bf16"}, [(6, 1)], "float32")])
def test_auto_precision_follows_the_hardware(monkeypatch, flags, gpus, chosen):
    import featcache.backbones.precision as registry

    monkeypatch.setattr(registry, "cpu_flags", lambda: flags)
    monkeypatch.setattr(registry, "gpu_compute_capabilities", lambda: gpus)
    assert registry.resolve_precision("auto") == chosen


def test_decode_workers_keep_row_order(image_folder, tmp_path):
    one = extract(data=str(image_folder), weights="random", decode_workers=1, batch_size=2,
                  cache_dir=tmp_path / "a", progress=False)
    three = extract(data=str(image_folder), weights="random", decode_workers=3, batch_size=2,
                    cache_dir=tmp_path / "b", progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(featcache.open_cache(one).load(split)[0], featcache.open_cache(three).load(split)[0])


def test_the_cache_records_where_the_extraction_loop_waited(image_folder, cache_dir):
    """Timers around each stage (issue 33: find where the loop waits by measuring, not guessing)."""
    import json

    from click.testing import CliRunner

    from featcache.cli import main

    path = extract(data=image_folder, weights="random", batch_size=4, progress=False)
    stages = featcache.open_cache(path).extract_stages
    assert set(stages) == {"seconds", "decode_wait", "model", "write_wait"}
    assert all(v >= 0 for v in stages.values()) and stages["model"] > 0
    assert stages["decode_wait"] + stages["model"] + stages["write_wait"] <= stages["seconds"] + 1e-3
    info = json.loads(CliRunner().invoke(main, ["info", "--json", str(path)]).output)
    assert info["extract_stages"] == stages
