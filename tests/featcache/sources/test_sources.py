import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from featcache.errors import BadInputError, DownloadError, MissingInputError
from featcache.sources import RESIZE_DCT, load_dataset
from tests.support import CLASSES, random_images, write_folder


def test_image_folder_rows_are_ordered_by_class_then_file(image_folder):
    ds = load_dataset(image_folder)
    assert ds.class_names == CLASSES
    assert ds.name == "tiny" and ds.source == f"folder:{image_folder}"
    assert ds.train.paths[:5] == ("train/ant/00.png", "train/ant/01.png", "train/ant/02.png",
                                  "train/ant/03.png", "train/bee/00.png")
    assert list(ds.train.labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert len(ds.test) == 6
    pixels = ds.train.load(4, 5, (32, 32))
    expected = np.asarray(Image.open(image_folder / "train/bee/00.png"))
    np.testing.assert_array_equal(pixels[0], expected)


def test_grayscale_palette_rgba_and_odd_sizes_become_rgb(tmp_path):
    root = write_folder(tmp_path / "mixed", n_train=1, n_test=1)
    folder = root / "train" / "ant"
    Image.fromarray(np.full((40, 50), 200, np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(random_images(1, 33)[0]).convert("P").save(folder / "pal.gif")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    ds = load_dataset(root)
    batch = ds.train.load(0, 4, (48, 48))
    assert batch.shape == (4, 48, 48, 3) and batch.dtype == np.uint8
    assert (batch[1] == 200).all()                      # gray.png: gray replicated to R, G, B
    assert (batch[3][..., 0] == 255).all() and (batch[3][..., 1:] == 0).all()   # rgba.png: alpha dropped
    with pytest.raises(BadInputError, match=r"differ in size.*gray.png.*--input-size"):
        ds.train.load(0, 4, (32, 32), require_native=(32, 32))


def test_npz_source(npz_file):
    ds = load_dataset(npz_file)
    assert ds.class_names == CLASSES and len(ds.train) == 12 and len(ds.test) == 6
    assert ds.train.load(0, 12, (32, 32)).shape == (12, 32, 32, 3)
    assert ds.default_input_size() == (32, 32)


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=random_images(3), y_train=np.arange(2)), "3 rows but y_train has 2"),
    (dict(x_train=random_images(3), y_train=np.array([0, 1, 7])), "outside 0..2"),
    (dict(x_train=np.zeros((3, 32, 32, 3), np.float32), y_train=np.arange(3)), "uint8"),
    (dict(x_train=np.array([{"a": 1}] * 3, dtype=object), y_train=np.arange(3)), "object arrays"),
])
def test_bad_npz_is_refused(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    base = dict(x_train=random_images(3), y_train=np.arange(3), x_test=random_images(3), y_test=np.arange(3),
                class_names=np.array(CLASSES))
    np.savez(path, **{**base, **arrays})
    with pytest.raises(BadInputError, match=message):
        load_dataset(path)


def test_cifar_python_folder_and_tarball_give_the_same_dataset(cifar_py, cifar_tgz):
    a, b = load_dataset(cifar_py), load_dataset(cifar_tgz)
    assert len(a.train) == 20 and len(a.test) == 4 and a.class_names[0] == "airplane"
    assert a.fingerprint == b.fingerprint
    with open(cifar_py / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(a.train.pixels[0], raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_python_refuses_foreign_pickles(cifar_py):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(cifar_py / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(BadInputError, match=r"test_batch.*refusing to load posix.system"):
        load_dataset(cifar_py)


def test_cifar_python_refuses_wrong_payload(cifar_py):
    with open(cifar_py / "data_batch_2", "wb") as f:
        pickle.dump({b"data": [1, 2, 3], b"labels": [0]}, f, protocol=2)
    with pytest.raises(BadInputError, match="data_batch_2 is not a CIFAR-10 batch"):
        load_dataset(cifar_py)


def test_fingerprint_follows_content(image_folder, tmp_path):
    before = load_dataset(image_folder).fingerprint
    assert load_dataset(image_folder).fingerprint == before
    assert load_dataset(image_folder, limit=2).fingerprint != before
    img = image_folder / "test" / "cow" / "01.png"
    pixels = np.asarray(Image.open(img)).copy()
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(img)
    assert load_dataset(image_folder).fingerprint != before
    (image_folder / "test" / "cow" / "01.png").rename(image_folder / "test" / "bee" / "99.png")   # relabel
    assert len({before, load_dataset(image_folder).fingerprint}) == 2


def test_limit_keeps_first_rows(image_folder):
    ds = load_dataset(image_folder, limit=5)
    assert len(ds.train) == 5 and len(ds.test) == 5 and ds.limit == 5
    assert ds.train.paths[-1] == "train/bee/00.png"


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "no dataset at"),
    (lambda root: root.mkdir(), "neither an image folder"),
    (lambda root: write_folder(root) and (root / "test" / "ant").rename(root / "test" / "ape"),
     r"class folders differ.*only in train \['ant'\], only in test \['ape'\]"),
    (lambda root: write_folder(root) and [(root / s / "dog").mkdir() for s in ("train", "test")],
     r"train/dog has no images"),
    (lambda root: write_folder(root) and (root / "train" / "ant" / "notes.txt").write_text("hi"),
     r"notes.txt is not an image file"),
])
def test_bad_folders_are_named(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises((BadInputError, MissingInputError), match=message):
        load_dataset(root)


def test_corrupt_image_is_named_when_loaded(image_folder):
    (image_folder / "train" / "bee" / "02.png").write_bytes(b"not a png at all")
    with pytest.raises(BadInputError, match=r"cannot read image .*train/bee/02.png \(not a format Pillow"):
        load_dataset(image_folder)   # found while fingerprinting, before any extraction work


def test_cifar10_download_failure_says_offline(monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure on https://www.cs.toronto.edu/...: None -- [Errno -3] "
                        "Temporary failure in name resolution")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(DownloadError, match=r"offline; fix: pass a local copy with --data"):
        load_dataset("cifar10")


def test_stat_fingerprint_reads_no_file_and_sees_changes(image_folder, monkeypatch):
    from pathlib import Path

    from featcache import sources as data

    content = load_dataset(image_folder).fingerprint
    file = image_folder / "train" / "bee" / "01.png"
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
    stat = load_dataset(image_folder, fingerprint_by="stat").fingerprint
    assert stat.startswith("stat:") and stat != content
    assert load_dataset(image_folder, fingerprint_by="stat").fingerprint == stat   # stable
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1))   # touched: another dataset as far as it can tell
    assert load_dataset(image_folder, fingerprint_by="stat").fingerprint != stat
    # "auto" keeps hashing content at CIFAR-10's size (older caches keep their keys) and stats above
    monkeypatch.undo()
    assert load_dataset(image_folder).fingerprint == data.fingerprint(load_dataset(image_folder), "content")
    monkeypatch.setattr(sys.modules["featcache.sources.fingerprints"], "CONTENT_FINGERPRINT_MAX_FILES", 10)
    assert load_dataset(image_folder).fingerprint.startswith("stat:")
    assert not load_dataset(image_folder, fingerprint_by="content").fingerprint.startswith("stat:")


