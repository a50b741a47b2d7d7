import numpy as np
import pytest

from featcache import backbone as bb
from featcache.errors import BadInputError, DownloadError, MissingInputError
from featcache.extract import feature_shape


@pytest.mark.parametrize("layer, size", [("block3_pool", 32), ("block2_conv2", 40), ("block5_pool", 64)])
def test_feature_shape_matches_the_built_model(layer, size):
    model = bb.build(layer=layer, weights="random", input_size=(size, size))
    assert model.output_shapes == [feature_shape(layer, (size, size))]
    assert model.model.layers[-1].name == layer
    assert not model.model.trainable and model.model.trainable_weights == []


def test_several_layers_share_one_forward_pass():
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    both = bb.build(layer=("block3_pool", "block4_pool"), weights="random", seed=2)(x)
    alone = bb.build(layer="block4_pool", weights="random", seed=2)(x)
    assert [f.shape for f in both] == [(2, 4, 4, 256), (2, 2, 2, 512)]
    np.testing.assert_allclose(both[1], alone[0], rtol=1e-5, atol=1e-5)


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
