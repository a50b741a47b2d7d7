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

A shard (one unit of a sharded extraction, `featcache.join`) has the same layout and key, holds the
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import BadInputError, CacheError, first_line

#: The newest format this module reads; it writes 1 for one layer and 2 for several.
FORMAT_VERSION = 2
SPLITS = ("train", "test")
#: The fields that decide whether a cache holds what was asked for (its key).
KEY_FIELDS = ("format_version", "backbone", "layer", "weights", "input_shape", "dtype",
              "dataset_fingerprint", "limit")
#: Key fields added later: left out of the key at their default, so older caches keep their names.
OPTIONAL_KEY_FIELDS = {"views": 1, "augment": "", "augment_seed": 0, "precision": "float32"}
_JSON_FIELDS = ("input_shape", "feature_shape", "versions", "skipped_images")
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
    backbone = "" if meta.backbone == "vgg16" else f"{meta.backbone}-"
    return f"{meta.dataset_name}-{backbone}{'+'.join(meta.layers)}-{meta.key[:12]}.h5"


def dataset_path(meta: CacheMeta, split: str, layer: str, *, views: bool = False) -> str:
    """Where a layer's features (or its training views) live in a file of `meta`'s format."""
    base = "train/views" if views else f"{split}/features"
    return base if meta.format_version == 1 else f"{base}/{layer}"


def differences(meta: CacheMeta, wanted: dict) -> list[str]:
    """'field: cache has X, asked for Y' for each field of `wanted` that the cache does not match."""
    out = []
    for k, v in wanted.items():
        have = getattr(meta, k)
        if (list(have) if isinstance(have, tuple) else have) != (list(v) if isinstance(v, tuple) else v):
            out.append(f"{k}: cache has {have!r}, asked for {v!r}")
    return out


@dataclass(frozen=True)
class SplitInfo:
    n: int
    shapes: dict               # {layer: shape of its features dataset, rows included}


