"""Reading one image file as uint8 RGB pixels, as an image viewer shows it, and resizing it.

Plain JPEGs (YCbCr or gray, no EXIF or XMP) are decoded by libjpeg-turbo through simplejpeg, straight
into the caller's batch row where the shapes agree; everything else goes through Pillow, which
applies EXIF orientation, scales 16-bit values and converts gray, palette and RGBA to RGB. The same
code serves extraction, prediction and the raw-pixel baselines.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
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


_DCT = "JPEG DCT-scaled by 1/2, 1/4 or 1/8 to at least the input size, then "
_CROP = "centre-cropped to the input's aspect ratio, then "
#: The interpolations a backbone may ask for (KerasHub's names), as Pillow's filters; Pillow filters a downscaled
#: image over each output pixel's whole footprint (what KerasHub calls antialias).
FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST", "lanczos3": "LANCZOS",
           "lanczos5": "LANCZOS", "area": "BOX"}


def resize_text(*, dct: bool = False, crop: bool = False, interpolation: str = "bilinear") -> str:
    """How images become model inputs, as a cache's metadata records it (`resize`, part of its key)."""
    return (_DCT if dct else "") + (_CROP if crop else "") + f"PIL {interpolation}, uint8"


def resize_mode(text: str) -> tuple[bool, bool, str]:
    """(dct, crop, interpolation) of a `resize_text`."""
    mode = (text.startswith(_DCT), _CROP in text, text.rsplit("PIL ", 1)[-1].split(",", 1)[0])
    if mode[2] not in FILTERS or resize_text(dct=mode[0], crop=mode[1], interpolation=mode[2]) != text:
        raise ValueError(f"unknown resize {text!r}")
    return mode


#: Resized (when not already the input size) from the decoded pixels...
RESIZE = resize_text()
#: ...or, for image files extracted at an --input-size, a JPEG at least twice that size on both sides decoded by
#: libjpeg at 1/2, 1/4 or 1/8 scale (in the DCT domain: several times cheaper than decoding every pixel), the
#: smallest scale still at least the input size, then resized as RESIZE. A backbone may ask for its images
#: centre-cropped to the input's aspect ratio first, and for another interpolation (a KerasHub preset's converter).
RESIZE_DCT = resize_text(dct=True)


def dct_scale(height: int, width: int, at_least: tuple[int, int]) -> int:
    """The largest of 8, 4 and 2 (else 1) that a height x width JPEG can be scaled down by and stay at least
    `at_least` (height, width) on both sides: the rule of Pillow's `Image.draft`, kept by both decoders."""
    for scale in (8, 4, 2):
        if scale * at_least[0] <= height and scale * at_least[1] <= width:
            return scale
    return 1


