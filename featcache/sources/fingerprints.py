"""The dataset fingerprint: the part of a cache's key that says which images and labels it holds."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from featcache.errors import BadInputError, UnreadableImageError
from featcache.sources.dataset import Dataset
from featcache.sources.images import check_header, printable, read_file

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
                    st = _stat(file)
                    h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
                    continue
                content = read_file(file)   # a regular file only, and a read error names it (exit 2, no resume)
                check_header(file, content)
                h.update(content)
    return ("stat:" if scheme == "stat" else "") + h.hexdigest()



def _stat(file) -> os.stat_result:
    """`file`'s stat, an error naming it if it went away or became unreachable since the folder was listed."""
    try:
        return file.stat()
    except OSError as e:
        raise UnreadableImageError(f"cannot read image {printable(str(file))} ({e.strerror or e}); expected the "
                                   "file listed a moment before; fix: rerun once the dataset stops changing, or "
                                   "restore the file") from e
