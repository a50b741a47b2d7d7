"""The Ray engine: a cache's units run as shards on long-lived Ray actors, then are joined.

Ray is an optional extra (`pip install featcache[ray]`) and is imported only here. Each actor
builds the backbone once and computes shard after shard (`featcache.engine.run_shard`), writing
its own files: activations never travel through Ray's object store, only each shard's rows of the
dataset (file names, or pixels for in-memory sources) go to it. Ray's `ActorPool` hands out the
shards; an actor that dies is restarted by Ray and its shard retried, resuming from the rows the
shard's partial file already holds. A finished shard is a file on disk, so a rerun after the
driver was killed computes only the missing ones. When every shard is verified, `featcache.join`
writes the cache as virtual datasets over them.

A cluster that featcache starts (no address given and none in $RAY_ADDRESS) is stopped at the end,
also on errors and Ctrl-C; the processes it started are recorded in the shard folder, so a run
after a driver killed outright (SIGKILL: no chance to clean up) stops those left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from featcache import engine, join, store
from featcache.errors import BadInputError, CacheError, FeatcacheError

log = logging.getLogger(__name__)

PROCESSES_FILE = "ray-processes.json"
#: Ray restarts a dead actor (and retries its shard) this many times before the run fails.
MAX_RESTARTS = 3


class ShardWorker:
    """One Ray actor's state: the backbone, built once, and what every shard of this cache shares."""

    def __init__(self, spec, meta: store.CacheMeta, class_names, require_native, max_image_pixels):
        from PIL import Image

        self.spec, self.meta, self.class_names, self.require_native = spec, meta, class_names, require_native
        Image.MAX_IMAGE_PIXELS = max_image_pixels   # the driver's bomb limit; a worker's Pillow has the default
        self.error = None
        try:
            self.model = engine.build_model(meta, spec)
        except Exception as e:  # noqa: BLE001  (handed to the driver by ready(), which raises it there, once)
            self.error = e

    def ready(self):
        """None once the backbone is built, else the error that stopped it."""
        return self.error

    def run(self, split, unit: engine.Unit, path: str) -> dict:
        return engine.run_shard(split, unit, self.meta, Path(path), model=self.model, spec=self.spec,
                                class_names=self.class_names, require_native=self.require_native,
                                crash_once=os.environ.get(CRASH_ONCE_ENV))


#: Tests set this to a file name: the first Ray worker to write a batch while the file is absent creates it
#: and dies at once (os._exit), as a worker killed mid-shard would. Read only in Ray workers.
CRASH_ONCE_ENV = "FEATCACHE_TEST_CRASH_ONCE"
#: Workers the cluster cannot place this long after the first one started are given up (and said so).
PLACE_SECONDS = 60


def run(ds, meta: store.CacheMeta, partial: Path, *, spec, progress: bool, force: bool, require_native) -> None:
    """Compute the shards of the cache that `partial` becomes (those not on disk yet) on Ray, verify all
    of them and write the joined cache at `partial`."""
    ray = _import_ray()
    final = partial.with_name(partial.name.removesuffix(".partial"))
    shards = join.folder(final).absolute()   # workers may run in another working folder
    if shards.exists():
        stop_leftovers(shards)
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
    units = shard_units(meta, spec)
    names = {join.shard_path(shards, u).name for u in units}
    stale = [p for p in shards.glob("*.h5*") if p.name.removesuffix(".partial") not in names]
    if stale:
        log.warning("%d files in %s are shards of another --shard-rows, not used (%.1f GB): delete them to free the "
                    "space", len(stale), shards, sum(p.stat().st_size for p in stale) / 1e9)
    todo = [u for u in units if not join.shard_path(shards, u).exists()]
    t0 = time.perf_counter()
    if todo:
        if spec.weights == "imagenet":
            # Keras downloads into one file under ~/.keras: once here, not by every worker of this node at once
            engine.build_model(meta, spec)
        _run_units(ray, ds, meta, todo, shards, spec=spec, progress=progress, require_native=require_native,
                   total=len(units))
    verified = join.verify(meta, units, shards)
    join.join(partial, meta, verified, labels={"train": ds.train.labels, "test": ds.test.labels},
              paths={"train": ds.train.paths, "test": ds.test.paths}, class_names=ds.class_names,
              extract_seconds=time.perf_counter() - t0 if len(todo) == len(units) else None)
    log.info("joined %d shards in %s", len(units), shards)


def shard_units(meta: store.CacheMeta, spec) -> list[engine.Unit]:
    return engine.units(meta, spec.shard_rows or join.default_shard_rows(meta))


