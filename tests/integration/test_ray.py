"""The Ray engine on a local 2-CPU cluster (random weights, tiny images): the cache the local engine
writes, row for row, also after a worker or the driver is killed; and no Ray process left behind,
checked by pid."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import featcache
from featcache.cache import shards as join
from featcache.extract import extract
from tests.support import Descendants, assert_all_gone, assert_same_cache, write_folder

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'featcache[ray]'); CI installs it")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.xdist_group("ray")   # one local cluster at a time on 2 cores (make test: --dist loadgroup)

OPTS = dict(weights="random", batch_size=4, views=2, progress=False)


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "tiny", n_train=5, n_test=2)   # 15 training rows, 6 test rows


@pytest.fixture
def local(folder, tmp_path):
    return featcache.open_cache(extract(data=folder, cache_dir=tmp_path / "local", **OPTS))


@pytest.mark.slow
def test_ray_gives_the_local_cache_row_for_row_and_stops_its_processes(folder, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # relative data and cache folder: the workers get absolute paths
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with Descendants(os.getpid(), exclude=before) as watch:
        path = extract(data="tiny", cache_dir="ray", engine="ray", workers=2, shard_rows=4, **OPTS)
    assert len(watch.seen) >= 4   # the cluster's own processes and the two workers were seen
    assert_all_gone(watch.seen)
    assert not ray.is_initialized()
    cache = featcache.open_cache(path)
    assert cache.kind == "virtual" and len(cache.shards) == 4 + 2
    assert_same_cache(local, cache)
    assert not (join.folder(path) / "ray-processes.json").exists()
    # --force rebuilds it (the old shards go with the old cache), batches of 3 not lining up with shards of 5
    with Descendants(os.getpid(), exclude=before) as watch:
        again = extract(data="tiny", cache_dir="ray", engine="ray", workers=2, shard_rows=5, force=True,
                        **{**OPTS, "batch_size": 3})
    assert again == path and len(featcache.open_cache(again).shards) == 3 + 2
    assert sorted(p.name for p in join.folder(path).iterdir()) == [
        "test-0000000000-0000000005.h5", "test-0000000005-0000000006.h5", "train-0000000000-0000000005.h5",
        "train-0000000005-0000000010.h5", "train-0000000010-0000000015.h5"]
    assert_same_cache(local, featcache.open_cache(again))
    assert_all_gone(watch.seen)


class CrashOnce:
    """An `after_batch` hook: the first worker to write a batch while `flag` is absent creates it and dies at once
    (os._exit), as a worker killed mid-shard would."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __call__(self, split, start, stop):
        if not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os._exit(1)


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_restarted_and_its_shard_resumes(folder, local, tmp_path, caplog):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import this test module
    crashed = tmp_path / "crashed"
    caplog.set_level("INFO", logger="featcache")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with Descendants(os.getpid(), exclude=before) as watch:
        path = extract(data=folder, cache_dir=tmp_path / "ray", engine="ray", workers=2, shard_rows=8,
                       after_batch=CrashOnce(crashed), **OPTS)
    assert crashed.exists()
    # the rows written before the crash (one batch) were kept, not recomputed
    assert re.search(r"shard train \d+-\d+ resumed at row \d+ after its worker died", caplog.text), caplog.text
    assert_same_cache(local, featcache.open_cache(path))
    assert_all_gone(watch.seen)


