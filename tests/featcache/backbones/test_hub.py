"""KerasHub presets as backbones (featcache.backbones.hub), offline: tiny DINOv2 and CLIP vision towers built from
configuration with random weights, saved with save_to_preset into a folder, and extracted from that folder."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache import backbones
from featcache.cli import main
from featcache.errors import BadInputError
from featcache.extract import extract
from heads import inference
from heads.train import train_head
from tests.support import write_folder

keras_hub = pytest.importorskip("keras_hub")

SIZE = 16   # the presets' own image size: KerasHub's converter then resizes nothing, so both paths see one image
CLASS_TOKEN = ("cls", "patch_mean", "cls_patch_mean", "patch_tokens", "cls_last4", "cls_last4_patch_mean")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def save_preset(folder, family: str, seed: int = 0, layers: int = 4):
    """A tiny preset of `family` (dinov2: class token, 2 registers, patches; clip: class token, patches; siglip:
    patches and a pooled output) with
    its image converter (ImageNet mean and standard deviation, as the real presets)."""
    import keras

    keras.utils.set_random_seed(seed)
    tower = dict(patch_size=4, num_layers=layers, hidden_dim=8, num_heads=2, intermediate_dim=16, image_shape=(SIZE, SIZE, 3))
    if family == "dinov2":
        model = keras_hub.models.DINOV2Backbone(**tower, num_register_tokens=2, position_embedding_shape=(SIZE, SIZE, 3))
        converter = keras_hub.layers.DINOV2ImageConverter
    elif family == "dinov3":   # rotary positions: any input size
        model = keras_hub.models.DINOV3Backbone(**tower, num_register_tokens=2)
        converter = keras_hub.layers.DINOV3ImageConverter
    elif family == "clip":
        model, converter = keras_hub.models.CLIPVisionEncoder(**tower), keras_hub.layers.CLIPImageConverter
    else:   # patch tokens only, pooled by an attention head
        model, converter = keras_hub.models.SigLIPVisionEncoder(**tower), keras_hub.layers.SigLIPImageConverter
    model.save_to_preset(str(folder))
    converter(image_size=(SIZE, SIZE), scale=[1 / (255 * s) for s in STD], offset=[-m / s for m, s in zip(MEAN, STD)],
              interpolation="bicubic").save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    return {family: save_preset(tmp / family, family) for family in ("dinov2", "clip", "siglip")}, tmp


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dinov2", "clip", "siglip"])
def test_cached_features_are_keras_hubs_own_forward_pass_with_the_presets_preprocessing(presets, family, tmp_path):
    folders, _ = presets
    images = write_folder(tmp_path / "imgs", n_train=2, n_test=1, size=SIZE)
    layers = backbones.get(f"hub:{folders[family]}").layers
    assert layers == {"dinov2": CLASS_TOKEN, "clip": CLASS_TOKEN, "siglip": ("patch_mean", "patch_tokens", "pooled")}[family]
    path = extract(data=images, backbone=f"hub:{folders[family]}", layer=",".join(layers), cache_dir=tmp_path / "cache",
                   dtype="float32", progress=False)
    cache = featcache.open_cache(path)
    assert cache.meta.input_shape == (SIZE, SIZE, 3) and "scale" in cache.meta.preprocessing
    root = cache.meta.dataset_source.removeprefix("folder:")
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(f"{root}/{p}").convert("RGB")) for p in cache.paths("train")])
    import keras

    model = keras_hub.models.Backbone.from_preset(str(folders[family]))
    converter = keras.saving.deserialize_keras_object(json.loads((folders[family] / "image_converter.json").read_text()))
    inputs = {"images": converter(pixels.astype("float32"))}
    if family == "siglip":   # its output is pooled; the tokens are its final norm's, the layer before the head
        tokens = np.asarray(keras.Model(model.inputs, model.layers[-2].output)(inputs))
    else:
        tokens = np.asarray(model(inputs))
        norm, blocks = ((model.layernorm, list(model.pyramid_outputs.values())[1:]) if family == "dinov2"
                        else (model.layer_norm, [layer.output for layer in model.encoder_layers]))
        last4 = [np.asarray(b)[:, 0] for b in keras.Model(model.inputs, [norm(b) for b in blocks[-4:]])(inputs)]
    before = {"dinov2": 3, "clip": 1, "siglip": 0}[family]   # the class token, and DINOv2's two registers
    patches = tokens[:, before:]
    want = {"cls": tokens[:, 0], "patch_mean": patches.mean(1),
            "cls_patch_mean": np.concatenate([tokens[:, 0], patches.mean(1)], -1),
            "patch_tokens": patches.reshape(len(pixels), SIZE // 4, SIZE // 4, -1)}
    if family != "siglip":   # DINOv2's linear evaluation: the last 4 blocks' class tokens, and the patch mean
        want.update(cls_last4=np.concatenate(last4, -1), cls_last4_patch_mean=np.concatenate([*last4, patches.mean(1)], -1))
        np.testing.assert_allclose(last4[-1], tokens[:, 0], atol=1e-5)   # the last block through the norm: the output
    else:
        want = {"patch_mean": want["patch_mean"], "patch_tokens": want["patch_tokens"],
                "pooled": np.asarray(model(inputs))}
    for layer, expected in want.items():
        got = cache.load("train", layer=layer)[0]
        np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_an_image_text_preset_is_cut_at_its_vision_tower(tmp_path, family):
    # what Backbone.from_preset("clip_...") saves: both towers, one weights file, one "images" input
    import keras

    keras.utils.set_random_seed(0)
    tower = dict(patch_size=4, num_layers=2, hidden_dim=8, num_heads=2, intermediate_dim=16, image_shape=(SIZE, SIZE, 3))
    text = dict(vocabulary_size=50, embedding_dim=8, hidden_dim=8, num_layers=1, num_heads=2, intermediate_dim=16,
                max_sequence_length=8)
    if family == "clip":
        model = keras_hub.models.CLIPBackbone(keras_hub.models.CLIPVisionEncoder(**tower),
                                              keras_hub.models.CLIPTextEncoder(**text), projection_dim=8)
    else:
        model = keras_hub.models.SigLIPBackbone(keras_hub.models.SigLIPVisionEncoder(**tower),
                                                keras_hub.models.SigLIPTextEncoder(**text))
    model.save_to_preset(str(tmp_path / "preset"))
    keras_hub.layers.ImageConverter(image_size=(SIZE, SIZE), scale=1 / 255).save_to_preset(str(tmp_path / "preset"))
    images = write_folder(tmp_path / "imgs", n_train=2, n_test=1, size=SIZE)
    layer = {"clip": "cls", "siglip": "pooled"}[family]
    cache = featcache.open_cache(extract(data=images, backbone=f"hub:{tmp_path / 'preset'}", layer=layer,
                                         cache_dir=tmp_path / "cache", dtype="float32", progress=False))
    from PIL import Image

    root = cache.meta.dataset_source.removeprefix("folder:")
    pixels = np.stack([np.asarray(Image.open(f"{root}/{p}").convert("RGB")) for p in cache.paths("train")]) / 255
    loaded = keras_hub.models.Backbone.from_preset(str(tmp_path / "preset")).vision_encoder
    out = np.asarray(loaded(pixels.astype("float32")))
    want = out[:, 0] if family == "clip" else out   # CLIP's tower gives its tokens, SigLIP's its pooled output
    np.testing.assert_allclose(cache.load("train")[0].reshape(want.shape), want, atol=1e-5)


@pytest.mark.slow
def test_images_are_centre_cropped_and_interpolated_as_the_preset_says(presets, tmp_path):
    # the converter says crop_to_aspect_ratio and bicubic: a 16x24 image is its centre 16x16, unresized
    from PIL import Image

    from featcache import sources

    folders, _ = presets
    rng = np.random.default_rng(3)
    wide = write_folder(tmp_path / "wide", n_train=1, n_test=1, size=SIZE)
    centre = tmp_path / "centre"
    for path in sorted(wide.rglob("*.png")):
        pixels = rng.integers(0, 256, (SIZE, SIZE + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        (centre / path.relative_to(wide)).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[:, 4:4 + SIZE]).save(centre / path.relative_to(wide))
    caches = [featcache.open_cache(extract(data=d, backbone=f"hub:{folders['dinov2']}", cache_dir=tmp_path / "cache",
                                           dtype="float32", progress=False)) for d in (wide, centre)]
    assert caches[0].meta.resize == sources.resize_text(dct=True, crop=True, interpolation="bicubic")
    np.testing.assert_allclose(caches[0].load("train")[0], caches[1].load("train")[0], atol=1e-6)
    from featcache.backbones import hub
    from featcache.sources.images import FILTERS

    assert set(hub.INTERPOLATIONS) == set(FILTERS)   # what a preset may ask for is what decoding does


@pytest.mark.slow
def test_the_key_changes_with_the_weights_and_the_configuration(presets, tmp_path):
    folders, _ = presets
    images = write_folder(tmp_path / "imgs", n_train=1, n_test=1, size=SIZE)

    def key(folder, **options):
        return featcache.open_cache(extract(data=images, backbone=f"hub:{folder}", cache_dir=tmp_path / "cache",
                                            progress=False, **options)).meta.key

    own = key(folders["dinov2"])   # the preset's own weights, or its file named: one cache (a run's --weights too)
    assert key(folders["dinov2"], weights=str(folders["dinov2"] / "model.weights.h5")) == own

    other = save_preset(tmp_path / "other", "dinov2", seed=1)   # the same model, other weights
    assert key(folders["dinov2"]) != key(other)
    converter = json.loads((other / "image_converter.json").read_text())
    converter["config"]["offset"] = [0.0, 0.0, 0.0]
    moved = tmp_path / "moved"
    (tmp_path / "other").rename(moved)   # a moved folder: the same preset, the same weights' hash
    before = key(moved)
    (moved / "image_converter.json").write_text(json.dumps(converter))
    assert key(moved) != before


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dinov2", "clip", "siglip"])
def test_heads_train_predict_reproduces_the_run_and_the_export_equals_the_cached_path(presets, tmp_path, family):
    folders, _ = presets
    images = write_folder(tmp_path / "imgs", size=24)   # resized to the preset's 16 px, as predict does
    cache = extract(data=images, backbone=f"hub:{folders[family]}", cache_dir=tmp_path / "cache", progress=False)
    run_dir = train_head(cache, model="dense", units=(8,), epochs=2, runs_dir=tmp_path / "runs", progress=False).run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    c = featcache.open_cache(cache)
    files = [f"{c.meta.dataset_source.removeprefix('folder:')}/{p}" for p in c.paths("test")]
    _, labels = c.load("test")
    got = inference.predict(run_dir, files, progress=False)
    assert np.mean(got.indices == labels) == pytest.approx(metrics["test_accuracy"])
    out = inference.export(run_dir, tmp_path / "exported")
    from PIL import Image

    from featcache import sources

    _, crop, interpolation = sources.resize_mode(c.meta.resize)   # as export.json says the model takes its images
    pixels = np.stack([sources.resize(np.asarray(Image.open(f).convert("RGB")), (SIZE, SIZE), crop=crop,
                                      interpolation=interpolation) for f in files])
    np.save(tmp_path / "pixels.npy", pixels)
    code = ("import sys; sys.modules['featcache'] = None; sys.modules['heads'] = None\n"
            "import numpy as np, keras, keras_hub\n"   # the preset's layers are KerasHub's
            f"m = keras.saving.load_model({str(out / 'model.keras')!r})\n"
            f"np.save({str(tmp_path / 'p.npy')!r}, np.asarray(m.predict_on_batch(np.load({str(tmp_path / 'pixels.npy')!r}))))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), got.probabilities, atol=1e-3)   # float16 storage


@pytest.mark.slow
def test_a_cache_outlives_its_preset_folder_moving(tmp_path):
    # a cache copied to another machine, or a preset folder moved: heads train and verify from the configuration the
    # cache carries; predict takes the weights where they are now, checked by hash
    images = write_folder(tmp_path / "imgs", n_train=4, n_test=2, size=SIZE)
    save_preset(tmp_path / "preset", "dinov2")
    r = run("extract", "--data", images, "--backbone", f"hub:{tmp_path / 'preset'}", "--cache-dir", tmp_path / "cache",
            "--no-progress")
    assert r.exit_code == 0, r.output
    cache = r.output.strip().splitlines()[-1]
    (tmp_path / "preset").rename(tmp_path / "moved")
    r = run("train-head", "--cache", cache, "--head", "dense", "--units", "8", "--epochs", "1", "--runs-dir",
            tmp_path / "runs", "--no-progress")
    assert r.exit_code == 0, r.output
    assert run("info", "--verify", cache).exit_code == 0
    run_dir = next((tmp_path / "runs").iterdir())
    r = run("predict", run_dir, images / "test")
    assert r.exit_code == 2 and "is not there" in r.output and "--weights" in r.output, r.output
    weights = tmp_path / "moved" / "model.weights.h5"
    got = inference.predict(run_dir, sorted((images / "test").rglob("*.png")), weights=str(weights), progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = sorted(p.name for p in (images / "test").iterdir())   # the classes are the folders, sorted
    labels = [names.index(f.parent.name) for f in sorted((images / "test").rglob("*.png"))]
    assert np.mean(got.indices == labels) == pytest.approx(metrics["test_accuracy"])


def test_fine_tuning_from_a_presets_cache_is_refused_in_one_line(presets, tmp_path):
    folders, _ = presets
    images = write_folder(tmp_path / "imgs", n_train=2, n_test=1, size=SIZE)
    cache = extract(data=images, backbone=f"hub:{folders['clip']}", cache_dir=tmp_path / "cache", progress=False)
    r = run("train-head", "--cache", cache, "--head", "finetune", "--runs-dir", tmp_path / "runs")
    assert r.exit_code == 2 and "needs a Keras application backbone" in r.output, r.output


@pytest.mark.slow
def test_a_preset_folder_with_missing_or_foreign_weights_is_a_one_line_error(presets, tmp_path, cache_dir):
    folders, tmp = presets
    images = write_folder(tmp_path / "imgs", n_train=1, n_test=1, size=SIZE)
    broken = tmp_path / "broken"
    save_preset(broken, "dinov2")
    (broken / "model.weights.h5").unlink()
    r = run("extract", "--data", images, "--backbone", f"hub:{broken}", "--no-progress")
    assert r.exit_code == 2 and "has no weights" in r.output and "fix:" in r.output, r.output
    (broken / "model.weights.h5").write_bytes((folders["clip"] / "model.weights.h5").read_bytes())   # CLIP's, not DINOv2's
    r = run("extract", "--data", images, "--backbone", f"hub:{broken}", "--no-progress")
    assert r.exit_code == 2 and "another model's" in r.output and "Traceback" not in r.output, r.output
    deeper = save_preset(tmp_path / "deeper", "dinov2", layers=5)   # Keras would load its first four blocks silently
    (broken / "model.weights.h5").write_bytes((deeper / "model.weights.h5").read_bytes())
    r = run("extract", "--data", images, "--backbone", f"hub:{broken}", "--no-progress")
    assert r.exit_code == 2 and "another model's" in r.output, r.output
    r = run("extract", "--data", images, "--backbone", f"hub:{folders['dinov2']}", "--weights",
            deeper / "model.weights.h5", "--no-progress")
    assert r.exit_code == 2 and "another model's" in r.output, r.output
    (broken / "model.weights.h5").write_bytes(b"\x89HDF\r\n" + b"\0" * 64)   # truncated
    r = run("extract", "--data", images, "--backbone", f"hub:{broken}", "--no-progress")
    assert r.exit_code == 2 and "cannot be read" in r.output and "fix:" in r.output, r.output
    r = run("extract", "--data", images, "--backbone", f"hub:{tmp_path / 'absent'}", "--no-progress")
    assert r.exit_code == 2 and "no KerasHub preset folder" in r.output, r.output


def test_a_broken_preset_configuration_or_name_is_a_one_line_error_naming_it(presets, tmp_path):
    import shutil

    folders, _ = presets
    cases = {"config.json": ("[]", "not a KerasHub configuration"),
             "image_converter.json": ('{"config": 3}', "not a KerasHub configuration")}
    for file, (text, message) in cases.items():
        broken = tmp_path / file
        shutil.copytree(folders["clip"], broken)
        (broken / file).write_text(text)
        with pytest.raises(BadInputError, match=message):
            backbones.get(f"hub:{broken}")
    odd = tmp_path / "odd"   # a converter size the model cannot take: blamed on the converter, before any weights
    shutil.copytree(folders["clip"], odd)
    converter = json.loads((odd / "image_converter.json").read_text())
    converter["config"]["image_size"] = [18, 18]
    (odd / "image_converter.json").write_text(json.dumps(converter))
    with pytest.raises(BadInputError, match="image_converter.json resizes images to 18x18"):
        backbones.get(f"hub:{odd}")
    with pytest.raises(BadInputError, match="unknown KerasHub preset 'dinov2_smal'"):
        backbones.get("hub:dinov2_smal")


def test_an_input_size_the_preset_cannot_take_is_refused(presets, tmp_path):
    folders, _ = presets
    with pytest.raises(BadInputError, match="takes only its own 16x16"):
        backbones.check_input_size(32, backbones.get(f"hub:{folders['clip']}"))
    with pytest.raises(BadInputError, match="multiple of .* patch size 4"):
        backbones.check_input_size(18, backbones.get(f"hub:{folders['dinov2']}"))
    assert backbones.output_shapes(f"hub:{folders['dinov2']}", (32, 32))["patch_tokens"] == (8, 8, 8)   # interpolated


@pytest.mark.slow
def test_a_preset_with_rotary_positions_takes_another_input_size(tmp_path):
    import keras

    folder = save_preset(tmp_path / "dinov3", "dinov3")
    images = write_folder(tmp_path / "imgs", n_train=2, n_test=1, size=32)
    cache = featcache.open_cache(extract(data=images, backbone=f"hub:{folder}", layer="patch_tokens", input_size=32,
                                         cache_dir=tmp_path / "cache", dtype="float32", progress=False))
    assert cache.meta.shapes == {"patch_tokens": (8, 8, 8)}
    from PIL import Image

    root = cache.meta.dataset_source.removeprefix("folder:")
    pixels = np.stack([np.asarray(Image.open(f"{root}/{p}").convert("RGB")) for p in cache.paths("train")])
    converter = keras.saving.deserialize_keras_object(json.loads((folder / "image_converter.json").read_text()))
    scale, offset = np.asarray(converter.scale, "float32"), np.asarray(converter.offset, "float32")
    model = keras_hub.models.Backbone.from_preset(str(folder), image_shape=(32, 32, 3))
    tokens = np.asarray(model(pixels.astype("float32") * scale + offset))[:, 3:]   # after the class token, 2 registers
    np.testing.assert_allclose(cache.load("train")[0], tokens.reshape(-1, 8, 8, 8), atol=1e-5)


def test_backbones_lists_both_families_and_a_presets_cut_points(presets):
    folders, _ = presets
    r = run("backbones")
    assert r.exit_code == 0 and "vgg16" in r.output and "hub:dinov2_small" in r.output, r.output
    r = run("backbones", f"hub:{folders['dinov2']}")
    assert r.exit_code == 0 and "cls_patch_mean" in r.output and "4x4x8" in r.output, r.output


def test_without_keras_hub_a_preset_is_a_one_line_error_naming_the_install(presets, monkeypatch):
    from featcache.backbones import hub

    monkeypatch.setitem(sys.modules, "keras_hub", None)
    with pytest.raises(BadInputError, match=r"pip install 'featcache\[hub\]'"):
        hub.keras_hub()
