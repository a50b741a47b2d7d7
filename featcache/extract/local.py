"""The local engine: the forward pass over a file's units, in this process.

`run_local` runs the units of one file in order, decoding the next batches in worker threads (or
processes) while the model runs, and writing each batch behind it (`featcache.cache.write.BatchWriter`).
`run_shard` runs one unit, with the same loop, into a file of its own: what each worker of the Ray
engine (`featcache.extract.ray`) does, shard after shard. A unit is done when the file says so: its
split's `/progress` has reached the unit's last row.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from featcache import augment as aug
from featcache import backbones, system
from featcache.cache import CacheMeta
from featcache.cache.files import close_checked, publish, resume_point
from featcache.cache.read import features_digest, open_cache
from featcache.cache.write import BatchWriter, create, finish, reopen, written_peak
from featcache.errors import BadInputError, CacheError, UnreadableImageError, WorkerError
from featcache.extract.planner import Unit, units
from featcache.sources import RESIZE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    """How rows of a split become model inputs: the input size, the native size every image must have
    (None: images of any size are resized), and the cached augmentation views of training rows."""

    size: tuple[int, int]
    require_native: tuple[int, int] | None
    views: int = 1
    augment: str = ""
    augment_seed: int = 0
    resizing: str = RESIZE   # the cache's resize

    @classmethod
    def of(cls, meta: CacheMeta, require_native) -> "Decoding":
        return cls(tuple(meta.input_shape[:2]), require_native, meta.views, meta.augment, meta.augment_seed,
                   meta.resize)

    def rows(self, splits: dict, name: str, s: int, e: int, row0: int = 0):
        """Rows [s, e) of split `name` decoded (uint8), with their cached views for the training split; the
        views' seeds follow the rows' place in the whole split (`row0` + row), so a shard gets the views a
        single file gets."""
        images = (splits or _WORKER_SPLITS)[name].load(s, e, self.size, require_native=self.require_native,
                                                       resizing=self.resizing)
        extra = ([aug.views(images, range(row0 + s, row0 + e), v, self.augment, self.augment_seed)
                  for v in range(1, self.views)] if name == "train" else [])
        return images, extra


@dataclass
class Job:
    """What one engine run over a file shares: its model and rows, how they decode, where progress goes.

    `after_batch(split, start, stop)` is called once each batch is on disk (tests inject a crash there);
    `row0` is the rows' place in the whole split (a shard's first row)."""

    model: object
    meta: CacheMeta
    splits: dict
    decoding: Decoding
    spec: object                 # the ExtractSpec (batch size, decoding workers)
    partial: Path
    row0: int = 0
    bar: object = None
    after_batch: Callable | None = None


def build_model(meta: CacheMeta, spec):
    """The backbone `meta` describes, built once per process (a Ray worker keeps its own for every shard)."""
    model = backbones.build(backbone=meta.backbone, layer=meta.layers, weights=spec.weights,
                            input_size=meta.input_shape[:2], seed=spec.seed, precision=meta.precision)
    assert model.output_shapes == list(meta.shapes.values()), model.output_shapes
    return model


def run_local(ds, meta: CacheMeta, partial: Path, start: tuple[int, int] | None, *, spec, progress: bool,
              decoding: Decoding, after_batch=None) -> None:
    """Compute every unfinished unit of `partial` (created here when `start` is None) and mark it complete."""

    model = build_model(meta, spec)
    if start is None:
        f = create(partial, meta, labels={"train": ds.train.labels, "test": ds.test.labels},
                   paths={"train": ds.train.paths, "test": ds.test.paths}, class_names=ds.class_names,
                   batch_size=spec.batch_size)
        start = (0, 0)
    else:
        f = reopen(partial, meta, start)
        log.info("resuming %s from train row %d, test row %d", partial, *start)
    done = {"train": start[0], "test": start[1]}
    batches = [(u.split, s, min(s + spec.batch_size, u.stop)) for u in units(meta) if not u.done(done)
               for s in range(max(u.start, done[u.split]), u.stop, spec.batch_size)]
    bar = system.progress_bar(_passes(meta, "train", meta.n_train) + meta.n_test, unit="img", desc="extract",
                              initial=_passes(meta, "train", start[0]) + start[1], enabled=progress)
    job = Job(model, meta, {"train": ds.train, "test": ds.test}, decoding, spec, partial, bar=bar,
              after_batch=after_batch)
    try:
        _compute(f, job, batches, peak=written_peak(f, meta, start, spec.batch_size))
    finally:
        bar.close()


def run_shard(split, unit: Unit, meta: CacheMeta, path: Path, *, model, spec, class_names, decoding: Decoding,
              after_batch=None) -> dict:
    """Compute `unit`'s rows (`split` holds just those rows) into a shard file of their own at `path`.

    The shard is a featcache file of the same key holding rows [unit.start, unit.stop) of one split
    (recorded in its `shard` attribute); it is written as ``path.partial``, resumed from there, and
    renamed to `path` when complete. Returns what the join needs to know of it."""
    import h5py

    partial = path.with_name(path.name + ".partial")
    t0, rows = time.perf_counter(), unit.stop - unit.start
    progress = resume_point(partial, meta, shard=(unit.split, unit.start, unit.stop))
    done = 0 if progress is None else progress[0 if unit.split == "train" else 1]
    start = (done, 0) if unit.split == "train" else (0, done)
    if progress is not None:
        f = reopen(partial, meta, start)
    else:
        other = "test" if unit.split == "train" else "train"
        f = create(partial, meta, labels={unit.split: split.labels, other: np.zeros(0, np.int64)},
                   paths={unit.split: split.paths, other: None if split.paths is None else ()},
                   class_names=class_names, batch_size=spec.batch_size, shard=unit)
    batches = [(unit.split, s, min(s + spec.batch_size, rows)) for s in range(done, rows, spec.batch_size)]
    job = Job(model, meta, {unit.split: split}, decoding, spec, partial, row0=unit.start, after_batch=after_batch)
    _compute(f, job, batches, peak=written_peak(f, meta, start, spec.batch_size))
    with h5py.File(partial, "r+") as f:   # read back: its digest is what the join records and checks it by
        f.attrs["digest"] = features_digest(f, meta)
        close_checked(f)
    publish(partial, path, lambda written: _check_shard(written, meta, unit))
    return {"split": unit.split, "start": unit.start, "stop": unit.stop, "computed": rows - done,
            "seconds": time.perf_counter() - t0}


def _check_shard(path: Path, meta: CacheMeta, unit: Unit) -> None:
    """A shard just written: complete, of this cache's key and of exactly `unit`'s rows."""
    shard = open_cache(path)
    if shard.meta.key != meta.key or shard.shard != (unit.split, unit.start, unit.stop) or \
            shard.splits[unit.split].n != unit.stop - unit.start:
        raise CacheError(f"shard {path} failed its check after writing (key, rows); fix: rerun to recompute it")


def _passes(meta, name: str, n: int) -> int:
    """Forward passes for `n` rows of split `name`: each training row has `views` of them."""
    return n * (meta.views if name == "train" else 1)


@dataclass
class Stages:
    """Where the extraction loop's seconds go: waiting for decoded batches, the model (with the copy of its
    outputs to the host), and handing batches to the writer (which waits only when the writer is behind)."""

    images: int = 0
    decode: float = 0.0
    model: float = 0.0
    write: float = 0.0

    def record(self, seconds: float) -> dict:
        return {"seconds": round(seconds, 3), "decode_wait": round(self.decode, 3), "model": round(self.model, 3),
                "write_wait": round(self.write, 3)}


def _compute(f, job: Job, batches: list, *, peak: float) -> None:
    """Run `batches` ((split, start, stop) rows of `job.splits`, written at the same rows of the open file
    `f`), mark the file complete and close it."""
    if batches:   # trace the model before the clock starts, as any warmed-up baseline would be
        job.model.warm_up((min(job.spec.batch_size, batches[0][2] - batches[0][1]), *job.decoding.size, 3),
                          job.meta.dtype)
    t0, stages = time.perf_counter(), Stages()
    try:
        with _decoded(job, batches) as decoded, BatchWriter(f, job.meta) as writer:
            t0 = time.perf_counter()   # the clock starts once the decoding processes are up, as the model is
            peak = _loop(job, batches, decoded, writer, peak, stages)
        seconds = time.perf_counter() - t0
        finish(f, max_abs_activation=peak, extract_seconds=seconds, stages=stages.record(seconds))
        close_checked(f)
    except UnreadableImageError:
        log.warning("the %d rows computed so far stay in %s", stages.images, job.partial)
        raise
    except BrokenProcessPool as e:
        raise WorkerError(f"a decoding process died (out of memory or killed; or featcache was called from a "
                           f"script without `if __name__ == '__main__':`, which processes that start by spawning "
                           f"need); the rows computed so far stay in {job.partial}: rerun to resume, with "
                           "--decoder threads to decode in this process") from e
    except BadInputError:
        f.close()
        job.partial.unlink(missing_ok=True)   # deterministic failure: a resume would fail the same way
        raise
    finally:
        f.close()
    _log_speed(stages, time.perf_counter() - t0)


def _loop(job: Job, batches: list, decoded, writer: BatchWriter, peak: float, stages: Stages) -> float:
    """The forward pass over `batches` as they come decoded, each written behind the model; each stage timed."""
    ready = iter(decoded)
    for name, s, e in batches:
        system.stop_if_interrupted()
        t0 = time.perf_counter()
        images, views = next(ready)
        t1 = time.perf_counter()
        outputs, peak = _forward(job, [images, *views], name, job.row0 + s, peak)
        t2 = time.perf_counter()
        writer.submit(name, s, e, outputs)
        stages.decode, stages.model = stages.decode + t1 - t0, stages.model + t2 - t1
        stages.write += time.perf_counter() - t2
        if job.after_batch is not None:
            writer.drain()
            job.after_batch(name, s, e)
        stages.images += _passes(job.meta, name, e - s)
        if job.bar is not None:
            job.bar.update(_passes(job.meta, name, e - s))
    t0 = time.perf_counter()
    writer.drain()
    stages.write += time.perf_counter() - t0
    return peak


def _log_speed(stages: Stages, seconds: float) -> None:
    if stages.images:
        log.info("extracted %d images in %.1f s (%.0f images/s; waiting for decoding %.1f s, model %.1f s, waiting "
                 "for writes %.1f s)", stages.images, seconds, stages.images / seconds, stages.decode, stages.model,
                 stages.write, extra={"images": stages.images, "seconds": seconds})


def _forward(job: Job, inputs: list, name: str, row: int, peak: float) -> tuple[list, float]:
    """Features of the preprocessed originals and each view, with the running largest |activation|."""
    outputs = []
    for v, x in enumerate(inputs):
        features, batch_peak = _stored(job.model, x, job.meta.dtype, f"{name} view {v}" if v else name, row)
        outputs.append(features)
        peak = max(peak, batch_peak)
    return outputs, peak


@contextlib.contextmanager
def _decoded(job: Job, batches: list):
    """An iterator of the decoded and preprocessed `batches`, in order, `decode_workers` of them decoding ahead,
    each in its own thread (PIL releases the GIL for most of the work) or, with processes, in a thread waiting
    on a decoding process. Results are taken in order, so at most a few batches wait in memory."""
    spec = job.spec
    processes = spec.decoder == "processes" or (spec.decoder == "auto" and spec.decode_workers > 4
                                                 and next(iter(job.splits.values())).files is not None
                                                 and not system.unspawnable_main())   # auto: threads then
    decode = functools.partial(job.decoding.rows, row0=job.row0)
    ahead = collections.deque()
    with ThreadPoolExecutor(spec.decode_workers) as pool, \
            decode_processes(spec.decode_workers if processes else 0, job.splits) as decoders:
        def load(batch):   # in a decoding thread: decode (here or in a worker process), then preprocess
            images, views = decoders.submit(decode, None, *batch).result() if processes else decode(job.splits,
                                                                                                     *batch)
            return job.model.preprocess(images), [job.model.preprocess(v) for v in views]

        def results():
            ahead.extend(pool.submit(load, b) for b in batches[:spec.decode_workers])
            for k in range(len(batches)):
                out = ahead.popleft().result()
                if k + spec.decode_workers < len(batches):
                    ahead.append(pool.submit(load, batches[k + spec.decode_workers]))
                yield out

        try:
            yield results()
        finally:
            for w in ahead:
                w.cancel()


_WORKER_SPLITS = None   # a decoding process's splits, set once when it starts


def _start_decoder(splits, max_image_pixels) -> None:
    """A decoding process's start: its splits, and the parent's decompression-bomb limit (a spawned process
    imports Pillow afresh, with the default, and would ignore a limit the caller set)."""
    from PIL import Image

    global _WORKER_SPLITS
    _WORKER_SPLITS = splits
    Image.MAX_IMAGE_PIXELS = max_image_pixels


@contextlib.contextmanager
def decode_processes(n: int, splits):
    """A pool of `n` decoding processes (none when n is 0). Processes, not threads, because Pillow holds the
    GIL for part of each image, and a GPU host's decoding must scale with its cores (docs/results/benchmarks-gpu.md)."""
    if not n:
        yield None
        return
    from PIL import Image

    pool = system.spawn_pool(n, _start_decoder, splits, Image.MAX_IMAGE_PIXELS, what="decoding",
                             fix="pass --decoder threads (decoder='threads') to decode in this process")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
