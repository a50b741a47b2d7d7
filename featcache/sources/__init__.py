"""Dataset sources: one registry, one `Dataset` shape whatever the source.

A source string is either ``cifar10`` (Keras download), ``SCHEME:PATH`` with a scheme of
`SOURCES`, or a plain path whose kind is detected (an image-folder tree, a CIFAR-10 python
release, an ``.npz``).  Every source yields uint8 RGB pixels in NHWC order, int64 labels,
class names and a content fingerprint, so that a changed dataset never reuses an old cache.

Image folders stay on disk and are decoded batch by batch (`Split.load`), so extraction memory
does not grow with the dataset.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from featcache.errors import BadInputError
from featcache.sources.arrays import CIFAR10_CLASSES, load_cifar_python, load_keras_cifar10, load_npz
from featcache.sources.dataset import Dataset, Split, existing
from featcache.sources.fingerprints import CONTENT_FINGERPRINT_MAX_FILES, FINGERPRINTS, fingerprint, fingerprint_scheme
from featcache.sources.folder import load_image_folder, without_bad_images
from featcache.sources.images import RESIZE, RESIZE_DCT, read_image, resize, resize_mode, resize_text

__all__ = ["CIFAR10_CLASSES", "CONTENT_FINGERPRINT_MAX_FILES", "FINGERPRINTS", "SOURCES", "Dataset", "Split",
           "fingerprint", "fingerprint_scheme", "load_cifar_python", "load_dataset", "load_image_folder",
           "load_keras_cifar10", "load_npz", "read_image", "resize", "resize_mode", "resize_text", "RESIZE",
           "RESIZE_DCT"]

log = logging.getLogger(__name__)


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
        ds = without_bad_images(ds)
    return replace(ds, fingerprint=fingerprint(ds, scheme))



def _detect(source: str) -> Callable[[str], Dataset]:
    path = existing(source)
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

