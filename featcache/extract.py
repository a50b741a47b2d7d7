"""Run the backbone once over a dataset and write its features to an HDF5 cache.

Batches are decoded in a background thread while the model runs, written as soon as they are
computed, and counted in the file's `/progress`; the file is built under ``<name>.partial`` and
renamed into place when complete, so an interrupted run resumes and a finished name is never
half-written. A lock file keeps two processes from building the same cache at once.
Several layers share one forward pass and one file; cached augmentation views of the training
split are computed in the same loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from featcache import augment as aug
from featcache import backbone as bb
from featcache import store
from featcache.data import Dataset, load_dataset
from featcache.errors import BadInputError, CacheError, UnreadableImageError

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512, 5: 512}


def feature_shape(layer: str, input_size: tuple[int, int]) -> tuple[int, int, int]:
    """Output shape of VGG16 at `layer` ('same' convolutions, 2x2 poolings), without building it."""
    bb.check_layer(layer)
    block = int(layer[5])
    halvings = block if layer.endswith("_pool") else block - 1
    h, w = input_size
    for _ in range(halvings):
        h, w = h // 2, w // 2
    return h, w, _CHANNELS[block]


def parse_layers(layer: str | Sequence[str]) -> tuple[str, ...]:
    """'block3_pool,block4_pool' or a sequence -> validated tuple of layer names."""
    layers = tuple(x.strip() for x in layer.split(",")) if isinstance(layer, str) else tuple(layer)
    if not layers or len(set(layers)) != len(layers):
        raise BadInputError(f"--layer must name distinct VGG16 layers separated by commas, got {layer!r}")
    for name in layers:
        bb.check_layer(name)
    return layers


def plan(*, data: str | Dataset = "cifar10", weights: str = "imagenet", layer: str | Sequence[str] = bb.DEFAULT_LAYER,
         input_size: int | None = None, dtype: str = "float16", limit: int | None = None, seed: int = 0,
         views: int = 1, augment: str = aug.DEFAULT_AUGMENT, augment_seed: int = 0, skip_bad_images: bool = False
         ) -> tuple[Dataset, store.CacheMeta]:
    """Validate the options and describe the cache they lead to, without running the backbone."""
    layers = parse_layers(layer)
    bb.check_input_size(input_size)
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if views < 1:
        raise BadInputError(f"--views must be at least 1 (1: the original images only), got {views}")
    augment = ",".join(aug.parse(augment)) if views > 1 else ""
    ds = data if isinstance(data, Dataset) else load_dataset(data, limit=limit, skip_bad_images=skip_bad_images)
    if input_size:
        size = (input_size, input_size)
    else:
        size = ds.default_input_size()
        if ds.test.pixels is not None and ds.test.native_size() != ds.train.native_size():
            raise BadInputError(f"train images are {ds.train.native_size()} but test images are "
                                f"{ds.test.native_size()}; fix: pass --input-size N")
    shapes = {name: feature_shape(name, size) for name in layers}
    return ds, store.CacheMeta(
        layer=",".join(layers), feature_shape=shapes if len(layers) > 1 else shapes[layers[0]],
        backbone=bb.BACKBONE, weights=bb.weights_identity(weights, seed=seed), weights_source=str(weights),
        input_shape=(*size, 3), preprocessing=bb.PREPROCESSING, resize=bb.RESIZE, dtype=dtype,
        dataset_name=ds.name, dataset_source=ds.source, dataset_fingerprint=ds.fingerprint, limit=ds.limit or 0,
        n_train=len(ds.train), n_test=len(ds.test), versions=_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        views=views, augment=augment, augment_seed=augment_seed if views > 1 else 0,
        skipped_images=tuple(tuple(x) for x in ds.skipped))


def expected_bytes(meta: store.CacheMeta) -> int:
    """Bytes the features of a cache take on disk (labels, paths and metadata excluded)."""
    row = sum(int(np.prod(shape)) for shape in meta.shapes.values()) * np.dtype(meta.dtype).itemsize
    return row * (meta.n_train * meta.views + meta.n_test)


def extract(*, data: str | Dataset = "cifar10", weights: str = "imagenet",
            layer: str | Sequence[str] = bb.DEFAULT_LAYER, input_size: int | None = None, batch_size: int = 128,
            dtype: str = "float16", cache_dir: str | Path = "cache", limit: int | None = None, force: bool = False,
            progress: bool = True, seed: int = 0, views: int = 1, augment: str = aug.DEFAULT_AUGMENT,
            augment_seed: int = 0, skip_bad_images: bool = False) -> Path:
    """Extract features of `data` at `layer` ("block3_pool", or several: "block3_pool,block4_pool") into
    `cache_dir` and return the cache's path. Several layers share one forward pass and one file.

    A complete cache with the same key is reused at once; `force` recomputes it. With `views` > 1 the
    training split also gets views - 1 augmented copies (`augment`, seeded by `augment_seed`) per image;
    test features are always of the original images. `skip_bad_images` leaves out (and records)
    image files that fail to decode instead of stopping at the first.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, got {batch_size!r}")
    ds, meta = plan(data=data, weights=weights, layer=layer, input_size=input_size, dtype=dtype, limit=limit,
                    seed=seed, views=views, augment=augment, augment_seed=augment_seed,
                    skip_bad_images=skip_bad_images)
    final = Path(cache_dir).expanduser() / store.cache_filename(meta)
    if final.exists() and not force:   # complete by construction (renamed into place): no lock, no write access
        _check_hit(final, meta)
        log.info("cache hit: %s (%s)", final, _mb(final.stat().st_size))
        return final
    folder = _cache_dir(cache_dir)
    with _exclusive(final.with_name(final.name + ".lock"), final):
        if final.exists() and not force:
            _check_hit(final, meta)
            log.info("cache hit: %s (%s)", final, _mb(final.stat().st_size))
            return final
        singles = None if force else _single_layer_caches(folder, meta)
        if singles:
            log.info("combining %s into one file (rows copied, no forward pass)",
                     ", ".join(str(c.path) for c in singles))
            _check_disk_space(folder, meta, None, final)
            store.combine(singles, _partial(final), batch_size=batch_size)
        else:
            start = _resume_point(_partial(final), meta, force)
            _check_disk_space(folder, meta, start, final)
            _check_batch_memory(meta, batch_size)
            _run(ds, meta, final, start, batch_size=batch_size, weights=weights, seed=seed, progress=progress,
                 require_native=None if input_size else ds.train.native_size())
        os.replace(_partial(final), final)
        log.info("cache: %s (%s)", final, _mb(final.stat().st_size))
    return final