def done_bytes(final: Path, meta: store.CacheMeta, spec) -> int:
    """Bytes of this cache's shards already on disk (what a rerun need not write again)."""
    shards = join.folder(final)
    paths = [join.shard_path(shards, u) for u in shard_units(meta, spec)]
    return sum(p.stat().st_size for p in paths if p.exists())


def _joined(partial: Path, meta: store.CacheMeta) -> bool:
    try:
        cache = store.open_cache(partial)
    except CacheError:
        return False
    return cache.kind == "virtual" and cache.meta.key == meta.key


def _run_units(ray, ds, meta, todo, shards: Path, **options) -> None:
    # Ray prints its workers' failures (even retried ones) on stdout, where the CLI's result goes
    with contextlib.redirect_stdout(sys.stderr):
        _run_on_actors(ray, ds, meta, todo, shards, **options)


def _run_on_actors(ray, ds, meta, todo, shards: Path, *, spec, progress: bool, require_native, total: int) -> None:
    from ray.util import ActorPool
    from tqdm import tqdm

    record = shards / PROCESSES_FILE
    before = {p.pid for p in _descendants()}
    owned = not ray.is_initialized()   # a caller's own connection (a notebook's ray.init) is left as it was
    started, actors = [], []
    try:
        if owned:
            _connect(ray, spec.ray_address)
        started = [p for p in _descendants() if p.pid not in before]   # none when joining a running cluster
        _record(record, started)
        workers, threads, gpus = _plan_workers(ray, spec, len(todo))
        log.info("ray: %d worker%s x %d thread%s%s; %d of %d shards to compute in %s", workers,
                 "s" * (workers > 1), threads, "s" * (threads > 1), f", {gpus:g} GPU each" if gpus else "",
                 len(todo), total, shards)
        env = {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1",
               "OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               "TF_FORCE_GPU_ALLOW_GROWTH": "true", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
               "KERAS_BACKEND": _keras_backend()}
        if os.environ.get(CRASH_ONCE_ENV):
            env[CRASH_ONCE_ENV] = os.environ[CRASH_ONCE_ENV]
        weights = Path(spec.weights)
        worker_spec = dataclasses.replace(
            spec, data=meta.dataset_source, decode_workers=threads, decoder="threads", engine="local",
            ray_address=None, workers=None, shard_rows=None,
            weights=str(weights.absolute()) if weights.is_file() else spec.weights)
        remote = ray.remote(ShardWorker).options(num_cpus=threads, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                                                  max_task_retries=MAX_RESTARTS, runtime_env={"env_vars": env})
        from PIL import Image

        actors = [remote.remote(worker_spec, meta, ds.class_names, require_native, Image.MAX_IMAGE_PIXELS)
                  for _ in range(workers)]
        actors = _placed(ray, actors)
        splits = {"train": ds.train, "test": ds.test}
        tasks = [(_absolute(splits[u.split].rows(u.start, u.stop)), u, str(join.shard_path(shards, u)))
                 for u in todo]
        passes = sum((u.stop - u.start) * (meta.views if u.split == "train" else 1) for u in todo)
        with tqdm(total=passes, unit="img", desc="extract (ray)", disable=None if progress else True,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            results = ActorPool(actors).map_unordered(lambda actor, task: actor.run.remote(*task), tasks)
            while True:
                try:
                    done = next(results)
                except StopIteration:
                    break
                except ray.exceptions.RayTaskError as e:
                    raise _one_line(e.cause) from None
                except ray.exceptions.ActorDiedError as e:
                    raise RuntimeError(f"a Ray worker died {MAX_RESTARTS + 1} times ({str(e).splitlines()[0]}); the "
                                       f"shards finished so far stay in {shards}: rerun the same command to compute "
                                       "the others") from None
                rows = done["stop"] - done["start"]
                if done["computed"] < rows:
                    log.info("shard %s %d-%d resumed at row %d after its worker died", done["split"], done["start"],
                             done["stop"], done["start"] + rows - done["computed"])
                bar.update(rows * (meta.views if done["split"] == "train" else 1))
                started += [p for p in _descendants() if p.pid not in before and p not in started]
                _record(record, started)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if owned and ray.is_initialized():
            ray.shutdown()   # disconnects; stops the cluster only if this process started it
        if owned:
            _stop(started + [p for p in _descendants() if p.pid not in before])
        record.unlink(missing_ok=True)


def _placed(ray, actors: list) -> list:
    """The actors that started: the first may take long (a download of the weights, a cluster scaling up);
    those not placed PLACE_SECONDS after it (the cluster lacks the CPUs or GPUs they ask for) are given up.
    A worker whose backbone could not be built raises its error here."""
    pending = {actor.ready.remote(): actor for actor in actors}
    ready = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=PLACE_SECONDS if ready else None)
        if not done:
            break
        actor = pending.pop(done[0])
        error = ray.get(done[0])
        if error is not None:
            raise _one_line(error) from None
        ready.append(actor)
    if pending:
        log.warning("%d of %d Ray workers could not be placed within %d s (the cluster lacks the CPUs or GPUs "
                    "they ask for); running with %d", len(pending), len(actors), PLACE_SECONDS, len(ready))
        for actor in pending.values():
            ray.kill(actor, no_restart=True)
    return ready