def read_image(path: Path, out: np.ndarray | None = None, at_least: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 RGB pixels as an image viewer shows them: EXIF orientation applied, 16-bit values scaled, float
    values (Pillow mode "F", e.g. a float TIFF) scaled from 0..1 to 0..255 when none exceeds 1.0, else clipped to
    0..255. A plain JPEG of `out`'s shape is decoded into `out` (a view of it is returned). With `at_least`
    (height, width), a JPEG is decoded at `dct_scale` (RESIZE_DCT): the caller resizes the rest of the way. Only
    a regular file is opened (see `read_bytes`)."""
    if path.suffix.lower() in _JPEG_SUFFIXES:
        pixels = _read_plain_jpeg(path, out, at_least)
        if pixels is not None:
            return pixels
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with open_regular(path) as f, Image.open(f) as img:
            if at_least is not None and img.format == "JPEG":
                _draft(img, at_least)
            img = ImageOps.exif_transpose(img)
            gray = _gray_as_rgb(img)
            if gray is not None:
                return gray
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from e


def _draft(img, at_least: tuple[int, int]) -> None:
    """Have Pillow decode the JPEG `img` at `dct_scale` of it, `at_least` given as displayed (an EXIF orientation
    of 5 to 8 swaps the stored sides)."""
    height, width = at_least
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
        height, width = width, height
    img.draft(img.mode, (width, height))


def _gray_as_rgb(img) -> np.ndarray | None:
    """16-bit, 32-bit integer and float gray images as uint8 RGB, scaled rather than clipped (Pillow's own
    conversion clips, so a 16-bit image turns white and a float one in 0..1 black); None for other modes."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or gray.max() > 255 else 255.0
        gray = gray * (255.0 / top)
    elif img.mode == "F":
        gray = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)   # NaN: no value, shown black
        if gray.size and gray.max() <= 1.0:   # the usual float convention, 0..1; anything larger is taken as 0..255
            gray = gray * 255.0
    else:
        return None
    gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _read_plain_jpeg(path: Path, out: np.ndarray | None = None,
                     at_least: tuple[int, int] | None = None) -> np.ndarray | None:
    """A YCbCr or gray JPEG without EXIF or XMP, decoded by libjpeg-turbo through simplejpeg (into `out` when the
    shapes agree): the pixels Pillow gives (tested equal, 4:4:4 to 4:2:0, progressive, gray), in a fraction of
    Pillow's time (docs/results/README.md, "Compute precision and decoding"). None wherever Pillow must decide: no simplejpeg, EXIF or XMP (orientation),
    CMYK and other color spaces, more pixels than Pillow's bomb limit, anything simplejpeg refuses (Pillow then
    decodes or names the fault)."""
    simplejpeg, pillow = _jpeg_modules()
    if simplejpeg is None:
        return None
    try:
        data = read_bytes(path)
        if b"Exif\0" in data or _XMP in data:   # either may carry an orientation; a whole-file look costs little
            return None
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        limit = pillow.MAX_IMAGE_PIXELS   # None: no limit; 0 refuses every image, as in Pillow
        if colorspace not in ("YCbCr", "Gray") or (limit is not None and height * width > limit):
            return None
        scale = 1 if at_least is None else dct_scale(height, width, at_least)
        shape = (-(-height // scale), -(-width // scale), 3)   # libjpeg rounds a scaled side up
        into = out if out is not None and out.shape == shape else None
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=into, min_height=shape[0], min_width=shape[1])
        return pixels if pixels.shape == shape else None   # another scale than Pillow's: let Pillow decode it
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


#: O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever; on a regular file it does nothing
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)   # O_BINARY: Windows


def _open_regular_fd(path: Path) -> tuple[int, int]:
    """(descriptor, size) of `path` opened for reading, an OSError unless it is a regular file: the folder
    listing refuses FIFOs, sockets and devices already; this check, on the opened file, closes the gap of one
    swapped in after the listing."""
    fd = os.open(path, _OPEN_FLAGS)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))
    return fd, st.st_size


def open_regular(path: Path) -> io.BufferedReader:
    """`path` opened for binary reading, an OSError unless it is a regular file (see `_open_regular_fd`)."""
    fd, _ = _open_regular_fd(path)
    return os.fdopen(fd, "rb")


def read_bytes(path: Path) -> bytes:
    """A regular file's bytes with three system calls: half the time of `Path.read_bytes` for a small file. An
    OSError for anything else (see `_open_regular_fd`)."""
    fd, size = _open_regular_fd(path)
    try:
        data = os.read(fd, size)
        while len(data) < size:   # a short read (huge file, signal): read on, from the same file
            more = os.read(fd, size - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    return data


def read_file(path: Path) -> bytes:
    """The bytes of image file `path` (`read_bytes`); an OSError becomes an UnreadableImageError naming it, as a
    file that cannot be read is fixed like one that cannot be decoded, not by a rerun."""
    try:
        return read_bytes(path)
    except OSError as e:
        raise _unreadable(path, e) from e


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

    if isinstance(e, UnidentifiedImageError):
        why = "not a format Pillow can identify"
    elif isinstance(e, OSError) and e.strerror and e.filename:
        why = e.strerror   # the message would repeat the path
    else:
        why = first_line(e)
    return UnreadableImageError(f"cannot read image {printable(str(path))} ({why}); fix: replace or remove the file, or pass "
                                "--skip-bad-images to leave unreadable images out")


def resize(img: np.ndarray, size: tuple[int, int], *, crop: bool = False, interpolation: str = "bilinear") -> np.ndarray:
    """`img` at `size` (height, width); with `crop`, its centre of the target's aspect ratio first."""
    from PIL import Image

    if crop:
        h, w = img.shape[:2]
        keep_h, keep_w = min(h, round(w * size[0] / size[1])), min(w, round(h * size[1] / size[0]))
        top, left = (h - keep_h) // 2, (w - keep_w) // 2
        img = img[top:top + keep_h, left:left + keep_w]
        if img.shape[:2] == tuple(size):
            return np.ascontiguousarray(img)
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
        (size[1], size[0]), getattr(Image.Resampling, FILTERS[interpolation])))


def printable(name: str) -> str:
    """A file name as valid UTF-8 text (undecodable bytes become U+FFFD), for messages and the cache."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
