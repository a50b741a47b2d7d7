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
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from featcache import system
from featcache.cache import CacheMeta, open_cache
from featcache.cache import shards as join
from featcache.cache.files import sweep
from featcache.errors import BadInputError, CacheError, FeatcacheError, WorkerError
from featcache.extract import local
from featcache.extract.planner import Unit, units

log = logging.getLogger(__name__)

PROCESSES_FILE = "ray-processes.json"
#: Ray restarts a dead actor (and retries its shard) this many times before the run fails.
MAX_RESTARTS = 3


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

#: Workers the cluster cannot place this long after the first one started are given up (and said so).
PLACE_SECONDS = 60


def run(ds, meta: CacheMeta, partial: Path, *, spec, progress: bool, force: bool, decoding: local.Decoding,
        after_batch=None) -> None:
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
    all_units = shard_units(meta, spec)
    _warn_stale(shards, all_units)
    todo = [u for u in all_units if not join.shard_path(shards, u).exists()]
    t0 = time.perf_counter()
    if todo:
        if spec.weights == "imagenet":
            # Keras downloads into one file under ~/.keras: once here, not by every worker of this node at once
            local.build_model(meta, spec)
        with contextlib.redirect_stdout(sys.stderr):   # Ray prints workers' failures on stdout, the CLI's result
            _run_units(ray, ds, meta, todo, shards, Job(spec, decoding, progress, len(all_units), after_batch))
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


def _run_units(ray, ds, meta, todo: list[Unit], shards: Path, job: Job) -> None:
    """Run the shards `todo` on actors of the cluster (featcache's own unless a connection or address is given)."""
    with owned_cluster(ray, job.spec.ray_address, shards / PROCESSES_FILE) as cluster:
        workers, threads, gpus = plan_workers(ray, job.spec, len(todo))
        log.info("ray: %d worker%s x %d thread%s%s; %d of %d shards to compute in %s", workers,
                 "s" * (workers > 1), threads, "s" * (threads > 1), f", {gpus:g} GPU each" if gpus else "",
                 len(todo), job.total, shards)
        actors = _start_actors(ray, ds, meta, job, cluster, (workers, threads, gpus))
        splits = {"train": ds.train, "test": ds.test}
        tasks = [(_absolute(splits[u.split].rows(u.start, u.stop)), u, str(join.shard_path(shards, u)))
                 for u in todo]
        passes = sum((u.stop - u.start) * (meta.views if u.split == "train" else 1) for u in todo)
        with system.progress_bar(passes, unit="img", desc="extract (ray)", enabled=job.progress) as bar:
            for done in _results(ray, actors, tasks, shards):
                rows = done["stop"] - done["start"]
                if done["computed"] < rows:
                    log.info("shard %s %d-%d resumed at row %d after its worker died", done["split"], done["start"],
                             done["stop"], done["start"] + rows - done["computed"])
                bar.update(rows * (meta.views if done["split"] == "train" else 1))
                cluster.record()


def _start_actors(ray, ds, meta, job: Job, cluster: "owned_cluster", plan: tuple[int, int, float]) -> list:
    """`workers` ShardWorker actors of `plan` (workers, threads and GPUs each), each building the backbone once;
    those that could not start are given up. The cluster kills them all when it closes."""
    from PIL import Image

    workers, threads, gpus = plan
    env = {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1",
           "OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
           "TF_FORCE_GPU_ALLOW_GROWTH": "true", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "KERAS_BACKEND": _keras_backend()}
    weights = Path(job.spec.weights)
    worker_spec = dataclasses.replace(
        job.spec, data=meta.dataset_source, decode_workers=threads, decoder="threads", engine="local",
        ray_address=None, workers=None, shard_rows=None,
        weights=str(weights.absolute()) if weights.is_file() else job.spec.weights)
    remote = ray.remote(ShardWorker).options(num_cpus=threads, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                                              max_task_retries=MAX_RESTARTS, runtime_env={"env_vars": env})
    cluster.actors = [remote.remote(worker_spec, meta, ds.class_names, job.decoding, Image.MAX_IMAGE_PIXELS,
                                    job.after_batch) for _ in range(workers)]
    return _placed(ray, cluster.actors)


def _results(ray, actors: list, tasks: list, shards: Path):
    """What each shard's run returned, as they finish; a worker's failure as the one line the local engine gives."""
    from ray.util import ActorPool

    results = ActorPool(actors).map_unordered(lambda actor, task: actor.run.remote(*task), tasks)
    while True:
        try:
            yield next(results)
        except StopIteration:
            return
        except ray.exceptions.RayTaskError as e:
            raise _one_line(e.cause) from None
        except ray.exceptions.ActorDiedError as e:
            raise WorkerError(f"a Ray worker died {MAX_RESTARTS + 1} times ({str(e).splitlines()[0]}); the "
                               f"shards finished so far stay in {shards}: rerun the same command to compute "
                               "the others") from None


