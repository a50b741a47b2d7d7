"""A Ray cluster as featcache uses it, for extraction and prediction alike: connected for a block and left as it
was found (`owned_cluster`, as img2dataset owns its Spark session), workers placed or given up, one-line errors,
and the processes a run starts recorded beside its files so that a later run can stop those a killed driver left.

Ray is an optional extra (`pip install featcache[ray]`) and is imported only where a cluster is used. The process
records are hints, not orders: only processes with the recorded pid and start time, of this user, whose command
line is Ray's, are ever stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from featcache.errors import BadInputError, FeatcacheError, WorkerError

log = logging.getLogger(__name__)

#: Who runs a job (extraction shards, prediction shards, search trials): this process, or actors on a Ray cluster.
ENGINES = ("local", "ray")
PROCESSES_FILE = "ray-processes.json"
#: Ray restarts a dead actor (and retries its task) this many times before the run fails.
MAX_RESTARTS = 3
#: Workers the cluster cannot place this long after the first one started are given up (and said so).
PLACE_SECONDS = 60
#: What Ray's processes have in their command lines: workers (ray::...), raylet, gcs_server, its Python agents.
_RAY_TOKENS = ("ray::", "/ray/", "raylet", "gcs_server")


@contextlib.contextmanager
def distribute(worker: type, args_for: Callable[[int], tuple], tasks: Sequence[tuple], *, engine: str = "local",
               ordered: bool = True, address: str | None = None, workers: int | None = None,
               record: Path | None = None, after_death: str = "rerun the same command") -> Iterator[Iterator]:
    """`with distribute(Worker, args_for, tasks, engine=...) as done: for result in done:` the one way featcache
    hands out work split into tasks (extraction shards, prediction shards), whoever runs it, as img2dataset's
    distributors share one signature. A worker is a class built once per worker as `Worker(*args_for(threads))`
    (threads: the CPU threads it may use) with `ready()` (None, or the error that stopped its start) and
    `run(*task)`.

    engine="local" is the twin: one worker in this process, the tasks in order, its errors raised as they are.
    engine="ray": actors on the cluster at `address` (or a cluster of featcache's own, `owned_cluster`, whose
    processes are recorded in the file `record`, a temporary one by default, and stopped on leaving), `workers` of them as `plan_workers` places them;
    results in the tasks' order or, `ordered=False`, as they finish; a task's error as the one line the local
    run gives; a worker dead MAX_RESTARTS + 1 times a WorkerError ending with `after_death`."""
    if engine not in ENGINES:
        raise BadInputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "local":
        yield _on_this_process(worker, args_for, tasks)
        return
    ray = import_ray()
    with contextlib.ExitStack() as stack:
        if record is None:   # a record nobody reads after: in a folder of its own, gone with the run
            import tempfile

            record = Path(stack.enter_context(tempfile.TemporaryDirectory())) / PROCESSES_FILE
        owned = stack.enter_context(owned_cluster(ray, address, record))
        yield _on_ray(ray, owned, worker, args_for, tasks, workers=workers, ordered=ordered, after_death=after_death)


def _on_this_process(worker: type, args_for, tasks) -> Iterator:
    one = worker(*args_for(len(os.sched_getaffinity(0))))
    error = one.ready()
    if error is not None:
        raise error
    for task in tasks:
        yield one.run(*task)


def _on_ray(ray, owned: "owned_cluster", worker: type, args_for, tasks, *, workers, ordered, after_death) -> Iterator:
    n, threads, gpus = plan_workers(ray, workers, len(tasks))
    log.info("ray: %d worker%s x %d thread%s%s", n, "s" * (n > 1), threads, "s" * (threads > 1),
             f", {gpus:g} GPU each" if gpus else "")
    remote = ray.remote(_started_on_ray(worker)).options(num_cpus=threads, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                                        max_task_retries=MAX_RESTARTS, runtime_env={"env_vars": worker_env(threads)})
    owned.actors = [remote.remote(*args_for(threads)) for _ in range(n)]
    for result in results(ray, placed(ray, owned.actors), list(tasks), ordered=ordered, after_death=after_death):
        owned.record()
        yield result


def _started_on_ray(worker: type) -> type:
    """`worker` as a Ray actor builds it: Keras on JAX or PyTorch told first that TensorFlow is absent, as a command
    tells it (`system.keras_without_tensorflow`); Ray names the actor after `worker`."""

    class OnRay(worker):
        def __init__(self, *args):
            from featcache import system

            system.keras_without_tensorflow()
            super().__init__(*args)

    OnRay.__name__ = OnRay.__qualname__ = worker.__name__
    return OnRay


def results(ray, actors: list, tasks: list, *, ordered: bool, after_death: str):
    """What `actor.run.remote(*task)` returns for each task on a pool of `actors` (in the tasks' order, or as they
    finish); a task's error as the one line the local run gives, and a worker that died MAX_RESTARTS + 1 times as a
    WorkerError ending with `after_death` (what was kept, and how to go on)."""
    from ray.util import ActorPool

    pool = ActorPool(actors)
    run = (pool.map if ordered else pool.map_unordered)(lambda actor, task: actor.run.remote(*task), tasks)
    while True:
        try:
            yield next(run)
        except StopIteration:
            return
        except ray.exceptions.RayTaskError as e:
            raise one_line(e.cause) from None
        except ray.exceptions.ActorDiedError as e:
            raise WorkerError(f"a Ray worker died {MAX_RESTARTS + 1} times ({str(e).splitlines()[0]}); "
                              f"{after_death}") from None


def plan_workers(ray, workers: int | None, tasks: int) -> tuple[int, int, float]:
    """(workers, threads each, GPUs each): one per GPU where the cluster has GPUs, else one per CPU, never more
    than tasks to run or CPUs to give; each gets an equal share of the CPUs of the smallest node (an actor lives
    on one node) and of a GPU (1/k, so that k of them fill each GPU)."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    node_cpus = min((int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
                     if n.get("Alive") and n["Resources"].get("CPU")), default=cpus)
    workers = min(workers or gpus or cpus, tasks)
    if workers > cpus:
        log.warning("--workers %d is more than the cluster's %d CPUs: running %d", workers, cpus, cpus)
        workers = cpus
    threads = max(1, min(node_cpus, cpus // workers))
    gpu_share = 1.0 / -(-workers // gpus) if gpus else 0.0
    return workers, threads, gpu_share


def worker_env(threads: int) -> dict:
    """The environment of a Ray worker of `threads` threads: TensorFlow and OpenMP sized to them, GPU memory grown
    on demand, this process's Keras backend."""
    return {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": str(threads),
            "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), "TF_FORCE_GPU_ALLOW_GROWTH": "true",
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "KERAS_BACKEND": keras_backend()}


class owned_cluster:
    """`with owned_cluster(ray, address, record) as cluster:` connected to Ray for the block, as img2dataset
    owns its Spark session: a cluster of featcache's own unless Ray is connected already (a notebook's
    `ray.init`, left as it was) or an address is given. The processes it starts are recorded in `record`
    (`cluster.record()` adds later ones), so a run after a driver killed outright can stop them; on leaving,
    its actors are killed, the connection closed and the processes it started stopped."""

    def __init__(self, ray, address: str | None, record: Path):
        self.ray, self.address, self.path = ray, address, record
        self.before = {p.pid for p in descendants()}
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
        self.started += [p for p in descendants() if p.pid not in self.before and p not in self.started]
        _record(self.path, self.started)

    def __exit__(self, *exc):
        # Taken before the shutdown: the workers of a stopped raylet are orphaned (no longer this process's
        # descendants) but may live on for seconds, so a list made after it would miss them.
        started = self.started + [p for p in descendants() if p.pid not in self.before and p not in self.started]
        try:
            for actor in self.actors:
                with contextlib.suppress(Exception):   # an actor of a cluster that is gone already
                    self.ray.kill(actor, no_restart=True)
            if self.owned and self.ray.is_initialized():
                self.ray.shutdown()   # disconnects; stops the cluster only if this process started it
        finally:
            if self.owned:   # Ray's processes only: a notebook's other workers started meanwhile are left alone
                started += [p for p in descendants() if p.pid not in self.before and p not in started]
                _stop([p for p in started if _command(p) is not None and looks_like_ray(_command(p))])
            self.path.unlink(missing_ok=True)


def placed(ray, actors: list) -> list:
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
            raise one_line(error) from None
        ready.append(actor)
    if pending:
        log.warning("%d of %d Ray workers could not be placed within %d s (the cluster lacks the CPUs or GPUs "
                    "they ask for); running with %d", len(pending), len(actors), PLACE_SECONDS, len(ready))
        for actor in pending.values():
            ray.kill(actor, no_restart=True)
    return ready


def one_line(error: BaseException) -> BaseException:
    """A worker's error as the CLI shows the local engine's (one line); others wrapped with their first line."""
    if isinstance(error, (FeatcacheError, OSError)):
        return error
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return WorkerError(f"a Ray worker failed: {type(error).__name__}: {first}")


def import_ray():
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


def keras_backend() -> str:
    import keras

    return keras.backend.backend()


def descendants() -> list:
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
