"""Units of extraction work and the local engine that runs them.

A unit is a shard of rows of one split (`Unit(split, start, stop)`); `units()` cuts a cache's
rows into them. A unit is done when the file says so: its split's `/progress` has reached the
unit's last row. The local engine runs the units of one file in order in this process, decoding
the next batches in worker threads while the model runs, and writing each batch as soon as it
is computed; a later engine can hand units to other processes or machines.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import augment as aug
from featcache import backbones, store
from featcache.errors import BadInputError, UnreadableImageError

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


def run_local(ds, meta: store.CacheMeta, partial: Path, start: tuple[int, int] | None, *, spec, progress: bool,
              require_native) -> None:
    """Compute every unfinished unit of `partial` (created here when `start` is None) and mark it complete."""
    import h5py
    from tqdm import tqdm

    model = backbones.build(backbone=meta.backbone, layer=meta.layers, weights=spec.weights,
                            input_size=meta.input_shape[:2], seed=spec.seed, precision=meta.precision)
    assert model.output_shapes == list(meta.shapes.values()), model.output_shapes
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
    splits = {"train": ds.train, "test": ds.test}
    size = tuple(meta.input_shape[:2])

    def load(batch):   # runs in a decoding thread: decode, augment and preprocess, ready for the model
        name, s, e = batch
        images = splits[name].load(s, e, size, require_native=require_native)
        views = [model.preprocess(aug.views(images, range(s, e), v, meta.augment, meta.augment_seed))
                 for v in range(1, meta.views)] if name == "train" else []
        return model.preprocess(images), views

    if batches:   # trace the model before the clock starts, as any warmed-up baseline would be
        model.model.predict_on_batch(model.preprocess(np.zeros((min(spec.batch_size, batches[0][2] - batches[0][1]),
                                                                *size, 3), np.uint8)))

    passes = lambda name, n: n * (meta.views if name == "train" else 1)   # noqa: E731
    bar = tqdm(total=passes("train", meta.n_train) + meta.n_test, unit="img", desc="extract",
               initial=passes("train", start[0]) + start[1], disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True)
    peak = _peak(f, meta, start, spec.batch_size)
    t0, n = time.perf_counter(), 0
    try:
        with ThreadPoolExecutor(spec.decode_workers) as pool:
            # `decode_workers` batches decode ahead, in their own threads (PIL releases the GIL); results are
            # taken in order, so rows are written in order and at most that many batches wait in memory
            ahead = collections.deque(pool.submit(load, b) for b in batches[:spec.decode_workers])
            for k, (name, s, e) in enumerate(batches):
                images, views = ahead.popleft().result()
                if k + spec.decode_workers < len(batches):
                    ahead.append(pool.submit(load, batches[k + spec.decode_workers]))
                peak = max(peak, _write_batch(f, meta, model, name, s, e, images, views))
                n += passes(name, e - s)
                bar.update(passes(name, e - s))
        store.finish(f, max_abs_activation=peak, extract_seconds=time.perf_counter() - t0)
    except UnreadableImageError:
        log.warning("the %d rows computed so far stay in %s", n, partial)
        raise
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


def _write_batch(f, meta, model, split: str, s: int, e: int, images, views) -> float:
    """Forward pass of one preprocessed batch (and its views), checked and written; then its rows count as done."""
    feats = model.forward(images)
    view_feats = [model.forward(v) for v in views]
    peak = 0.0
    for j, layer in enumerate(meta.layers):
        out = _checked(feats[j], meta.dtype, split, s)
        f[store.dataset_path(meta, split, layer)][s:e] = out
        peak = max(peak, float(np.abs(out).max()))
        for v, vf in enumerate(view_feats):
            out = _checked(vf[j], meta.dtype, f"{split} view {v + 1}", s)
            f[store.dataset_path(meta, split, layer, views=True)][s:e, v] = out
            peak = max(peak, float(np.abs(out).max()))
    f["progress"][0 if split == "train" else 1] = e
    f.flush()
    return peak


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


def _checked(features: np.ndarray, dtype: str, split: str, row: int) -> np.ndarray:
    with np.errstate(over="ignore"):   # overflow is what we check for, right below
        out = features.astype(dtype)
    if not np.isfinite(out).all():
        top = float(np.nanmax(np.abs(features)))
        raise BadInputError(f"{split} rows from {row}: activations reach {top:.4g}, beyond {dtype}'s range "
                            f"(largest finite {np.finfo(dtype).max:.6g}); fix: rerun with --dtype float32")
    return out