class owned_cluster:
    """`with owned_cluster(ray, address, record) as cluster:` connected to Ray for the block, as img2dataset
    owns its Spark session: a cluster of featcache's own unless Ray is connected already (a notebook's
    `ray.init`, left as it was) or an address is given. The processes it starts are recorded in `record`
    (`cluster.record()` adds later ones), so a run after a driver killed outright can stop them; on leaving,
    its actors are killed, the connection closed and the processes it started stopped."""

    def __init__(self, ray, address: str | None, record: Path):
        self.ray, self.address, self.path = ray, address, record
        self.before = {p.pid for p in _descendants()}
        self.owned = not ray.is_initialized()
        self.started, self.actors = [], []

    def __enter__(self):
        try:
            if self.owned:
                _connect(self.ray, self.address)
            self.record()   # none when joining a running cluster
        except BaseException:
            self.__exit__()
            raise
        return self

    def record(self) -> None:
        self.started += [p for p in _descendants() if p.pid not in self.before and p not in self.started]
        _record(self.path, self.started)

    def __exit__(self, *exc):
        try:
            for actor in self.actors:
                with contextlib.suppress(Exception):   # an actor of a cluster that is gone already
                    self.ray.kill(actor, no_restart=True)
            if self.owned and self.ray.is_initialized():
                self.ray.shutdown()   # disconnects; stops the cluster only if this process started it
        finally:
            if self.owned:   # Ray's processes only: a notebook's other workers started meanwhile are left alone
                _stop([p for p in self.started + [p for p in _descendants() if p.pid not in self.before]
                       if _command(p) is not None and looks_like_ray(_command(p))])
            self.path.unlink(missing_ok=True)


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
        try:
            error = ray.get(done[0])
        except ray.exceptions.RayActorError as e:   # died while building its backbone, restarts used up
            raise WorkerError(f"a Ray worker died while starting, {MAX_RESTARTS + 1} times "
                               f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); out of "
                               "memory is the usual cause: fix: fewer --workers per node, or more memory") from None
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
    return WorkerError(f"a Ray worker failed: {type(error).__name__}: {first}")


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


def plan_workers(ray, spec, shards: int) -> tuple[int, int, float]:
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
    """Stop the Ray processes that a killed run recorded in `shards` and left behind; returns how many. The
    record is a hint, not an order: only processes that are still the ones recorded are stopped (`leftovers`)."""
    found = leftovers(shards)
    _stop(found)
    (shards / PROCESSES_FILE).unlink(missing_ok=True)
    if found:
        log.warning("stopped %d Ray processes left by an interrupted run", len(found))
    return len(found)


def leftovers(shards: Path) -> list:
    """The processes recorded in `shards` that are verifiably the ones a featcache Ray run started: the same pid
    and start time, this user's, and Ray's by their command line. Anything else in the record (another user's
    process, a reused pid, a process that is not Ray's, a malformed entry or file) is ignored, with a warning."""
    import psutil

    path = shards / PROCESSES_FILE
    try:
        entries = json.loads(path.read_text()) if path.exists() else []
        if not isinstance(entries, list):
            raise ValueError(f"expected a list, got {type(entries).__name__}")
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: not a record of Ray processes (%s)", path, e)
        return []
    found = []
    for entry in entries:
        try:
            p = psutil.Process(int(entry["pid"]))
            if _is_ours(p, float(entry["started"])):
                found.append(p)
            else:
                log.warning("not stopping pid %s named in %s: not a Ray process this user started then", p.pid, path)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("ignoring a malformed entry of %s: %r (%s)", path, entry, e)
        except psutil.Error:
            continue   # gone already
    return found


def _command(p) -> str | None:
    """A process's command line and name, lower case; None when it is gone."""
    import psutil

    try:
        return " ".join(p.cmdline()).lower() + " " + p.name().lower()
    except psutil.Error:
        return None


def _is_ours(p, started: float) -> bool:
    """Whether `p` is the process recorded: started then, by this user, and one of Ray's (its command line)."""
    import psutil

    try:
        if abs(p.create_time() - started) >= 1e-3 or p.uids().real != os.getuid():
            return False
        command = " ".join(p.cmdline()).lower() + " " + p.name().lower()
    except psutil.Error:
        return False
    return looks_like_ray(command)


#: What Ray's processes have in their command lines: workers (ray::...), raylet, gcs_server, its Python agents.
_RAY_TOKENS = ("ray::", "/ray/", "raylet", "gcs_server")


def looks_like_ray(command: str) -> bool:
    return any(token in command for token in _RAY_TOKENS)


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
