"""`--head finetune`: the backbone's layers above a cached layer, trained from the cache's weights with a head."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import backbones
from featcache.backbones.cut import default_tune_to, upper
from featcache.cli import main
from featcache.errors import BadInputError
from featcache.extract import extract
from heads import inference
from heads.config import TrainConfig
from heads.train import train_head
from tests.support import CLASSES

QUICK = dict(units=(8,), epochs=4, warmup_epochs=1, progress=False)


def colour_folder(root: Path, n_train: int = 12, n_test: int = 4, size: int = 32) -> Path:
    """ROOT/{train,test}/<class>/NN.png: each class a colour of its own under noise, so a head can learn it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.normal(60, 25, (size, size, 3))
                pixels[..., k] += 120
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def block2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    folder = colour_folder(tmp / "colours")
    cache = extract(data=folder, weights="random", layer="block2_pool", cache_dir=tmp / "cache", batch_size=8,
                    progress=False)
    return folder, cache, tmp


def _tuned_kernels(model):
    return [np.array(w) for w in model.layers[1].weights]


@pytest.mark.slow
def test_the_tuned_layers_start_as_the_backbone_and_only_the_second_stage_moves_them(block2, monkeypatch):
    import keras

    from heads import fit

    _, cache, tmp = block2
    seen = {}
    real = fit._fit_stages

    def watched(model, config, train):   # the tuned layers' weights at the start and after each stage
        seen["start"] = _tuned_kernels(model)

        def stage(c):
            out = train(c)
            seen.setdefault("stages", []).append(_tuned_kernels(model))
            return out
        return real(model, config, stage)

    monkeypatch.setattr(fit, "_fit_stages", watched)
    result = train_head(cache, model="finetune", runs_dir=tmp / "runs", **QUICK)
    keras.utils.set_random_seed(0)   # what featcache.backbones builds for weights="random", seed 0
    direct = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    want = [np.array(w) for name in ("block3_conv1", "block3_conv2", "block3_conv3")
            for w in direct.get_layer(name).weights]
    for got, expected in zip(seen["start"], want, strict=True):
        np.testing.assert_array_equal(got, expected)
    warm, tuned = seen["stages"]
    assert all(np.array_equal(a, b) for a, b in zip(seen["start"], warm))   # frozen during the warm-up
    assert not all(np.array_equal(a, b) for a, b in zip(warm, tuned))      # trained after it
    m = result.metrics
    assert m["epochs_run"] >= 2 and m["test_accuracy"] > 1 / len(CLASSES)   # a colour per class: beats chance
    assert result.config.tune_to is None and "block3_conv1" in {
        layer.name for layer in keras.saving.load_model(result.run_dir / "model.keras").layers[1].layers}


@pytest.mark.slow
def test_a_cosine_schedule_decays_the_fine_tuning_rate_after_a_constant_warm_up(block2):
    _, cache, tmp = block2
    result = train_head(cache, model="finetune", runs_dir=tmp / "runs-cosine", lr_schedule="cosine", **QUICK)
    rates = result.history["learning_rate"]   # 1 warm-up epoch at --lr, then 3 from --finetune-lr down to 0
    assert rates == pytest.approx([1e-3, *(1e-4 * (1 + np.cos(np.pi * k / 3)) / 2 for k in (1, 2, 3))], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])   # each forced: `auto` differs between CPUs
