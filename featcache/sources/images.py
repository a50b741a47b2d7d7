"""Reading one image file as uint8 RGB pixels, as an image viewer shows it, and resizing it.

Plain JPEGs (YCbCr or gray, no EXIF or XMP) are decoded by libjpeg-turbo through simplejpeg, straight
into the caller's batch row where the shapes agree; everything else goes through Pillow, which
applies EXIF orientation, scales 16-bit values and converts gray, palette and RGBA to RGB. The same
code serves extraction, prediction and the raw-pixel baselines.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import numpy as np

from featcache.errors import UnreadableImageError, first_line

#: Files that operating systems leave in folders; skipped like hidden files, never taken for images.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}


def is_system_file(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SYSTEM_FILES


def pillow_extensions() -> set[str]:
    from PIL import Image

    return set(Image.registered_extensions())


_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def read_image(path: Path, out: np.ndarray | None = None) -> np.ndarray:
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
    shapes agree): the pixels Pillow gives (tested equal, 4:4:4 to 4:2:0, progressive, gray), in a fraction of
    Pillow's time (README, "Compute precision and decoding"). None wherever Pillow must decide: no simplejpeg, EXIF or XMP (orientation),
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


def check_header(path: Path, content: bytes) -> None:
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


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def printable(name: str) -> str:
    """A file name as valid UTF-8 text (undecodable bytes become U+FFFD), for messages and the cache."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
