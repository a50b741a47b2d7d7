"""Dataset sources: one registry, one `Dataset` shape whatever the source.

A source string is either ``cifar10`` (Keras download), ``SCHEME:PATH`` with a scheme of
`SOURCES`, or a plain path whose kind is detected (an image-folder tree, a CIFAR-10 python
release, an ``.npz``).  Every source yields uint8 RGB pixels in NHWC order, int64 labels,
class names and a content fingerprint, so that a changed dataset never reuses an old cache.

Image folders stay on disk and are decoded batch by batch (`Split.load`), so extraction memory
does not grow with the dataset.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import sys
import pickle
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.errors import (BadInputError, DownloadError, MissingInputError, UnreadableImageError,
                              first_line)

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Split:
    """One split (train or test): labels plus pixels held in memory or image files on disk."""

    labels: np.ndarray
    pixels: np.ndarray | None = None          # uint8 (n, h, w, 3) for in-memory sources
    files: tuple[Path, ...] | None = None     # image files for folder sources
    paths: tuple[str, ...] | None = None      # each row's file relative to the dataset root

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "Split":
        """The first `n` rows (all rows when n is larger)."""
        return self.rows(0, n)

    def rows(self, start: int, stop: int) -> "Split":
        """Rows [start, stop) (what one shard of work needs of this split)."""
        return replace(self, labels=self.labels[start:stop],
                       pixels=None if self.pixels is None else self.pixels[start:stop],
                       files=None if self.files is None else self.files[start:stop],
                       paths=None if self.paths is None else self.paths[start:stop])

    def native_size(self) -> tuple[int, int]:
        """(height, width) of the first image; in-memory sources share one size by construction."""
        if self.pixels is not None:
            return tuple(self.pixels.shape[1:3])
        return _read_image(self.files[0]).shape[:2]

    def load(self, start: int, stop: int, size: tuple[int, int],
             *, require_native: tuple[int, int] | None = None) -> np.ndarray:
        """Rows [start, stop) as uint8 (n, *size, 3), resized (bilinear) where needed.

        With `require_native`, an image of another native size is an error: the caller chose
        the input size from the images' own size, which only makes sense when they share it.
        """
        if self.pixels is not None:
            batch = self.pixels[start:stop]
            if batch.shape[1:3] == tuple(size):
                return batch
            return np.stack([_resize(img, size) for img in batch])
        out = np.empty((stop - start, *size, 3), np.uint8)
        for i, path in enumerate(self.files[start:stop]):
            img = _read_image(path, out=out[i])
            if require_native is not None and img.shape[:2] != tuple(require_native):
                raise BadInputError(
                    f"images differ in size: {path} is {img.shape[1]}x{img.shape[0]}, expected "
                    f"{require_native[1]}x{require_native[0]} like the first image; "
                    "fix: pass --input-size N to resize every image to NxN")
            if not np.may_share_memory(img, out):   # not decoded in place
                out[i] = img if img.shape[:2] == tuple(size) else _resize(img, size)
        return out

    def all_pixels(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """Every row in memory (for raw-pixel baselines); folders must share one size or pass one."""
        native = self.native_size()
        return self.load(0, len(self), size or native,
                         require_native=None if size else native)


@dataclass(frozen=True)
class Dataset:
    name: str            # short name used in cache file names, e.g. "cifar10"
    source: str          # what was loaded, e.g. "folder:/data/cifar10-jpeg"
    train: Split
    test: Split
    class_names: tuple[str, ...]
    fingerprint: str     # sha256 of pixels (or image file bytes), labels, paths and class names
    limit: int | None = None
    skipped: tuple[tuple[str, str], ...] = ()   # (file, reason) of unreadable images left out (skip_bad_images)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def default_input_size(self, min_size: int = 32) -> tuple[int, int]:
        """The images' own size, raised to the backbone's minimum (`min_size` px per side)."""
        h, w = self.train.native_size()
        return max(h, min_size), max(w, min_size)


# --------------------------------------------------------------------------- sources

def load_keras_cifar10(_: str = "") -> Dataset:
    """CIFAR-10 through `keras.datasets.cifar10.load_data()` (downloads ~170 MB once)."""
    import keras

    try:
        with contextlib.redirect_stdout(sys.stderr):   # Keras prints its download progress on stdout
            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as e:  # Keras wraps every network failure in a bare Exception
        raise DownloadError(
            f"could not download CIFAR-10 ({e}); this machine seems offline; fix: pass a local copy "
            "with --data PATH (an image folder ROOT/{train,test}/<class>/, a cifar-10-batches-py "
            "folder or cifar-10-python.tar.gz, or an .npz)") from e
    return _from_arrays("cifar10", "cifar10", x_train, y_train, x_test, y_test, CIFAR10_CLASSES)


def load_npz(path: str) -> Dataset:
    """An .npz holding x_train, y_train, x_test, y_test and optionally class_names."""
    file = _existing(path)
    try:
        with np.load(file, allow_pickle=False) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise BadInputError(f"{file} lacks {sorted(missing)}; expected arrays x_train, y_train, "
                                    "x_test, y_test (and optionally class_names)")
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"{file} holds object arrays or is not a valid .npz ({e}); expected "
                            "plain numeric arrays; fix: save with np.savez and numeric dtypes") from e
    except (OSError, EOFError) as e:
        raise BadInputError(f"cannot read {file} as .npz ({e})") from e
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if not np.issubdtype(y.dtype, np.integer):
            raise BadInputError(f"{file}: y_{split} must hold integer labels 0..n_classes-1, got {y.dtype} "
                                "(strings or NaN are not labels); fix: map class names to integers and pass the "
                                "names as class_names")
    names = arrays.get("class_names")
    n_classes = 1 + int(max(np.max(arrays["y_train"], initial=0), np.max(arrays["y_test"], initial=0)))
    class_names = tuple(str(c) for c in names) if names is not None else tuple(str(i) for i in range(n_classes))
    return _from_arrays(file.stem, f"npz:{file}", arrays["x_train"], arrays["y_train"],
                        arrays["x_test"], arrays["y_test"], class_names, where=str(file))


def load_cifar_python(path: str) -> Dataset:
    """The original CIFAR-10 python release: a cifar-10-batches-py folder or its .tar.gz."""
    file = _existing(path)
    if file.is_dir():
        def read(name: str) -> bytes:
            member = file / name
            if not member.is_file():
                raise BadInputError(f"{member} is missing; expected data_batch_1..5, test_batch and "
                                    "batches.meta in a cifar-10-batches-py folder")
            return member.read_bytes()
        batches = {name: read(name) for name in _CIFAR_FILES}
    else:
        try:
            with tarfile.open(file, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                batches = {}
                for name in _CIFAR_FILES:
                    if name not in members:
                        raise BadInputError(f"{file} has no {name}; expected the cifar-10-python.tar.gz release")
                    batches[name] = tar.extractfile(members[name]).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BadInputError(f"cannot read {file} as a tar archive ({first_line(e)}); expected "
                                "cifar-10-python.tar.gz or a cifar-10-batches-py folder") from e

    def parts(names):
        xs, ys = [], []
        for name in names:
            d = _unpickle_cifar(batches[name], f"{file}:{name}")
            data, labels = d.get(b"data"), d.get(b"labels")
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                    and data.shape[1] == 3072 and isinstance(labels, list) and len(labels) == len(data)):
                raise BadInputError(f"{file}:{name} is not a CIFAR-10 batch; expected b'data' uint8 "
                                    "(n, 3072) and b'labels' a list of n ints")
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(labels))
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = parts([f"data_batch_{i}" for i in range(1, 6)])
    x_test, y_test = parts(["test_batch"])
    meta = _unpickle_cifar(batches["batches.meta"], f"{file}:batches.meta")
    names = meta.get(b"label_names")
    if not (isinstance(names, list) and all(isinstance(n, bytes) for n in names)):
        raise BadInputError(f"{file}:batches.meta has no list of label_names")
    return _from_arrays("cifar10", f"cifar-py:{file}", x_train, y_train, x_test, y_test,
                        tuple(n.decode() for n in names), where=str(file))


def load_image_folder(path: str) -> Dataset:
    """A tree ROOT/{train,test}/<class>/<image> in any format Pillow reads."""
    root = _existing(path)
    layout = "expected ROOT/train/<class>/<image> and ROOT/test/<class>/<image>"
    if not root.is_dir():
        raise BadInputError(f"{root} is not a folder; {layout}")
    splits = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise BadInputError(f"{folder} is missing; {layout}")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise BadInputError(f"{folder} has no class folders; {layout}")
        splits[split] = classes
    if splits["train"] != splits["test"]:
        only_train = sorted(set(splits["train"]) - set(splits["test"]))
        only_test = sorted(set(splits["test"]) - set(splits["train"]))
        raise BadInputError(f"train and test class folders differ in {root}: only in train {only_train}, "
                            f"only in test {only_test}; fix: give both splits the same class folders")
    classes = splits["train"]
    image_exts = {ext for ext in _pillow_extensions()}
    out = {}
    for split in ("train", "test"):
        files, labels = [], []
        for label, name in enumerate(classes):
            folder = root / split / name
            entries = sorted(p for p in folder.iterdir() if not _is_system_file(p.name))
            for p in entries:
                if p.is_dir() or p.suffix.lower() not in image_exts:
                    raise BadInputError(f"{p} is not an image file; expected only images in {folder}; "
                                        "fix: move it out of the dataset")
            if not entries:
                raise BadInputError(f"{folder} has no images; fix: add images or remove the class folder")
            files += entries
            labels += [label] * len(entries)
        out[split] = Split(labels=np.asarray(labels, np.int64), files=tuple(files),
                           paths=tuple(_printable(str(p.relative_to(root))) for p in files))
    # an absolute source: a cache made here still finds its dataset from another working folder
    return Dataset(name=root.name, source=f"folder:{root.resolve()}", train=out["train"], test=out["test"],
                   class_names=tuple(classes), fingerprint="")


#: scheme -> loader; plain paths are routed by `_detect`.
SOURCES: dict[str, Callable[[str], Dataset]] = {
    "cifar10": load_keras_cifar10,
    "folder": load_image_folder,
    "cifar-py": load_cifar_python,
    "npz": load_npz,
}


def load_dataset(source: str | Path = "cifar10", *, limit: int | None = None,
                 skip_bad_images: bool = False, fingerprint_by: str = "auto") -> Dataset:
    """Load `source` (see module doc), keep the first `limit` rows of each split, fingerprint it.

    Image files are checked while they are fingerprinted by content (their headers: cheap), so an
    unreadable file is reported before any extraction work. `fingerprint_by` "auto" fingerprints
    image folders of more than CONTENT_FINGERPRINT_MAX_FILES files by size and time instead
    ("stat", see `fingerprint`): a bad file is then found when the extraction reaches it. With
    `skip_bad_images`, every image of an image folder is decoded once first and those that fail are
    left out (listed in `Dataset.skipped`).
    """
    if limit is not None and limit < 1:
        raise BadInputError(f"--limit must be at least 1, got {limit}")
    source = str(source)
    scheme, _, rest = source.partition(":")
    if source == "cifar10":
        loader, arg = load_keras_cifar10, ""
    elif scheme in SOURCES and rest:
        loader, arg = SOURCES[scheme], rest
    else:
        loader, arg = _detect(source), source
    ds = loader(arg)
    if limit is not None:
        ds = replace(ds, train=ds.train.head(limit), test=ds.test.head(limit), limit=limit)
        kept = len(np.unique(ds.train.labels))
        if kept < len(ds.class_names):
            log.warning("WARNING: --limit %d keeps %d of the %d classes in the training split (rows are in source "
                        "order); accuracies on it are not comparable; for a balanced subset use train-head "
                        "--per-class", limit, kept, len(ds.class_names))
    scheme = fingerprint_scheme(ds, fingerprint_by)
    if skip_bad_images:
        ds = _without_bad_images(ds)
    return replace(ds, fingerprint=fingerprint(ds, scheme))


def _without_bad_images(ds: Dataset) -> Dataset:
    """`ds` without the images that fail to decode; each is logged and listed in `skipped`."""
    from tqdm import tqdm

    if ds.train.files is None:
        return ds   # pixels in memory: nothing to decode
    skipped, splits = [], {}
    bar = tqdm(total=len(ds.train) + len(ds.test), unit="img", desc="check images", file=sys.stderr,
               dynamic_ncols=True, disable=None)
    for name, split in (("train", ds.train), ("test", ds.test)):
        keep = []
        for i, file in enumerate(split.files):
            try:
                _read_image(file)
                keep.append(i)
            except UnreadableImageError as e:
                skipped.append((split.paths[i], str(e.__cause__ or e)[:200]))
                log.warning("skipping unreadable image %s (%s)", file, skipped[-1][1])
            bar.update(1)
        if not keep:
            raise BadInputError(f"no readable image in the {name} split of {ds.source}")
        idx = np.asarray(keep)
        splits[name] = replace(split, labels=split.labels[idx], files=tuple(split.files[i] for i in keep),
                               paths=tuple(split.paths[i] for i in keep))
    bar.close()
    if skipped:
        log.warning("left out %d unreadable images; `featcache info` on the cache lists them", len(skipped))
    return replace(ds, train=splits["train"], test=splits["test"], skipped=tuple(skipped))


#: Image folders of more files than this are fingerprinted by file metadata under `fingerprint_by="auto"`;
#: smaller ones (CIFAR-10's 60,000 files among them, so their caches keep their keys) by content.
CONTENT_FINGERPRINT_MAX_FILES = 100_000
FINGERPRINTS = ("auto", "content", "stat")


def fingerprint_scheme(ds: Dataset, fingerprint_by: str = "auto") -> str:
    """'content' or 'stat': how `ds` is fingerprinted (in-memory pixels always by content: no disk to spare)."""
    if fingerprint_by not in FINGERPRINTS:
        raise BadInputError(f"--fingerprint must be one of {', '.join(FINGERPRINTS)}, got {fingerprint_by!r}")
    if ds.train.files is None or fingerprint_by == "content":
        return "content"
    if fingerprint_by == "stat":
        return "stat"
    return "stat" if len(ds.train) + len(ds.test) > CONTENT_FINGERPRINT_MAX_FILES else "content"


def fingerprint(ds: Dataset, scheme: str = "content") -> str:
    """sha256 over class names and, per split, labels, paths and pixels (or image file bytes).

    With scheme 'stat' (image files only) each file contributes its size and modification time in
    nanoseconds instead of its bytes: one stat per file instead of a full read of the dataset, and
    the result is prefixed "stat:". It still sees any file added, removed, renamed or moved to
    another class and any rewrite that changes a size or a time; it misses only a rewrite of the same
    size whose time was set back, and a copy that does not keep times looks like new data (a
    rebuild, never a wrong hit)."""
    h = hashlib.sha256()
    h.update("\0".join(ds.class_names).encode())
    for name, split in (("train", ds.train), ("test", ds.test)):
        h.update(f"|{name}|{len(split)}|".encode())
        h.update(np.ascontiguousarray(split.labels, "<i8").tobytes())
        if split.pixels is not None:
            h.update(str(split.pixels.shape).encode())
            h.update(np.ascontiguousarray(split.pixels).data)
        else:
            for file in split.files:   # names as bytes: a file name need not be valid UTF-8
                h.update(os.fsencode(file.relative_to(file.parents[2])) + b"\0")
                if scheme == "stat":
                    st = file.stat()
                    h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
                    continue
                content = file.read_bytes()
                _check_header(file, content)
                h.update(content)
    return ("stat:" if scheme == "stat" else "") + h.hexdigest()


# --------------------------------------------------------------------------- helpers

_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


def _detect(source: str) -> Callable[[str], Dataset]:
    path = _existing(source)
    if path.is_dir():
        if (path / "data_batch_1").exists():
            return load_cifar_python
        if (path / "train").is_dir() or (path / "test").is_dir():
            return load_image_folder
        raise BadInputError(f"{path} is neither an image folder (ROOT/train/<class>/, ROOT/test/<class>/) "
                            "nor a cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta)")
    if path.suffix == ".npz":
        return load_npz
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return load_cifar_python
    raise BadInputError(f"{path}: unknown dataset file; expected an .npz, cifar-10-python.tar.gz, "
                        "or a folder")


def _printable(name: str) -> str:
    """A file name as valid UTF-8 text (undecodable bytes become U+FFFD), for messages and the cache."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _existing(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInputError(
            f"no dataset at {p}; expected 'cifar10' (download), an image folder ROOT/{{train,test}}/<class>/, "
            "a cifar-10-batches-py folder or cifar-10-python.tar.gz, or an .npz")
    return p


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, bytes, ints and numpy arrays."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}   # how protocol-2 pickles written by Python 3 spell bytes

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle_cifar(payload: bytes, where: str) -> dict:
    try:
        d = _CifarUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise BadInputError(f"{where} is not a CIFAR-10 python batch ({e}); only numpy arrays, lists "
                            "and bytes are accepted") from e
    if not isinstance(d, dict):
        raise BadInputError(f"{where} is not a CIFAR-10 python batch; expected a dict, got {type(d).__name__}")
    return d


