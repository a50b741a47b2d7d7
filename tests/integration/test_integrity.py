"""What featcache writes is checked before it takes its name, and what it reads is the file it wrote: full
disks, swapped or edited shards, tampered metadata, shards vanishing mid-run, kill lists on disk, leftovers.
Each test was written against the code before these checks, where it failed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.cache import shards as join
from featcache.cache.read import verify_content
from featcache.cli import main
from featcache.errors import BadInputError, CacheError
from featcache.extract import extract
from tests.featcache.cache.test_shards import OPTS, sharded
from tests.support import small_disk


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def joined(image_folder, tmp_path):
    path, units = sharded(image_folder, tmp_path / "c", rows=5)
    return path, [join.shard_path(join.folder(path), u) for u in units]


# --------------------------------------------------------------------------- one write path: checked before renamed

@pytest.fixture
def full_disk(tmp_path):
    """A 600 kB tmpfs (where this machine lets us mount one): room for a copy's features, not for the whole file."""
    yield from small_disk(tmp_path / "full", "600k")


def test_consolidate_onto_a_full_disk_leaves_no_complete_looking_file(joined, full_disk):
    path, _ = joined
    before = featcache.open_cache(path)
    filler = full_disk / "filler"
    free = shutil.disk_usage(full_disk).free
    need = path.stat().st_size + featcache.cache.expected_bytes(before.meta)
    filler.write_bytes(b"\0" * max(0, free - need + (64 << 10)))   # the features fit; the whole file does not
    r = run("consolidate", path, "-o", full_disk)
    assert r.exit_code in (1, 2) and "error" in r.output, r.output
    assert not (full_disk / path.name).exists(), "no file may take the final name"
    assert not [p for p in full_disk.iterdir() if p.name != "filler"], "nor may a temporary one stay"
    assert featcache.open_cache(path).kind == "virtual"


def test_a_copy_that_reads_back_other_than_written_is_refused_and_the_original_kept(joined, monkeypatch):
    path, _ = joined
    real = join.copy_rows

    def lossy(source, target, block_bytes, *, digest=None):   # a device that loses writes silently
        real(source, target, block_bytes, digest=digest)
        target[0] = 0

    monkeypatch.setattr(join, "copy_rows", lossy)
    with pytest.raises(CacheError, match="failed its check after writing .*read back differ"):
        join.consolidate(path)
    assert featcache.open_cache(path).kind == "virtual", "the joined cache was not replaced"


def test_consolidate_refuses_to_replace_a_file_that_is_not_this_cache(joined, tmp_path):
    path, _ = joined
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    r = run("consolidate", path, "-o", target)
    assert r.exit_code == 2 and "exists and is not this cache" in r.output and target.read_text() == "mine"
    r = run("consolidate", path, "-o", tmp_path / "no" / "such" / "folder")
    assert r.exit_code == 2 and "no folder" in r.output and len(r.output.strip().splitlines()) == 1
    assert run("-q", "consolidate", path, "-o", target, "--force").exit_code == 0
    assert featcache.open_cache(target).kind == "file"


def test_a_temporary_file_of_a_killed_run_is_removed_by_the_next(tmp_path):
    from featcache.cache.files import sweep, temporary_path

    final = tmp_path / "x.pooled.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = temporary_path(final, "pooling")   # this process is alive: its file is being written
    mine.write_bytes(b"y")
    left = mine.with_name(mine.name.replace(f".{os.getpid()}.tmp", f".{dead}.tmp"))
    left.write_bytes(b"x" * 100)
    elsewhere = final.with_name(f".{final.name}.pooling.another-host.{dead}.tmp")   # a host sharing the folder
    elsewhere.write_bytes(b"z")
    assert sweep(tmp_path) == [left] and not left.exists() and mine.exists() and elsewhere.exists()


# --------------------------------------------------------------------------- shards known by content