def test_a_stat_fingerprinted_cache_is_a_hit_until_a_file_changes(image_folder, tmp_path, monkeypatch):
    from featcache.extract import check_cache, extract

    opts = dict(data=image_folder, weights="random", cache_dir=tmp_path, fingerprint="stat", progress=False)
    first = extract(**opts)
    assert extract(**opts) == first
    check_cache(first, data=image_folder)   # compared by the scheme the cache was made with
    file = image_folder / "test" / "cow" / "00.png"
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert extract(**opts) != first


def test_plain_jpegs_decode_fast_to_the_pixels_pillow_gives(tmp_path, monkeypatch):
    import simplejpeg

    from featcache import sources as data

    rng = np.random.default_rng(0)
    img = np.clip(np.arange(48 * 40 * 3).reshape(48, 40, 3) % 251 + rng.integers(-20, 20, (48, 40, 3)), 0, 255)
    img = img.astype(np.uint8)
    cases = {"444.jpg": dict(subsampling=0), "420.jpg": dict(subsampling=2, quality=60),
             "progressive.jpeg": dict(progressive=True)}
    for name, options in cases.items():
        Image.fromarray(img).save(tmp_path / name, "JPEG", **options)
    Image.fromarray(img[..., 0]).save(tmp_path / "gray.jpg", "JPEG")
    Image.fromarray(img).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6   # rotated: only Pillow's path applies the orientation
    Image.fromarray(img).save(tmp_path / "rotated.jpg", "JPEG", exif=exif)

    fast = []
    decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: fast.append(1) or decode(*a, **k))
    for name in [*cases, "gray.jpg", "cmyk.jpg", "rotated.jpg"]:
        before = len(fast)
        with Image.open(tmp_path / name) as reference:
            expected = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
        np.testing.assert_array_equal(data.read_image(tmp_path / name), expected, err_msg=name)
        assert len(fast) - before == (name not in ("cmyk.jpg", "rotated.jpg")), name
    assert data.read_image(tmp_path / "rotated.jpg").shape == (40, 48, 3)
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "444.jpg").read_bytes()[:300])
    with pytest.raises(BadInputError, match="broken.jpg"):   # Pillow names the fault, as before
        data.read_image(tmp_path / "broken.jpg")