@pytest.mark.slow
def test_a_killed_driver_rerun_computes_only_the_missing_shards(tmp_path):
    data = write_folder(tmp_path / "more", n_train=16, n_test=8)   # 48 + 24 rows: 18 shards of 4
    local = featcache.open_cache(extract(data=data, cache_dir=tmp_path / "local", **OPTS))
    command = [sys.executable, "-m", "featcache.cli", "extract", "--data", str(data), "--weights", "random",
               "--batch-size", "4", "--views", "2", "--cache-dir", str(tmp_path / "ray"), "--no-progress",
               "--engine", "ray", "--workers", "2", "--shard-rows", "4"]
    shards = join.folder(tmp_path / "ray" / local.path.name)

    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Descendants(first.pid) as watch:
        deadline = time.monotonic() + 240
        while len(list(shards.glob("*.h5"))) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        watch.poll()
        first.send_signal(signal.SIGKILL)
        first.wait()
    time.sleep(2)   # let the workers notice the driver is gone
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.h5")}
    assert 2 <= len(done) < 18, f"the driver was not killed mid-run: {len(done)} shards"

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with Descendants(os.getpid(), exclude=before) as rerun_watch:
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"{18 - len(done)} of 18 shards to compute" in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.h5") if p.name in done} == done  # not redone
    assert_same_cache(local, featcache.open_cache(second.stdout.strip()))
    # what the killed driver left running was stopped by the rerun, and the rerun stopped its own
    assert_all_gone({**watch.seen, **rerun_watch.seen})