def test_a_shard_swapped_for_another_of_the_same_size_is_refused(joined):
    path, files = joined
    a, b = files[0], files[1]   # train 0-5 and 5-10: the same size
    assert a.stat().st_size == b.stat().st_size
    tmp = a.with_name("swap")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(CacheError, match="is not the file it joined .*rows"):
        featcache.open_cache(path)
    r = run("info", path)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_a_shard_recomputed_into_another_file_is_refused(joined, image_folder, tmp_path):
    path, files = joined
    again, _ = sharded(image_folder, tmp_path / "again", rows=5)   # same key, rows and size; another file
    shutil.copy(join.folder(again) / files[2].name, files[2])
    with pytest.raises(CacheError, match="file_id"):
        featcache.open_cache(path)


@pytest.mark.parametrize("offset", [0, 0.37, 0.99])
def test_any_change_of_a_shards_features_is_found_by_a_content_check(joined, offset):
    path, files = joined
    assert verify_content(featcache.open_cache(path)) == len(files)
    with h5py.File(files[3], "r+") as f:   # test rows 0-5: edit one value in place, size unchanged
        x = f["test/features"]
        flat = x[...].reshape(-1)
        i = int(offset * (flat.size - 1))
        flat[i] = flat[i] + 1
        x[...] = flat.reshape(x.shape)
    cache = featcache.open_cache(path)   # the cheap checks pass (same file, size and identity) ...
    with pytest.raises(CacheError, match=f"shard {files[3]} changed"):
        verify_content(cache)            # ... the content check does not
    assert run("info", path, "--verify").exit_code == 2


@pytest.mark.parametrize("attribute, value", [("backbone", "resnet50"), ("layer", "block4_pool"),
                                              ("weights", "random:seed=1"), ("input_shape", "[64, 64, 3]"),
                                              ("dtype", "float32"), ("dataset_fingerprint", "0" * 64),
                                              ("limit", 3), ("views", 1), ("augment_seed", 5)])
def test_an_edited_key_attribute_is_refused_as_tampered(image_folder, cache_dir, attribute, value):
    path = extract(data=image_folder, cache_dir=cache_dir, progress=False, **OPTS)
    with h5py.File(path, "r+") as f:
        f.attrs[attribute] = value
    with pytest.raises(CacheError, match="tampered"):
        featcache.open_cache(path)


def test_a_tampered_cache_renamed_to_its_new_key_is_no_hit_for_the_other_layer(image_folder, cache_dir):
    path = extract(data=image_folder, cache_dir=cache_dir, progress=False, weights="random")
    with h5py.File(path, "r+") as f:
        f.attrs["layer"] = "block4_pool"
        key = featcache.CacheMeta.from_attrs(f.attrs).key
    renamed = path.with_name(f"{path.name.split('-block3_pool-')[0]}-block4_pool-{key[:12]}.h5")
    path.rename(renamed)
    assert featcache.open_cache(renamed).meta.layer == "block4_pool"   # self-consistent: name and attributes agree
    with pytest.raises(CacheError, match="tampered"):
        extract(data=image_folder, cache_dir=cache_dir, progress=False, weights="random", layer="block4_pool")
    r = run("train-head", "--cache", renamed, "--weights", "random", "--runs-dir", cache_dir / "runs")
    assert r.exit_code == 2 and "tampered" in r.output


# --------------------------------------------------------------------------- reading the file it wrote

def test_a_shard_that_vanishes_during_streamed_training_stops_it_and_writes_no_run(joined, tmp_path, monkeypatch):
    from heads import train as ht

    path, files = joined
    runs = tmp_path / "runs"
    real = ht.fit

    def fit_then_lose_a_shard(data, config, *a, **kw):
        files[0].unlink()   # as `extract --force` elsewhere, or a user cleaning up, would
        return real(data, config, *a, **kw)

    monkeypatch.setattr(ht, "fit", fit_then_lose_a_shard)
    with pytest.raises(CacheError, match="NaN"):
        ht.train_head(path, model="dense", pooling="flatten", stream=True, epochs=2, units=(8,), runs_dir=runs,
                      progress=False)
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


def test_a_cache_rewritten_under_a_streaming_reader_is_refused(image_folder, cache_dir):
    from heads.feed import CachedRows

    path = extract(data=image_folder, cache_dir=cache_dir, progress=False, **OPTS)
    rows = CachedRows(path, "train/features")
    rows.read(np.arange(3))
    extract(data=image_folder, cache_dir=cache_dir, progress=False, force=True, **OPTS)
    with pytest.raises(CacheError, match="replaced by another file"):
        rows.read(np.arange(3))
    path.unlink()
    with pytest.raises(CacheError, match="could not be opened again"):
        rows.read(np.arange(3))


