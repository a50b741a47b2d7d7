"""Bad and messy input from a newcomer's and an attacker's try: each gets a right result or one line."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.sources import load_dataset, read_image
from tests.support import ROOT, write_folder


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    path = tmp_path / "g16.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = read_image(path)
    assert pixels.shape == (8, 64, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255 and abs(pixels.mean() - 127.5) < 2


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    img = np.zeros((16, 32, 3), np.uint8)
    img[:, :16] = 255   # left half white, 32 wide and 16 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6    # "rotate 90 CW to display"
    Image.fromarray(img).save(tmp_path / "r.jpg", exif=exif, quality=95)
    shown = read_image(tmp_path / "r.jpg")
    assert shown.shape == (32, 16, 3)                           # displayed upright: 16 wide, 32 high
    assert shown[:8].mean() > 200 and shown[-8:].mean() < 50   # the white half is now on top


def test_system_files_in_class_folders_are_skipped(tmp_path):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store"):
        (root / "train" / "ant" / name).write_bytes(b"junk")
    ds = load_dataset(root)
    assert len(ds.train) == 6 and not any("Thumbs" in p or "ini" in p for p in ds.train.paths)


def test_limit_that_drops_classes_warns(tmp_path, caplog):
    root = write_folder(tmp_path / "d", n_train=4, n_test=2)
    with caplog.at_level("WARNING"):
        load_dataset(root, limit=4)   # the first 4 rows of a class-ordered folder: one class
    assert "keeps 1 of the 3 classes" in caplog.text and "--per-class" in caplog.text


def test_views_mismatch_with_cache_is_refused(image_folder, cache_dir):
    path = run("extract", "--data", image_folder, "--weights", "random", "--no-progress").stdout.strip()
    for args, field in ((["--views", "4"], "views"), (["--views", "4", "--augment", "flip"], "views")):
        r = run("train-head", "--cache", path, *args, "--epochs", "1", "--no-progress")
        assert r.exit_code == 2 and f"{field}: cache has 1, asked for 4" in r.stderr, r.output


def test_runs_table_survives_damaged_runs(tmp_path):
    from tests.heads.test_train import fake_run

    fake_run(tmp_path, "good", val=0.7, test=0.6)
    fake_run(tmp_path, "truncated", val=0.8, test=0.6)
    (tmp_path / "truncated" / "metrics.json").write_text('{"val_accuracy": 0.8, "te')
    fake_run(tmp_path, "old-layout", val=0.8, test=0.6)
    (tmp_path / "old-layout" / "metrics.json").write_text('{"accuracy": 0.8}')
    fake_run(tmp_path, "no-config", val=0.8, test=0.6)
    (tmp_path / "no-config" / "config.json").unlink()
    r = run("runs", "--runs-dir", tmp_path)
    assert r.exit_code == 0 and "good" in r.stdout
    for name in ("truncated", "old-layout", "no-config"):
        assert name not in r.stdout and f"skipping {tmp_path / name}" in r.stderr


def test_unwritable_runs_dir_is_refused_before_training(image_folder, cache_dir, tmp_path, monkeypatch):
    import heads.train as ht

    path = run("extract", "--data", image_folder, "--weights", "random", "--no-progress").stdout.strip()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(ht, "fit", lambda *a, **k: pytest.fail("trained before checking --runs-dir"))
    r = run("train-head", "--cache", path, "--runs-dir", blocked / "runs", "--no-progress")
    assert r.exit_code == 2 and "--runs-dir" in r.stderr and "resume" not in r.stderr


def test_interrupted_run_write_leaves_no_run_folder(tmp_path, monkeypatch):
    import heads.reports as reports
    from heads import train as ht
    from heads.train import TrainConfig
    from tests.heads.test_train import blob_data

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(reports, "plot_curves", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ht.train(blob_data(), TrainConfig(units=(8,), epochs=1), runs_dir=tmp_path, progress=False)
    assert os.listdir(tmp_path) == []


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("featcache, version ")


def test_help_explains_every_training_option():
    text = run("train-head", "--help").stdout
    for option in ("--seed", "--pooling", "--runs-dir", "--batch-size", "--per-class", "--subset-seed", "--dropout",
                   "--epochs", "--precision", "--backbone"):
        block = text.split("\n  " + option, 1)[1].split("\n  --", 1)[0]
        assert len(block.split()) > 4, option   # more than a type and a default


def test_cache_hit_needs_no_write_access(image_folder, cache_dir, monkeypatch):
    import sys

    fx = sys.modules["featcache.extract.build"]

    path = run("extract", "--data", image_folder, "--weights", "random", "--no-progress").stdout.strip()

    def refuse(*a, **k):
        raise AssertionError("a cache hit must not create folders or lock files")

    monkeypatch.setattr(fx.system, "writable_folder", refuse)
    monkeypatch.setattr(fx, "cache_lock", refuse)
    r = run("extract", "--data", image_folder, "--weights", "random", "--no-progress")
    assert r.exit_code == 0 and r.stdout.strip() == path and "cache hit" in r.stderr


def test_partial_being_written_is_not_called_deletable(tmp_path):
    import fcntl

    import h5py

    final = tmp_path / "x-block3_pool-0123456789ab.h5"
    partial = final.with_name(final.name + ".partial")
    h5py.File(partial, "w").close()
    with open(final.with_name(final.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = run("info", partial)
    assert r.exit_code == 2 and "being written by another featcache process" in r.stderr
    assert "delete it" not in r.stderr


@pytest.mark.parametrize("args, memory", [(["--batch-size", "1000000"], 5 << 20),
                                          (["--input-size", "10000", "--limit", "1"], None)])
def test_a_batch_that_cannot_fit_in_memory_is_refused_up_front(image_folder, cache_dir, monkeypatch, args, memory):
    import sys

    if memory is not None:   # 12 images of 32x32 in one batch need ~6 MB: pretend 5 MB are free
        monkeypatch.setattr(sys.modules["featcache.system"], "available_memory", lambda: memory)
    r = run("extract", "--data", image_folder, "--weights", "random", "--no-progress", *args)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert r.exit_code == 2 and len(errors) == 1 and "GB of memory is available" in errors[0], r.stderr
    assert "one batch of 12 images" in errors[0] if memory else "one batch of 1 images" in errors[0]
    assert not list(cache_dir.glob("*.partial"))


def test_baseline_on_mixed_sizes_takes_input_size(tmp_path, cache_dir):
    from PIL import Image

    root = write_folder(tmp_path / "d", n_train=3, n_test=1)
    Image.new("RGB", (40, 48)).save(root / "train" / "ant" / "big.png")
    r = run("train-baseline", "ann", "--data", root, "--epochs", "1", "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.exit_code == 2 and "--input-size" in r.stderr
    r = run("train-baseline", "ann", "--data", root, "--input-size", "32", "--epochs", "1", "--runs-dir",
            tmp_path / "runs", "--no-progress")
    assert r.exit_code == 0, r.output


def test_cache_made_from_a_relative_path_works_from_another_folder(tmp_path, cache_dir, monkeypatch):
    write_folder(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    path = run("extract", "--data", "d", "--weights", "random", "--no-progress").stdout.strip()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = run("train-head", "--cache", path, "--limit", "2", "--epochs", "1", "--no-progress")
    assert r.exit_code == 2 and "limit: cache has 0, asked for 2" in r.stderr   # compared, not "no dataset at d"


@pytest.mark.parametrize("labels", [np.array(["ant", "bee", "cow"] * 4), np.array([0.0, 1.0, np.nan] * 4)])
def test_npz_with_string_or_nan_labels(tmp_path, cache_dir, labels):
    from tests.support import random_images

    path = tmp_path / "bad.npz"
    np.savez(path, x_train=random_images(12), y_train=labels, x_test=random_images(3), y_test=np.arange(3))
    r = run("extract", "--data", path, "--weights", "random", "--no-progress")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "y_train must hold integer labels" in r.stderr


def test_file_name_that_is_not_utf8(tmp_path, cache_dir):
    from PIL import Image

    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    odd = os.path.join(os.fsencode(root / "train" / "ant"), b"caf\xe9.png")
    with open(odd, "wb") as f:
        Image.new("RGB", (32, 32), (9, 9, 9)).save(f, format="PNG")
    r = run("extract", "--data", root, "--weights", "random", "--no-progress")
    # refused before any work, as folder names are: stored with U+FFFD, the cache's path would name no file
    assert r.exit_code == 2 and "caf\ufffd.png" in r.stderr and "rename it" in r.stderr, r.output
    assert r.stderr.strip().count("\n") == 0 and not list(cache_dir.rglob("*.h5*"))


def test_decompression_bomb_is_one_line(tmp_path, cache_dir, monkeypatch):
    from PIL import Image

    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # a 32x32 image now counts as a bomb (> 2x the limit)
    r = run("extract", "--data", root, "--weights", "random", "--no-progress")
    assert r.exit_code == 2 and "cannot read image" in r.stderr and "decompression bomb" in r.stderr.lower()
    assert r.stderr.strip().count("\n") == 0


def test_broken_tar_is_one_line(tmp_path, cache_dir):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b" + os.urandom(200))
    r = run("extract", "--data", path, "--weights", "random", "--no-progress")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "cannot read" in r.stderr


def test_keras_download_messages_stay_off_stdout(cache_dir, monkeypatch):
    import keras

    def offline():
        print("Downloading data from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
        raise Exception("URL fetch failure")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    r = run("extract", "--data", "cifar10", "--weights", "random", "--no-progress")
    assert r.exit_code == 2 and r.stdout == "" and "Downloading data" in r.stderr


def test_python_api_options_are_checked_by_their_names():
    from featcache.errors import BadInputError
    from featcache.extract import plan
    from heads.train import TrainConfig

    with pytest.raises(BadInputError, match="--input-size must be a whole number"):
        plan(data="cifar10", weights="random", input_size=40.7)
    assert TrainConfig(units="400,256").units == (400, 256)
    with pytest.raises(BadInputError, match="--units"):
        TrainConfig(units="4x")


@pytest.mark.slow
def test_tensorflow_start_up_chatter_is_kept_off_stderr(image_folder, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "FEATCACHE_CACHE_DIR": str(tmp_path / "c")}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    out = subprocess.run([sys.executable, "-m", "featcache.cli", "extract", "--data", str(image_folder),
                          "--weights", "random", "--no-progress"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    noise = [line for line in out.stderr.splitlines() if any(
        word in line for word in ("oneDNN", "cuda", "absl", "I0000", "E0000", "W0000"))]
    assert noise == [], noise


def test_unreadable_image_fails_before_any_work_and_can_be_skipped(tmp_path, cache_dir):
    root = write_folder(tmp_path / "d", n_train=3, n_test=2)
    (root / "train" / "bee" / "zz-broken.png").write_bytes(b"not an image at all")
    r = run("extract", "--data", root, "--weights", "random", "--no-progress")
    assert r.exit_code == 2 and "zz-broken.png" in r.stderr and "--skip-bad-images" in r.stderr
    assert not cache_dir.exists() or not list(cache_dir.iterdir())   # refused before the cache was started
    r = run("extract", "--data", root, "--weights", "random", "--no-progress", "--skip-bad-images")
    assert r.exit_code == 0, r.output
    info = json.loads(run("info", r.stdout.strip(), "--json").stdout)
    assert info["splits"]["train"]["n"] == 9
    assert [p for p, _ in info["meta"]["skipped_images"]] == ["train/bee/zz-broken.png"]
    assert "skipped       1 unreadable images: train/bee/zz-broken.png" in run("info", r.stdout.strip()).stdout


def test_image_that_breaks_mid_run_keeps_the_finished_batches(tmp_path, cache_dir):
    root = write_folder(tmp_path / "d", n_train=3, n_test=2)
    good = (root / "train" / "cow" / "00.png").read_bytes()
    (root / "train" / "cow" / "zz-truncated.png").write_bytes(good[: len(good) // 2])   # header fine, data cut
    r = run("extract", "--data", root, "--weights", "random", "--no-progress", "--batch-size", "2")
    assert r.exit_code == 2 and "zz-truncated.png" in r.stderr
    partial = list(cache_dir.glob("*.partial"))
    assert len(partial) == 1 and "rows computed so far stay in" in r.stderr
    import h5py

    with h5py.File(partial[0], "r") as f:
        assert f["progress"][0] >= 8   # the batches before the broken image


def test_interrupted_training_does_not_promise_a_resume(image_folder, cache_dir, tmp_path, monkeypatch):
    import heads.train as ht

    path = run("extract", "--data", image_folder, "--weights", "random", "--no-progress").stdout.strip()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ht, "fit", ctrl_c)
    r = run("train-head", "--cache", path, "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.exit_code == 130 and "resume" not in r.stderr and "no run folder was written" in r.stderr
    assert list((tmp_path / "runs").iterdir()) == []


class _DroppedInterrupt:
    """Ctrl-C landing in a `__del__`: the handler's KeyboardInterrupt is raised there, and Python drops it."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def test_a_ctrl_c_python_dropped_still_stops_training(tiny_cache, tmp_path, monkeypatch):
    # TensorFlow runs weakref callbacks and __del__s all the time; a Ctrl-C landing in one was lost, and the
    # command trained on as if never interrupted
    import heads.fit as hf

    logged = hf.epoch_log

    def dropping(epochs, progress):
        callback = logged(epochs, progress)
        ends = callback.on_epoch_end
        callback.on_epoch_end = lambda epoch, logs=None: (ends(epoch, logs), _DroppedInterrupt())
        return callback

    monkeypatch.setattr(hf, "epoch_log", dropping)
    r = run("train-head", "--cache", tiny_cache, "--head", "dense", "--units", "8", "--epochs", "50", "--patience",
            "50", "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.exit_code == 130 and "no run folder was written" in r.stderr, r.output
    assert "Exception ignored" not in r.stderr   # the dropped interrupt is raised, not printed
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_make_clean_copes_with_a_missing_cache_folder_and_honours_runs_dir(tmp_path):
    import shutil
    import subprocess

    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "my-runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs").mkdir()   # the default folder: not the one asked for, so it stays
    out = subprocess.run(["make", "clean", "CACHE_DIR=no-such-cache", "RUNS_DIR=my-runs"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "my-runs").exists() and (tmp_path / "runs").exists()


def test_loss_curve_uses_a_log_scale_when_the_first_epoch_is_huge(tmp_path, monkeypatch):
    import matplotlib.axes

    from heads.reports import plot_curves

    scales = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale", lambda self, value, **kw: scales.append(value))
    history = {"loss": [900.0, 1.2, 0.9], "val_loss": [5000.0, 1.1, 1.0], "accuracy": [0.1, 0.5, 0.6],
               "val_accuracy": [0.1, 0.5, 0.55]}
    plot_curves(history, 3, tmp_path / "c.png", "t")
    assert scales == ["log"] and (tmp_path / "c.png").stat().st_size > 0
    scales.clear()
    plot_curves({**history, "loss": [1.5, 1.2, 0.9], "val_loss": [1.4, 1.1, 1.0]}, 3, tmp_path / "d.png", "t")
    assert scales == []


def test_any_format_pillow_reads(tmp_path, cache_dir):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "formats"
    kinds = {"png": "RGBA", "bmp": "RGB", "gif": "P", "tiff": "RGB", "webp": "RGB", "jpg": "L"}
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for ext, mode in kinds.items():
                img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert(mode)
                img.save(root / split / c / f"x.{ext}")
    ds = load_dataset(root)
    pixels = ds.train.load(0, len(ds.train), (32, 32))
    assert pixels.shape == (12, 32, 32, 3) and pixels.dtype == np.uint8
    r = run("extract", "--data", root, "--weights", "random", "--no-progress")
    assert r.exit_code == 0, r.output


def test_interrupted_forced_extraction_does_not_promise_a_resume(image_folder, cache_dir, monkeypatch):
    import sys

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["featcache.extract.local"], "run_local", ctrl_c)
    r = run("extract", "--data", image_folder, "--weights", "random", "--no-progress", "--force")
    assert r.exit_code == 130 and "a rerun with --force starts again from the first batch" in r.stderr