@dataclass(frozen=True)
class FeatureCache:
    """An opened cache: its metadata and shapes; arrays are read on demand with `load`."""

    path: Path
    meta: CacheMeta
    class_names: tuple[str, ...]
    complete: bool
    progress: tuple[int, int]
    splits: dict
    max_abs_activation: float | None
    extract_seconds: float | None = None
    shard: tuple | None = None   # a shard's (split, start, stop)
    shards: tuple = ()           # a virtual cache's shard files: ({"file", "split", "start", "stop", "bytes"}, ...)

    @property
    def kind(self) -> str:
        """'file' (self-contained), 'virtual' (joined shards, see `featcache.join`) or 'shard'."""
        return "shard" if self.shard else "virtual" if self.shards else "file"

    @property
    def layers(self) -> tuple[str, ...]:
        return self.meta.layers

    def load(self, split: str, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of `split` at `layer` (may be left out with one layer), in their stored dtype."""
        import h5py

        with h5py.File(self.path, "r") as f:
            return f[dataset_path(self.meta, split, self.select_layer(layer))][...], f[f"{split}/labels"][...]

    def load_views(self, layer: str | None = None) -> np.ndarray | None:
        """(n_train, views - 1, *feature_shape) augmented training views at `layer`, or None without views."""
        import h5py

        name = dataset_path(self.meta, "train", self.select_layer(layer), views=True)
        with h5py.File(self.path, "r") as f:
            return f[name][...] if name in f else None

    def select_layer(self, layer: str | None) -> str:
        """`layer`, checked to be in this cache; None stands for its only layer."""
        if layer is None and len(self.layers) == 1:
            return self.layers[0]
        if layer not in self.layers:
            raise BadInputError(f"{self.path} holds {', '.join(self.layers)}"
                                + ("" if layer is None else f", not {layer}")
                                + "; fix: name one of these layers (--layer)")
        return layer

    def as_tf_dataset(self, split: str, layer: str | None = None, **options):
        """Batches (float32 features, labels) streamed from disk; see `featcache.reader.as_tf_dataset`."""
        from featcache.reader import as_tf_dataset

        return as_tf_dataset(self, split, layer=layer, **options)

    def array(self, split: str, layer: str | None = None):
        """`with cache.array("train") as x:` a read-only, lazily read view of a split's features."""
        from featcache.reader import array_view

        return array_view(self, split, layer)

    def paths(self, split: str) -> list[str] | None:
        import h5py

        with h5py.File(self.path, "r") as f:
            if f"{split}/paths" not in f:
                return None
            return [p.decode() for p in f[f"{split}/paths"][...]]

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the file, plus its shards for a joined (virtual) cache."""
        return self.path.stat().st_size + sum(s["bytes"] for s in self.shards)


def open_cache(path: str | Path, *, require_complete: bool = True) -> FeatureCache:
    """Open and check a cache file; a CacheError says what is wrong and how to fix it."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no cache file at {path}; fix: run `featcache extract` first or check the path")
    fix = "fix: delete it, or rerun `featcache extract` with --force to rebuild it"
    if path.name.endswith(".partial") and being_written(path):
        fix = "it is being written by another featcache process; fix: wait for that extraction to finish"
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path} is not a readable HDF5 file ({first_line(e)}); {fix}") from e
    try:
        with f:
            if "format_version" not in f.attrs or "dataset_fingerprint" not in f.attrs:
                raise CacheError(f"{path} is an HDF5 file but not a featcache cache; {fix}")
            version = int(f.attrs["format_version"])
            if version > FORMAT_VERSION:
                raise CacheError(f"{path} has cache format {version}, this featcache reads up to "
                                 f"{FORMAT_VERSION}; fix: upgrade featcache, or re-extract with --force")
            meta = CacheMeta.from_attrs(f.attrs)
            splits = {}
            for s in SPLITS:
                shapes = {layer: tuple(f[dataset_path(meta, s, layer)].shape) for layer in meta.layers}
                splits[s] = SplitInfo(n=len(f[f"{s}/labels"]), shapes=shapes)
            cache = FeatureCache(
                path=path, meta=meta,
                class_names=tuple(c.decode() for c in f["class_names"][...]),
                complete=bool(f.attrs.get("complete", False)),
                progress=tuple(int(v) for v in f["progress"][...]),
                splits=splits,
                max_abs_activation=(float(f.attrs["max_abs_activation"])
                                    if "max_abs_activation" in f.attrs else None),
                extract_seconds=(float(f.attrs["extract_seconds"]) if "extract_seconds" in f.attrs else None),
                shard=tuple(json.loads(f.attrs["shard"])) if "shard" in f.attrs else None,
                shards=tuple(json.loads(f.attrs["shards"])) if "shards" in f.attrs else ())
    except (KeyError, ValueError, OSError, TypeError) as e:
        raise CacheError(f"{path} is damaged or not a featcache cache ({first_line(e)}); {fix}") from e
    if cache.shards:
        from featcache.join import check_sources

        check_sources(cache)
    if require_complete and not cache.complete:
        if being_written(path):
            raise CacheError(f"{path} is being written by another featcache process; fix: wait for that "
                             "extraction to finish, then use the finished file without .partial")
        raise CacheError(f"{path} is incomplete (its extraction was interrupted); fix: rerun the same "
                         "`featcache extract` command to resume it")
    return cache


