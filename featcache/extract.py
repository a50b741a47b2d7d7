"""Run the backbone once over a dataset and write its features to an HDF5 cache.

Batches are decoded in a background thread while the model runs, written as soon as they are
computed, and counted in the file's `/progress`; the file is built under ``<name>.partial`` and
renamed into place when complete, so an interrupted run resumes and a finished name is never
half-written. A lock file keeps two processes from building the same cache at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from featcache import backbone as bb
from featcache import store
from featcache.data import Dataset, load_dataset
from featcache.errors import BadInputError, CacheError

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


def plan(*, data: str | Dataset = "cifar10", weights: str = "imagenet", layer: str = bb.DEFAULT_LAYER,
         input_size: int | None = None, dtype: str = "float16", limit: int | None = None,
         seed: int = 0) -> tuple[Dataset, store.CacheMeta]:
    """Validate the options and describe the cache they lead to, without running the backbone."""
    bb.check_layer(layer)
    bb.check_input_size(input_size)
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ds = data if isinstance(data, Dataset) else load_dataset(data, limit=limit)
    if input_size:
        size = (input_size, input_size)
    else:
        size = ds.default_input_size()
        if ds.test.pixels is not None and ds.test.native_size() != ds.train.native_size():
            raise BadInputError(f"train images are {ds.train.native_size()} but test images are "
                                f"{ds.test.native_size()}; fix: pass --input-size N")
    meta = store.CacheMeta(
        backbone=bb.BACKBONE, layer=layer, weights=bb.weights_identity(weights, seed=seed),
        weights_source=str(weights), input_shape=(*size, 3), feature_shape=feature_shape(layer, size),
        preprocessing=bb.PREPROCESSING, resize=bb.RESIZE, dtype=dtype, dataset_name=ds.name,
        dataset_source=ds.source, dataset_fingerprint=ds.fingerprint, limit=ds.limit or 0,
        n_train=len(ds.train), n_test=len(ds.test), versions=_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return ds, meta


def extract(*, data: str | Dataset = "cifar10", weights: str = "imagenet", layer: str = bb.DEFAULT_LAYER,
            input_size: int | None = None, batch_size: int = 128, dtype: str = "float16",
            cache_dir: str | Path = "cache", limit: int | None = None, force: bool = False,
            progress: bool = True, seed: int = 0) -> Path:
    """Extract features of `data` at `layer` into `cache_dir` and return the cache's path.

    A complete cache with the same key is reused at once; `force` recomputes it.
    """
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, got {batch_size}")
    ds, meta = plan(data=data, weights=weights, layer=layer, input_size=input_size, dtype=dtype,
                    limit=limit, seed=seed)
    final = _cache_dir(cache_dir) / store.cache_filename(meta)
    partial = final.with_name(final.name + ".partial")
    with _exclusive(final.with_name(final.name + ".lock"), final):
        if final.exists() and not force:
            cached = store.open_cache(final)
            if cached.meta.key != meta.key:
                raise CacheError(f"{final} holds another extraction ({'; '.join(store.differences(cached.meta, {k: getattr(meta, k) for k in store.KEY_FIELDS}))}); "
                                 "fix: rerun with --force to rebuild it")
            log.info("cache hit: %s (%s)", final, _mb(final.stat().st_size))
            return final
        start = _resume_point(partial, meta, force)
        native = None if input_size else ds.train.native_size()
        _run(ds, meta, partial, start, batch_size=batch_size, weights=weights, seed=seed, progress=progress,
             require_native=native)
        os.replace(partial, final)
    log.info("cache: %s (%s)", final, _mb(final.stat().st_size))
    return final


def check_cache(path: str | Path, *, data: str | None = None, weights: str | None = None, layer: str | None = None,
                input_size: int | None = None, dtype: str | None = None, limit: int | None = None,
                seed: int = 0) -> store.FeatureCache:
    """Open a complete cache and check it against the options given; a CacheError names each field that differs."""
    cache = store.open_cache(path)
    m, wanted = cache.meta, {}
    if data is not None or limit is not None:
        ds = load_dataset(data if data is not None else m.dataset_source,
                          limit=limit if limit is not None else (m.limit or None))
        wanted.update(dataset_fingerprint=ds.fingerprint, limit=ds.limit or 0)
    if weights is not None:
        wanted["weights"] = bb.weights_identity(weights, seed=seed)
    if layer is not None:
        wanted["layer"] = layer
    if input_size is not None:
        wanted["input_shape"] = (input_size, input_size, 3)
    if dtype is not None:
        wanted["dtype"] = dtype
    diffs = store.differences(m, wanted)
    if diffs:
        raise CacheError(f"{cache.path} does not match what was asked ({'; '.join(diffs)}); fix: leave out --cache "
                         "to use or build the matching cache, or drop the options that differ")
    return cache


def _run(ds, meta, partial, start, *, batch_size, weights, seed, progress, require_native):
    from tqdm import tqdm

    model = bb.build(layer=meta.layer, weights=weights, input_size=meta.input_shape[:2], seed=seed)
    assert model.output_shape == tuple(meta.feature_shape), (model.output_shape, meta.feature_shape)
    if start is None:
        f = store.create(partial, meta, labels={"train": ds.train.labels, "test": ds.test.labels},
                         paths={"train": ds.train.paths, "test": ds.test.paths}, class_names=ds.class_names,
                         rows_per_chunk=store.chunk_rows(meta.feature_shape, meta.dtype, batch_size))
        start = (0, 0)
    else:
        import h5py

        f = h5py.File(partial, "r+")
        log.info("resuming %s from train row %d, test row %d", partial, *start)
    peak = _peak(f, start, batch_size)
    size = tuple(meta.input_shape[:2])
    todo = [(i, name, split, s) for i, (name, split) in enumerate((("train", ds.train), ("test", ds.test)))
            for s in range(start[i], len(split), batch_size)]
    done = sum(start)
    bar = tqdm(total=meta.n_train + meta.n_test, initial=done, unit="img", disable=None if progress else True,
               desc="extract", file=sys.stderr, dynamic_ncols=True)
    t0, n = time.perf_counter(), 0
    try:
        with ThreadPoolExecutor(1) as pool:
            def load(job):
                _, _, split, s = job
                return split.load(s, min(s + batch_size, len(split)), size, require_native=require_native)

            pending = pool.submit(load, todo[0]) if todo else None
            for k, job in enumerate(todo):
                images = pending.result()
                pending = pool.submit(load, todo[k + 1]) if k + 1 < len(todo) else None
                i, name, _, s = job
                feats = _checked(model(images), meta.dtype, name, s)
                peak = max(peak, float(np.abs(feats).max()))
                f[f"{name}/features"][s:s + len(feats)] = feats
                f["progress"][i] = s + len(feats)
                f.flush()
                n += len(feats)
                bar.update(len(feats))
        store.finish(f, max_abs_activation=peak)
    except BadInputError:
        f.close()
        partial.unlink(missing_ok=True)   # deterministic failure: a resume would fail the same way
        raise
    finally:
        bar.close()
        f.close()
    seconds = time.perf_counter() - t0
    if n:
        log.info("extracted %d images in %.1f s (%.0f images/s)", n, seconds, n / seconds,
                 extra={"images": n, "seconds": seconds})


def _peak(f, start: tuple[int, int], batch_size: int) -> float:
    """Largest |activation| among rows already written (only a resumed run has any)."""
    peak = 0.0
    for name, rows in zip(store.SPLITS, start):
        for s in range(0, rows, batch_size):
            peak = max(peak, float(np.abs(f[f"{name}/features"][s:min(s + batch_size, rows)]).max()))
    return peak


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
