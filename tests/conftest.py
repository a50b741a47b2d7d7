"""Shared fixtures: tiny synthetic datasets in every source format, caches of them (the helpers they use are in
tests/support.py)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.support import CLASSES, random_images, write_cifar_py, write_folder

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_folder(tmp_path / "tiny")


@pytest.fixture
def npz_file(tmp_path) -> Path:
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=random_images(12, seed=1), y_train=np.arange(12) % 3,
             x_test=random_images(6, seed=2), y_test=np.arange(6) % 3, class_names=np.array(CLASSES))
    return path


@pytest.fixture
def cifar_py(tmp_path) -> Path:
    return write_cifar_py(tmp_path / "cifar-10-batches-py")


@pytest.fixture
def cifar_tgz(tmp_path) -> Path:
    folder = write_cifar_py(tmp_path / "src" / "cifar-10-batches-py")
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("FEATCACHE_CACHE_DIR", str(d))
    return d


@pytest.fixture
def tiny_cache(image_folder, cache_dir) -> str:
    """`featcache extract` of the tiny image folder (random weights): the cache path it prints."""
    from click.testing import CliRunner

    from featcache.cli import main

    r = CliRunner().invoke(main, ["extract", "--data", str(image_folder), "--weights", "random", "--no-progress"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout.strip()