def test_map_shift_moves_the_maps_by_whole_cells_in_training_only(block2, precision):
    import keras

    from heads.inference import compute_dtypes

    _, cache, tmp = block2
    run = train_head(cache, model="finetune", runs_dir=tmp / f"runs-shift-{precision}", map_shift=1,
                     train_precision=precision, **QUICK).run_dir
    model = keras.saving.load_model(run / "model.keras")
    assert precision in compute_dtypes(model) and "float32" in compute_dtypes(model)   # the softmax stays float32
    shift = model.get_layer("shift_maps")
    maps = np.random.default_rng(0).uniform(1, 2, (32, 8, 8, 4)).astype(np.float32)   # nothing zero before
    np.testing.assert_array_equal(np.asarray(shift(maps, training=False)), maps)
    moved = np.asarray(shift(maps, training=True))
    seen = set()
    for before, after in zip(maps, moved):
        dy, dx = next((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                      if np.array_equal(np.roll(before, (dy, dx), (0, 1))[1:-1, 1:-1], after[1:-1, 1:-1]))
        seen.add((dy, dx))
        empty = (after == 0).all(-1)   # the cells shifted in are zeros, and only they
        assert empty.sum() == 8 * (dy != 0) + 8 * (dx != 0) - (dy != 0) * (dx != 0)
    assert len(seen) > 3
    with pytest.raises(BadInputError, match="--map-shift applies to --head finetune, not dense"):
        TrainConfig(model="dense", map_shift=1)
    with pytest.raises(BadInputError, match="--map-shift 8 would shift the cached 8x8 maps out of view"):
        train_head(cache, model="finetune", runs_dir=tmp / "runs-shift-8", map_shift=8, **QUICK)


@pytest.mark.slow
def test_predict_and_export_rebuild_backbone_tuned_layers_and_head_as_one_model(block2, tmp_path):
    import keras

    import featcache

    folder, cache, tmp = block2
    run = train_head(cache, model="finetune", runs_dir=tmp / "runs-predict", **QUICK).run_dir
    c = featcache.open_cache(cache)
    files = [str(folder / p) for p in c.paths("test")]
    got = inference.predict(run, files, progress=False)
    head = keras.saving.load_model(run / "model.keras", compile=False)
    want = np.asarray(head.predict_on_batch(c.load("test")[0].astype(np.float32)))
    np.testing.assert_allclose(got.probabilities, want, atol=1e-3)
    exported = inference.export(run, tmp_path / "export")
    assert exported.exists()


@pytest.mark.slow
def test_bad_tune_to_and_a_random_weights_cache_are_said_in_one_line(block2, tmp_path):
    _, cache, _ = block2
    for tune_to, says in (("block1_pool", "not above the cached layer block2_pool"),
                          ("block9_pool", "block9_pool is not a layer of vgg16")):
        r = CliRunner().invoke(main, ["train-head", "--cache", str(cache), "--head", "finetune", "--tune-to", tune_to,
                                      "--runs-dir", str(tmp_path), "--no-progress"])
        assert r.exit_code == 2 and says in r.stderr and "block2_pool" in r.stderr, r.output
        assert len([line for line in r.stderr.splitlines() if not line.startswith("WARNING")]) == 1
    r = CliRunner().invoke(main, ["train-head", "--cache", str(cache), "--head", "dense", "--tune-to", "block3_pool",
                                  "--runs-dir", str(tmp_path), "--no-progress"])
    assert r.exit_code == 2 and "--tune-to applies to --head finetune" in r.stderr
    r = CliRunner().invoke(main, ["train-head", "--cache", str(cache), "--head", "finetune", "--epochs", "2",
                                  "--units", "4", "--runs-dir", str(tmp_path), "--no-progress"])
    assert r.exit_code == 0 and "RANDOM backbone weights" in r.stderr, r.output


@pytest.mark.slow
def test_the_backbones_batchnorm_statistics_do_not_move(tmp_path):
    import keras

    model = upper("resnet50", "conv3_block4_out", "conv4_block6_out", weights="random")
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert norms and not any(n.trainable for n in norms) and all(c.trainable for c in convs)
    before = [np.array(n.moving_mean) for n in norms]
    kernel = np.array(convs[0].kernel)
    inputs = keras.Input(model.input.shape[1:])
    head = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(model(inputs)))
    whole = keras.Model(inputs, head)
    whole.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(16, *model.input.shape[1:])).astype(np.float32)
    whole.fit(x, np.arange(16) % 3, epochs=2, batch_size=8, verbose=0)
    assert all(np.array_equal(b, np.array(n.moving_mean)) for b, n in zip(before, norms))
    assert not np.array_equal(kernel, np.array(convs[0].kernel))   # the convolutions did train


@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_every_cut_point_is_a_blocks_output(name):
    """The layers between two consecutive cut points read nothing from below the lower one: each cut point is
    what the rest of the network is computed from (ConvNeXt's `..._identity` layers were its residual branch)."""
    import keras

    spec = backbones.get(name)
    size = max(spec.min_input_size, 64)
    base = spec.keras_application()(weights=None, include_top=False, input_shape=(size, size, 3))
    for lower, higher in zip(spec.layers, spec.layers[1:]):
        keras.Model(spec.tensor(base, lower), spec.tensor(base, higher))   # raises if not connected


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_every_backbone_cuts_above_a_cached_layer(name):
    spec = backbones.get(name)
    size = max(spec.min_input_size, 64)
    shapes = backbones.output_shapes(name, (size, size))
    cached = spec.layers[0]
    top = default_tune_to(name, cached)
    model = upper(name, cached, top, weights="random", input_size=(size, size))
    assert tuple(model.input.shape[1:]) == shapes[cached] and tuple(model.output.shape[1:]) == shapes[top]
    with pytest.raises(BadInputError, match="nothing above it"):
        default_tune_to(name, spec.layers[-1])


@pytest.mark.slow
def test_finetune_is_a_search_parameter(block2, tmp_path):
    import json

    _, cache, _ = block2
    r = CliRunner().invoke(main, ["search", "--cache", str(cache), "--param", "head=dense|finetune", "--units", "8",
                                  "--epochs", "3", "--warmup-epochs", "1", "--pruner", "none", "--runs-dir",
                                  str(tmp_path), "--no-progress"])
    assert r.exit_code == 0, r.output
    record = json.loads((Path(r.stdout.strip()) / "search.json").read_text())
    assert sorted(t["params"]["model"] for t in record["trials"]) == ["dense", "finetune"]
    assert all(t["state"] == "complete" for t in record["trials"])
