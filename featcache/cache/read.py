"""Reading a cache: `open_cache` checks a file and describes it (`FeatureCache`); arrays are read on demand,
whole (`load`), as a read-only view (`array`), or as block-shuffled tf.data streams (`as_tf_dataset`).

Random single-row reads from HDF5 are slow (each touches a chunk); contiguous blocks of rows are
fast. A training stream therefore shuffles the order of blocks each epoch and mixes rows in a
bounded buffer, so every row is seen once per epoch while memory holds a few blocks at a time.
A virtual cache (joined shards) is opened only while each shard is still the file it joined.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.cache import digests
from featcache.cache.files import being_written
from featcache.cache.format import FORMAT_VERSION, SPLITS, CacheMeta, checked_split, dataset_path, feature_datasets
from featcache.cache.pooled import GLOBAL_POOLINGS, global_pool
from featcache.errors import BadInputError, CacheError, first_line

#: Rows per block read from HDF5 (a few chunks: chunks hold up to one batch, capped at 1 MiB).
BLOCK_ROWS = 256


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
    extract_stages: dict | None = None   # where the extraction's seconds went (featcache.extract.local.Stages)

    @property
    def kind(self) -> str:
        """'file' (self-contained), 'virtual' (joined shards, see `featcache.cache.shards`) or 'shard'."""
        return "shard" if self.shard else "virtual" if self.shards else "file"

    @property
    def layers(self) -> tuple[str, ...]:
        return self.meta.layers

    def load(self, split: str, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of `split` at `layer` (may be left out with one layer), in their stored dtype; every
        row checked against the digests recorded when it was written."""
        name = dataset_path(self.meta, split, self.select_layer(layer))
        with reading(self, name) as f:
            return checked(f, self, name, f[name][...]), f[f"{split}/labels"][...]

    def load_views(self, layer: str | None = None) -> np.ndarray | None:
        """(n_train, views - 1, *feature_shape) augmented training views at `layer`, or None without views."""
        name = dataset_path(self.meta, "train", self.select_layer(layer), views=True)
        with reading(self, name) as f:
            return checked(f, self, name, f[name][...]) if name in f else None

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
        """Batches (float32 features, labels) streamed from disk; see `as_tf_dataset` below."""
        return as_tf_dataset(self, split, layer=layer, **options)

    def array(self, split: str, layer: str | None = None):
        """`with cache.array("train") as x:` a read-only, lazily read view of a split's features."""
        return array_view(self, split, layer)

    def paths(self, split: str) -> list[str] | None:
        import h5py

        with h5py.File(self.path, "r") as f:
            if f"{checked_split(split)}/paths" not in f:
                return None
            return [p.decode() for p in f[f"{split}/paths"][...]]

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the file, plus its shards for a joined (virtual) cache."""
        return self.path.stat().st_size + sum(s["bytes"] for s in self.shards)


def open_cache(path: str | Path, *, require_complete: bool = True) -> FeatureCache:
    """Open and check a cache file; a CacheError says what is wrong and how to fix it."""
    import h5py

    if not isinstance(path, (str, os.PathLike)):
        raise BadInputError(f"a cache is given by its path, not {type(path).__name__} {path!r}")
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
            cache = _describe(path, f, fix)
    except (KeyError, ValueError, OSError, TypeError) as e:
        raise CacheError(f"{path} is damaged or not a featcache cache ({first_line(e)}); {fix}") from e
    _check_name(cache)
    if cache.shards:
        check_sources(cache)
    if require_complete and not cache.complete:
        if being_written(path):
            raise CacheError(f"{path} is being written by another featcache process; fix: wait for that "
                             "extraction to finish, then use the finished file without .partial")
        raise CacheError(f"{path} is incomplete (its extraction was interrupted); fix: rerun the same "
                         "`featcache extract` command to resume it")
    return cache


#: How featcache names a cache: ...-<first 12 hex digits of its key>.h5, maybe .partial.
_NAMED_BY_KEY = re.compile(r"-(?P<key12>[0-9a-f]{12})\.h5(\.partial)?$")


def _check_name(cache: FeatureCache) -> None:
    """Refuse a cache whose attributes no longer give the key in its name (edited after it was written). Files
    renamed by hand (no key in the name), shards and pooled files are not named by key."""
    m = _NAMED_BY_KEY.search(cache.path.name)
    if m and cache.shard is None and m["key12"] != cache.meta.key[:12]:
        raise CacheError(f"{cache.path} is named for key {m['key12']} but its attributes give {cache.meta.key[:12]}: "
                         "it was renamed from another cache's name, or its metadata was edited (tampered) after it was "
                         "written; fix: give it back its own name (…-<first 12 digits of its key>.h5), or delete it "
                         "and rerun `featcache extract`")


def _describe(path: Path, f, fix: str) -> FeatureCache:
    """The FeatureCache of an open file (h5py raises KeyError and the like where a part is missing)."""
    if "format_version" not in f.attrs or "dataset_fingerprint" not in f.attrs:
        raise CacheError(f"{path} is an HDF5 file but not a featcache cache; {fix}")
    version = int(f.attrs["format_version"])
    if version > FORMAT_VERSION:
        raise CacheError(f"{path} has cache format {version}, this featcache reads up to "
                         f"{FORMAT_VERSION}; fix: upgrade featcache, or re-extract with --force")
    meta = CacheMeta.from_attrs(f.attrs)
    splits = {s: SplitInfo(n=len(f[f"{s}/labels"]),
                           shapes={layer: tuple(f[dataset_path(meta, s, layer)].shape) for layer in meta.layers})
              for s in SPLITS}
    for s, info in splits.items():   # the attributes describe the datasets they sit beside
        for layer, shape in info.shapes.items():
            if tuple(shape[1:]) != meta.shapes[layer]:
                raise CacheError(f"{path}: its feature_shape attribute says {layer} rows are {meta.shapes[layer]} but "
                                 f"/{dataset_path(meta, s, layer)} holds {tuple(shape[1:])} (tampered); {fix}")
    _check_own_data(path, f, meta, fix)
    number = lambda name: float(f.attrs[name]) if name in f.attrs else None   # noqa: E731
    return FeatureCache(
        path=path, meta=meta, class_names=tuple(c.decode() for c in f["class_names"][...]),
        complete=bool(f.attrs.get("complete", False)), progress=tuple(int(v) for v in f["progress"][...]),
        splits=splits, max_abs_activation=number("max_abs_activation"), extract_seconds=number("extract_seconds"),
        shard=tuple(json.loads(f.attrs["shard"])) if "shard" in f.attrs else None,
        shards=tuple(json.loads(f.attrs["shards"])) if "shards" in f.attrs else (),
        extract_stages=json.loads(f.attrs["extract_stages"]) if "extract_stages" in f.attrs else None)


def _check_own_data(path: Path, f, meta: CacheMeta, fix: str) -> None:
    """Refuse a file that reads another file's bytes (links, external storage, virtual datasets but a joined
    cache's features over its own shards), whose small records (class names, labels, paths) differ from what was
    written, or whose labels are not class numbers."""
    joined = "shards" in f.attrs
    sources = {r["file"] for r in json.loads(f.attrs["shards"])} if joined else set()
    virtual = {d.path for d in feature_datasets(meta)} if joined else set()
    problems = digests.foreign_storage(f, virtual_ok=virtual, sources=sources)
    if problems:
        raise CacheError(f"{path} reads data from outside itself ({'; '.join(problems)}): not a file featcache "
                         f"wrote; {fix}")
    if digests.has_digests(f):
        small = [n for n in ("class_names", *(f"{s}/{k}" for s in SPLITS for k in ("labels", "paths"))) if n in f]
        problems = [p for n in small for p in digests.check(f, n)]
        if problems:
            raise CacheError(f"{path} was changed after it was written ({'; '.join(problems)}); {fix}")
    n_classes = len(f["class_names"])
    for split in SPLITS:
        labels = f[f"{split}/labels"][...]
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise CacheError(f"{path}: /{split}/labels holds {int(labels.min())}..{int(labels.max())}, expected class "
                             f"numbers 0..{n_classes - 1} of its {n_classes} class names (tampered); {fix}")


def check_sources(cache: FeatureCache) -> None:
    """Refuse a joined cache one of whose shards is missing, or is not the file it joined: its size, or its
    identity (key, rows, the file id each file gets when created, its content digest) differs from the record."""
    import h5py

    base = cache.path.resolve().parent   # relative sources: from the real file's folder, also through a link
    for record in cache.shards:
        shard = base / record["file"]
        fix = (f"fix: restore it, or delete {cache.path} and rerun the same `featcache extract` command "
               "(it recomputes missing shards; delete a damaged one first)")
        if not shard.is_file():
            raise CacheError(f"{cache.path} is missing its shard {shard}; {fix}")
        size = shard.stat().st_size
        if size != record["bytes"]:
            raise CacheError(f"{cache.path}: its shard {shard} has {size} bytes, {record['bytes']} when joined "
                             f"(truncated or replaced); {fix}")
        try:
            with h5py.File(shard, "r") as f:
                have = {"key": CacheMeta.from_attrs(f.attrs).key, "rows": json.loads(f.attrs["shard"]),
                        "file_id": _text(f.attrs.get("file_id")), "digest": _text(f.attrs.get("digest"))}
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise CacheError(f"{cache.path}: its shard {shard} cannot be read ({first_line(e)}); {fix}") from e
        wanted = {"key": cache.meta.key, "rows": [record["split"], record["start"], record["stop"]],
                  **{k: record[k] for k in ("file_id", "digest") if k in record}}   # joins before both: size only
        diffs = [k for k, v in wanted.items() if have[k] != v]
        if diffs:
            raise CacheError(f"{cache.path}: its shard {shard} is not the file it joined ({', '.join(diffs)} "
                             f"differ: replaced or edited); {fix}")


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def features_digest(f, meta: CacheMeta, *, block_bytes: int = 64 << 20) -> str:
    """sha256 over every features and views dataset of the open file `f`, in `feature_datasets` order, rows in
    order: what a copy or a shard is checked by, read back after it was written."""
    h = hashlib.sha256()
    for d in feature_datasets(meta):
        data = f[d.path]
        rows = max(1, block_bytes // max(1, int(np.prod(data.shape[1:])) * data.dtype.itemsize))
        for s in range(0, len(data), rows):
            h.update(np.ascontiguousarray(data[s:s + rows]))
    return h.hexdigest()


def verify(path: Path, meta: CacheMeta, *, digest: str | None = None) -> FeatureCache:
    """Re-open a cache file just written and check it is what was meant: complete, of `meta`'s key, every row
    counted, its largest activation finite, every dataset read back equal to what was written (the digests
    recorded while writing; given `digest`, also that of all its features); a CacheError otherwise."""
    import h5py

    cache = open_cache(path)
    problems = []
    if cache.meta.key != meta.key:
        problems.append("another key")
    if (cache.splits["train"].n, cache.splits["test"].n) != (meta.n_train, meta.n_test) or \
            cache.progress != (meta.n_train, meta.n_test):
        problems.append(f"rows {cache.progress} of {(meta.n_train, meta.n_test)}")
    if cache.max_abs_activation is None or not np.isfinite(cache.max_abs_activation):
        problems.append("no finite largest activation")
    if not problems:
        with h5py.File(path, "r") as f:
            problems += check_digests(f, cache)
            if digest is not None and features_digest(f, meta) != digest:
                problems.append("its features read back differ from what was written")
    if problems:
        raise CacheError(f"{path} failed its check after writing ({'; '.join(problems)}): a full disk or a failing "
                         "device; fix: free some space or check the disk, then rerun")
    return cache


def check_digests(f, cache: FeatureCache) -> list[str]:
    """Problems of the open file of `cache` against the digests recorded while writing it: every dataset but a
    joined cache's virtual features (their shards are checked by `verify_content`) re-read in full. A file
    written before digests existed has none to check."""
    if not digests.has_digests(f):
        return []
    virtual = {d.path for d in feature_datasets(cache.meta)} if cache.shards else set()
    try:
        return [p for name in digests.written_datasets(f) if name not in virtual for p in digests.check(f, name)]
    except OSError as e:   # a chunk failing its Fletcher-32 checksum
        return [f"a block fails its checksum ({first_line(e)})"]


def verify_content(cache: FeatureCache) -> int:
    """Read the whole cache again and compare it with the digests recorded when it was written: every dataset of
    the file, and every shard of a joined cache; returns how many shards were checked (0 for one file). A CacheError names the first
    that differs: any change, even of one byte, is found (the cheap checks on open see size and identity)."""
    import h5py

    with h5py.File(cache.path, "r") as f:
        if not digests.has_digests(f):
            raise CacheError(f"{cache.path} was written before featcache recorded digests, so its content cannot be "
                             "checked; fix: rebuild it with `featcache extract ... --force`")
        problems = check_digests(f, cache)
    if problems:
        raise digests.differs(cache.path, problems)
    base = cache.path.resolve().parent
    checked = 0
    for record in cache.shards:
        if "digest" not in record:
            continue   # joined before shards carried digests
        shard = base / record["file"]
        with h5py.File(shard, "r") as f:
            if features_digest(f, cache.meta) != record["digest"]:
                raise CacheError(f"{cache.path}: the features of its shard {shard} changed since they were written; "
                                 f"fix: delete {shard} and rerun the same `featcache extract` command")
        checked += 1
    return checked


def check_finite(x: np.ndarray, cache: FeatureCache, what: str) -> np.ndarray:
    """`x`, refused when it holds a value that is not finite: no extraction writes one (it refuses activations its
    dtype cannot hold), so it is a joined cache's fill value (NaN) where a shard went missing while it was read, or
    damage."""
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        if cache.shards:
            raise CacheError(f"{cache.path}: {what} read as NaN, so one of its shards went missing or changed while "
                             "it was read; fix: restore the shard (or rerun `featcache extract`) and run again")
        raise CacheError(f"{cache.path}: {what} hold values that are not finite (inf or NaN), which no extraction "
                         "writes: the file was changed or damaged; fix: delete it and rerun `featcache extract`")
    return x


def checked(f, cache: FeatureCache, name: str, x: np.ndarray) -> np.ndarray:
    """`x`, the whole dataset `name` just read from the open file of `cache`: finite and, where the file has
    digests, equal to what was written; a CacheError otherwise."""
    check_finite(x, cache, f"/{name}")
    if digests.has_digests(f) and not f[name].is_virtual:
        problems = digests.check(f, name, x)
        if problems:
            raise digests.differs(cache.path, problems)
    return x


def checked_rows(f, cache: FeatureCache, name: str, first: int, rows: np.ndarray, state: dict) -> np.ndarray:
    """`rows`, just read as rows [first, first + len) of dataset `name` of the open file of `cache`: finite and,
    where the file has digests, equal to what was written (`digests.RowsCheck`, kept in `state` between calls)."""
    if "check" not in state:
        state["check"] = digests.RowsCheck.of(f, name)
    if state["check"]:
        state["check"].verify(f[name], first, rows)
    return check_finite(rows, cache, f"/{name} rows {first}-{first + len(rows)}")


@contextlib.contextmanager
def reading(cache: FeatureCache, name: str = "features"):
    """`with reading(cache) as f:` the cache's file open for reading, where a block failing its checksum (damage on
    disk) is a CacheError naming the file."""
    import h5py

    with h5py.File(cache.path, "r") as f:
        try:
            yield f
        except OSError as e:
            if "filter" not in str(e) and "read" not in str(e).lower():
                raise
            raise CacheError(f"{cache.path}: /{name} cannot be read back ({first_line(e)}): damaged on disk; fix: "
                             "delete it and rerun the same `featcache extract` command") from e


@contextlib.contextmanager
def array_view(cache, split: str, layer: str | None = None):
    """`with array_view(cache, "train") as x:` a read-only h5py dataset of that split's features:
    slice it like a numpy array (`x[1000:2000]`), nothing is read until you do."""
    import h5py

    with h5py.File(cache.path, "r") as f:
        yield f[dataset_path(cache.meta, split, cache.select_layer(layer))]


def block_order(n_rows: int, block_rows: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """(start, stop) of every block of `n_rows`, in a seeded order that differs from epoch to epoch."""
    blocks = [(s, min(s + block_rows, n_rows)) for s in range(0, n_rows, block_rows)]
    order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
    return [blocks[i] for i in order]


def as_tf_dataset(cache, split: str, *, layer: str | None = None, batch_size: int = 256, shuffle: bool = False,
                  seed: int = 0, pooling: str | None = None, block_rows: int = BLOCK_ROWS,
                  shuffle_blocks: int = 8):
    """A tf.data.Dataset of (features as float32, labels) batches of one split, read from disk as it goes.

    With `shuffle`, blocks of `block_rows` contiguous rows are read in a new seeded order each epoch
    and their rows mixed in a buffer of `shuffle_blocks` blocks; without it, rows come in order.
    `pooling` ("gap" or "max") pools each feature map to a vector as it is read.
    """
    import tensorflow as tf

    if pooling is not None and pooling not in GLOBAL_POOLINGS:
        raise BadInputError(f"pooling must be None or one of {', '.join(GLOBAL_POOLINGS)}, got {pooling!r}")
    for what, value in (("batch_size", batch_size), ("block_rows", block_rows), ("shuffle_blocks", shuffle_blocks)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise BadInputError(f"{what} must be a whole number of at least 1, got {value!r}")
    name = dataset_path(cache.meta, split, cache.select_layer(layer))
    path, n = str(Path(cache.path)), cache.splits[split].n
    shape = cache.splits[split].shapes[cache.select_layer(layer)][1:]
    out_shape = (shape[-1],) if pooling else tuple(shape)
    epoch, state = [-1], {}   # state: the digests' check, kept across epochs (a record is hashed once)

    def blocks():
        import h5py

        epoch[0] += 1
        order = block_order(n, block_rows, seed, epoch[0]) if shuffle else \
            [(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]
        with h5py.File(path, "r") as f:   # opened per epoch, in the reading thread: h5py objects do not fork
            for s, e in order:
                x = checked_rows(f, cache, name, s, f[name][s:e], state)
                yield (global_pool(x, pooling) if pooling else x.astype(np.float32)), f[f"{split}/labels"][s:e]

    ds = tf.data.Dataset.from_generator(blocks, output_signature=(
        tf.TensorSpec((None, *out_shape), tf.float32), tf.TensorSpec((None,), tf.int64))).unbatch()
    if shuffle:
        ds = ds.shuffle(shuffle_blocks * block_rows, seed=seed, reshuffle_each_iteration=True)
    # its length known: Keras fits it epoch after epoch without warning that it "ran out of data"
    ds = ds.batch(batch_size).apply(tf.data.experimental.assert_cardinality(-(-n // batch_size)))
    return steady(ds)


def steady(ds, prefetch: int = 2):
    """`ds` with `prefetch` batches read ahead and tf.data's autotuner off, what every pipeline featcache feeds to
    Keras ends with. With the autotuner on, Keras starting an epoch's iterator stalled about 4 s, the CPUs idle, in
    about half the epochs of 12 heads trained together on 2 cores (bench/epoch_start.py: a median epoch of 8.1 s
    against 5.8 s); and AUTOTUNE may buffer up to half the machine's memory. Reading ahead a batch or two keeps a
    training step fed: a batch is gathered in a few milliseconds, a step takes tens."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(prefetch).with_options(options)
