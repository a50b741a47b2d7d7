import json

import h5py
import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def test_extract_prints_only_the_path_and_info_describes_it(image_folder, cache_dir):
    r = run("extract", "--data", image_folder, "--weights", "random", "--no-progress")
    assert r.exit_code == 0, r.output
    path = r.stdout.strip()
    assert path.startswith(str(cache_dir)) and path.endswith(".h5") and "\n" not in path
    assert "images/s" in r.stderr and "MB" in r.stderr
    info = json.loads(run("info", path, "--json").stdout)
    assert info["complete"] is True and info["layer"] == "block3_pool" and info["dtype"] == "float16"
    assert info["splits"] == {"train": {"n": 12, "shapes": {"block3_pool": [12, 4, 4, 256]}},
                              "test": {"n": 6, "shapes": {"block3_pool": [6, 4, 4, 256]}}}
    assert info["size_bytes"] > 12 * 4096 and info["meta"]["weights"] == "random:seed=0"
    assert info["meta"]["format_version"] == 1 and info["meta"]["key"] == featcache.open_cache(path).meta.key
    human = run("info", path).stdout
    assert "RANDOM WEIGHTS" in human and "complete      yes" in human
    again = run("extract", "--data", image_folder, "--weights", "random", "--no-progress")
    assert again.stdout.strip() == path and "cache hit" in again.stderr


def test_cache_dir_option_beats_env(image_folder, cache_dir, tmp_path):
    r = run("extract", "--data", image_folder, "--weights", "random", "--no-progress", "--limit", "2",
            "--cache-dir", tmp_path / "elsewhere")
    assert r.stdout.startswith(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("args, message", [
    (["--layer", "block9_pool"], "unknown layer 'block9_pool'; expected one of"),
    (["--input-size", "31"], "--input-size must be at least 32"),
    (["--data", "/nonexistent/data"], "no dataset at /nonexistent/data"),
    (["--weights", "/nonexistent/w.h5"], "weights file /nonexistent/w.h5 does not exist"),
])
def test_bad_input_gives_one_line_and_exit_2(image_folder, cache_dir, args, message):
    r = run("extract", "--data", image_folder, "--weights", "random", "--no-progress", *args)
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and r.stdout == ""


def test_batch_size_zero_is_refused(image_folder, cache_dir):
    r = run("extract", "--data", image_folder, "--batch-size", "0")
    assert r.exit_code == 2 and "--batch-size" in r.stderr


def test_info_on_a_foreign_file(tmp_path):
    path = tmp_path / "x.h5"
    h5py.File(path, "w").close()
    r = run("info", path)
    assert r.exit_code == 2 and "not a featcache cache" in r.stderr


def test_unwritable_cache_dir(image_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run("extract", "--data", image_folder, "--weights", "random", "--cache-dir", blocker / "sub")
    assert r.exit_code == 2 and "cannot create cache folder" in r.stderr


def test_help_is_fast_and_explains():
    r = run("extract", "--help")
    assert "--input-size" in r.stdout and "FEATCACHE_CACHE_DIR" in r.stdout


@pytest.fixture
def tiny_cache(image_folder, cache_dir):
    return run("extract", "--data", image_folder, "--weights", "random", "--no-progress").stdout.strip()


@pytest.mark.slow
def test_train_head_end_to_end(tiny_cache, tmp_path):
    r = run("train-head", "--cache", tiny_cache, "--head", "dense", "--epochs", "2", "--units", "8,8", "--runs-dir",
            tmp_path / "runs", "--no-progress")
    assert r.exit_code == 0, r.output
    run_dir = tmp_path / "runs" / r.stdout.strip().split("/")[-1]
    assert r.stdout.strip() == str(run_dir) and (run_dir / "model.keras").exists()
    assert "RANDOM backbone weights" in r.stderr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["units"] == [8, 8] and config["random_weights"] is True
    assert config["data"]["cache_meta"]["layer"] == "block3_pool"
    table = run("runs", "--runs-dir", tmp_path / "runs")
    assert "RANDOM WEIGHTS" in table.stdout and "dense" in table.stdout
    rows = json.loads(run("runs", "--runs-dir", tmp_path / "runs", "--json").stdout)
    assert rows[0]["model"] == "dense"


def test_train_head_builds_the_cache_from_selection_options(image_folder, cache_dir, tmp_path):
    r = run("train-head", "--data", image_folder, "--weights", "random", "--head", "linear", "--epochs", "1",
            "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.exit_code == 0, r.output
    assert len([p for p in cache_dir.glob("*.h5") if not p.name.endswith(".pooled.h5")]) == 1


def test_train_head_names_what_differs_from_the_cache(tiny_cache, tmp_path):
    r = run("train-head", "--cache", tiny_cache, "--layer", "block2_pool", "--runs-dir", tmp_path)
    assert r.exit_code == 2 and "layer: cache has 'block3_pool', asked for 'block2_pool'" in r.stderr
    r = run("train-head", "--cache", tiny_cache, "--limit", "2", "--runs-dir", tmp_path)
    assert r.exit_code == 2 and "dataset_fingerprint: cache has" in r.stderr and "limit" in r.stderr


@pytest.mark.slow
def test_train_baseline_ann_on_pixels(image_folder, tmp_path):
    r = run("train-baseline", "ann", "--data", image_folder, "--epochs", "1", "--runs-dir", tmp_path, "--no-progress")
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / r.stdout.strip().split("/")[-1] / "metrics.json").read_text())
    assert metrics["n_test"] == 6 and metrics["random_weights"] is False


@pytest.mark.parametrize("args, message", [
    (["--units", ""], "--units"), (["--units", "400,0"], "--units"), (["--units", "400,-2"], "--units"),
    (["--units", "4a"], "--units"), (["--units", "400,,256"], "--units"),
    (["--dropout", "1"], "--dropout"), (["--dropout", "-0.1"], "--dropout"),
    (["--val-fraction", "0"], "--val-fraction"), (["--val-fraction", "1"], "--val-fraction"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_training_options_exit_2(tiny_cache, tmp_path, args, message):
    r = run("train-head", "--cache", tiny_cache, "--runs-dir", tmp_path / "runs", *args)
    assert r.exit_code == 2 and message in r.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written"


def test_train_head_hands_its_config_down_as_one_object(tiny_cache, tmp_path, monkeypatch):
    """The command builds one TrainConfig (validated once) and passes it down; it is never flattened into keywords
    and rebuilt. Fields beside a config are refused."""
    import heads.train as ht

    seen, built, real = [], [], ht.TrainConfig
    monkeypatch.setattr(ht, "train", lambda data, config, **kw: seen.append(config) or 1 / 0)
    monkeypatch.setattr(ht, "TrainConfig", lambda **kw: built.append(kw) or real(**kw))
    with pytest.raises(ZeroDivisionError):
        run("train-head", "--cache", tiny_cache, "--units", "8", "--epochs", "1", "--runs-dir", tmp_path)
    assert seen[0].units == (8,) and seen[0].epochs == 1
    assert built == []   # heads.train built no TrainConfig of its own: the command's came down whole
    monkeypatch.undo()
    with pytest.raises(TypeError, match="inside the TrainConfig"):
        ht.train_head(tiny_cache, config=seen[0], epochs=3)