def _one_line(error: BaseException) -> BaseException:
    """A worker's error as the CLI shows the local engine's (one line); others wrapped with their first line."""
    if isinstance(error, (FeatcacheError, OSError)):
        return error
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RuntimeError(f"a Ray worker failed: {type(error).__name__}: {first}")


def _absolute(split):
    """A split's image files as absolute paths: a Ray worker may run in another working folder."""
    if split.files is None:
        return split
    return dataclasses.replace(split, files=tuple(p.absolute() for p in split.files))


def _import_ray():
    try:
        import psutil  # noqa: F401  (it stops the Ray processes featcache starts)
        import ray
    except ImportError as e:
        raise BadInputError("--engine ray needs Ray; fix: pip install 'featcache[ray]' (or use --engine local)") \
            from e
    return ray


def _connect(ray, address: str | None) -> None:
    options = dict(log_to_driver=False, logging_level=logging.WARNING)
    given = address or os.environ.get("RAY_ADDRESS")
    if given is None:   # "local": a cluster of its own, even where `ray start` runs one (pass "auto" for that)
        address = "local"
        options.update(include_dashboard=False)
    else:
        _check_reachable(given)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, ValueError) as e:
        raise BadInputError(f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS')} "
                            f"({str(e).splitlines()[0]}); fix: check --ray-address or $RAY_ADDRESS") from e


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a host:port nobody answers on at once: ray.init retries such an address for minutes."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return   # "auto", "local": Ray resolves those itself, and fails fast
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise BadInputError(f"nothing answers at the Ray address {address} ({e.strerror or e}); fix: pass the head "
                            "node's host:port (e.g. 10.0.0.5:6379, or ray://10.0.0.5:10001) with --ray-address or "
                            "$RAY_ADDRESS, or leave both out to start a local cluster") from e


def _plan_workers(ray, spec, shards: int) -> tuple[int, int, float]:
    """(workers, threads each, GPUs each): one per GPU where the cluster has GPUs, else one per CPU, never more
    than shards to run or CPUs to give; each gets an equal share of the CPUs of the smallest node (an actor lives
    on one node) and of a GPU (1/k, so that k of them fill each GPU)."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    node_cpus = min((int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                     if n.get("Alive") and n["Resources"].get("CPU")), default=cpus)
    workers = min(spec.workers or gpus or cpus, shards)
    if workers > cpus:
        log.warning("--workers %d is more than the cluster's %d CPUs: running %d", workers, cpus, cpus)
        workers = cpus
    threads = max(1, min(node_cpus, cpus // workers))
    gpu_share = 1.0 / -(-workers // gpus) if gpus else 0.0
    return workers, threads, gpu_share


def _keras_backend() -> str:
    import keras

    return keras.backend.backend()


# --------------------------------------------------------------------------- processes

def _descendants() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def _record(path: Path, processes) -> None:
    """Write the pids (with start times, so a reused pid is never mistaken) of the processes this run started."""
    entries = []
    for p in processes:
        try:
            entries.append({"pid": p.pid, "started": p.create_time()})
        except Exception:   # noqa: BLE001  (psutil.Error: it has exited already)
            continue
    if entries:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)


def stop_leftovers(shards: Path) -> int:
    """Stop the Ray processes that a killed run recorded in `shards` and left behind; returns how many."""
    import psutil

    path = shards / PROCESSES_FILE
    if not path.exists():
        return 0
    alive = []
    for entry in json.loads(path.read_text()):
        try:
            p = psutil.Process(entry["pid"])
            if abs(p.create_time() - entry["started"]) < 1e-3:
                alive.append(p)
        except psutil.Error:
            continue
    _stop(alive)
    path.unlink()
    if alive:
        log.warning("stopped %d Ray processes left by an interrupted run", len(alive))
    return len(alive)


def _stop(processes, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, whatever of `processes` still runs."""
    import psutil

    alive = []
    for p in processes:
        try:
            p.terminate()
            alive.append(p)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=grace)
