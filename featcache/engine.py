"""Units of extraction work and the local engine that runs them.

A unit is a shard of rows of one split (`Unit(split, start, stop)`); `units()` cuts a cache's
rows into them. A unit is done when the file says so: its split's `/progress` has reached the
unit's last row. The local engine (`run_local`) runs the units of one file in order in this
process, decoding the next batches in worker threads (or processes) while the model runs, and
writing each batch behind it. `run_shard` runs one unit, with the same loop, into a file of its
own: what each worker of the Ray engine (`featcache.ray_engine`) does, shard after shard.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import augment as aug
from featcache import backbones, store
from featcache.errors import BadInputError, CacheError, UnreadableImageError
from featcache.workers import spawn_pool

log = logging.getLogger(__name__)

#: Rows per unit: a few minutes of work for VGG16 at 32 px on 2 CPU cores.
SHARD_ROWS = 65536


@dataclass(frozen=True)
class Unit:
    split: str          # "train" or "test"
    start: int          # first row
    stop: int           # one past the last row

    def done(self, progress: dict) -> bool:
        return progress[self.split] >= self.stop


def units(meta: store.CacheMeta, shard_rows: int = SHARD_ROWS) -> list[Unit]:
    """Every row of both splits, in order, cut into units of at most `shard_rows` rows."""
    return [Unit(split, s, min(s + shard_rows, n))
            for split, n in (("train", meta.n_train), ("test", meta.n_test)) for s in range(0, n, shard_rows)]


def build_model(meta: store.CacheMeta, spec):
    """The backbone `meta` describes, built once per process (a Ray worker keeps its own for every shard)."""
    model = backbones.build(backbone=meta.backbone, layer=meta.layers, weights=spec.weights,
                            input_size=meta.input_shape[:2], seed=spec.seed, precision=meta.precision)
    assert model.output_shapes == list(meta.shapes.values()), model.output_shapes
    return model


def run_local(ds, meta: store.CacheMeta, partial: Path, start: tuple[int, int] | None, *, spec, progress: bool,
              require_native) -> None:
    """Compute every unfinished unit of `partial` (created here when `start` is None) and mark it complete."""
    import h5py
    from tqdm import tqdm

    model = build_model(meta, spec)
    if start is None:
        f = store.create(partial, meta, labels={"train": ds.train.labels, "test": ds.test.labels},
                         paths={"train": ds.train.paths, "test": ds.test.paths}, class_names=ds.class_names,
                         batch_size=spec.batch_size)
        start = (0, 0)
    else:
        f = h5py.File(partial, "r+")
        log.info("resuming %s from train row %d, test row %d", partial, *start)
    done = {"train": start[0], "test": start[1]}
    todo = [u for u in units(meta) if not u.done(done)]
    batches = [(u.split, s, min(s + spec.batch_size, u.stop)) for u in todo
               for s in range(max(u.start, done[u.split]), u.stop, spec.batch_size)]
    bar = tqdm(total=_passes(meta, "train", meta.n_train) + meta.n_test, unit="img", desc="extract",
               initial=_passes(meta, "train", start[0]) + start[1], disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True)
    try:
        _compute(f, model, {"train": ds.train, "test": ds.test}, meta, batches, spec=spec, partial=partial,
                 require_native=require_native, peak=_peak(f, meta, start, spec.batch_size), bar=bar)
    finally:
        bar.close()


def run_shard(split, unit: Unit, meta: store.CacheMeta, path: Path, *, model, spec, class_names,
              require_native, crash_once: str | None = None) -> dict:
    """Compute `unit`'s rows (`split` holds just those rows) into a shard file of their own at `path`.

    The shard is a featcache file of the same key holding rows [unit.start, unit.stop) of one split
    (recorded in its `shard` attribute); it is written as ``path.partial``, resumed from there, and
    renamed to `path` when complete. Returns what the join needs to know of it."""
    import h5py

    partial = path.with_name(path.name + ".partial")
    t0 = time.perf_counter()
    rows = unit.stop - unit.start
    done = 0
    if partial.exists():
        try:
            old = store.open_cache(partial, require_complete=False)
            if old.meta.key == meta.key and old.shard == (unit.split, unit.start, unit.stop):
                done = old.progress[0 if unit.split == "train" else 1]
            else:
                partial.unlink()
        except CacheError as e:
            log.warning("discarding unusable shard partial: %s", e)
            partial.unlink()
    if partial.exists():
        f = h5py.File(partial, "r+")
    else:
        other = "test" if unit.split == "train" else "train"
        f = store.create(partial, meta, labels={unit.split: split.labels, other: np.zeros(0, np.int64)},
                         paths={unit.split: split.paths, other: None if split.paths is None else ()},
                         class_names=class_names, batch_size=spec.batch_size, shard=unit)
    start = (done, 0) if unit.split == "train" else (0, done)
    batches = [(unit.split, s, min(s + spec.batch_size, rows)) for s in range(done, rows, spec.batch_size)]
    _compute(f, model, {unit.split: split}, meta, batches, spec=spec, partial=partial, require_native=require_native,
             peak=_peak(f, meta, start, spec.batch_size), row0=unit.start, crash_once=crash_once)
    os.replace(partial, path)
    return {"split": unit.split, "start": unit.start, "stop": unit.stop, "computed": rows - done,
            "seconds": time.perf_counter() - t0}


def _passes(meta, name: str, n: int) -> int:
    """Forward passes for `n` rows of split `name`: each training row has `views` of them."""
    return n * (meta.views if name == "train" else 1)


def _compute(f, model, splits: dict, meta: store.CacheMeta, batches: list, *, spec, partial: Path, require_native,
             peak: float, bar=None, row0: int = 0, crash_once: str | None = None) -> None:
    """Run `batches` ((split, start, stop) rows of `splits`, written at the same rows of the open file `f`),
    mark the file complete and close it. `row0` is the rows' place in the whole split (augmentation seeds).
    `crash_once` (tests of the Ray engine): a file name; if it does not exist after the first batch is written,
    it is created and the process dies at once, as a worker killed mid-shard would."""
    size = tuple(meta.input_shape[:2])
    processes = spec.decoder == "processes" or (spec.decoder == "auto" and spec.decode_workers > 4
                                                 and next(iter(splits.values())).files is not None)
    decode = functools.partial(_decode_rows, size=size, require_native=require_native, views=meta.views,
                               augment=meta.augment, augment_seed=meta.augment_seed, row0=row0)

    def load(batch):   # runs in a decoding thread: decode (here or in a worker process), then preprocess
        images, views = decoders.submit(decode, None, *batch).result() if processes else decode(splits, *batch)
        return model.preprocess(images), [model.preprocess(v) for v in views]

    if batches:   # trace the model before the clock starts, as any warmed-up baseline would be
        model.warm_up((min(spec.batch_size, batches[0][2] - batches[0][1]), *size, 3), meta.dtype)

    t0, n = time.perf_counter(), 0
    writes, failed = collections.deque(), threading.Event()
    try:
        # `decode_workers` batches decode ahead, each in its own thread (PIL releases the GIL for most of
        # the work) or, with processes, in a thread waiting on a decoding process; one thread writes behind,
        # so the model runs while the previous batch goes to disk. Results are taken in order, so rows are
        # written in order and at most a few batches wait in memory.
        with ThreadPoolExecutor(spec.decode_workers) as pool, ThreadPoolExecutor(1) as writer, \
                _decode_processes(spec.decode_workers if processes else 0, splits) as decoders:
            t0 = time.perf_counter()   # the clock starts once the decoding processes are up, as the model is
            ahead = collections.deque(pool.submit(load, b) for b in batches[:spec.decode_workers])
            try:
                for k, (name, s, e) in enumerate(batches):
                    images, views = ahead.popleft().result()
                    if k + spec.decode_workers < len(batches):
                        ahead.append(pool.submit(load, batches[k + spec.decode_workers]))
                    outputs = []
                    for v, x in enumerate([images, *views]):
                        what = f"{name} view {v}" if v else name
                        features, batch_peak = _stored(model, x, meta.dtype, what, row0 + s)
                        outputs.append(features)
                        peak = max(peak, batch_peak)
                    writes.append(writer.submit(_write_batch, f, meta, name, s, e, outputs, failed))
                    while len(writes) > 2 or (writes and writes[0].done()):
                        writes.popleft().result()
                    if crash_once and not os.path.exists(crash_once):
                        _drain(writes)
                        Path(crash_once).touch()
                        os._exit(1)
                    n += _passes(meta, name, e - s)
                    if bar is not None:
                        bar.update(_passes(meta, name, e - s))
            finally:   # the file is closed below only once no write is under way
                for w in ahead:
                    w.cancel()
                for w in _drain(writes):
                    w.result()
        store.finish(f, max_abs_activation=peak, extract_seconds=time.perf_counter() - t0)
    except UnreadableImageError:
        log.warning("the %d rows computed so far stay in %s", n, partial)
        raise
    except BrokenProcessPool as e:
        raise RuntimeError(f"a decoding process died (out of memory or killed; or featcache was called from a "
                           f"script without `if __name__ == '__main__':`, which processes that start by spawning "
                           f"need); the rows computed so far stay in {partial}: rerun to resume, with --decoder "
                           f"threads to decode in this process") from e
    except BadInputError:
        f.close()
        partial.unlink(missing_ok=True)   # deterministic failure: a resume would fail the same way
        raise
    finally:
        f.close()
    seconds = time.perf_counter() - t0
    if n:
        log.info("extracted %d images in %.1f s (%.0f images/s)", n, seconds, n / seconds,
                 extra={"images": n, "seconds": seconds})


_WORKER_SPLITS = None   # a decoding process's splits, set once when it starts


def _decode_rows(splits, name: str, s: int, e: int, *, size, require_native, views: int, augment: str,
                 augment_seed: int, row0: int = 0):
    """Rows [s, e) of split `name` decoded (uint8), with their cached views for the training split; the
    views' seeds follow the rows' place in the whole split (`row0` + row), so a shard gets the views a
    single file gets."""
    split = (splits or _WORKER_SPLITS)[name]
    images = split.load(s, e, size, require_native=require_native)
    extra = ([aug.views(images, range(row0 + s, row0 + e), v, augment, augment_seed) for v in range(1, views)]
             if name == "train" else [])
    return images, extra


def _start_decoder(splits, max_image_pixels) -> None:
    """A decoding process's start: its splits, and the parent's decompression-bomb limit (a spawned process
    imports Pillow afresh, with the default, and would ignore a limit the caller set)."""
    from PIL import Image

    global _WORKER_SPLITS
    _WORKER_SPLITS = splits
    Image.MAX_IMAGE_PIXELS = max_image_pixels


@contextlib.contextmanager
def _decode_processes(n: int, splits):
    """A pool of `n` decoding processes (none when n is 0). Processes, not threads, because Pillow holds the
    GIL for part of each image: on a 16-core GPU host, 8 decoding threads reached ~1,500 images/s."""
    if not n:
        yield None
        return
    from PIL import Image

    pool = spawn_pool(n, _start_decoder, splits, Image.MAX_IMAGE_PIXELS)
    try:
        list(pool.map(time.sleep, [0.05] * n))   # all n started now (they start on demand), not within the first batches
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _drain(writes):
    """Wait for every pending write; the first failure is raised after all have finished."""
    for w in writes:
        w.exception()
    return list(writes)


def _stored(model, preprocessed, dtype: str, what: str, row: int) -> tuple[list, float]:
    """The batch's features per layer in the storage dtype and its largest |stored value|; refused if a
    value overflows that dtype (the row maxima say so: the cast is monotonic)."""
    features, row_peaks = model.forward_stored(preprocessed, dtype)
    with np.errstate(over="ignore"):   # overflow is what we check for, right below
        stored_peaks = [p.astype(dtype) for p in row_peaks]
    if all(np.isfinite(p).all() for p in stored_peaks):
        return features, max(float(p.max()) for p in stored_peaks)
    top = max(float(np.nanmax(p)) for p in row_peaks)
    raise BadInputError(f"{what} rows from {row}: activations reach {top:.4g}, beyond {dtype}'s range "
                        f"(largest finite {np.finfo(dtype).max:.6g}); fix: rerun with --dtype float32")


def _write_batch(f, meta, split: str, s: int, e: int, outputs: list, failed: threading.Event) -> None:
    """Write one batch (its originals, then each cached view) per layer; then its rows count as done.
    Nothing more is written once a write has failed (disk full, say): rows stay a prefix, ready to resume."""
    if failed.is_set():
        return
    try:
        _write_rows(f, meta, split, s, e, outputs)
    except BaseException:
        failed.set()
        raise


def _write_rows(f, meta, split: str, s: int, e: int, outputs: list) -> None:
    for v, features in enumerate(outputs):
        for layer, out in zip(meta.layers, features):
            if v == 0:
                f[store.dataset_path(meta, split, layer)][s:e] = out
            else:
                f[store.dataset_path(meta, split, layer, views=True)][s:e, v - 1] = out
    f["progress"][0 if split == "train" else 1] = e
    f.flush()


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