@pytest.mark.parametrize("command", ["train-head", "search"])
@pytest.mark.parametrize("name", ["../../../escaped", "a/b", "x" * 300])
def test_a_name_is_one_short_file_name_checked_before_any_work(tiny_cache, tmp_path, command, name):
    # a search named '../../../escaped' wrote its study and winner outside --runs-dir; 300 characters trained first
    extra = ["--param", "lr=1e-3|3e-3", "--trials", "2"] if command == "search" else []
    r = run(command, "--cache", tiny_cache, "--runs-dir", tmp_path / "runs" / "e", "--name", name, *extra)
    assert r.exit_code == 2 and "--name must be one file name" in r.output, r.output
    assert not [p for p in tmp_path.rglob("*") if "escaped" in p.name or p.name.startswith("search-")]


@pytest.mark.slow
def test_auto_never_chooses_a_diverged_head(tiny_cache, tmp_path):
    # --lr 1e5: the dense head's validation loss was NaN, and min() over it kept the dense head
    r = run("-q", "train-head", "--cache", tiny_cache, "--runs-dir", tmp_path, "--lr", "1e5", "--epochs", "2")
    assert r.exit_code == 0, r.output
    metrics = json.loads((Path(r.output.strip().splitlines()[-1]) / "metrics.json").read_text())
    assert np.isfinite(metrics["val_loss"]) and metrics["chosen"] == "linear", metrics


@pytest.mark.parametrize("args, words", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--l2", "inf"], "--l2 must be a finite number"),
    (["--units", "1000000000"], "each at most 65,536"),
])
def test_options_that_cannot_work_are_refused_before_any_work(tiny_cache, tmp_path, args, words):
    r = run("train-head", "--cache", tiny_cache, "--runs-dir", tmp_path / "runs", *args)
    assert r.exit_code == 2 and words in r.output, r.output
    assert not (tmp_path / "runs").exists()


def test_a_search_range_needs_finite_bounds(tiny_cache, tmp_path):
    r = run("search", "--cache", tiny_cache, "--runs-dir", tmp_path, "--param", "lr=1e-4:inf:log")
    assert r.exit_code == 2 and "finite bounds" in r.output, r.output
