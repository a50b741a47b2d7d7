"""Hostile dataset sources: special files, unreadable entries, names that are not UTF-8, npz files that would exhaust
memory, class "folders" that are files and float TIFFs. Each gets a right result or one line naming the file, never
a hang, a traceback or an exit 1 that offers a useless resume."""

import builtins
import io
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.errors import BadInputError
from featcache.sources import load_dataset, read_image
from tests.support import CLASSES, ROOT, random_images, write_folder


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_exit_2(r, *names):
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().count("\n") == 0 and "rerun" not in r.stderr, r.stderr
    for name in names:
        assert name in r.stderr, r.stderr


# 1. only regular files are opened


@pytest.mark.slow
def test_fifo_named_like_an_image_is_refused_not_opened(tmp_path):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    os.mkfifo(root / "train" / "bee" / "f.jpg")
    env = {**os.environ, "FEATCACHE_CACHE_DIR": str(tmp_path / "cache")}
    try:   # in a process of its own: reading a FIFO blocks forever, and a regression must not hang the suite
        r = subprocess.run([sys.executable, "-m", "featcache.cli", "extract", "--data", str(root), "--weights",
                            "random", "--no-progress"], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("featcache extract blocked on a FIFO named train/bee/f.jpg")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "f.jpg" in r.stderr and "regular file" in r.stderr, r.stderr


def test_fifo_given_as_the_dataset_is_refused_not_opened(tmp_path):
    os.mkfifo(tmp_path / "data.npz")
    code = "import sys; from featcache.sources import load_dataset; load_dataset(sys.argv[1])"
    try:
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data.npz")], capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("load_dataset blocked on a FIFO named data.npz")
    assert "BadInputError" in r.stderr and "data.npz is not a regular file" in r.stderr, r.stderr


def test_stat_fingerprint_reads_no_file(image_folder, monkeypatch):
    from featcache.sources import fingerprints

    read = []
    monkeypatch.setattr(fingerprints, "read_file", lambda p: read.append(p) or b"")
    load_dataset(image_folder, fingerprint_by="stat")
    assert read == []


def _socket(path: Path):
    cwd = os.getcwd()
    os.chdir(path.parent)   # a relative name: a socket's path must be short, tmp_path may not be
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(path.name)
    finally:
        os.chdir(cwd)
    return s


def _device(path: Path):
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))   # a /dev/null
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here ({e})")


@pytest.mark.parametrize("make, why", [   # a FIFO only in a process of its own (above): it could hang this one
    (_socket, "regular file"),
    (_device, "regular file"),
    (lambda p: os.symlink(p.name, p), "cannot"),                   # a loop: the link points at itself
    (lambda p: os.symlink(p.parent / "gone.png", p), "cannot"),    # dangling
])
def test_special_entries_in_class_folders_are_named(tmp_path, make, why):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    keep = make(root / "test" / "cow" / "odd.png")
    with pytest.raises(BadInputError, match=rf"(?=.*test/cow/odd.png)(?=.*{why})"):
        load_dataset(root)
    del keep


def test_symlink_to_a_regular_image_is_fine(tmp_path):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    os.symlink(root / "train" / "ant" / "00.png", root / "train" / "ant" / "link.png")
    assert len(load_dataset(root).train) == 7


def test_symlink_loop_is_exit_2_naming_it(tmp_path, cache_dir):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    os.symlink("loop.png", root / "train" / "ant" / "loop.png")
    assert_one_line_exit_2(run("extract", "--data", root, "--weights", "random", "--no-progress"), "loop.png")


# 2. unreadable images and folders: exit 2 naming them (a rerun cannot help)


def _refuse(monkeypatch, target: Path, *calls):
    """Make the OS refuse `target` (permission denied) in each of `calls` ((module, name)): chmod 000 does not stop
    root, who runs these tests here."""
    for module, name in calls:
        real = getattr(module, name)

        def denied(path, *args, _real=real, **kw):
            if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path) == str(target):
                raise PermissionError(13, "Permission denied", str(target))
            return _real(path, *args, **kw)
        monkeypatch.setattr(module, name, denied)


def test_unreadable_image_is_exit_2_naming_it(tmp_path, cache_dir, monkeypatch):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    target = root / "train" / "bee" / "01.png"
    _refuse(monkeypatch, target, (os, "open"), (io, "open"), (builtins, "open"))
    assert_one_line_exit_2(run("extract", "--data", root, "--weights", "random", "--no-progress"),
                           "train/bee/01.png")


def test_unreadable_class_folder_is_exit_2_naming_it(tmp_path, cache_dir, monkeypatch):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    target = root / "test" / "ant"
    _refuse(monkeypatch, target, (os, "listdir"), (os, "scandir"))
    assert_one_line_exit_2(run("extract", "--data", root, "--weights", "random", "--no-progress"), "test/ant")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_chmod_000_image_is_exit_2_naming_it(tmp_path, cache_dir):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    (root / "train" / "bee" / "01.png").chmod(0)
    assert_one_line_exit_2(run("extract", "--data", root, "--weights", "random", "--no-progress"),
                           "train/bee/01.png")


# 3. names that are not UTF-8 are refused before any work


