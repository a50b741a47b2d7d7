"""The same commands with Keras on JAX, where TensorFlow cannot be imported (as on the GPU machine this project is
lent): extraction, the heads (dense, auto, the probe, kNN, a streamed head), a 2-trial search, predict and export.
Figures that do not depend on a backend's random numbers (features with the real weights, the probe and kNN on
them) agree with the TensorFlow run; trained heads only have to train (their random initialisation differs)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import featcache
from featcache.extract import extract
from tests.support import ROOT, assert_same_features, write_folder

WEIGHTS = ROOT.parent / "shared" / "weights" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed (dev extra)"),
              pytest.mark.xdist_group("jax")]


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """`featcache ...` in a process with KERAS_BACKEND=jax, TensorFlow's import blocked; returns stdout."""
    root = tmp_path_factory.mktemp("jax")
    blocker = root / "no-tensorflow" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('TensorFlow is blocked in this test')\n")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(blocker.parent), "JAX_PLATFORMS": "cpu",
           "FEATCACHE_CACHE_DIR": str(root / "cache")}

    def run(*args, ok=True):
        p = subprocess.run([sys.executable, "-m", "featcache.cli", "-q", *map(str, args)], env=env, cwd=root,
                           capture_output=True, text=True, timeout=600)
        assert (p.returncode == 0) == ok, p.stderr[-3000:]
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        return p.stdout.strip() if ok else p.stderr

    run.root = root
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("data") / "d", n_train=16, n_test=8)


def weights() -> str:
    return str(WEIGHTS) if WEIGHTS.is_file() else "random"


@pytest.mark.slow
def test_extraction_on_jax_matches_tensorflow_and_keys_random_weights_by_backend(jax_run, data, tmp_path):
    on_jax = featcache.open_cache(jax_run("extract", "--data", data, "--weights", weights(), "--no-progress"))
    on_tf = featcache.open_cache(extract(data=data, weights=weights(), cache_dir=tmp_path, progress=False))
    if weights() == "random":   # each backend draws its own numbers: never the same cache
        assert on_jax.meta.weights == "random:seed=0:jax" and on_jax.meta.key != on_tf.meta.key
        return
    assert on_jax.meta.key == on_tf.meta.key
    for split in ("train", "test"):
        assert_same_features(on_jax.load(split)[0], on_tf.load(split)[0])


@pytest.mark.slow
def test_a_keras_hub_preset_extracts_on_jax_as_on_tensorflow(jax_run, data, tmp_path):
    pytest.importorskip("keras_hub")
    from tests.featcache.backbones.test_hub import save_preset

    folder = save_preset(tmp_path / "dinov2", "dinov2")   # a preset folder is backend-neutral: JSON and HDF5
    args = dict(backbone=f"hub:{folder}", dtype="float32", layer="cls_patch_mean,patch_tokens")
    on_jax = featcache.open_cache(jax_run("extract", "--data", data, "--backbone", args["backbone"], "--dtype", "float32",
                                          "--layer", args["layer"], "--no-progress"))
    on_tf = featcache.open_cache(extract(data=data, cache_dir=tmp_path / "cache", progress=False, **args))
    assert on_jax.meta.key == on_tf.meta.key   # the preset's own weights: known by their hash on every backend
    for layer in ("cls_patch_mean", "patch_tokens"):
        assert_same_features(on_jax.load("train", layer)[0], on_tf.load("train", layer)[0])