def cli(*args, **kw):
    return [sys.executable, "-m", "featcache.cli", "extract", "--weights", "random", "--batch-size", "4",
            "--no-progress", "--engine", "ray", *map(str, args)]


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_every_ray_process(tmp_path):
    data = write_folder(tmp_path / "d", n_train=16, n_test=8)
    proc = subprocess.Popen(cli("--data", data, "--cache-dir", tmp_path / "c", "--workers", "2", "--shard-rows", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Descendants(proc.pid) as watch:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "c").glob("*.shards/*.h5")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        watch.poll()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err
    assert_all_gone(watch.seen)


@pytest.mark.slow
def test_an_address_nobody_answers_on_is_refused_at_once(image_folder, tmp_path):
    t = time.monotonic()
    out = subprocess.run(cli("--data", image_folder, "--cache-dir", tmp_path, "--ray-address", "127.0.0.1:1"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and time.monotonic() - t < 60
    assert out.stderr.strip().splitlines()[-1].startswith("error: nothing answers at the Ray address 127.0.0.1:1")


@pytest.mark.slow
def test_a_worker_that_cannot_build_its_backbone_stops_the_run_with_its_one_line_error(folder, tmp_path):
    bad = tmp_path / "vgg16_notop.h5"
    bad.write_bytes(os.urandom(5000))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with Descendants(os.getpid(), exclude=before) as watch, \
            pytest.raises(featcache.errors.BadInputError, match=r"weights file .* does not fit VGG16") as e:
        extract(data=folder, cache_dir=tmp_path / "ray", weights=bad, batch_size=4, progress=False, engine="ray",
                workers=2)
    assert "\n" not in str(e.value)
    assert_all_gone(watch.seen)


@pytest.mark.slow
def test_workers_keep_the_decompression_bomb_limit_the_caller_set(folder, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)   # the images are larger: refused, by the workers
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with Descendants(os.getpid(), exclude=before) as watch, \
            pytest.raises(featcache.errors.UnreadableImageError, match="cannot read image") as e:
        extract(data=folder, cache_dir=tmp_path / "ray", weights="random", input_size=32, fingerprint="stat",
                batch_size=4, progress=False, engine="ray", workers=2)
    assert "\n" not in str(e.value)
    assert_all_gone(watch.seen)


@pytest.mark.slow
def test_a_second_driver_on_the_same_cache_waits_for_the_first(folder, local, tmp_path):
    import fcntl

    (tmp_path / "ray").mkdir()
    lock = open(tmp_path / "ray" / (local.path.name + ".lock"), "a")   # as a first driver holds it
    fcntl.flock(lock, fcntl.LOCK_EX)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cli("--data", folder, "--cache-dir", tmp_path / "ray", "--views", "2",
                                    "--workers", "2"), stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 120
        while "waiting for it to finish" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "another featcache process is extracting" in log.read_text()
        time.sleep(1)
        assert proc.poll() is None and not (tmp_path / "ray" / join.folder(local.path).name).exists()
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log.read_text()
    assert_same_cache(local, featcache.open_cache(out.strip()))


@pytest.mark.slow
def test_predict_on_ray_gives_the_local_rows_and_stops_its_processes(tmp_path):
    from heads import inference
    from heads.train import train_head

    data = write_folder(tmp_path / "tiny", n_train=10, n_test=12)
    cache = extract(data=data, cache_dir=tmp_path / "c", weights="random", batch_size=4, progress=False)
    run = train_head(cache, model="dense", units=(8,), epochs=1, runs_dir=tmp_path / "runs", progress=False).run_dir
    local = inference.predict(run, [data / "test"], batch_size=4, progress=False)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with Descendants(os.getpid(), exclude=before) as watch:
        on_ray = inference.predict(run, [data / "test"], batch_size=4, progress=False, engine="ray", workers=2)
    assert [f.resolve() for f in on_ray.files] == [f.resolve() for f in local.files]
    assert (on_ray.indices == local.indices).all()
    # workers of 1 thread sum in another order than 2 local threads: float32 rounding, amplified by random weights
    np.testing.assert_allclose(on_ray.probabilities, local.probabilities, atol=1e-3)
    assert [[c for c, _ in row] for row in on_ray.top(3)] == [[c for c, _ in row] for row in local.top(3)]
    assert not ray.is_initialized()
    assert_all_gone(watch.seen)


class _ClusterStub:
    """A stand-in for the `ray` module whose cluster is one "raylet" process that started a "worker" after the
    cluster's record was taken; shutting it down kills the raylet alone, orphaning the worker, as a raylet stopped
    under load leaves its workers running for seconds."""

    def __init__(self):
        self.raylet = None

    def is_initialized(self):
        return self.raylet is not None

    def init(self, **options):
        worker = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                  "'import time; time.sleep(120)', '/ray/default_worker.py']); time.sleep(120)")
        self.raylet = subprocess.Popen([sys.executable, "-c", worker, "raylet"])

    def shutdown(self):
        self.raylet.kill()
        self.raylet.wait()
        self.raylet = None


def test_a_leaving_cluster_stops_the_workers_its_shutdown_orphans(tmp_path):
    from featcache import cluster

    stub = _ClusterStub()
    before = {p.pid for p in psutil.Process().children(recursive=True)}   # an earlier test's resource tracker
    with Descendants(os.getpid(), exclude=before) as seen, \
            cluster.owned_cluster(stub, None, tmp_path / cluster.PROCESSES_FILE):
        deadline = time.monotonic() + 30   # the worker starts after the record: as Ray Tune's trials do
        while len(psutil.Process(stub.raylet.pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.poll()
    assert len(seen.seen) == 2 and stub.raylet is None   # the raylet and its worker; the raylet shut down
    assert_all_gone(seen.seen, wait=2.0)


SEEDED_ON_RAY = """
import sys

import keras

from featcache import cluster


class Seeded:
    def __init__(self):
        keras.utils.set_random_seed(0)   # Keras imports TensorFlow for it wherever it is installed, unless told not to

    def ready(self):
        return None

    def run(self):
        return "tensorflow" in sys.modules


with cluster.distribute(Seeded, lambda threads: (), [()], engine="ray", workers=1) as done:
    print("tensorflow imported in the worker:", *done)
"""


@pytest.mark.slow
def test_a_ray_worker_on_jax_leaves_an_installed_tensorflow_unimported(tmp_path):
    # what a command on JAX does for itself (test_backends.py), its Ray workers do too: 2 s and ~450 MB each
    pytest.importorskip("jax")
    pytest.importorskip("tensorflow")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", SEEDED_ON_RAY], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with Descendants(proc.pid) as watch:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "tensorflow imported in the worker: False" in out, out + err[-3000:]
    assert len(watch.seen) >= 2   # the cluster's processes and its worker were seen, and are gone
    assert_all_gone(watch.seen)
