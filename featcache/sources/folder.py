"""Image-folder sources: ROOT/{train,test}/<class>/<image>, kept on disk and decoded batch by batch.

Classes are the sorted folder names and must match between splits; rows are ordered by class, then
file name; hidden and system files are skipped and anything else that is not an image is refused.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np

from featcache import system
from featcache.errors import BadInputError, UnreadableImageError
from featcache.sources.dataset import Dataset, Split, existing, require_utf8
from featcache.sources.images import is_system_file, pillow_extensions, printable, read_image

log = logging.getLogger(__name__)



_LAYOUT = "expected ROOT/train/<class>/<image> and ROOT/test/<class>/<image>"


def load_image_folder(path: str) -> Dataset:
    """A tree ROOT/{train,test}/<class>/<image> in any format Pillow reads.

    Every entry is checked before any file is opened, each refused in one line naming it: a name that is not
    UTF-8 (root, class folder or image: the cache stores names as text), an entry that cannot be listed or followed (no permission, a symlink loop, a
    dangling link), a file where a class folder belongs, and anything in a class folder that is not a regular image
    file (a FIFO would block its first read forever). A symlink counts as what it points to."""
    root = existing(path)
    if not root.is_dir():
        raise BadInputError(f"{root} is not a folder; {_LAYOUT}")
    classes = _class_names(root)
    image_exts = pillow_extensions()
    out = {}
    for split in ("train", "test"):
        files, labels = [], []
        for label, name in enumerate(classes):
            entries = _images(root / split / name, image_exts)
            files += entries
            labels += [label] * len(entries)
        out[split] = Split(labels=np.asarray(labels, np.int64), files=tuple(files),
                           paths=tuple(printable(str(p.relative_to(root))) for p in files))
    # an absolute source: a cache made here still finds its dataset from another working folder
    return Dataset(name=root.name, source=f"folder:{root.resolve()}", train=out["train"], test=out["test"],
                   class_names=tuple(classes), fingerprint="")


def _class_names(root: Path) -> list[str]:
    """The class folders' names, sorted, the same in both splits."""
    splits = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise BadInputError(f"{folder} is missing; {_LAYOUT}")
        classes = []
        for p, mode in _listing(folder):
            if not stat.S_ISDIR(mode):   # a class would silently be missing from the dataset
                raise BadInputError(f"{printable(str(p))} is not a folder; {_LAYOUT}, only class folders in "
                                    f"{printable(str(folder))}; fix: move it out of the dataset")
            require_utf8(p)   # class names are written to the cache as UTF-8 text
            classes.append(p.name)
        if not classes:
            raise BadInputError(f"{folder} has no class folders; {_LAYOUT}")
        splits[split] = sorted(classes)
    if splits["train"] != splits["test"]:
        only_train = sorted(set(splits["train"]) - set(splits["test"]))
        only_test = sorted(set(splits["test"]) - set(splits["train"]))
        raise BadInputError(f"train and test class folders differ in {root}: only in train {only_train}, "
                            f"only in test {only_test}; fix: give both splits the same class folders")
    return splits["train"]


def _images(folder: Path, image_exts: set[str]) -> list[Path]:
    """The image files of class folder `folder`, sorted by name; anything else is refused, never opened."""
    entries = _listing(folder)
    for p, mode in entries:
        if stat.S_ISDIR(mode) or p.suffix.lower() not in image_exts:
            raise BadInputError(f"{printable(str(p))} is not an image file; expected only images in "
                                f"{printable(str(folder))}; fix: move it out of the dataset")
        if not stat.S_ISREG(mode):
            raise BadInputError(f"{printable(str(p))} is not a regular file (a FIFO, socket or device); expected "
                                f"only image files in {printable(str(folder))}; fix: move it out of the dataset")
        require_utf8(p)   # stored with U+FFFD, the cache's path would name no file (inspect, mistakes)
    if not entries:
        raise BadInputError(f"{folder} has no images; fix: add images or remove the class folder")
    return [p for p, _ in entries]


def _listing(folder: Path) -> list[tuple[Path, int]]:
    """(entry, st_mode) of each entry of `folder` but hidden and system files, sorted by name; a symlink's mode is
    its target's. A folder that cannot be listed or an entry that cannot be followed is refused naming it: a
    rerun cannot fix either."""
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise BadInputError(f"cannot list {printable(str(folder))} ({e.strerror or e}); expected a readable "
                            "folder; fix: make it readable or move it out of the dataset") from e
    out = []
    for p in sorted(folder / name for name in names if not is_system_file(name)):   # sorted as paths, as ever: rows and fingerprints keep their order
        try:
            mode = os.stat(p).st_mode
        except OSError as e:
            raise BadInputError(f"cannot follow {printable(str(p))} ({e.strerror or e}); expected a file or "
                                "folder, got a symlink loop, a dangling link or an entry out of reach; fix: repair "
                                "or remove it") from e
        out.append((p, mode))
    return out


def without_bad_images(ds: Dataset) -> Dataset:
    """`ds` without the images that fail to decode; each is logged and listed in `skipped`."""
    if ds.train.files is None:
        return ds   # pixels in memory: nothing to decode
    skipped, splits = [], {}
    bar = system.progress_bar(len(ds.train) + len(ds.test), unit="img", desc="check images")
    for name, split in (("train", ds.train), ("test", ds.test)):
        keep = []
        for i, file in enumerate(split.files):
            try:
                read_image(file)
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