def test_large_jpegs_decode_at_a_dct_scale_to_the_pixels_pillow_gives(tmp_path, monkeypatch):
    """DCT-scaled decoding (issue 33): a JPEG at least twice the input size is decoded at 1/2, 1/4 or 1/8, the
    smallest scale still at least the input size, by simplejpeg where it applies and by Pillow's draft otherwise,
    to the same pixels."""
    import simplejpeg

    from featcache.sources import Split, images

    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (25, 17, 3), dtype=np.uint8)).resize((136, 200)))
    img = np.clip(smooth + rng.integers(-9, 9, smooth.shape), 0, 255).astype(np.uint8)   # 200 x 136
    cases = {"444.jpg": dict(subsampling=0), "420.jpg": dict(subsampling=2), "progressive.jpg": dict(progressive=True)}
    for name, options in cases.items():
        Image.fromarray(img).save(tmp_path / name, "JPEG", **options)
    exif = Image.Exif()
    exif[0x0112] = 6   # shown rotated: 136 x 200
    Image.fromarray(img).save(tmp_path / "rotated.jpg", "JPEG", exif=exif)
    fast = []
    decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: fast.append(1) or decode(*a, **k))
    for at_least, shape in (((32, 32), (50, 34)), ((60, 32), (100, 68)), ((100, 100), (200, 136))):
        for name in cases:
            with Image.open(tmp_path / name) as reference:
                reference.draft("RGB", at_least[::-1])
                expected = np.asarray(reference.convert("RGB"))
            got = images.read_image(tmp_path / name, at_least=at_least)
            assert got.shape == expected.shape == (*shape, 3), (name, at_least, got.shape)
            np.testing.assert_array_equal(got, expected, err_msg=name)
    assert len(fast) == 9
    rotated = images.read_image(tmp_path / "rotated.jpg", at_least=(32, 60))   # stored: at least 60 x 32, scale 2
    assert rotated.shape == (68, 100, 3) and len(fast) == 9   # EXIF: Pillow's path
    split = Split(labels=np.zeros(2, np.int64), files=(tmp_path / "444.jpg", tmp_path / "rotated.jpg"))
    scaled, full = split.load(0, 2, (32, 32), resizing=RESIZE_DCT), split.load(0, 2, (32, 32))
    assert scaled.shape == full.shape == (2, 32, 32, 3) and np.abs(scaled.astype(int) - full).mean() < 8


def test_a_batch_of_mixed_images_loads_as_pillow_shows_each(tmp_path):
    """JPEGs of the batch's size are decoded in place, others resized, non-JPEGs and EXIF-rotated ones go
    through Pillow: every row is what Pillow gives for its file."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "mixed"
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"a.jpg": ((32, 32), {}), "b.jpg": ((40, 48), {}), "c.png": ((32, 32), {}),
             "d.jpg": ((32, 32), {"exif": exif}), "e.jpeg": ((32, 32), {"progressive": True})}
    for split in ("train", "test"):
        (folder / split / "x").mkdir(parents=True)
        for name, (shape, options) in files.items():
            img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / split / "x" / name, **options)
        Image.fromarray(img[..., 0]).save(folder / split / "x" / "f.jpg")   # gray, decoded in place as RGB
        # orientation where a quick look for EXIF at the start would miss it: XMP only, EXIF after 128 KiB
        xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
               b'</x:xmpmeta>')
        Image.fromarray(img).save(folder / split / "x" / "g.jpg", xmp=xmp)
        Image.fromarray(img).save(folder / split / "x" / "h.jpg", exif=exif)
        late = (folder / split / "x" / "h.jpg").read_bytes()
        at = late.index(b"\xff\xe1")
        comments = (b"\xff\xfe" + (65535).to_bytes(2, "big") + b"c" * 65533) * 2
        (folder / split / "x" / "h.jpg").write_bytes(late[:at] + comments + late[at:])
    split = load_dataset(folder).train
    batch = split.load(0, len(split), (32, 32))
    for row, path in zip(batch, split.files):
        with Image.open(path) as img:
            expected = ImageOps.exif_transpose(img).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(row, np.asarray(expected), err_msg=path.name)


def test_the_decompression_bomb_limit_holds_on_every_decoding_path(tmp_path, monkeypatch):
    """Pillow's limit, as the caller sets it at run time: lowered, or 0 (every image refused), in this process
    and in spawned decoding processes (which import Pillow afresh)."""
    import psutil

    from featcache.errors import UnreadableImageError
    from featcache.extract import extract

    folder = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (folder / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 99, np.uint8)).save(folder / split / cls / "0.jpg")
    ds = load_dataset(folder, fingerprint_by="stat")   # a content fingerprint would refuse the files already
    for limit in (100, 0):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(BadInputError, match="0.jpg"):
            ds.train.load(0, 1, (32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UnreadableImageError, match="0.jpg"):   # raised in the decoding process, passed back
        extract(data=folder, weights="random", input_size=32, cache_dir=tmp_path / "c", decoder="processes",
                decode_workers=1, fingerprint="stat", progress=False)
    workers = [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert not workers   # the decoding process is stopped (multiprocessing's resource tracker may stay)


def test_the_resize_texts_caches_recorded_before_backbones_chose_their_resize_are_unchanged():
    # they are part of every cache's key: another text would orphan every cache made before
    from featcache import sources

    assert sources.RESIZE == "PIL bilinear, uint8"
    assert sources.RESIZE_DCT == "JPEG DCT-scaled by 1/2, 1/4 or 1/8 to at least the input size, then PIL bilinear, uint8"
    for dct in (False, True):
        for crop in (False, True):
            text = sources.resize_text(dct=dct, crop=crop, interpolation="bicubic")
            assert sources.resize_mode(text) == (dct, crop, "bicubic")
