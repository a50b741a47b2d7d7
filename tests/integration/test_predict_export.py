"""Using a trained head on new images: predict and export reproduce the run's own predictions."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featcache
from featcache.cli import main
from featcache.errors import BadInputError, MissingInputError
from featcache.extract import extract
from heads import inference
from heads.train import train_baseline, train_head
from tests.support import REAL_DATA, REAL_WEIGHTS, needs_shared

OPTS = dict(weights="random", batch_size=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dense head (and a linear probe) on a tiny image folder, random weights."""
    from tests.support import write_folder

    tmp = tmp_path_factory.mktemp("inference")
    folder = write_folder(tmp / "tiny")
    cache = extract(data=folder, cache_dir=tmp / "cache", progress=False, **OPTS)
    runs = {m: train_head(cache, model=m, units=(8,), epochs=2, runs_dir=tmp / "runs", progress=False).run_dir
            for m in ("dense", "linear")}
    runs["conv"] = train_head(cache, model="conv", filters=4, units=(8,), epochs=1, runs_dir=tmp / "runs",
                              progress=False).run_dir
    runs["knn"] = train_head(cache, model="knn", runs_dir=tmp / "runs", progress=False).run_dir
    return folder, cache, runs, tmp


def _cached_probabilities(run_dir, cache):
    import keras

    import heads.knn  # noqa: F401  (a kNN head's layer is featcache's own)

    head = keras.saving.load_model(run_dir / "model.keras", compile=False)
    x, _ = featcache.open_cache(cache).load("test")
    return np.asarray(head.predict_on_batch(x.astype(np.float32)))


def _test_files(cache):
    c = featcache.open_cache(cache)
    root = c.meta.dataset_source.removeprefix("folder:")
    return [f"{root}/{p}" for p in c.paths("test")]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "linear", "conv", "knn"])
def test_predict_on_the_raw_test_images_gives_the_heads_predictions_on_the_cached_features(trained, model):
    _, cache, runs, _ = trained
    got = inference.predict(runs[model], _test_files(cache), progress=False)
    want = _cached_probabilities(runs[model], cache)
    assert (got.indices == want.argmax(1)).mean() >= 0.995
    np.testing.assert_allclose(got.probabilities, want, atol=1e-3)   # float16 storage, batches cut differently


@pytest.mark.slow
def test_large_jpegs_at_an_input_size_are_decoded_at_a_dct_scale_in_extract_and_predict(tmp_path):
    """A JPEG folder at --input-size: the cache records the DCT-scaled decode in its resize method and key, its
    features are those of the scaled decode, and predict (and the export's record) decode the same way."""
    from featcache import sources
    from tests.support import CLASSES

    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("test", 2)):
        for c in CLASSES:
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(n):   # smooth 136 px photos: scaled by 4 for a 32 px input
                small = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
                Image.fromarray(small).resize((136, 136)).save(tmp_path / "d" / split / c / f"{i}.jpg", quality=90)
    cache = extract(data=tmp_path / "d", input_size=32, cache_dir=tmp_path / "c", progress=False, **OPTS)
    c = featcache.open_cache(cache)
    assert c.meta.resize == sources.RESIZE_DCT and "resize" in c.meta.key_fields()
    native = extract(data=tmp_path / "d", cache_dir=tmp_path / "c", progress=False, **OPTS)
    assert featcache.open_cache(native).meta.resize == sources.RESIZE   # no --input-size: never scaled
    files = _test_files(cache)
    split = sources.Split(labels=np.zeros(len(files), np.int64), files=tuple(Path(f) for f in files))
    scaled, full = split.load(0, len(files), (32, 32), resizing=sources.RESIZE_DCT), split.load(0, len(files), (32, 32))
    assert np.abs(scaled.astype(int) - full).max() > 0   # the two decodes differ: the test can tell them apart
    run_dir = train_head(cache, model="dense", units=(8,), epochs=1, runs_dir=tmp_path / "runs",
                         progress=False).run_dir
    got = inference.predict(run_dir, files, progress=False)
    np.testing.assert_allclose(got.probabilities, _cached_probabilities(run_dir, cache), atol=1e-3)
    out = inference.export(run_dir, tmp_path / "exp")
    assert sources.RESIZE_DCT in json.loads((out / "export.json").read_text())["takes"]


