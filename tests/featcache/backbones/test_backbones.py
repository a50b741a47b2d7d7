import numpy as np
import pytest

from featcache import backbones as bb
from featcache.errors import BadInputError, DownloadError, MissingInputError


@pytest.mark.parametrize("layer, size, shape", [("block3_pool", 32, (4, 4, 256)), ("block2_conv2", 40, (40 // 2, 20, 128)),
                                                ("block5_pool", 64, (2, 2, 512))])
def test_feature_shape_matches_the_built_model(layer, size, shape):
    model = bb.build(layer=layer, weights="random", input_size=(size, size))
    assert model.output_shapes == [bb.output_shapes("vgg16", (size, size))[layer]] == [shape]
    assert model.model.layers[-1].name == layer
    assert not model.model.trainable and model.model.trainable_weights == []


def test_several_layers_share_one_forward_pass():
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    both = bb.build(layer=("block3_pool", "block4_pool"), weights="random", seed=2)(x)
    alone = bb.build(layer="block4_pool", weights="random", seed=2)(x)
    assert [f.shape for f in both] == [(2, 4, 4, 256), (2, 2, 2, 512)]
    np.testing.assert_allclose(both[1], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_stored_features_are_the_forward_pass_cast_where_the_model_runs(precision):
    model = bb.build(layer=("block3_pool", "block4_pool"), weights="random", precision=precision)
    x = model.preprocess(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    features, row_peaks = model.forward_stored(x, "float16")
    for reference, stored, peak in zip(model.forward(x), features, row_peaks):
        assert stored.dtype == np.float16 and stored.shape == reference.shape
        np.testing.assert_array_equal(stored, reference.astype(np.float16))
        np.testing.assert_array_equal(peak, np.abs(reference).max(axis=(1, 2, 3)))


def test_random_weights_are_seeded():
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    a = bb.build(weights="random", seed=1)(x)[0]
    b = bb.build(weights="random", seed=1)(x)[0]
    np.testing.assert_array_equal(a, b)
    assert bb.weights_identity("random", seed=1) == "random:seed=1"


def test_unknown_layer_lists_valid_names():
    with pytest.raises(BadInputError, match=r"unknown layer 'block3_pol'.*block1_conv1.*block5_pool"):
        bb.build(layer="block3_pol", weights="random")


def test_input_size_below_32_is_refused():
    with pytest.raises(BadInputError, match="at least 32"):
        bb.check_input_size(31)


def test_missing_weights_file(tmp_path):
    with pytest.raises(MissingInputError, match="nope.h5 does not exist"):
        bb.build(weights=str(tmp_path / "nope.h5"))


def test_weights_file_of_another_model_is_refused(tmp_path):
    import keras

    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(BadInputError, match="does not fit VGG16"):
        bb.build(weights=str(path))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(BadInputError, match="junk.h5 does not fit VGG16"):
        bb.build(weights=str(junk))


def test_imagenet_download_failure_says_offline(monkeypatch):
    import keras.src.applications.vgg16 as vgg16

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(vgg16.file_utils, "get_file", offline)
    with pytest.raises(DownloadError, match="offline; fix: pass --weights PATH"):
        bb.build(weights="imagenet")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(bb.BACKBONES))
def test_every_backbone_matches_its_keras_application(name, image_folder, tmp_path):
    """Random weights at the smallest input: layers, shapes and preprocessing equal Keras' own; a tiny
    extraction and a head trained on it work."""
    import importlib

    import keras

    from featcache.cache import open_cache
    from featcache.extract import extract
    from featcache.sources import load_dataset
    from heads.train import train_head

    spec = bb.get(name)
    size = spec.min_input_size
    assert spec.default_layer in spec.layers
    shapes = bb.output_shapes(name, (size, size))
    keras.utils.set_random_seed(0)
    direct = spec.keras_application()(weights=None, include_top=False, input_shape=(size, size, 3))
    assert shapes == {layer: tuple(spec.tensor(direct, layer).shape[1:]) for layer in spec.layers}
    x = np.random.default_rng(0).integers(0, 256, (3, size, size, 3)).astype("float32")
    keras_preprocess = importlib.import_module(spec.application.rsplit(".", 1)[0]).preprocess_input
    np.testing.assert_array_equal(np.asarray(spec.preprocess(x.copy())), np.asarray(keras_preprocess(x.copy())))
    path = extract(data=str(image_folder), backbone=name, weights="random", dtype="float32", cache_dir=tmp_path / "c",
                   progress=False)   # float32: random-weight activations of some backbones underflow float16
    cache = open_cache(path)
    assert cache.meta.backbone == name and cache.layers == (spec.default_layer,)
    assert (name == "vgg16") != (f"-{name}-" in path.name)   # other backbones name themselves in the file
    assert cache.splits["train"].shapes[spec.default_layer] == (12, *shapes[spec.default_layer])
    images = load_dataset(image_folder).train.load(0, 12, (size, size)).astype("float32")
    cut = keras.Model(direct.input, spec.tensor(direct, spec.default_layer))
    expected = cut.predict_on_batch(keras_preprocess(images))   # same seed, same random weights
    cached = cache.load("train")[0].astype("float32")
    np.testing.assert_allclose(cached, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    result = train_head(path, runs_dir=None, progress=False, epochs=1)
    assert 0 <= result.metrics["test_accuracy"] <= 1


def test_unknown_backbone_lists_valid_names():
    from click.testing import CliRunner

    from featcache.cli import main

    r = CliRunner().invoke(main, ["extract", "--backbone", "resnet", "--weights", "random"])
    assert r.exit_code == 2 and "resnet50" in r.stderr and "convnext_tiny" in r.stderr
    with pytest.raises(BadInputError, match=r"unknown layer 'block3_pool'; expected one of resnet50's layers: "
                                            r"conv2_block3_out"):
        bb.build(backbone="resnet50", layer="block3_pool", weights="random")


def test_backbones_command_lists_layers_and_shapes():
    import json

    from click.testing import CliRunner

    from featcache.cli import main

    r = CliRunner().invoke(main, ["backbones", "vgg16", "--input-size", "64", "--json"])
    table = json.loads(r.stdout)["vgg16"]
    assert table["layers"]["block3_pool"] == {"shape": [8, 8, 256], "float16_bytes": 2 * 8 * 8 * 256}
    assert table["default_layer"] == "block3_pool"
    human = CliRunner().invoke(main, ["backbones"]).stdout
    assert all(name in human for name in bb.BACKBONES) and "(default)" in human


def test_imagenet_offline_names_the_local_file_for_every_backbone(monkeypatch):
    import keras.src.utils.file_utils as file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(DownloadError, match="ResNet50 weights.*offline; fix: pass --weights PATH to a local "
                                            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        bb.build(backbone="resnet50", weights="imagenet")


def test_a_keras_model_name_is_ascii_whatever_the_folder_is_called():
    # a preset folder named "dino ünï": TensorFlow refused the non-ASCII model name in predict and export
    from featcache.backbones import keras_name

    name = keras_name("hub:/tmp/dino v2 ünï_dense")
    assert name.isascii() and name.replace("_", "").isalnum() and name.startswith("hub_tmp_dino_v2_")