def test_a_symlink_to_a_joined_cache_finds_its_shards(joined, tmp_path):
    path, _ = joined
    link = tmp_path / "elsewhere" / "link.h5"
    link.parent.mkdir()
    link.symlink_to(path)
    assert featcache.open_cache(link).kind == "virtual"


def test_a_pooled_file_missing_a_dataset_is_pooled_again(image_folder, cache_dir):
    from featcache.cache.pooled import pooled, pooled_path

    cache = featcache.open_cache(extract(data=image_folder, cache_dir=cache_dir, progress=False, **OPTS))
    first = pooled(cache, None, "gap")
    with h5py.File(pooled_path(cache, cache.layers[0], "gap"), "r+") as f:
        del f["test/features"]
    np.testing.assert_array_equal(pooled(cache, None, "gap")["test"], first["test"])


# --------------------------------------------------------------------------- process records are hints

def _record(shards: Path, entries) -> Path:
    shards.mkdir(parents=True, exist_ok=True)
    path = shards / "ray-processes.json"
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return path


@pytest.mark.parametrize("entries", ["{not json", '[{"pid": 1}]', '{"pid": 1}', '[{"pid": "x", "started": 0}]'])
def test_a_malformed_process_record_is_ignored_with_a_warning(tmp_path, entries, caplog):
    pytest.importorskip("psutil")
    from featcache import cluster as engine

    _record(tmp_path / "s", entries)
    assert engine.stop_leftovers(tmp_path / "s") == 0
    assert "ignoring" in caplog.text


def test_a_record_naming_a_process_that_is_not_rays_stops_nothing(tmp_path, caplog):
    psutil = pytest.importorskip("psutil")
    from featcache import cluster as engine

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(victim.pid).create_time()
        _record(tmp_path / "s", [{"pid": victim.pid, "started": started}, {"pid": os.getpid(),
                                 "started": psutil.Process().create_time()}])
        assert engine.stop_leftovers(tmp_path / "s") == 0
        assert victim.poll() is None, "a process that is not Ray's was killed"
        assert "not a Ray process" in caplog.text
    finally:
        victim.kill()
        victim.wait()


def test_a_local_run_beside_an_interrupted_ray_run_says_so(image_folder, cache_dir, caplog):
    from featcache.extract import plan

    _, meta = plan(data=image_folder, cache_dir=str(cache_dir), **OPTS)
    final = cache_dir / featcache.cache.cache_filename(meta)
    join.folder(final).mkdir(parents=True)
    caplog.set_level("WARNING")
    extract(data=image_folder, cache_dir=cache_dir, progress=False, **OPTS)
    assert f"{join.folder(final)} holds shards of an interrupted --engine ray run" in caplog.text


# --------------------------------------------------------------------------- run records

def _fake_run(runs: Path, name: str, val) -> None:
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"val_accuracy": val, "test_accuracy": 0.5, "seconds": 1.0,
                                                     "seconds_per_epoch": 0.1, "epochs_run": 50, "best_epoch": 50}))
    (folder / "config.json").write_text(json.dumps({"model": "dense", "pooling": "gap", "batchnorm": True,
                                                    "dropout": 0.2, "units": [8], "epochs": 50, "lr": 0.01}))


