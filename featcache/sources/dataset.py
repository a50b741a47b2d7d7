"""What every source yields: a `Dataset` of two `Split`s (train, test), whatever the source.

A split holds its labels and either uint8 pixels in memory or image files on disk; files are decoded
batch by batch (`Split.load`), so extraction memory does not grow with the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from featcache.errors import BadInputError, MissingInputError
from featcache.sources.images import RESIZE, printable, read_image, resize, resize_mode


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
        return read_image(self.files[0]).shape[:2]

    def load(self, start: int, stop: int, size: tuple[int, int],
             *, require_native: tuple[int, int] | None = None, resizing: str = RESIZE) -> np.ndarray:
        """Rows [start, stop) as uint8 (n, *size, 3), resized (bilinear) where needed.

        With `require_native`, an image of another native size is an error: the caller chose
        the input size from the images' own size, which only makes sense when they share it.
        `resizing` (a cache's `resize`, images.resize_text) says how: large JPEGs decoded at a DCT scale first
        (images.RESIZE_DCT), a centre crop to the input's aspect ratio, the interpolation.
        """
        dct, crop, interpolation = resize_mode(resizing)
        if self.pixels is not None:
            batch = self.pixels[start:stop]
            if batch.shape[1:3] == tuple(size):
                return batch
            return np.stack([resize(img, size, crop=crop, interpolation=interpolation) for img in batch])
        out = np.empty((stop - start, *size, 3), np.uint8)
        for i, path in enumerate(self.files[start:stop]):
            img = read_image(path, out=out[i], at_least=size if dct else None)
            if require_native is not None and img.shape[:2] != tuple(require_native):
                raise BadInputError(
                    f"images differ in size: {path} is {img.shape[1]}x{img.shape[0]}, expected "
                    f"{require_native[1]}x{require_native[0]} like the first image; "
                    "fix: pass --input-size N to resize every image to NxN")
            if not np.may_share_memory(img, out):   # not decoded in place
                out[i] = img if img.shape[:2] == tuple(size) else resize(img, size, crop=crop,
                                                                          interpolation=interpolation)
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



def existing(path: str) -> Path:
    """`path` as a Path, refused in one line unless it is a folder or a regular file (a FIFO would block the first
    read forever) named in UTF-8 (see `require_utf8`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInputError(
            f"no dataset at {printable(str(p))}; expected 'cifar10' (download), an image folder "
            "ROOT/{train,test}/<class>/, a cifar-10-batches-py folder or cifar-10-python.tar.gz, or an .npz")
    if not (p.is_dir() or p.is_file()):
        raise BadInputError(f"{printable(str(p))} is not a regular file or a folder (a FIFO, socket or device); "
                            "expected a dataset file or folder; fix: pass the dataset itself")
    require_utf8(p.absolute())
    require_utf8(p.resolve())
    return p


def require_utf8(path: Path) -> None:
    """Refuse a path that is not valid UTF-8: the cache stores the source path, the dataset's name and class names
    as UTF-8 text, so such a name fails half way through writing it (a traceback, a .partial file), and written
    with U+FFFD instead it no longer names anything on disk."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"expected UTF-8 file and folder names, got one that is not valid UTF-8 in "
                            f"{printable(str(path))}; fix: rename it") from None
