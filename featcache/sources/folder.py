"""Image-folder sources: ROOT/{train,test}/<class>/<image>, kept on disk and decoded batch by batch.

Classes are the sorted folder names and must match between splits; rows are ordered by class, then
file name; hidden and system files are skipped and anything else that is not an image is refused.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from featcache import system
from featcache.errors import BadInputError, UnreadableImageError
from featcache.sources.dataset import Dataset, Split, existing
from featcache.sources.images import is_system_file, pillow_extensions, printable, read_image

log = logging.getLogger(__name__)



def load_image_folder(path: str) -> Dataset:
    """A tree ROOT/{train,test}/<class>/<image> in any format Pillow reads."""
    root = existing(path)
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
    image_exts = {ext for ext in pillow_extensions()}
    out = {}
    for split in ("train", "test"):
        files, labels = [], []
        for label, name in enumerate(classes):
            folder = root / split / name
            entries = sorted(p for p in folder.iterdir() if not is_system_file(p.name))
            for p in entries:
                if p.is_dir() or p.suffix.lower() not in image_exts:
                    raise BadInputError(f"{p} is not an image file; expected only images in {folder}; "
                                        "fix: move it out of the dataset")
            if not entries:
                raise BadInputError(f"{folder} has no images; fix: add images or remove the class folder")
            files += entries
            labels += [label] * len(entries)
        out[split] = Split(labels=np.asarray(labels, np.int64), files=tuple(files),
                           paths=tuple(printable(str(p.relative_to(root))) for p in files))
    # an absolute source: a cache made here still finds its dataset from another working folder
    return Dataset(name=root.name, source=f"folder:{root.resolve()}", train=out["train"], test=out["test"],
                   class_names=tuple(classes), fingerprint="")




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


