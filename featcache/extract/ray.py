"""The Ray engine: a cache's units run as shards on long-lived Ray actors, then are joined.

Ray is an optional extra (`pip install featcache[ray]`) and is imported only here. Each actor
builds the backbone once and computes shard after shard (`featcache.extract.local.run_shard`), writing
its own files: activations never travel through Ray's object store, only each shard's rows of the
dataset (file names, or pixels for in-memory sources) go to it. Ray's `ActorPool` hands out the
shards; an actor that dies is restarted by Ray and its shard retried, resuming from the rows the
shard's partial file already holds. A finished shard is a file on disk, so a rerun after the
driver was killed computes only the missing ones. When every shard is verified,
`featcache.cache.shards` writes the cache as virtual datasets over them.

A cluster that featcache starts (no address given and none in $RAY_ADDRESS) is stopped at the end,
also on errors and Ctrl-C; the processes it started are recorded in the shard folder, so a run
after a driver killed outright (SIGKILL: no chance to clean up) stops those left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import sys
import time
from pathlib import Path

from featcache import cluster, system
from featcache.cache import CacheMeta, open_cache
from featcache.cache import shards as join
from featcache.cache.files import sweep
from featcache.errors import BadInputError, CacheError
from featcache.extract import local
from featcache.extract.planner import Unit, units

log = logging.getLogger(__name__)



class ShardWorker:
    """One Ray actor's state: the backbone, built once, and what every shard of this cache shares."""

    def __init__(self, spec, meta: CacheMeta, class_names, decoding, max_image_pixels, after_batch=None):
        from PIL import Image

        self.spec, self.meta, self.class_names, self.decoding = spec, meta, class_names, decoding
        self.after_batch = after_batch
        Image.MAX_IMAGE_PIXELS = max_image_pixels   # the driver's bomb limit; a worker's Pillow has the default
        self.error = None
        try:
            self.model = local.build_model(meta, spec)
        except Exception as e:  # noqa: BLE001  (handed to the driver by ready(), which raises it there, once)
            self.error = e

    def ready(self):
        """None once the backbone is built, else the error that stopped it."""
        return self.error

    def run(self, split, unit: Unit, path: str) -> dict:
        return local.run_shard(split, unit, self.meta, Path(path), model=self.model, spec=self.spec,
                               class_names=self.class_names, decoding=self.decoding, after_batch=self.after_batch)



def run(ds, meta: CacheMeta, partial: Path, *, spec, progress: bool, force: bool, decoding: local.Decoding,
        after_batch=None) -> None:
    """Compute the shards of the cache that `partial` becomes (those not on disk yet) on Ray, verify all
    of them and write the joined cache at `partial`."""
    cluster.import_ray()   # before any work: a one-line error where Ray is not installed
    final = partial.with_name(partial.name.removesuffix(".partial"))
    shards = join.folder(final).absolute()   # workers may run in another working folder
    if shards.exists():
        cluster.stop_leftovers(shards)
    if force:   # the old cache reads through the old shards: it goes first, so it is never read half-deleted
        final.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
        shutil.rmtree(shards, ignore_errors=True)
    elif partial.exists():
        if _joined(partial, meta):
            return   # joined already; only the rename into place was interrupted
        raise BadInputError(f"{partial} holds a local extraction of this cache, resumable; fix: rerun with "
                            f"--engine local to finish it, or delete it to start over on Ray")
    shards.mkdir(exist_ok=True)
    all_units = shard_units(meta, spec)
    _warn_stale(shards, all_units)
    todo = [u for u in all_units if not join.shard_path(shards, u).exists()]
    t0 = time.perf_counter()
    if todo:
        if spec.weights == "imagenet":
            # Keras downloads into one file under ~/.keras: once here, not by every worker of this node at once
            local.build_model(meta, spec)
        with contextlib.redirect_stdout(sys.stderr):   # Ray prints workers' failures on stdout, the CLI's result
            _run_units(ds, meta, todo, shards, Job(spec, decoding, progress, len(all_units), after_batch))
    verified = join.verify(meta, all_units, shards)
    sweep(partial.parent, partial.name)   # a join a killed driver left half-written
    join.join(partial, meta, verified, labels={"train": ds.train.labels, "test": ds.test.labels},
              paths={"train": ds.train.paths, "test": ds.test.paths}, class_names=ds.class_names,
              extract_seconds=time.perf_counter() - t0 if len(todo) == len(all_units) else None)
    log.info("joined %d shards in %s", len(all_units), shards)