def _from_arrays(name, source, x_train, y_train, x_test, y_test, class_names, where="arrays") -> Dataset:
    splits = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 1):   # grayscale -> RGB
            x = np.repeat(x.reshape(x.shape[:3] + (1,)), 3, axis=-1)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise BadInputError(f"{where}: x_{split} must be uint8 pixels (n, h, w, 3), got "
                                f"{x.dtype} {x.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise BadInputError(f"{where}: y_{split} must hold integer labels, got {y.dtype}")
        y = y.reshape(-1).astype(np.int64)
        if len(y) != len(x):
            raise BadInputError(f"{where}: x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        if len(y) == 0:
            raise BadInputError(f"{where}: the {split} split is empty")
        if y.min() < 0 or y.max() >= len(class_names):
            raise BadInputError(f"{where}: y_{split} has labels outside 0..{len(class_names) - 1}")
        splits[split] = Split(labels=y, pixels=x)
    return Dataset(name=name, source=source, train=splits["train"], test=splits["test"],
                   class_names=tuple(class_names), fingerprint="")


#: Files that operating systems leave in folders; skipped like hidden files, never taken for images.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}


def _is_system_file(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SYSTEM_FILES


def _pillow_extensions() -> set[str]:
    from PIL import Image

    return set(Image.registered_extensions())


_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def _read_image(path: Path, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB pixels as an image viewer shows them: EXIF orientation applied, 16-bit values scaled.
    A plain JPEG of `out`'s shape is decoded into `out` (a view of it is returned)."""
    if path.suffix.lower() in _JPEG_SUFFIXES:
        pixels = _read_plain_jpeg(path, out)
        if pixels is not None:
            return pixels
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):   # 16-bit grayscale: scale, don't clip
                gray = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or gray.max() > 255 else 255.0
                gray = np.clip(np.rint(gray * (255.0 / top)), 0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from e


def _read_plain_jpeg(path: Path, out: np.ndarray | None = None) -> np.ndarray | None:
    """A YCbCr or gray JPEG without EXIF or XMP, decoded by libjpeg-turbo through simplejpeg (into `out` when the
    shapes agree): the pixels Pillow gives (tested equal, 4:4:4 to 4:2:0, progressive, gray), at ~20 vs ~93 us
    for a CIFAR-10 JPEG with its read. None wherever Pillow must decide: no simplejpeg, EXIF or XMP (orientation),
    CMYK and other color spaces, more pixels than Pillow's bomb limit, anything simplejpeg refuses (Pillow then
    decodes or names the fault)."""
    simplejpeg, pillow = _jpeg_modules()
    if simplejpeg is None:
        return None
    try:
        data = _read_bytes(path)
        if b"Exif\0" in data or _XMP in data:   # either may carry an orientation; a whole-file look costs little
            return None
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        limit = pillow.MAX_IMAGE_PIXELS   # None: no limit; 0 refuses every image, as in Pillow
        if colorspace not in ("YCbCr", "Gray") or (limit is not None and height * width > limit):
            return None
        into = out if out is not None and out.shape == (height, width, 3) else None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=into)
    except (OSError, ValueError):
        return None


_XMP = b"http://ns.adobe.com/xap/1.0/"   # the header of an XMP segment


@functools.cache
def _jpeg_modules():
    """simplejpeg (None if it cannot be imported) and PIL.Image, imported once: per image, the imports
    cost a third of decoding a CIFAR-10 JPEG."""
    from PIL import Image

    try:
        import simplejpeg
    except ImportError:
        return None, Image
    return simplejpeg, Image


def _read_bytes(path: Path) -> bytes:
    """A file's bytes with three system calls: half the time of `Path.read_bytes` for a small file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))   # O_BINARY: no newline translation on Windows
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
    finally:
        os.close(fd)
    return data if len(data) == size else path.read_bytes()   # a short read (huge file, signal): plain read


def _check_header(path: Path, content: bytes) -> None:
    """Refuse a file Pillow cannot identify, or whose size makes it a decompression bomb, without decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(content)) as img:
            w, h = img.size
        if Image.MAX_IMAGE_PIXELS is not None and w * h > 2 * Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{w}x{h} pixels could be a decompression bomb")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: Exception) -> UnreadableImageError:
    from PIL import UnidentifiedImageError

    why = "not a format Pillow can identify" if isinstance(e, UnidentifiedImageError) else first_line(e)
    return UnreadableImageError(f"cannot read image {path} ({why}); fix: replace or remove the file, or pass "
                                "--skip-bad-images to leave unreadable images out")


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BILINEAR))