def test_runs_sorts_non_numbers_last_and_writes_strict_json(tmp_path):
    runs = tmp_path / "runs"
    for name, val in [("a-nan", float("nan")), ("b-low", 0.1), ("c-true", True), ("d-text", "0.99"),
                      ("e-high", 0.9)]:
        _fake_run(runs, name, val)
    r = run("runs", "--runs-dir", runs, "--json")
    rows = json.loads(r.output, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert [row["run"] for row in rows][:2] == ["e-high", "b-low"]
    assert {row["run"] for row in rows[2:]} == {"a-nan", "c-true", "d-text"}
    assert all(row["val_accuracy"] is None for row in rows[2:])
    table = run("runs", "--runs-dir", runs).output
    assert "n/a" in table and "lr=0.01" in table and "(cap: still improving)" in table


def test_a_training_split_of_one_class_is_refused_in_one_line(image_folder, cache_dir, tmp_path):
    r = run("train-head", "--data", image_folder, "--weights", "random", "--limit", "2", "--runs-dir",
            tmp_path / "runs", "--no-progress")
    assert r.exit_code == 2 and "holds one class" in r.output
    assert r.output.count("error") == 1


def test_the_probes_history_rows_are_l2_strengths(image_folder, cache_dir, tmp_path):
    from heads.train import train_head

    path = extract(data=image_folder, cache_dir=cache_dir, progress=False, **OPTS)
    result = train_head(path, model="linear", runs_dir=tmp_path / "runs", progress=False)
    assert (result.run_dir / "history.csv").read_text().startswith("C_tried,C,")


def test_imagenet_weights_are_found_in_the_weights_folder(tmp_path, monkeypatch):
    from featcache import backbones

    monkeypatch.setenv(backbones.WEIGHTS_DIR_ENV, str(tmp_path))
    spec = backbones.get("vgg16")
    assert backbones.local_imagenet_weights(spec) in (None, Path.home() / ".keras" / "models" / spec.weights_file)
    (tmp_path / spec.weights_file).write_bytes(b"")
    assert backbones.local_imagenet_weights(spec) == tmp_path / spec.weights_file


def test_bad_input_error_is_the_one_a_missing_output_folder_gives(joined, tmp_path):
    path, _ = joined
    with pytest.raises(BadInputError, match="no folder"):
        join.consolidate(path, tmp_path / "missing" / "x.h5")


def test_found_in_review_layer_sequences_and_fingerprint_with_cache(image_folder, cache_dir, tmp_path):
    from featcache.extract import ExtractSpec

    assert ExtractSpec(weights="random", layer=("block3_pool", "block4_pool")).layer == "block3_pool,block4_pool"
    path = extract(data=image_folder, cache_dir=cache_dir, progress=False, **OPTS)
    r = run("train-head", "--cache", path, "--fingerprint", "stat", "--head", "linear", "--runs-dir", tmp_path / "r",
            "--no-progress")
    assert r.exit_code == 0, r.output


def test_a_partial_whose_datasets_were_not_all_created_is_discarded_not_resumed(image_folder, cache_dir, caplog):
    from featcache.cache.files import partial_path, resume_point
    from featcache.extract import plan

    _, meta = plan(data=image_folder, cache_dir=str(cache_dir), **OPTS)
    partial = partial_path(cache_dir / featcache.cache.cache_filename(meta))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with h5py.File(partial, "w") as f:   # what a create() cut short by a full quota leaves: attributes, progress
        f.attrs.update(meta.to_attrs())
        f["progress"] = np.zeros(2, np.int64)
    assert resume_point(partial, meta) is None and not partial.exists()
    assert "were not all created" in caplog.text
    assert featcache.open_cache(extract(data=image_folder, cache_dir=cache_dir, progress=False, **OPTS)).complete


def test_a_ray_worker_dying_while_it_starts_is_one_line():
    from featcache import cluster as engine
    from featcache.errors import WorkerError

    class ActorDied(Exception):
        pass

    class FakeRay:   # what ray.wait/get do when a worker was OOM-killed building its backbone, restarts used up
        class exceptions:
            RayActorError = ActorDied

        def wait(self, refs, num_returns, timeout):
            return refs[:1], refs[1:]

        def get(self, ref):
            raise ActorDied("The actor died unexpectedly before finishing this task.\nmore lines")

    class Actor:
        class ready:
            @staticmethod
            def remote():
                return object()

    with pytest.raises(WorkerError, match="died while starting, 4 times \\(The actor died unexpectedly"):
        engine.placed(FakeRay(), [Actor()])



def test_a_hit_on_a_joined_cache_reports_the_size_of_its_shards(joined, image_folder, caplog):
    path, files = joined
    caplog.set_level("INFO")
    assert extract(data=image_folder, cache_dir=path.parent, progress=False, **OPTS) == path
    mb = sum(f.stat().st_size for f in files) / 1e6
    assert f"cache hit: {path} (" in caplog.text and "(0.0 MB)" not in caplog.text and mb > 0.05