def check_cache(path: str | Path, *, data: str | None = None, weights: str | None = None, layer: str | None = None,
                input_size: int | None = None, dtype: str | None = None, limit: int | None = None,
                views: int | None = None, augment: str | None = None, augment_seed: int | None = None,
                skip_bad_images: bool = False, seed: int = 0) -> store.FeatureCache:
    """Open a complete cache and check it against the options given; a CacheError names each field that differs."""
    cache = store.open_cache(path)
    m, wanted = cache.meta, {}
    if data is not None or limit is not None:
        ds = load_dataset(data if data is not None else m.dataset_source,
                          limit=limit if limit is not None else (m.limit or None),
                          skip_bad_images=skip_bad_images or bool(m.skipped_images))
        wanted.update(dataset_fingerprint=ds.fingerprint, limit=ds.limit or 0)
    if weights is not None:
        wanted["weights"] = bb.weights_identity(weights, seed=seed)
    if layer is not None:
        missing = [name for name in parse_layers(layer) if name not in m.layers]
        if missing:
            wanted["layer"] = layer
    if input_size is not None:
        wanted["input_shape"] = (input_size, input_size, 3)
    if dtype is not None:
        wanted["dtype"] = dtype
    if views is not None:
        wanted["views"] = views
    if augment is not None and (views or m.views) > 1:
        wanted["augment"] = ",".join(aug.parse(augment))
    if augment_seed is not None and (views or m.views) > 1:
        wanted["augment_seed"] = augment_seed
    diffs = store.differences(m, wanted)
    if diffs:
        raise CacheError(f"{cache.path} does not match what was asked ({'; '.join(diffs)}); fix: leave out --cache "
                         "to use or build the matching cache, or drop the options that differ")
    return cache


