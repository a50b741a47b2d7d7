"""The HDF5 cache format, in one place.

Layout of ``<cache-dir>/<dataset>-<layer>-<key12>.h5`` (format 1, one layer)::

    /                      attributes: every CacheMeta field, plus `complete` and `max_abs_activation`
    /class_names           (n_classes,) utf-8
    /progress              (2,) int64: rows of train and test already written (resume point)
    /<split>/features      (n, *feature_shape) float16|float32, chunks of whole rows up to 1 MiB
    /<split>/labels        (n,) int64
    /<split>/paths         (n,) utf-8, the image file of each row (image-folder sources only)
    /train/views           (n, views - 1, *feature_shape): augmented views 1.. of each training row
                           (only when views > 1; view 0 is /train/features)

A shard (one unit of a sharded extraction, `featcache.cache.shards`) has the same layout and key, holds the
rows [start, stop) of one split (the other split is empty) and says so in its `shard` attribute. A
virtual cache joins shards: its features and views are HDF5 virtual datasets over the shard files
(relative paths: the cache and its ``.shards`` folder move together), its `shards` attribute lists
them with their sizes, and it opens and reads like any other cache.

Several layers from one forward pass share one file, ``<dataset>-<layer>+<layer>-<key12>.h5``
(format 2): `layer` lists them ("block3_pool,block4_pool"), `feature_shape` maps each to its
shape, and each features or views dataset above becomes a group with one dataset per layer
(``/train/features/block4_pool``). Files of one layer are still written in format 1, so their keys
and names did not change when format 2 was added.

Every dataset is allocated in full when the file is created, so extraction only ever writes raw
feature rows and the progress counter: the file's own structure is on disk from the start, and a
process killed mid-batch leaves a file that reopens and resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from featcache.errors import BadInputError


#: The newest format this module reads; it writes 1 for one layer and 2 for several.
FORMAT_VERSION = 2
SPLITS = ("train", "test")
#: The fields that decide whether a cache holds what was asked for (its key).
KEY_FIELDS = ("format_version", "backbone", "layer", "weights", "input_shape", "dtype",
              "dataset_fingerprint", "limit")
#: Key fields added later: left out of the key at their default, so older caches keep their names.
OPTIONAL_KEY_FIELDS = {"views": 1, "augment": "", "augment_seed": 0, "precision": "float32",
                       "resize": "PIL bilinear, uint8"}   # featcache.sources.RESIZE (not imported: a sibling layer)
_JSON_FIELDS = ("input_shape", "feature_shape", "versions", "skipped_images", "backbone_config")
_MAX_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class CacheMeta:
    """What produced a cache; written as HDF5 attributes of the file's root."""

    backbone: str
    layer: str                 # one layer, or several joined by "," (one file, one forward pass)
    weights: str               # identity: "sha256:...", "imagenet:keras-3.x", "random:seed=0"
    weights_source: str        # what the user passed: a path, "imagenet" or "random"
    input_shape: tuple[int, int, int]
    feature_shape: tuple[int, ...] | dict   # with several layers: {layer: shape}
    preprocessing: str
    resize: str
    dtype: str
    dataset_name: str
    dataset_source: str
    dataset_fingerprint: str
    limit: int                 # 0: every row
    n_train: int
    n_test: int
    versions: dict
    created: str
    views: int = 1             # feature views per training image: the original plus views - 1 augmented
    augment: str = ""          # augmentations of views 1.., e.g. "flip,crop"
    augment_seed: int = 0
    skipped_images: tuple = ()  # (file, reason) of unreadable images left out by --skip-bad-images
    precision: str = "float32"  # compute precision of the backbone (float32, bfloat16, float16)
    #: a KerasHub preset's configuration files ({name: text}), so that heads, `info --verify`, predict and export
    #: still rebuild its graph when its folder has moved or is gone (its weights' hash and this digest are keyed)
    backbone_config: dict = dataclasses.field(default_factory=dict)

    @property
    def format_version(self) -> int:
        """The layout of the file: 1 for one layer, 2 for several (see the module's doc)."""
        return 1 if len(self.layers) == 1 else 2

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.layer.split(","))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{layer: feature shape of one row}, for one layer or several."""
        if isinstance(self.feature_shape, dict):
            return {k: tuple(v) for k, v in self.feature_shape.items()}
        return {self.layer: tuple(self.feature_shape)}

    @property
    def key(self) -> str:
        return cache_key(self.key_fields())

    def key_fields(self) -> dict:
        fields = {f: getattr(self, f) for f in KEY_FIELDS}
        fields.update({f: getattr(self, f) for f, default in OPTIONAL_KEY_FIELDS.items()
                       if getattr(self, f) != default})
        return fields

    @property
    def random_weights(self) -> bool:
        return self.weights.startswith("random")

    def to_dict(self) -> dict:
        """Every field and the format version, JSON-ready (what run records and `info --json` show)."""
        d = {**dataclasses.asdict(self), "format_version": self.format_version}
        return json.loads(json.dumps(d))

    def to_attrs(self) -> dict:
        return {k: json.dumps(v) if k in _JSON_FIELDS else v for k, v in self.to_dict().items()}

    @classmethod
    def from_attrs(cls, attrs) -> "CacheMeta":
        d = {}
        for field in dataclasses.fields(cls):
            k = field.name
            if k not in attrs and field.default is not dataclasses.MISSING:
                continue
            v = attrs[k]
            v = v.decode() if isinstance(v, bytes) else v
            if k in _JSON_FIELDS:
                v = json.loads(v)
                if k == "feature_shape" and isinstance(v, dict):   # several layers: {layer: shape}
                    v = {name: tuple(shape) for name, shape in v.items()}
                v = tuple(v) if isinstance(v, list) else v
            elif isinstance(v, np.generic):
                v = v.item()
            d[k] = v
        return cls(**d)


def cache_key(fields: dict) -> str:
    """sha256 of the key fields, canonical JSON (tuples and lists alike)."""
    canon = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in sorted(fields.items())},
                       sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def cache_filename(meta: CacheMeta) -> str:
    """<dataset>-<layers>-<key12>.h5; other backbones than VGG16 (whose names predate them) name themselves."""
    name = meta.backbone
    if name.startswith("hub:"):   # a KerasHub preset: its name, or its folder's
        name = "hub-" + name[len("hub:"):].rstrip("/").rsplit("/", 1)[-1]
    backbone = "" if name == "vgg16" else re.sub(r"[^\w.+-]+", "_", name) + "-"
    return f"{meta.dataset_name}-{backbone}{'+'.join(meta.layers)}-{meta.key[:12]}.h5"


def checked_split(split: str) -> str:
    """`split`, one of SPLITS, or the one error naming them."""
    if split not in SPLITS:
        raise BadInputError(f"a cache holds the splits {' and '.join(SPLITS)}, not {split!r}; fix: pass one of "
                            "them (validation rows are carved from train when a head is trained)")
    return split


def dataset_path(meta: CacheMeta, split: str, layer: str, *, views: bool = False) -> str:
    """Where a layer's features (or its training views) live in a file of `meta`'s format."""
    base = "train/views" if views else f"{checked_split(split)}/features"
    return base if meta.format_version == 1 else f"{base}/{layer}"


@dataclass(frozen=True)
class FeatureDataset:
    """One features (or views) dataset of a cache file: where it is and what each of its rows holds."""

    split: str
    layer: str
    views: bool          # the training views (n, views - 1, *shape), not the originals (n, *shape)
    path: str
    row_shape: tuple     # one row's shape (the views' axis included)


def feature_datasets(meta: CacheMeta) -> list[FeatureDataset]:
    """Every features and views dataset of a file of `meta`'s format: the one list of them."""
    out = [FeatureDataset(split, layer, False, dataset_path(meta, split, layer), tuple(shape))
           for split in SPLITS for layer, shape in meta.shapes.items()]
    if meta.views > 1:
        out += [FeatureDataset("train", layer, True, dataset_path(meta, "train", layer, views=True),
                               (meta.views - 1, *shape)) for layer, shape in meta.shapes.items()]
    return out


def row_bytes(meta: CacheMeta, layers=None) -> int:
    """Stored bytes of one image's features, over `layers` (default: all), one view."""
    shapes = meta.shapes
    return sum(int(np.prod(shapes[name])) for name in (layers or shapes)) * np.dtype(meta.dtype).itemsize


def expected_bytes(meta: CacheMeta, layers=None) -> int:
    """Bytes of the features of a cache (every view of the training split, the test split) at `layers`."""
    return row_bytes(meta, layers) * (meta.n_train * meta.views + meta.n_test)


def differences(meta: CacheMeta, wanted: dict) -> list[str]:
    """'field: cache has X, asked for Y' for each field of `wanted` that the cache does not match."""
    out = []
    for k, v in wanted.items():
        have = getattr(meta, k)
        if (list(have) if isinstance(have, tuple) else have) != (list(v) if isinstance(v, tuple) else v):
            out.append(f"{k}: cache has {have!r}, asked for {v!r}")
    return out


def chunk_rows(feature_shape: tuple[int, ...], dtype: str, batch_size: int) -> int:
    """Rows per chunk: one batch, capped so a chunk stays within 1 MiB."""
    row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
    return max(1, min(batch_size, _MAX_CHUNK_BYTES // row_bytes))