def being_written(path: Path) -> bool:
    """Whether another process holds the extraction lock of this cache (or of the cache this partial becomes)."""
    import fcntl

    final = path.with_name(path.name.removesuffix(".partial"))
    lock = final.with_name(final.name + ".lock")
    if not lock.exists():
        return False
    try:
        with lock.open("rb") as fd:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def chunk_rows(feature_shape: tuple[int, ...], dtype: str, batch_size: int) -> int:
    """Rows per chunk: one batch, capped so a chunk stays within 1 MiB."""
    row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
    return max(1, min(batch_size, _MAX_CHUNK_BYTES // row_bytes))


def create(path: Path, meta: CacheMeta, *, labels: dict, paths: dict, class_names, batch_size: int,
           compression: str | None = None, shard=None):
    """Create a cache file with every dataset allocated; returns the open h5py.File (mode r+).

    Chunks hold whole rows: up to one batch (`batch_size`), capped at 1 MiB. A shard (`shard`: its
    split, start and stop) gets the labels and paths of its rows only, and the other split none."""
    import h5py

    f = h5py.File(path, "w")
    try:
        f.attrs.update(meta.to_attrs())
        f.attrs["complete"] = False
        if shard is not None:
            f.attrs["shard"] = json.dumps(list(dataclasses.astuple(shard) if dataclasses.is_dataclass(shard)
                                               else shard))
        f.create_dataset("class_names", data=np.array(class_names, dtype=h5py.string_dtype()))
        f.create_dataset("progress", data=np.zeros(2, np.int64))
        for split in SPLITS:
            n = len(labels[split])
            for layer, shape in meta.shapes.items():
                rows = min(chunk_rows(shape, meta.dtype, batch_size), max(n, 1))
                _allocate(f, dataset_path(meta, split, layer), (n, *shape), (rows, *shape) if n else None, meta.dtype,
                          compression)
            f.create_dataset(f"{split}/labels", data=np.asarray(labels[split], np.int64))
            if paths.get(split) is not None:
                f.create_dataset(f"{split}/paths", data=np.array(paths[split], dtype=h5py.string_dtype()))
        if meta.views > 1:
            n, k = len(labels["train"]), meta.views - 1
            for layer, shape in meta.shapes.items():
                rows = max(1, min(n, chunk_rows(shape, meta.dtype, batch_size) // k))
                _allocate(f, dataset_path(meta, "train", layer, views=True), (n, k, *shape),
                          (rows, k, *shape) if n else None, meta.dtype)
        f.flush()
    except BaseException:
        f.close()
        raise
    return f


def _allocate(f, name: str, shape: tuple, chunks: tuple, dtype: str, compression: str | None = None) -> None:
    """A features dataset; uncompressed ones get all their space now (compressed chunks are sized on write)."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if compression is None:
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compression=compression,
                     shuffle=compression == "gzip" or None, dcpl=dcpl,
                     fill_time="never" if compression is None else None)


def combine(sources, path: Path, *, batch_size: int = 128) -> CacheMeta:
    """Write the single-layer caches `sources` (FeatureCache, same images and options) as one file at `path`.

    No forward pass: rows are copied. Featcache before format 2 wrote one file per layer even from
    one pass; this turns those into what `extract --layer a,b` writes now. Returns the new meta.
    """
    import h5py

    first = sources[0].meta
    meta = dataclasses.replace(first, layer=",".join(c.meta.layer for c in sources),
                               feature_shape={c.meta.layer: tuple(c.meta.feature_shape) for c in sources})
    with h5py.File(sources[0].path, "r") as src:
        labels = {s: src[f"{s}/labels"][...] for s in SPLITS}
        paths = {s: src[f"{s}/paths"][...].astype(str) if f"{s}/paths" in src else None for s in SPLITS}
    # `created` is stamped once per extraction (to the second): equal stamps mean one pass, timed in each file
    one_pass = len({c.meta.created for c in sources}) == 1
    seconds = [c.extract_seconds for c in sources]
    with create(path, meta, labels=labels, paths=paths, class_names=sources[0].class_names,
                batch_size=batch_size) as f:
        for c in sources:
            with h5py.File(c.path, "r") as src:
                names = [(dataset_path(c.meta, s, c.meta.layer), dataset_path(meta, s, c.meta.layer)) for s in SPLITS]
                if "train/views" in src:
                    names.append(("train/views", dataset_path(meta, "train", c.meta.layer, views=True)))
                for a, b in names:
                    for s in range(0, len(src[a]), 2048):
                        f[b][s:s + 2048] = src[a][s:s + 2048]
        f["progress"][...] = [first.n_train, first.n_test]
        finish(f, max_abs_activation=max(c.max_abs_activation for c in sources),
               extract_seconds=None if None in seconds else (max(seconds) if one_pass else sum(seconds)))
    return meta


def finish(f, *, max_abs_activation: float, extract_seconds: float | None = None) -> None:
    f.attrs["max_abs_activation"] = max_abs_activation
    if extract_seconds is not None:   # of the run that completed the file (a resumed run: its part only)
        f.attrs["extract_seconds"] = extract_seconds
    f.attrs["complete"] = True
    f.flush()