@pytest.mark.slow
def test_the_export_loads_and_predicts_where_featcache_cannot_be_imported(trained, tmp_path):
    _, cache, runs, _ = trained
    out = inference.export(runs["dense"], tmp_path / "exported")
    record = json.loads((out / "export.json").read_text())
    assert record["random_weights"] is True and record["input_size"] == [32, 32]
    assert record["cache"][0]["key"] == featcache.open_cache(cache).meta.key
    files = _test_files(cache)
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.save(tmp_path / "pixels.npy", pixels)
    code = ("import sys; sys.modules['featcache'] = None; sys.modules['heads'] = None\n"   # neither can be imported
            "import numpy as np, keras\n"
            f"m = keras.saving.load_model({str(out / 'model.keras')!r})\n"
            f"np.save({str(tmp_path / 'probs.npy')!r}, np.asarray(m.predict_on_batch(np.load({str(tmp_path / 'pixels.npy')!r}))))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    probs = np.load(tmp_path / "probs.npy")
    np.testing.assert_allclose(probs, inference.predict(out, files, progress=False).probabilities, atol=1e-5)
    np.testing.assert_allclose(probs, _cached_probabilities(runs["dense"], cache), atol=1e-3)


@pytest.mark.slow
def test_predict_cli_formats_top_k_and_bad_images(trained, tmp_path):
    folder, _, runs, _ = trained
    images = tmp_path / "new"
    images.mkdir()
    for i, f in enumerate(sorted((folder / "test").rglob("*.png"))[:3]):
        (images / f"{i}.png").write_bytes(f.read_bytes())
    r = CliRunner().invoke(main, ["predict", str(runs["dense"]), str(images), "--format", "json", "--top-k", "2",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and all(len(row["predictions"]) == 2 for row in rows)
    assert all(row["predictions"][0]["probability"] >= row["predictions"][1]["probability"] for row in rows)
    csv = CliRunner().invoke(main, ["predict", str(runs["dense"]), str(images), "--format", "csv", "--no-progress"])
    assert csv.stdout.splitlines()[0] == "path,class_1,probability_1,class_2,probability_2,class_3,probability_3"
    (images / "broken.png").write_bytes(b"not an image")
    bad = CliRunner().invoke(main, ["predict", str(runs["dense"]), str(images), "--format", "csv", "--no-progress"])
    assert bad.exit_code == 2 and "broken.png" in bad.stderr and len(bad.stdout.splitlines()) == 4   # header + 3
    skipped = CliRunner().invoke(main, ["predict", str(runs["dense"]), str(images), "--skip-bad-images",
                                        "--format", "csv", "--no-progress"])
    assert skipped.exit_code == 0 and "broken.png" in skipped.stderr


@pytest.mark.slow
def test_a_baseline_run_predicts_from_pixels(trained, tmp_path):
    folder, cache, _, tmp = trained
    run = train_baseline("ann", data=folder, epochs=1, runs_dir=tmp_path, progress=False).run_dir
    got = inference.predict(run, _test_files(cache), progress=False)
    assert got.probabilities.shape == (len(_test_files(cache)), 3)


def test_weights_of_another_hash_are_refused_and_a_folder_without_a_model_named(trained, tmp_path):
    _, _, runs, _ = trained
    config = json.loads((runs["dense"] / "config.json").read_text())
    config["data"]["cache_meta"]["weights"] = "sha256:" + "0" * 64
    config["data"]["cache_meta"]["weights_source"] = str(tmp_path / "w.h5")
    (tmp_path / "w.h5").write_bytes(b"other weights")
    moved = tmp_path / "run"
    moved.mkdir()
    (moved / "model.keras").write_bytes((runs["dense"] / "model.keras").read_bytes())
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match="are not the ones the cache was made from"):
        inference.end_to_end(inference.load_run(moved))
    (moved / "model.keras").unlink()
    r = CliRunner().invoke(main, ["predict", str(moved), str(tmp_path)])
    assert r.exit_code == 2 and "holds no model.keras" in r.output
    with pytest.raises(MissingInputError):
        inference.load_run(moved)


def test_a_weights_file_is_recorded_by_its_absolute_path(image_folder, tmp_path, monkeypatch):
    from featcache.extract import plan

    monkeypatch.chdir(tmp_path)
    Path("w.h5").write_bytes(b"any bytes: planning hashes the file, it does not load it")
    _, meta = plan(data=image_folder, weights="w.h5")
    assert meta.weights_source == str(tmp_path / "w.h5")   # predict and export find it from any folder


@pytest.mark.slow
def test_a_head_on_pooled_layers_concatenated_and_one_on_a_joined_cache_predict_as_trained(image_folder, tmp_path):
    import keras

    from heads.data import data_from_caches
    from tests.featcache.cache.test_shards import sharded

    several = extract(data=image_folder, cache_dir=tmp_path / "c", layer="block2_pool,block3_pool", progress=False,
                      **OPTS)
    joined, _ = sharded(image_folder, tmp_path / "j", rows=5)
    for cache, model in ((several, "dense"), (joined, "dense")):
        run = train_head(cache, model=model, units=(8,), epochs=2, runs_dir=tmp_path / "runs", progress=False).run_dir
        head = keras.saving.load_model(run / "model.keras", compile=False)
        x = data_from_caches([cache], "gap", prepooled=True).x_test if cache == several else \
            featcache.open_cache(cache).load("test")[0]
        want = np.asarray(head.predict_on_batch(np.asarray(x, np.float32)))
        got = inference.predict(run, _test_files(cache), progress=False)
        np.testing.assert_allclose(got.probabilities, want, atol=1e-3)


def test_inspect_writes_the_most_confused_pairs_and_the_highest_loss_images(trained):
    import keras

    from heads.mistakes import most_confused, top_losses

    _, cache, runs, _ = trained
    r = CliRunner().invoke(main, ["inspect", str(runs["dense"]), "--images", "4"])
    assert r.exit_code == 0, r.output
    assert (runs["dense"] / "mistakes.md").read_text().count("|") > 6 and (runs["dense"] / "top_losses.png").is_file()
    # the images shown are the wrongly predicted ones with the highest loss
    head = keras.saving.load_model(runs["dense"] / "model.keras", compile=False)
    x, y = featcache.open_cache(cache).load("test")
    probs = np.asarray(head.predict_on_batch(x.astype(np.float32)))
    rows = top_losses(probs, y, 4)
    loss = -np.log(probs[np.arange(len(y)), y])
    wrong = probs.argmax(1) != y
    assert all(wrong[rows]) and list(loss[rows]) == sorted(loss[wrong], reverse=True)[:len(rows)]
    assert most_confused([[5, 2, 0], [7, 1, 1], [0, 0, 3]], ["a", "b", "c"], 2) == [("b", "a", 7), ("a", "b", 2)]


def test_predict_on_a_labelled_folder_reports_its_accuracy(trained):
    folder, _, runs, _ = trained
    r = CliRunner().invoke(main, ["predict", str(runs["dense"]), str(folder / "test"), "--format", "csv",
                                  "--no-progress"])
    assert r.exit_code == 0 and "labelled by their folders: accuracy" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "knn"])
