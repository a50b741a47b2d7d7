"""Run a frozen backbone once over a dataset and write its features to an HDF5 cache.

`extract(**options)` validates the options once (`featcache.spec.ExtractSpec`), plans the cache
they lead to (`plan`), and reuses it when it exists. Otherwise the file is built under
``<name>.partial`` by an engine (`featcache.engine`: units of rows, written batch by batch and
counted in the file's `/progress`) and renamed into place when complete, so an interrupted run
resumes and a finished name is never half-written. A lock file keeps two processes from building
the same cache at once. Several layers share one forward pass and one file; cached augmentation
views of the training split are computed in the same pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import platform
import shutil
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from featcache import backbones, engine, store
from featcache.data import Dataset, load_dataset
from featcache.errors import BadInputError, CacheError
from featcache.spec import ExtractSpec

log = logging.getLogger(__name__)


def plan(spec: ExtractSpec | None = None, **options) -> tuple[Dataset, store.CacheMeta]:
    """Describe the cache that `spec` (or the options of an ExtractSpec) leads to, without running the backbone."""
    spec = spec if spec is not None else ExtractSpec(**options)
    bspec = spec.backbone_spec
    data = spec.data
    ds = data if isinstance(data, Dataset) else load_dataset(data, limit=spec.limit,
                                                             skip_bad_images=spec.skip_bad_images,
                                                             fingerprint_by=spec.fingerprint)
    if spec.input_size:
        size = (spec.input_size, spec.input_size)
    else:
        size = ds.default_input_size(bspec.min_input_size)
        if ds.test.pixels is not None and ds.test.native_size() != ds.train.native_size():
            raise BadInputError(f"train images are {ds.train.native_size()} but test images are "
                                f"{ds.test.native_size()}; fix: pass --input-size N")
    all_shapes = backbones.output_shapes(spec.backbone, size)
    shapes = {name: all_shapes[name] for name in spec.layers}
    return ds, store.CacheMeta(
        layer=spec.layer, feature_shape=shapes if len(shapes) > 1 else shapes[spec.layers[0]],
        backbone=spec.backbone, weights=backbones.weights_identity(spec.weights, seed=spec.seed),
        weights_source=str(spec.weights), input_shape=(*size, 3), preprocessing=bspec.preprocessing,
        resize=backbones.RESIZE, dtype=spec.dtype, dataset_name=ds.name, dataset_source=ds.source,
        dataset_fingerprint=ds.fingerprint, limit=ds.limit or 0, n_train=len(ds.train), n_test=len(ds.test),
        versions=_versions(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        views=spec.views, augment=spec.augment, augment_seed=spec.augment_seed,
        skipped_images=tuple(tuple(x) for x in ds.skipped), precision=_precision(spec.precision))


def _precision(asked: str) -> str:
    chosen = backbones.resolve_precision(asked)
    if asked == "auto":
        log.info("--precision auto: computing in %s on this machine", chosen)
    return chosen


def expected_bytes(meta: store.CacheMeta) -> int:
    """Bytes the features of a cache take on disk (labels, paths and metadata excluded)."""
    row = sum(int(np.prod(shape)) for shape in meta.shapes.values()) * np.dtype(meta.dtype).itemsize
    return row * (meta.n_train * meta.views + meta.n_test)


def extract(*, force: bool = False, progress: bool = True, **options) -> Path:
    """Extract the features that `options` (the fields of `featcache.spec.ExtractSpec`: data, backbone,
    weights, layer, input_size, dtype, limit, views, augment, augment_seed, skip_bad_images, cache_dir,
    batch_size, seed) describe, and return the cache's path.

    Several layers ("block3_pool,block4_pool") share one forward pass and one file. A complete cache
    with the same key is reused at once; `force` recomputes it. With `views` > 1 the training split
    also gets views - 1 augmented copies per image; test features are always of the original images.
    `cache_dir` defaults to $FEATCACHE_CACHE_DIR, then ./cache.
    """
    spec = ExtractSpec(**options)
    ds, meta = plan(spec)
    final = Path(spec.cache_dir).expanduser() / store.cache_filename(meta)
    if final.exists() and not force:   # complete by construction (renamed into place): no lock, no write access
        _check_hit(final, meta)
        log.info("cache hit: %s (%s)", final, _mb(final.stat().st_size))
        return final
    folder = _cache_dir(spec.cache_dir)
    with cache_lock(final):
        if final.exists() and not force:
            _check_hit(final, meta)
            log.info("cache hit: %s (%s)", final, _mb(final.stat().st_size))
            return final
        singles = None if force else _single_layer_caches(folder, meta)
        if singles:
            log.info("combining %s into one file (rows copied, no forward pass)",
                     ", ".join(str(c.path) for c in singles))
            _check_disk_space(folder, meta, 0)
            store.combine(singles, _partial(final), batch_size=spec.batch_size)
        elif spec.engine == "ray":
            from featcache import ray_engine

            _check_disk_space(folder, meta, 0 if force else ray_engine.done_bytes(final, meta, spec))
            _check_batch_memory(meta, spec)
            ray_engine.run(ds, meta, _partial(final), spec=spec, progress=progress, force=force,
                           require_native=None if spec.input_size else ds.train.native_size())
        else:
            start = _resume_point(_partial(final), meta, force)
            _check_disk_space(folder, meta, _partial(final).stat().st_size if start is not None else 0)
            _check_batch_memory(meta, spec)
            engine.run_local(ds, meta, _partial(final), start, spec=spec, progress=progress,
                             require_native=None if spec.input_size else ds.train.native_size())
        os.replace(_partial(final), final)
        log.info("cache: %s (%s)", final, _mb(store.open_cache(final).size_bytes))
    return final


def check_cache(path: str | Path, **given) -> store.FeatureCache:
    """Open a complete cache and check it against the extraction options `given` (any key option of
    ExtractSpec: data, backbone, weights, layer, input_size, dtype, limit, views, augment, augment_seed);
    a CacheError names each field that differs."""
    from featcache.spec import KEY_OPTIONS

    unknown = set(given) - set(KEY_OPTIONS) - {"skip_bad_images", "seed"}
    if unknown:
        raise TypeError(f"check_cache() got options it cannot compare: {', '.join(sorted(unknown))}")
    cache = store.open_cache(path)
    m = cache.meta
    # the cache's own options fill in what was not given, so only the given ones can differ
    spec = ExtractSpec(data=given.get("data", m.dataset_source), backbone=given.get("backbone", m.backbone),
                       layer=given.get("layer", m.layer), views=given.get("views", m.views),
                       augment=given.get("augment", m.augment or "flip,crop"),
                       augment_seed=given.get("augment_seed", m.augment_seed), seed=given.get("seed", 0))
    wanted = {}
    if "data" in given or "limit" in given:
        ds = load_dataset(spec.data, limit=given.get("limit", m.limit or None),
                          skip_bad_images=given.get("skip_bad_images", False) or bool(m.skipped_images),
                          fingerprint_by="stat" if m.dataset_fingerprint.startswith("stat:") else "content")
        wanted.update(dataset_fingerprint=ds.fingerprint, limit=ds.limit or 0)
    if "backbone" in given:
        wanted["backbone"] = spec.backbone
    if "weights" in given:
        wanted["weights"] = backbones.weights_identity(given["weights"], seed=spec.seed)
    if "layer" in given and not set(spec.layers) <= set(m.layers):
        wanted["layer"] = spec.layer
    if given.get("input_size") is not None:
        wanted["input_shape"] = (given["input_size"], given["input_size"], 3)
    if "dtype" in given:
        wanted["dtype"] = given["dtype"]
    if "precision" in given:
        wanted["precision"] = backbones.resolve_precision(given["precision"])
    if "views" in given:
        wanted["views"] = spec.views
    if "augment" in given and spec.views > 1:
        wanted["augment"] = spec.augment
    if "augment_seed" in given and spec.views > 1:
        wanted["augment_seed"] = spec.augment_seed
    diffs = store.differences(m, wanted)
    if diffs:
        raise CacheError(f"{cache.path} does not match what was asked ({'; '.join(diffs)}); fix: leave out --cache "
                         "to use or build the matching cache, or drop the options that differ")
    return cache


def _check_hit(final: Path, meta: store.CacheMeta) -> None:
    cached = store.open_cache(final)
    if cached.meta.key != meta.key:
        diffs = store.differences(cached.meta, meta.key_fields())
        raise CacheError(f"{final} holds another extraction ({'; '.join(diffs)}); fix: rerun with --force to "
                         "rebuild it")


def _single_layer_caches(folder: Path, meta: store.CacheMeta) -> list[store.FeatureCache] | None:
    """For several layers: complete one-layer caches of each, with the same options, if all exist."""
    if len(meta.layers) == 1:
        return None
    found = []
    for layer, shape in meta.shapes.items():
        single = dataclasses.replace(meta, layer=layer, feature_shape=shape)
        try:
            cache = store.open_cache(folder / store.cache_filename(single))
        except CacheError:
            return None
        if cache.meta.key != single.key:
            return None
        found.append(cache)
    return found


def _check_disk_space(folder: Path, meta: store.CacheMeta, have: int) -> None:
    """Log the expected size; refuse before any work when what is left to write (`have` bytes are written
    already) cannot fit the free space."""
    need = expected_bytes(meta)
    free = shutil.disk_usage(folder).free
    log.info("expected cache size: %s", _mb(need))
    if need - have > free:
        raise BadInputError(f"the cache needs {need / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free; fix: "
                            "free some space, pass another --cache-dir, or lower --input-size or --views")


def _check_batch_memory(meta: store.CacheMeta, spec: ExtractSpec) -> None:
    """Refuse a batch whose forward pass cannot fit in memory, before any work (instead of a crash later)."""
    h, w = meta.input_shape[:2]
    per_pixel = spec.backbone_spec.peak_bytes_per_pixel
    batch_size = min(spec.batch_size, max(meta.n_train, meta.n_test))   # the largest batch that will run
    need = batch_size * h * w * per_pixel
    have = available_memory()
    if have is not None and need > 0.8 * have:
        fits = max(0, int(0.8 * have // (h * w * per_pixel)))
        fix = f"pass --batch-size {fits} or less" if fits else "lower --input-size"
        raise BadInputError(f"one batch of {batch_size} images at {h}x{w} needs about {need / 1e9:.1f} GB but "
                            f"{have / 1e9:.1f} GB of memory is available; fix: {fix}")


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup memory limit if one is set."""
    have = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            have = min(have or 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return have


def _partial(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def _resume_point(partial: Path, meta: store.CacheMeta, force: bool) -> tuple[int, int] | None:
    if not partial.exists():
        return None
    if not force:
        try:
            old = store.open_cache(partial, require_complete=False)
            if old.meta.key == meta.key:
                return old.progress
        except CacheError as e:
            log.warning("discarding unusable partial file: %s", e)
    partial.unlink()
    return None


def _cache_dir(cache_dir: str | Path) -> Path:
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create cache folder {path} ({e.strerror}); fix: pass a writable "
                            "--cache-dir or set FEATCACHE_CACHE_DIR") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInputError(f"cache folder {path} is not writable; fix: pass a writable --cache-dir or "
                            "set FEATCACHE_CACHE_DIR")
    return path


def cache_lock(final: Path):
    """The lock that one process building (or rewriting) the cache `final` holds; others wait for it."""
    return _exclusive(final.with_name(final.name + ".lock"), final)


@contextlib.contextmanager
def _exclusive(lock_path: Path, target: Path):
    """Hold an exclusive lock on `lock_path`; wait (and say so) while another process holds it."""
    with lock_path.open("a") as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another featcache process is extracting %s; waiting for it to finish", target)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("featcache", "tensorflow", "keras", "h5py", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    import keras

    out["keras_backend"] = keras.backend.backend()
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
