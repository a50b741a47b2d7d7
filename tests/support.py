"""What tests share beside fixtures: tiny synthetic datasets, the real data when present, comparisons of
features and caches, and the watch on the processes a run starts (tests import it as `tests.support`)."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest

#: The repository (featcache's checkout), whatever folder of tests/ a test lives in.
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REAL_DATA = SHARED / "datasets" / "cifar10-jpeg"
REAL_WEIGHTS = SHARED / "weights" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
CLASSES = ("ant", "bee", "cow")


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_folder(root: Path, n_train: int = 4, n_test: int = 2, size: int = 32, seed: int = 0) -> Path:
    """ROOT/{train,test}/<class>/NN.png with random RGB pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


def assert_same_features(x, y) -> None:
    """Features of the same images computed in batches cut differently: equal but for float32 rounding (1e-5 of
    the largest feature) and one float16 step. On CPUs without AVX-512, oneDNN's convolutions sum a row in
    another order in a batch of 2 than in a batch of 4 (seen here: 3e-6 on features up to 5)."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    np.testing.assert_allclose(x, y, rtol=2 ** -10, atol=1e-5 * max(1.0, float(np.abs(y).max(initial=0))))


def assert_same_cache(a, b) -> None:
    """Two opened caches hold the same extraction, row for row: key, features, views, labels, paths, classes."""
    assert a.meta.key == b.meta.key
    for split in ("train", "test"):
        (xa, ya), (xb, yb) = a.load(split), b.load(split)
        assert_same_features(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert a.paths(split) == b.paths(split)
    assert_same_features(a.load_views(), b.load_views())
    assert a.class_names == b.class_names


def write_cifar_py(root: Path, per_batch: int = 4, seed: int = 0) -> Path:
    """A cifar-10-batches-py folder in the original pickle layout, with few rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)

    def dump(name, obj):
        with open(root / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        dump(name, {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                    b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                    b"filenames": [b"x.png"] * per_batch})
    dump("batches.meta", {b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer",
                                                               "dog", "frog", "horse", "ship", "truck")],
                          b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return root


def bench_script(name: str):
    """bench/<name>.py imported as `python bench/<name>.py` runs it: with bench/ on the path (for bench/common.py)."""
    import importlib.util
    import sys

    bench = str(ROOT / "bench")
    sys.path.insert(0, bench)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(bench)
    return module


needs_shared = pytest.mark.skipif(not (REAL_DATA.is_dir() and REAL_WEIGHTS.is_file()),
                                  reason="../shared (real CIFAR-10 images and VGG16 weights) is absent")


class Descendants:
    """Every process below `pid` seen while the block runs, polled in a thread: {pid: start time}."""

    def __init__(self, pid: int, exclude=()):
        self.pid, self.exclude, self.seen = pid, set(exclude), {}
        self._stop = threading.Event()

    def poll(self):
        import psutil

        try:
            for p in psutil.Process(self.pid).children(recursive=True):
                if p.pid not in self.exclude and p.pid not in self.seen:
                    self.seen[p.pid] = p.create_time()
        except psutil.Error:
            pass

    def __enter__(self):
        def loop():
            while not self._stop.wait(0.05):
                self.poll()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def assert_all_gone(seen: dict, wait: float = 15.0):
    """None of the processes `seen` runs any more (same pid and start time), but the test process's own
    multiprocessing resource tracker; stragglers are killed, then reported."""
    import psutil

    deadline = time.monotonic() + wait
    while True:
        alive = []
        for pid, started in seen.items():
            try:
                p = psutil.Process(pid)
                if (abs(p.create_time() - started) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
                        and not _resource_tracker(p)):
                    alive.append(p)
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    names = [f"{p.pid} {_command_line(p)}" for p in alive]
    for p in alive:
        p.kill()
    assert names == [], f"Ray processes left running: {names}"


def _resource_tracker(p) -> bool:
    """Python's multiprocessing resource tracker: one per process that used multiprocessing (Ray's driver code
    does), living as long as that process, the test's own; not a process a run leaves behind."""
    return "multiprocessing.resource_tracker" in _command_line(p)


def _command_line(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())[:200] or p.name()
    except psutil.Error:
        return "(gone)"


def small_disk(where: Path, size: str):
    """A generator for a fixture: a tmpfs of `size` mounted at `where` (where this machine lets us mount one; the
    test is skipped otherwise), unmounted afterwards."""
    import subprocess

    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)