@dataclasses.dataclass(frozen=True)
class Job:
    """What every shard of one Ray run shares, besides the cache's meta and rows."""

    spec: object
    decoding: local.Decoding
    progress: bool
    total: int                  # shards of the cache, done or not
    after_batch: object = None  # called in the workers once each batch is on disk (tests inject crashes)


def _warn_stale(shards: Path, all_units: list[Unit]) -> None:
    names = {join.shard_path(shards, u).name for u in all_units}
    stale = [p for p in shards.glob("*.h5*") if p.name.removesuffix(".partial") not in names]
    if stale:
        log.warning("%d files in %s are shards of another --shard-rows, not used (%.1f GB): delete them to free the "
                    "space", len(stale), shards, sum(p.stat().st_size for p in stale) / 1e9)


def shard_units(meta: CacheMeta, spec) -> list[Unit]:
    return units(meta, spec.shard_rows or join.default_shard_rows(meta))


def done_bytes(final: Path, meta: CacheMeta, spec) -> int:
    """Bytes of this cache's shards already on disk (what a rerun need not write again)."""
    shards = join.folder(final)
    paths = [join.shard_path(shards, u) for u in shard_units(meta, spec)]
    return sum(p.stat().st_size for p in paths if p.exists())


def _joined(partial: Path, meta: CacheMeta) -> bool:
    try:
        cache = open_cache(partial)
    except CacheError:
        return False
    return cache.kind == "virtual" and cache.meta.key == meta.key


def _run_units(ds, meta, todo: list[Unit], shards: Path, job: Job) -> None:
    """Run the shards `todo` on actors of the cluster (featcache's own unless a connection or address is given)."""
    log.info("ray: %d of %d shards to compute in %s", len(todo), job.total, shards)
    splits = {"train": ds.train, "test": ds.test}
    tasks = [(_absolute(splits[u.split].rows(u.start, u.stop)), u, str(join.shard_path(shards, u))) for u in todo]
    passes = sum((u.stop - u.start) * (meta.views if u.split == "train" else 1) for u in todo)
    with system.progress_bar(passes, unit="img", desc="extract (ray)", enabled=job.progress) as bar, \
            cluster.distribute(ShardWorker, functools.partial(_worker_args, ds, meta, job), tasks, engine="ray",
                               ordered=False, address=job.spec.ray_address, workers=job.spec.workers,
                               record=shards / cluster.PROCESSES_FILE, after_death=(
                                   f"the shards finished so far stay in {shards}: rerun the same command to compute "
                                   "the others")) as done:
        for result in done:
            rows = result["stop"] - result["start"]
            if result["computed"] < rows:
                log.info("shard %s %d-%d resumed at row %d after its worker died", result["split"], result["start"],
                         result["stop"], result["start"] + rows - result["computed"])
            bar.update(rows * (meta.views if result["split"] == "train" else 1))


def _worker_args(ds, meta, job: Job, threads: int) -> tuple:
    """What a ShardWorker of `threads` threads is built from: the spec of a local extraction of one shard at a
    time, decoding in its threads, weights by absolute path (a worker may run in another working folder)."""
    from PIL import Image

    weights = Path(job.spec.weights)
    worker_spec = dataclasses.replace(
        job.spec, data=meta.dataset_source, decode_workers=threads, decoder="threads", engine="local",
        ray_address=None, workers=None, shard_rows=None,
        weights=str(weights.absolute()) if weights.is_file() else job.spec.weights)
    return worker_spec, meta, ds.class_names, job.decoding, Image.MAX_IMAGE_PIXELS, job.after_batch


def _absolute(split):
    """A split's image files as absolute paths: a Ray worker may run in another working folder."""
    if split.files is None:
        return split
    return dataclasses.replace(split, files=tuple(p.absolute() for p in split.files))