def _run(ds, meta, final, start, *, batch_size, weights, seed, progress, require_native):
    import h5py
    from tqdm import tqdm

    model = bb.build(layer=meta.layers, weights=weights, input_size=meta.input_shape[:2], seed=seed)
    assert model.output_shapes == list(meta.shapes.values()), model.output_shapes
    if start is None:
        f = store.create(_partial(final), meta, labels={"train": ds.train.labels, "test": ds.test.labels},
                         paths={"train": ds.train.paths, "test": ds.test.paths}, class_names=ds.class_names,
                         batch_size=batch_size)
        start = (0, 0)
    else:
        f = h5py.File(_partial(final), "r+")
        log.info("resuming %s from train row %d, test row %d", _partial(final), *start)
    peak = _peak(f, meta, start, batch_size)
    size = tuple(meta.input_shape[:2])
    todo = [(i, name, split, s) for i, (name, split) in enumerate((("train", ds.train), ("test", ds.test)))
            for s in range(start[i], len(split), batch_size)]

    def load(job):
        _, name, split, s = job
        images = split.load(s, min(s + batch_size, len(split)), size, require_native=require_native)
        views = [aug.views(images, range(s, s + len(images)), v, meta.augment, meta.augment_seed)
                 for v in range(1, meta.views)] if name == "train" else []
        return images, views

    passes = lambda name, n: n * (meta.views if name == "train" else 1)   # noqa: E731
    bar = tqdm(total=passes("train", meta.n_train) + meta.n_test, unit="img", desc="extract",
               initial=passes("train", start[0]) + start[1], disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True)
    t0, n = time.perf_counter(), 0
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(load, todo[0]) if todo else None
            for k, job in enumerate(todo):
                images, views = pending.result()
                pending = pool.submit(load, todo[k + 1]) if k + 1 < len(todo) else None
                i, name, _, s = job
                e = s + len(images)
                feats = model(images)
                view_feats = [model(v) for v in views]
                for j, layer in enumerate(meta.layers):
                    out = _checked(feats[j], meta.dtype, name, s)
                    f[store.dataset_path(meta, name, layer)][s:e] = out
                    peak = max(peak, float(np.abs(out).max()))
                    for v, vf in enumerate(view_feats):
                        out = _checked(vf[j], meta.dtype, f"{name} view {v + 1}", s)
                        f[store.dataset_path(meta, name, layer, views=True)][s:e, v] = out
                        peak = max(peak, float(np.abs(out).max()))
                f["progress"][i] = e
                f.flush()
                n += passes(name, len(images))
                bar.update(passes(name, len(images)))
        store.finish(f, max_abs_activation=peak, extract_seconds=time.perf_counter() - t0)
    except UnreadableImageError:
        log.warning("the %d rows computed so far stay in %s", n, _partial(final))
        raise
    except BadInputError:
        f.close()
        _partial(final).unlink(missing_ok=True)   # deterministic failure: a resume would fail the same way
        raise
    finally:
        bar.close()
        f.close()
    seconds = time.perf_counter() - t0
    if n:
        log.info("extracted %d images in %.1f s (%.0f images/s)", n, seconds, n / seconds,
                 extra={"images": n, "seconds": seconds})


def _peak(f, meta: store.CacheMeta, start: tuple[int, int], batch_size: int) -> float:
    """Largest |activation| among rows already written (only a resumed run has any)."""
    peak = 0.0
    datasets = []
    for layer in meta.layers:
        datasets += [(store.dataset_path(meta, "train", layer), start[0]),
                     (store.dataset_path(meta, "test", layer), start[1])]
        if meta.views > 1:
            datasets.append((store.dataset_path(meta, "train", layer, views=True), start[0]))
    for name, rows in datasets:
        for s in range(0, rows, batch_size):
            peak = max(peak, float(np.abs(f[name][s:min(s + batch_size, rows)]).max()))
    return peak


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


def _check_disk_space(folder: Path, meta: store.CacheMeta, start, final: Path) -> None:
    """Log the expected size; refuse before any work when it cannot fit the free space."""
    need = expected_bytes(meta)
    have = _partial(final).stat().st_size if start is not None else 0
    free = shutil.disk_usage(folder).free
    log.info("expected cache size: %s", _mb(need))
    if need - have > free:
        raise BadInputError(f"the cache needs {need / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free; fix: "
                            "free some space, pass another --cache-dir, or lower --input-size or --views")


def _check_batch_memory(meta: store.CacheMeta, batch_size: int) -> None:
    """Refuse a batch whose forward pass cannot fit in memory, before any work (instead of a crash later)."""
    h, w = meta.input_shape[:2]
    batch_size = min(batch_size, max(meta.n_train, meta.n_test))   # the largest batch that will run
    need = batch_size * h * w * bb.PEAK_BYTES_PER_PIXEL
    have = available_memory()
    if have is not None and need > 0.8 * have:
        fits = max(0, int(0.8 * have // (h * w * bb.PEAK_BYTES_PER_PIXEL)))
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


def _checked(features: np.ndarray, dtype: str, split: str, row: int) -> np.ndarray:
    with np.errstate(over="ignore"):   # overflow is what we check for, right below
        out = features.astype(dtype)
    if not np.isfinite(out).all():
        top = float(np.nanmax(np.abs(features)))
        raise BadInputError(f"{split} rows from {row}: activations reach {top:.4g}, beyond {dtype}'s range "
                            f"(largest finite {np.finfo(dtype).max:.6g}); fix: rerun with --dtype float32")
    return out


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
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
