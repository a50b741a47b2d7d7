"""What happens when a run is killed, a cache is corrupt or stale, two writers race, or the disk fills."""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache import backbones as bb
from featcache.cli import main
from featcache.extract import extract
from tests.featcache.extract.test_extract import count_calls
from tests.support import ROOT, write_folder


def featcache_process(*args, cache_dir):
    env = {**os.environ, "FEATCACHE_CACHE_DIR": str(cache_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", "featcache.cli", "extract", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def wait_for_rows(cache_dir, rows, proc, timeout=120):
    """Block until the partial file in `cache_dir` has at least `rows` train rows written."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for p in cache_dir.glob("*.partial"):
            try:
                with h5py.File(p, "r", locking=False) as f:
                    if f["progress"][0] >= rows:
                        return int(f["progress"][0])
            except (OSError, KeyError):
                pass
        time.sleep(0.05)
    pytest.fail("extraction made no progress")


@pytest.fixture
def slow_folder(tmp_path):
    """Big enough that batch size 1 gives a kill time to land mid-run."""
    return write_folder(tmp_path / "slow", n_train=40, n_test=4)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_extraction_resumes_and_matches_an_uninterrupted_run(slow_folder, tmp_path, monkeypatch, sig):
    args = ["--data", slow_folder, "--weights", "random", "--batch-size", "1", "--no-progress"]
    proc = featcache_process(*args, cache_dir=tmp_path / "b")
    wait_for_rows(tmp_path / "b", 10, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted; rerun the same command to resume" in err, err
    partial = next((tmp_path / "b").glob("*.partial"))
    done = featcache.open_cache(partial, require_complete=False).progress
    assert 10 <= done[0] < 120 and not list((tmp_path / "b").glob("*.h5"))
    with monkeypatch.context() as m:
        calls = count_calls(m)
        resumed = extract(data=slow_folder, weights="random", batch_size=1, cache_dir=tmp_path / "b", progress=False)
    assert sum(calls) == 120 + 12 - done[0] - done[1], "finished batches must not be computed again"
    reference = extract(data=slow_folder, weights="random", batch_size=1, cache_dir=tmp_path / "a", progress=False)
    a, b = featcache.open_cache(reference), featcache.open_cache(resumed)
    assert a.meta.key == b.meta.key and a.max_abs_activation == b.max_abs_activation
    for split in ("train", "test"):
        for x, y in zip(a.load(split), b.load(split)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_concurrent_writers_of_one_key_make_one_correct_file(tmp_path):
    data = write_folder(tmp_path / "d", n_train=20, n_test=4)
    args = ["--data", data, "--weights", "random", "--batch-size", "2", "--no-progress"]
    procs = [featcache_process(*args, cache_dir=tmp_path / "c") for _ in range(2)]
    other = featcache_process(*args, "--limit", "5", cache_dir=tmp_path / "c")   # another key, side by side
    outs = [p.communicate(timeout=300) for p in procs + [other]]
    assert [p.returncode for p in procs + [other]] == [0, 0, 0], outs
    assert outs[0][0] == outs[1][0] and outs[0][0] != outs[2][0]
    assert any("waiting" in err for _, err in outs[:2]) or any("cache hit" in err for _, err in outs[:2])
    assert sum("extracted 72 images" in err for _, err in outs[:2]) == 1, "exactly one process computes"
    files = sorted(p.name for p in (tmp_path / "c").glob("*.h5"))
    assert len(files) == 2 and not list((tmp_path / "c").glob("*.partial"))
    cache = featcache.open_cache(outs[0][0].strip())
    assert cache.complete and cache.progress == (60, 12)


def test_disk_full_leaves_a_resumable_partial(image_folder, cache_dir, monkeypatch):
    real_setitem = h5py.Dataset.__setitem__
    writes = []

    def failing(self, key, value):
        if self.name.endswith("/features") and not self.name.startswith("/digests/"):
            writes.append(key)
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_setitem(self, key, value)

    with monkeypatch.context() as m:
        m.setattr(h5py.Dataset, "__setitem__", failing)
        with pytest.raises(OSError, match="No space left"):
            extract(data=image_folder, weights="random", batch_size=4, cache_dir=cache_dir, progress=False)
    partial = next(cache_dir.glob("*.partial"))
    assert featcache.open_cache(partial, require_complete=False).progress == (8, 0)
    with monkeypatch.context() as m:
        calls = count_calls(m)
        path = extract(data=image_folder, weights="random", batch_size=4, cache_dir=cache_dir, progress=False)
    assert calls == [4, 4, 2] and featcache.open_cache(path).complete


def test_disk_full_in_the_cli_says_the_run_resumes(image_folder, cache_dir, monkeypatch):
    def full(**kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys.modules["featcache.extract"], "extract", full)
    r = CliRunner().invoke(main, ["extract", "--data", str(image_folder)])
    assert r.exit_code == 1 and "No space left on device" in r.stderr and "rerun the same command to resume the extraction" in r.stderr


@pytest.mark.parametrize("content", [b"\x89HDF\r\n\x1a\n" + b"\0" * 100, os.urandom(2048)])
def test_train_head_refuses_corrupt_caches(tmp_path, content):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(content)
    r = CliRunner().invoke(main, ["train-head", "--cache", str(bad), "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "bad.h5" in r.stderr and "--force" in r.stderr
    assert r.stderr.count("\n") == 1 and bad.read_bytes() == content


def test_another_weights_file_is_another_identity(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    a.write_bytes(b"weights" * 100)
    b.write_bytes(b"weights" * 99 + b"weightz")
    assert bb.weights_identity(str(a)) != bb.weights_identity(str(b))
    assert bb.weights_identity(str(a)) == bb.weights_identity(str(tmp_path / "a.h5"))


def test_no_unsafe_loading_in_the_code():
    """No pickle of user files beyond the CIFAR allow-list, no allow_pickle=True, models loaded in safe mode. One
    unpickling is allowed: a spawned worker's start arguments (featcache.system._start), from a file its parent
    created for them alone (mkstemp: mode 0600, created exclusively), what multiprocessing would otherwise unpickle
    from the pipe to that worker."""
    allowed = {"system.py": 1}
    for path in list((ROOT / "featcache").glob("*.py")) + list((ROOT / "heads").glob("*.py")):
        text = path.read_text()
        assert "allow_pickle=True" not in text, path
        assert "safe_mode=False" not in text, path
        assert len(re.findall(r"pickle\.loads?\(", text)) == allowed.get(path.name, 0), path


def _featcache_like_group():
    """An empty click group with featcache's errors and exit codes (featcache.cli.group._Group), for commands a test
    defines."""
    import click

    from featcache.cli.group import _Group

    @click.group(cls=_Group)
    def cli():
        pass

    return cli


def test_an_error_a_ctrl_c_caused_still_reads_as_interrupted():
    """Ctrl-C landing in a clean-up (a file write, a pool's shutdown) that then fails: exit 130, not 1."""
    cli = _featcache_like_group()

    @cli.command()
    def extract():
        try:
            raise KeyboardInterrupt
        finally:
            raise OSError("Can't write data (interrupted)")

    r = CliRunner().invoke(cli, ["extract"])
    assert r.exit_code == 130 and "interrupted; rerun the same command to resume" in r.output, r.output


def test_any_error_after_a_ctrl_c_reads_as_interrupted():
    """Ctrl-C inside a library that swallows it and fails later in its own way (SQLAlchemy's session closed in the
    middle of an Optuna commit, the interrupt nowhere in the error's chain): exit 130 with the rerun hint, not a
    traceback and exit 1 (a killed search's trials were failed, and its command said nothing of how to go on)."""
    cli = _featcache_like_group()

    @cli.command()
    def search():
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        raise RuntimeError("Method 'close()' can't be called here")

    @cli.command()
    def broken():
        raise RuntimeError("a bug")

    r = CliRunner().invoke(cli, ["search"])
    assert r.exit_code == 130 and "rerun the same command to continue the search" in r.output, r.output
    r = CliRunner().invoke(cli, ["broken"])   # without a Ctrl-C a bug stays a bug
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)


def test_wrong_values_from_python_are_one_line_errors(tmp_path):
    """Found by a hostile-testing helper: each was a raw KeyError, TypeError, AttributeError or TensorFlow error."""
    from featcache.cache import open_cache
    from featcache.errors import BadInputError
    from heads.trials import run_search
    from tests.support import bench_script

    path = bench_script("common").write_synthetic_cache(tmp_path / "c.h5", n_train=40, n_test=10, shape=(2, 2, 8))
    cache = open_cache(path)
    for call, said in ((lambda: cache.load("val"), "holds the splits train and test, not 'val'"),
                       (lambda: cache.paths("val"), "not 'val'"),
                       (lambda: cache.as_tf_dataset("train", batch_size=0), "batch_size must be a whole number"),
                       (lambda: open_cache(42), "given by its path, not int"),
                       (lambda: run_search(path, ["dropout=0.1|0.3"], config={"epochs": 1}, runs_dir=tmp_path),
                        "expected a TrainConfig"),
                       (lambda: run_search(path, [3], runs_dir=tmp_path), "not int 3")):
        with pytest.raises(BadInputError, match=said):
            call()