def metrics(run_folder) -> dict:
    return json.loads((Path(run_folder) / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("head", ["linear", "knn"])
def test_probe_and_knn_on_jax_give_the_tensorflow_figures(jax_run, data, tmp_path, head):
    from click.testing import CliRunner

    from featcache.cli import main

    args = ["train-head", "--data", data, "--weights", weights(), "--head", head, "--no-progress"]
    on_jax = metrics(jax_run(*args, "--runs-dir", jax_run.root / "runs"))
    r = CliRunner().invoke(main, ["-q", *map(str, args), "--runs-dir", tmp_path / "runs"],
                           env={"FEATCACHE_CACHE_DIR": str(tmp_path / "cache")})
    assert r.exit_code == 0, r.output
    on_tf = metrics(r.output.strip().splitlines()[-1])
    if weights() != "random":   # same features: the same solution, within one test image of 24
        assert abs(on_jax["test_accuracy"] - on_tf["test_accuracy"]) <= 1 / 24 + 1e-9, (on_jax, on_tf)


@pytest.mark.slow
@pytest.mark.parametrize("weights", [weights, lambda: "random"], ids=["weights", "random"])
def test_heads_train_predict_and_export_on_jax(jax_run, data, weights, tmp_path):
    common = ["--data", data, "--weights", weights(), "--runs-dir", jax_run.root / "runs", "--no-progress"]
    run = jax_run("train-head", *common, "--epochs", "3")
    assert 0 <= metrics(run)["test_accuracy"] <= 1
    streamed = metrics(jax_run("train-head", *common, "--head", "dense", "--pooling", "flatten", "--stream",
                               "--epochs", "2"))
    assert streamed["epochs_run"] == 2 and 0 <= streamed["test_accuracy"] <= 1
    predictions = tmp_path / "p.csv"   # each parameter its own files
    jax_run("predict", run, data / "test", "--format", "csv", "-o", predictions)
    rows = predictions.read_text().splitlines()[1:]
    assert len(rows) == 24
    accuracy = sum(Path(r.split(",")[0]).parent.name == r.split(",")[1] for r in rows) / len(rows)
    assert abs(accuracy - metrics(run)["test_accuracy"]) < 1e-9, "predict reproduces the run's test accuracy"
    jax_run("export", run, "-o", tmp_path / "exported", "--format", "keras")
    assert (tmp_path / "exported" / "model.keras").is_file()


@pytest.mark.slow
def test_a_two_trial_search_on_jax(jax_run, data):
    out = Path(jax_run("search", "--data", data, "--weights", weights(), "--runs-dir", jax_run.root / "runs", "--name", "s",
                       "--param", "lr=1e-3|3e-3", "--trials", "2", "--epochs", "2", "--no-progress"))
    summary = json.loads(((out if out.is_absolute() else jax_run.root / out) / "search.json").read_text())
    assert len(summary["trials"]) == 2, summary


def test_an_unusable_backend_is_one_line(jax_run, data):
    env = {**os.environ, "KERAS_BACKEND": "bogus"}
    p = subprocess.run([sys.executable, "-m", "featcache.cli", "extract", "--data", str(data), "--weights", "random"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "KERAS_BACKEND" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_heads_trained_together_follow_their_trajectory_alone_on_jax(jax_run):
    """tests/heads/test_together.py with Keras on JAX (TensorFlow blocked): the same weights, histories and stops as
    each head alone, across the segments a pass is cut into as its heads stop."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(jax_run.root / "no-tensorflow")}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                        str(ROOT / "tests" / "heads" / "test_together.py")], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]



@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow is not installed")
def test_a_command_on_jax_leaves_an_installed_tensorflow_unimported(tmp_path):
    # Keras imports TensorFlow wherever it is installed, to seed its generators and to save a model: 2 s and 450 MB
    # more for every command on JAX (measured: train-head on a tiny cache 9.4-10.0 s and 960 MB, 6.7-6.9 s and 485 MB
    # without)
    folder = write_folder(tmp_path / "d", n_train=12, n_test=6)
    code = ("import sys\nfrom featcache.cli import main\n"
            "try:\n    main(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('tensorflow imported:', 'tensorflow' in sys.modules, file=sys.stderr)\n")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "FEATCACHE_CACHE_DIR": str(tmp_path / "c")}
    p = subprocess.run([sys.executable, "-c", code, "-q", "train-head", "--data", str(folder), "--weights", "random",
                        "--head", "dense", "--units", "8", "--epochs", "2", "--runs-dir", str(tmp_path / "runs"),
                        "--no-progress"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "runs").is_dir() and "tensorflow imported: False" in p.stderr, p.stderr[-3000:]
