"""Run folders and exports read back as one bound whole: a model.keras from another run, damaged JSON, a FIFO
where a record should be, outputs over existing files or into run folders, weights known by the file loaded. Each
test failed on the code before these checks (a traceback, a silently wrong answer, a hang or lost data)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache import backbones
from featcache.cli import main
from featcache.errors import MissingInputError
from featcache.extract import extract
from heads.train import train_head
from tests.support import ROOT


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.support import write_folder

    tmp = tmp_path_factory.mktemp("records")
    folder = write_folder(tmp / "tiny")
    cache = extract(data=folder, cache_dir=tmp / "cache", weights="random", batch_size=4, progress=False)
    made = {m: train_head(cache, model=m, units=(8,), epochs=2, runs_dir=tmp / "runs", progress=False).run_dir
            for m in ("dense", "linear")}
    return folder, made


def copy_run(run_dir, tmp_path) -> Path:
    out = tmp_path / run_dir.name
    shutil.copytree(run_dir, out)
    return out


@pytest.mark.slow
def test_a_model_from_another_run_is_refused_by_predict_and_inspect(runs, tmp_path):
    folder, made = runs
    run_dir = copy_run(made["dense"], tmp_path)
    shutil.copy(made["linear"] / "model.keras", run_dir / "model.keras")   # same classes: answers would look fine
    for args in (("predict", run_dir, folder / "test"), ("inspect", run_dir)):
        r = run(*args)
        assert r.exit_code == 2 and "is not the model config.json records" in r.output, r.output
    assert not (run_dir / "mistakes.md").exists()


@pytest.mark.parametrize("damage", ["truncated", "list", "no classes"])
def test_damaged_run_records_are_one_line(runs, tmp_path, damage):
    folder, made = runs
    run_dir = copy_run(made["dense"], tmp_path)
    config = run_dir / "config.json"
    text = config.read_text()
    config.write_text({"truncated": text[: len(text) // 2], "list": "[1, 2]",
                       "no classes": json.dumps({**json.loads(text), "class_names": []})}[damage])
    r = run("predict", run_dir, folder / "test")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "config.json" in r.output, r.output


def test_an_export_whose_class_list_was_trimmed_is_refused(runs, tmp_path):
    folder, made = runs
    assert run("export", made["dense"], "-o", tmp_path / "exp").exit_code == 0
    record = json.loads((tmp_path / "exp" / "export.json").read_text())
    record["class_names"] = record["class_names"][:-1]
    (tmp_path / "exp" / "export.json").write_text(json.dumps(record))
    r = run("predict", tmp_path / "exp", folder / "test")
    assert r.exit_code == 2 and "class names" in r.output, r.output


def test_runs_skips_a_deeply_nested_record_and_never_opens_a_fifo(runs, tmp_path):
    _, made = runs
    nested = copy_run(made["dense"], tmp_path / "r")
    (nested / "metrics.json").write_text("[" * 100000 + "]" * 100000)
    fifo = copy_run(made["linear"], tmp_path / "r")
    (fifo / "metrics.json").unlink()
    os.mkfifo(fifo / "metrics.json")
    p = subprocess.run([sys.executable, "-m", "featcache.cli", "runs", "--runs-dir", str(tmp_path / "r")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.count("skipping") == 2, p.stderr


def test_predict_writes_its_output_whole_and_never_over_a_file_or_into_a_run(runs, tmp_path):
    folder, made = runs
    out = tmp_path / "pred.csv"
    out.write_text("keep me\n")
    r = run("predict", made["dense"], folder / "test", "-o", out)
    assert r.exit_code == 2 and "exists" in r.output and out.read_text() == "keep me\n", r.output
    assert run("predict", made["dense"], folder / "test", "-o", out, "--force").exit_code == 0
    assert out.read_text().startswith("path,")
    before = (made["dense"] / "model.keras").read_bytes()
    r = run("predict", made["dense"], folder / "test", "-o", made["dense"] / "model.keras", "--force")
    assert r.exit_code == 2 and "inside a run" in r.output
    assert (made["dense"] / "model.keras").read_bytes() == before


def test_export_never_writes_into_a_run_nor_over_an_export_without_force(runs, tmp_path):
    _, made = runs
    before = sorted(p.name for p in made["dense"].iterdir())
    r = run("export", made["dense"], "-o", made["dense"], "--format", "keras")
    assert r.exit_code == 2 and "is a run folder" in r.output
    assert sorted(p.name for p in made["dense"].iterdir()) == before
    assert run("export", made["dense"], "-o", tmp_path / "x").exit_code == 0
    r = run("export", made["linear"], "-o", tmp_path / "x")
    assert r.exit_code == 2 and "not empty" in r.output
    assert json.loads((tmp_path / "x" / "export.json").read_text())["run"].endswith(made["dense"].name)
    assert run("export", made["linear"], "-o", tmp_path / "x", "--force").exit_code == 0
    assert json.loads((tmp_path / "x" / "export.json").read_text())["run"].endswith(made["linear"].name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_imagenet_weights_on_disk_are_known_by_their_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WEIGHTS_DIR", str(tmp_path))
    weights = tmp_path / backbones.get("vgg16").weights_file
    weights.write_bytes(b"genuine")
    genuine = backbones.weights_identity("imagenet")
    assert genuine == backbones.weights_identity(str(weights))   # the same key as --weights PATH
    weights.write_bytes(b"tampered")
    assert backbones.weights_identity("imagenet") != genuine


def test_weights_that_are_a_folder_say_so(tmp_path):
    with pytest.raises(MissingInputError, match="is a folder"):
        backbones.weights_identity(str(tmp_path))


@pytest.mark.slow
def test_predict_refuses_a_fifo_named_as_an_image(runs, tmp_path):
    _, made = runs
    os.mkfifo(tmp_path / "pipe.png")
    p = subprocess.run([sys.executable, "-m", "featcache.cli", "predict", str(made["dense"]), str(tmp_path / "pipe.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a regular file" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("content", [b"params = 5\n", b"[params]\nlr = ['\xff']\n"])
def test_a_malformed_space_file_is_one_line(runs, tmp_path, content):
    folder, _ = runs
    space = tmp_path / "space.toml"
    space.write_bytes(content)
    r = run("search", "--data", folder, "--weights", "random", "--space", space, "--runs-dir", tmp_path,
            "--cache-dir", tmp_path / "c")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "space" in r.output, r.output


def test_verify_with_a_backend_that_is_not_installed_is_one_line(runs):
    cache = next(p for p in (Path(runs[1]["dense"]).parents[1] / "cache").glob("*.h5") if "pooled" not in p.name)
    env = {**os.environ, "KERAS_BACKEND": "torch" if not importlib.util.find_spec("torch") else "bogus"}
    p = subprocess.run([sys.executable, "-m", "featcache.cli", "info", "--verify", str(cache)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "KERAS_BACKEND" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.fixture
def full_disk(tmp_path):
    from tests.support import small_disk

    yield from small_disk(tmp_path / "full", "64m")


def test_a_search_whose_study_cannot_be_written_is_one_line(runs, full_disk):
    folder, _ = runs
    (full_disk / "search-s").mkdir()
    (full_disk / "filler").write_bytes(b"\0" * shutil.disk_usage(full_disk).free)
    r = run("-q", "search", "--data", folder, "--weights", "random", "--cache-dir", full_disk.parent / "c",
            "--runs-dir", full_disk, "--name", "s", "--param", "lr=1e-3|3e-3")
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "study.db" in errors[0] and "--storage" not in r.output, r.output



def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` but `leave` bytes; the filler, to delete for room again."""
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "predict"])
def test_outputs_on_a_full_disk_are_one_line_and_leave_what_was_there(runs, full_disk, command):
    """An export or predictions that do not fit: one line, exit 2, no half-written output under its name, nothing
    left in the way of the rerun; an earlier output replaced with --force is kept whole (issue 32, mechanism 9)."""
    folder, made = runs
    out = full_disk / ("exp" if command == "export" else "pred.csv")
    args = (("export", made["dense"], "-o", out) if command == "export" else
            ("predict", made["dense"], folder / "test", "-o", out))
    r = run(*args)
    assert r.exit_code == 0, r.output
    before = {p.relative_to(full_disk): p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()}
    filler = fill(full_disk, 0)
    r = run(*args, "--force")
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "is full" in errors[0] and str(out) in errors[0], r.output
    assert "Traceback" not in r.output
    after = {p.relative_to(full_disk): p.read_bytes() for p in [out, *out.rglob("*")] if p.is_file()}
    assert after == before, "the earlier output must be kept whole"
    assert sorted(p.name for p in full_disk.iterdir()) == sorted(["filler", out.name]), "no temporary file left"
    shutil.rmtree(out) if out.is_dir() else out.unlink()
    filler.rename(full_disk / "filler-1")
    fill(full_disk, 0)   # no room for a new output either
    r = run(*args)
    assert r.exit_code == 2 and not out.exists() and "is full" in r.output, r.output
    for filler in full_disk.glob("filler*"):
        filler.unlink()
    assert run(*args).exit_code == 0, "the rerun must not be refused by what the failed one left"
