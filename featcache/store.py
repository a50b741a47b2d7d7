"""The HDF5 cache format, in one place.

Layout of ``<cache-dir>/<dataset>-<layer>-<key12>.h5``::

    /                      attributes: every CacheMeta field, plus `complete` and `max_abs_activation`
    /class_names           (n_classes,) utf-8
    /progress              (2,) int64: rows of train and test already written (resume point)
    /<split>/features      (n, *feature_shape) float16|float32, chunks of whole rows up to 1 MiB
    /<split>/labels        (n,) int64
    /<split>/paths         (n,) utf-8, the image file of each row (image-folder sources only)
    /train/views           (n, views - 1, *feature_shape): augmented views 1.. of each training row
                           (only when views > 1; view 0 is /train/features)

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

from featcache.errors import CacheError

FORMAT_VERSION = 1
SPLITS = ("train", "test")
#: The fields that decide whether a cache holds what was asked for (its key).
KEY_FIELDS = ("format_version", "backbone", "layer", "weights", "input_shape", "dtype",
              "dataset_fingerprint", "limit")
#: Key fields added later: left out of the key at their default, so older caches keep their names.
OPTIONAL_KEY_FIELDS = {"views": 1, "augment": "", "augment_seed": 0}
_JSON_FIELDS = ("input_shape", "feature_shape", "versions")
_MAX_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class CacheMeta:
    """What produced a cache; written as HDF5 attributes of the file's root."""

    backbone: str
    layer: str
    weights: str               # identity: "sha256:...", "imagenet:keras-3.x", "random:seed=0"
    weights_source: str        # what the user passed: a path, "imagenet" or "random"
    input_shape: tuple[int, int, int]
    feature_shape: tuple[int, ...]
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
    format_version: int = FORMAT_VERSION
    views: int = 1             # feature views per training image: the original plus views - 1 augmented
    augment: str = ""          # augmentations of views 1.., e.g. "flip,crop"
    augment_seed: int = 0

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

    def to_attrs(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: json.dumps(v) if k in _JSON_FIELDS else v for k, v in d.items()}

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
    return f"{meta.dataset_name}-{meta.layer}-{meta.key[:12]}.h5"


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
    shape: tuple[int, ...]     # of the features dataset, rows included


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

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of `split` read into memory in their stored dtype."""
        import h5py

        with h5py.File(self.path, "r") as f:
            return f[f"{split}/features"][...], f[f"{split}/labels"][...]

    def load_views(self) -> np.ndarray | None:
        """(n_train, views - 1, *feature_shape) augmented training views, or None without views."""
        import h5py

        with h5py.File(self.path, "r") as f:
            return f["train/views"][...] if "train/views" in f else None

    def paths(self, split: str) -> list[str] | None:
        import h5py

        with h5py.File(self.path, "r") as f:
            if f"{split}/paths" not in f:
                return None
            return [p.decode() for p in f[f"{split}/paths"][...]]

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def open_cache(path: str | Path, *, require_complete: bool = True) -> FeatureCache:
    """Open and check a cache file; a CacheError says what is wrong and how to fix it."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise CacheError(f"no cache file at {path}; fix: run `featcache extract` first or check the path")
    fix = "fix: delete it, or rerun `featcache extract` with --force to rebuild it"
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path} is not a readable HDF5 file ({_short(e)}); {fix}") from e
    try:
        with f:
            if "format_version" not in f.attrs or "dataset_fingerprint" not in f.attrs:
                raise CacheError(f"{path} is an HDF5 file but not a featcache cache; {fix}")
            version = int(f.attrs["format_version"])
            if version > FORMAT_VERSION:
                raise CacheError(f"{path} has cache format {version}, this featcache reads up to "
                                 f"{FORMAT_VERSION}; fix: upgrade featcache, or re-extract with --force")
            meta = CacheMeta.from_attrs(f.attrs)
            splits = {s: SplitInfo(n=f[f"{s}/features"].shape[0], shape=tuple(f[f"{s}/features"].shape))
                      for s in SPLITS}
            cache = FeatureCache(
                path=path, meta=meta,
                class_names=tuple(c.decode() for c in f["class_names"][...]),
                complete=bool(f.attrs.get("complete", False)),
                progress=tuple(int(v) for v in f["progress"][...]),
                splits=splits,
                max_abs_activation=(float(f.attrs["max_abs_activation"])
                                    if "max_abs_activation" in f.attrs else None),
                extract_seconds=(float(f.attrs["extract_seconds"]) if "extract_seconds" in f.attrs else None))
    except (KeyError, ValueError, OSError, TypeError) as e:
        raise CacheError(f"{path} is damaged or not a featcache cache ({_short(e)}); {fix}") from e
    if require_complete and not cache.complete:
        raise CacheError(f"{path} is incomplete (its extraction was interrupted); fix: rerun the same "
                         "`featcache extract` command to resume it")
    return cache


def chunk_rows(feature_shape: tuple[int, ...], dtype: str, batch_size: int) -> int:
    """Rows per chunk: one batch, capped so a chunk stays within 1 MiB."""
    row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
    return max(1, min(batch_size, _MAX_CHUNK_BYTES // row_bytes))


def create(path: Path, meta: CacheMeta, *, labels: dict, paths: dict, class_names, rows_per_chunk: int,
           compression: str | None = None):
    """Create a cache file with every dataset allocated; returns the open h5py.File (mode r+)."""
    import h5py

    f = h5py.File(path, "w")
    try:
        f.attrs.update(meta.to_attrs())
        f.attrs["complete"] = False
        f.create_dataset("class_names", data=np.array(class_names, dtype=h5py.string_dtype()))
        f.create_dataset("progress", data=np.zeros(2, np.int64))
        for split in SPLITS:
            n = len(labels[split])
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            if compression is None:   # compressed chunks are sized on write, so cannot be allocated now
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            f.create_dataset(f"{split}/features", shape=(n, *meta.feature_shape), dtype=meta.dtype,
                             chunks=(min(rows_per_chunk, max(n, 1)), *meta.feature_shape),
                             compression=compression, shuffle=compression == "gzip" or None,
                             dcpl=dcpl, fill_time="never" if compression is None else None)
            f.create_dataset(f"{split}/labels", data=np.asarray(labels[split], np.int64))
            if paths.get(split) is not None:
                f.create_dataset(f"{split}/paths", data=np.array(paths[split], dtype=h5py.string_dtype()))
        if meta.views > 1:
            n, k = len(labels["train"]), meta.views - 1
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            rows = max(1, min(n, rows_per_chunk // k))
            f.create_dataset("train/views", shape=(n, k, *meta.feature_shape), dtype=meta.dtype,
                             chunks=(rows, k, *meta.feature_shape), dcpl=dcpl, fill_time="never")
        f.flush()
    except BaseException:
        f.close()
        raise
    return f


def finish(f, *, max_abs_activation: float, extract_seconds: float | None = None) -> None:
    f.attrs["max_abs_activation"] = max_abs_activation
    if extract_seconds is not None:   # of the run that completed the file (a resumed run: its part only)
        f.attrs["extract_seconds"] = extract_seconds
    f.attrs["complete"] = True
    f.flush()


def _short(e: Exception) -> str:
    return str(e).split("\n")[0][:200]