def _image(path: bytes):
    from PIL import Image

    with open(path, "wb") as f:
        Image.new("RGB", (32, 32), (9, 9, 9)).save(f, format="PNG")


def test_class_folder_not_utf8_is_refused_before_any_work(tmp_path, cache_dir):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    for split in ("train", "test"):
        folder = os.fsencode(root / split) + b"/\xffdog"
        os.mkdir(folder)
        _image(folder + b"/00.png")
    assert_one_line_exit_2(run("extract", "--data", root, "--weights", "random", "--no-progress"),
                           "\ufffddog", "UTF-8", "rename")
    assert not cache_dir.exists() or not [p for p in cache_dir.rglob("*") if p.is_file()]


def test_root_not_utf8_is_refused_before_any_work(tmp_path, cache_dir):
    root = write_folder(Path(os.fsdecode(os.fsencode(tmp_path) + b"/data\xff")), n_train=2, n_test=1)
    assert_one_line_exit_2(run("extract", "--data", root, "--weights", "random", "--no-progress"),
                           "data\ufffd", "UTF-8", "rename")
    assert not cache_dir.exists() or not [p for p in cache_dir.rglob("*") if p.is_file()]


def test_npz_named_not_utf8_is_refused(tmp_path, npz_file):
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xfftiny.npz"))
    npz_file.rename(odd)
    with pytest.raises(BadInputError, match="(?=.*\ufffdtiny.npz)(?=.*UTF-8)(?=.*rename)"):
        load_dataset(odd)


# 4. npz files: labels 0..k-1 with k bounded, x of at least one pixel, and a file that is not an npz


@pytest.mark.parametrize("y_train", [np.array([0, 1, 10 ** 8]), np.array([0, 1, 2 ** 62]),
                                     np.array([0, 1, 2 ** 64 - 1], np.uint64), np.array([0, 1, 40]),
                                     np.array([0, -1, 2])])
def test_npz_labels_must_be_few_classes(tmp_path, y_train):
    path = tmp_path / "big.npz"
    np.savez(path, x_train=random_images(3), y_train=y_train, x_test=random_images(3), y_test=np.arange(3))
    with pytest.raises(BadInputError, match=r"big.npz.*y_train"):
        load_dataset(path)


def test_npz_labels_within_class_names_are_fine(tmp_path):
    path = tmp_path / "few.npz"   # 3 rows but 5 named classes: the class names bound the labels
    np.savez(path, x_train=random_images(3), y_train=np.array([0, 4, 4]), x_test=random_images(3),
             y_test=np.arange(3), class_names=np.array(["a", "b", "c", "d", "e"]))
    assert load_dataset(path).n_classes == 5


def test_npz_images_of_no_pixels_are_refused(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, x_train=np.zeros((3, 0, 0, 3), np.uint8), y_train=np.arange(3), x_test=random_images(3),
             y_test=np.arange(3), class_names=np.array(CLASSES))
    with pytest.raises(BadInputError, match=r"empty.npz.*x_train.*\(3, 0, 0, 3\)"):
        load_dataset(path)


@pytest.mark.parametrize("content", [b"PK\x03\x04" + bytes(range(256)) * 2, bytes(range(256)) * 2, None])
def test_file_that_is_not_an_npz_is_one_line(tmp_path, cache_dir, content):
    path = tmp_path / "data.npz"
    if content is None:   # a single array saved with np.save under an .npz name
        np.save(tmp_path / "data.npy", random_images(3))
        (tmp_path / "data.npy").rename(path)
    else:
        path.write_bytes(content)
    with pytest.raises(BadInputError, match="data.npz"):
        load_dataset(path)


def test_npz_not_a_zip_via_the_cli_is_one_line(tmp_path, cache_dir):
    path = tmp_path / "data.npz"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 2)
    assert_one_line_exit_2(run("extract", "--data", path, "--weights", "random", "--no-progress"), "data.npz")


# 5. a class "folder" that is a file


def test_class_that_is_a_file_is_refused(tmp_path):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    for split in ("train", "test"):
        (root / split / "dog").write_bytes(b"not a folder")
    with pytest.raises(BadInputError, match=r"train/dog.*not a folder"):
        load_dataset(root)


def test_system_files_beside_class_folders_are_still_skipped(tmp_path):
    root = write_folder(tmp_path / "d", n_train=2, n_test=1)
    for split in ("train", "test"):
        (root / split / ".DS_Store").write_bytes(b"x")
        (root / split / "Thumbs.db").write_bytes(b"x")
    assert load_dataset(root).class_names == CLASSES


# 6. float images


def test_float_tiff_in_0_to_1_is_scaled(tmp_path):
    from PIL import Image

    gradient = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (8, 1))
    Image.fromarray(gradient).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == "F"
    pixels = read_image(tmp_path / "x.tif")
    assert pixels.shape == (8, 64, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255 and abs(pixels.mean() - 127.5) < 2


def test_float_tiff_beyond_1_is_clipped(tmp_path):
    from PIL import Image

    Image.fromarray(np.array([[-5.0, 0.0, 100.4, 254.6, 1000.0]], np.float32)).save(tmp_path / "y.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "y.tif")[0, :, 0], [0, 0, 100, 255, 255])