def test_a_saved_model_export_serves_the_same_probabilities(trained, tmp_path, model):
    """A SavedModel serves without featcache, also for the kNN head, whose Keras file needs `import heads.knn`."""
    import tensorflow as tf

    _, cache, runs, _ = trained
    out = inference.export(runs[model], tmp_path / "sm", format="saved_model")
    files = _test_files(cache)
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    loaded = tf.saved_model.load(str(out / "saved_model"))   # kept: its functions need their variables alive
    served = loaded.serve(tf.constant(pixels))
    np.testing.assert_allclose(np.asarray(served), inference.predict(runs[model], files, progress=False)
                               .probabilities, atol=1e-5)


@pytest.mark.slow
def test_a_saved_model_export_prints_its_folder_alone_on_stdout(trained, tmp_path):
    # Keras' export printed ~37 lines (a temporary path, every TensorSpec) before it: `out=$(featcache export ...)`
    _, _, runs, _ = trained
    r = CliRunner().invoke(main, ["export", str(runs["dense"]), "-o", str(tmp_path / "sm"), "--format", "saved_model"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [str(tmp_path / "sm")], r.stdout[:2000]


@pytest.mark.slow
def test_an_onnx_export_runs_in_onnxruntime_and_gives_the_same_probabilities(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    _, cache, runs, _ = trained
    out = inference.export(runs["dense"], tmp_path / "onnx", format="onnx")
    files = _test_files(cache)
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    session = ort.InferenceSession(str(out / "model.onnx"))
    probs = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    np.testing.assert_allclose(probs, inference.predict(runs["dense"], files, progress=False).probabilities, atol=1e-3)


@pytest.mark.slow
@needs_shared
def test_real_images_and_weights_whose_file_moved(tmp_path):
    """A few hundred real CIFAR-10 JPEGs with the real weights: the weights file the cache recorded is gone (moved),
    predict says so in one line, and with --weights (the same file, hash checked) gives the cached predictions."""
    import shutil

    data = tmp_path / "cifar"
    for split, n in (("train", 20), ("test", 10)):
        for c in sorted((REAL_DATA / split).iterdir()):
            (data / split / c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[:n]:
                shutil.copy(f, data / split / c.name / f.name)
    moved = tmp_path / "w" / REAL_WEIGHTS.name
    moved.parent.mkdir()
    shutil.copy(REAL_WEIGHTS, moved)
    cache = extract(data=data, weights=moved, cache_dir=tmp_path / "c", progress=False)
    run = train_head(cache, model="dense", units=(16,), epochs=3, runs_dir=tmp_path / "runs", progress=False).run_dir
    kept = tmp_path / "kept.h5"
    moved.rename(kept)
    r = CliRunner().invoke(main, ["predict", str(run), str(data / "test"), "--no-progress"])
    assert r.exit_code == 2 and "is not there; fix: pass --weights FILE" in r.output
    got = inference.predict(run, _test_files(cache), weights=str(kept), progress=False)
    want = _cached_probabilities(run, cache)
    assert (got.indices == want.argmax(1)).mean() >= 0.995
    np.testing.assert_allclose(got.probabilities, want, atol=1e-3)   # float16 storage of the cached features


def test_predict_and_export_options_are_declared_once_and_validated_before_any_work(trained, tmp_path):
    """PredictConfig and ExportConfig hold every option of predict and export: the command line is built from them
    and the Python API checks a value with the same one-line message (batch_size=0 reached the model before)."""
    import click

    from featcache.cli import main
    from heads.export import ExportConfig, export_options
    from heads.predict import PredictConfig, predict_options

    _, cache, runs, _ = trained
    with pytest.raises(BadInputError, match="--batch-size must be at least 1"):
        inference.predict(runs["dense"], _test_files(cache), batch_size=0, progress=False)
    with pytest.raises(BadInputError, match="--ray-address and --workers need --engine ray"):
        inference.predict(runs["dense"], _test_files(cache), workers=2, progress=False)
    with pytest.raises(BadInputError, match="--format must be one of keras, saved_model, onnx"):
        inference.export(runs["dense"], tmp_path / "x", format="pdf")
    with pytest.raises(TypeError, match="inside the PredictConfig"):
        inference.predict(runs["dense"], _test_files(cache), config=PredictConfig(), batch_size=2)
    assert not (tmp_path / "x").exists()
    for command, declared in (("predict", predict_options()), ("export", export_options())):
        params = {p.name: p for p in main.get_command(click.Context(main), command).params}
        for f in declared:
            p = params[f.name]
            assert p.help == f.metadata["help"] and (p.is_flag or p.default == f.default), (command, f.name)
    assert ExportConfig().format == "keras" and PredictConfig().engine == "local"
