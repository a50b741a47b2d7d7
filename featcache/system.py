"""Where featcache meets the machine: memory, disk, folders, package versions, progress, worker processes.

Every probe of the operating system lives here, so the layers above ask one question ("how much
memory may I use?", "does this fit the disk?") in one way. Nothing here knows about caches or heads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import pickle
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path

from featcache.errors import BadInputError, DiskFullError, WorkerError

log = logging.getLogger(__name__)

#: Seconds between progress lines when stderr is not a terminal (a log file, CI, nohup).
LOG_EVERY_SECONDS = 10.0


# --------------------------------------------------------------------------- memory and disk

def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable capped by a cgroup memory limit if one is set;
    physical memory where /proc is not there."""
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
    return have if have is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


#: Room kept free beyond the rows a file needs: its labels, paths, digests and HDF5's own structure. HDF5 crashes
#: the process (SIGSEGV while closing) when a write fails on a full disk, so featcache stops before that.
HEADROOM_BYTES = 1 << 20


def headroom(need: int) -> int:
    return HEADROOM_BYTES + need // 50


def check_free_space(folder: Path, need: int, *, have: int = 0, what: str = "the cache", fix: str) -> None:
    """Refuse before any work when `need` bytes (of which `have` are written already) and their headroom cannot
    fit `folder`."""
    free, left = shutil.disk_usage(folder).free, need - have
    if left + headroom(left) > free:
        raise BadInputError(f"{what} needs {megabytes(left + headroom(left))} more (with headroom) but {folder} has "
                            f"{megabytes(free)} free; fix: {fix}")


#: The largest record featcache reads back (config.json, metrics.json, export.json, search.json...).
MAX_RECORD_BYTES = 64 << 20


def read_json(path: str | Path, *, fix: str) -> dict:
    """The JSON object in the regular file `path`; anything else (missing, a FIFO or device, unreadable, not UTF-8,
    truncated, nested deeper than Python can parse, not an object) is one BadInputError naming the file and `fix`.
    A FIFO is never opened (reading one waits for a writer for ever)."""
    import json
    import stat

    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD_BYTES:
            raise BadInputError(f"{path} is not a regular file of at most {megabytes(MAX_RECORD_BYTES)}; fix: {fix}")
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, BadInputError):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise BadInputError(f"{path} cannot be read as a JSON record ({why}); fix: {fix}") from e
    if not isinstance(value, dict):
        raise BadInputError(f"{path} holds JSON {type(value).__name__}, expected an object; fix: {fix}")
    return value


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read a MiB at a time; remembered for the file as it is now (a weights file is
    hashed for the cache key and again when the backbone loads it: once is enough while it is unchanged)."""
    import hashlib

    st = os.stat(path)
    now = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if now not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHED[now] = h.hexdigest()
    return _HASHED[now]


_HASHED: dict[tuple, str] = {}   # file_sha256's memory, by (path, inode, size, mtime, ctime)


@contextlib.contextmanager
def file_lock(path: Path, *, waiting: str | None = None, reentrant: bool = False):
    """The one lock featcache's processes coordinate by: an exclusive flock of the file `path` (created if missing),
    held for the block; the kernel drops it when its process dies, so a killed holder never leaves it taken. A
    process that finds it held logs `waiting` (if given) and waits. With `reentrant`, a block inside another that
    holds the same lock in this process goes straight in (for locks taken again by code the holder calls)."""
    import fcntl

    key = Path(path).absolute()
    if reentrant and key in _HELD_LOCKS:
        yield
        return
    with key.open("a") as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.warning("%s", waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        if reentrant:
            _HELD_LOCKS.add(key)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(key)
            fcntl.flock(fd, fcntl.LOCK_UN)


#: The reentrant locks (file_lock) this process holds.
_HELD_LOCKS: set = set()


def is_locked(path: Path) -> bool:
    """Whether another process holds file_lock(`path`) now (False when the file is missing or unreadable)."""
    import fcntl

    path = Path(path)
    if not path.exists():
        return False
    try:
        with path.open("rb") as fd:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


@contextlib.contextmanager
def staged_folder(final: Path, purpose: str, *, force: bool = False):
    """`with staged_folder(out, "exporting") as tmp:` write a folder's files into `tmp`, a hidden folder beside
    `final`; when the block succeeds every file is fsynced and `tmp` renamed to `final` (an empty `final`, or with
    `force` an existing one, is replaced: moved aside first, deleted after), so `final` is never half-written and
    an error (a full disk) leaves what was there. The temporary folder is gone afterwards either way."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{purpose}.", dir=final.parent))
    old = None
    try:
        try:
            yield tmp
            for path in [*tmp.rglob("*"), tmp]:
                fsync_path(path)
        except OSError as e:
            raise (no_room(e, final) or e) from e
        if final.exists():
            if any(final.iterdir()) and not force:
                raise BadInputError(f"{final} is not empty; fix: pass another folder, or --force")
            old = final.with_name(f"{tmp.name}.old")
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def no_room(error: OSError, target: Path, fix: str = "free some space, or pass another -o"):
    """A full disk (or quota) met while writing `target`, as the one-line DiskFullError; None for another error."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return DiskFullError(f"{Path(target).parent} is full ({error.strerror}) while writing {target}: nothing was "
                         f"replaced and nothing half-written kept; fix: {fix}")


def staged_file(final: Path, text: str, *, force: bool = False) -> Path:
    """Write `text` to the file `final` through a temporary file beside it (fsynced, then renamed): a full disk
    leaves the old file whole. An existing `final` is replaced only with `force`."""
    final = Path(final)
    if final.exists() and not force:
        raise BadInputError(f"{final} exists; fix: pass another -o, or --force to replace it")
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise (no_room(e, final) or e) from e
        os.replace(name, final)
        fsync_path(final.parent)
    finally:
        if os.path.exists(name):
            os.unlink(name)
    return final


def fsync_path(path: Path) -> None:
    """fsync a file or folder: its data (or a rename in it) on the device, or an OSError saying why not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The longest run or search name: with its date prefix it stays within a file name's 255 bytes.
MAX_NAME = 100


def check_name(name: str | None, *, option: str = "--name") -> str | None:
    """`name`, refused (before any work) unless it can be one file name inside the runs folder: no path separators,
    not '.' or '..', no control characters, at most MAX_NAME characters."""
    if name is None:
        return None
    text = str(name)
    if not text or text in (".", "..") or "/" in text or "\\" in text or len(text) > MAX_NAME or \
            any(ord(ch) < 32 for ch in text):
        raise BadInputError(f"{option} must be one file name of 1 to {MAX_NAME} characters, without '/' or '\\' "
                            f"and not '..', got {text[:60]!r}{'...' if len(text) > 60 else ''}; fix: pass a short "
                            "plain name")
    return text


def writable_folder(path: str | Path, *, what: str, fix: str) -> Path:
    """`path`, created if needed and checked writable; a BadInputError names `what` it is and the `fix`."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create {what} {path} ({e.strerror}); fix: {fix}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInputError(f"{what} {path} is not writable; fix: {fix}")
    return path


def package_versions(packages=("featcache", "tensorflow", "keras", "h5py", "numpy")) -> dict:
    """Python's and each package's version, and Keras' backend: what a cache or a run records of its software."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    import keras

    out["keras_backend"] = keras.backend.backend()
    return out


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------- progress

def progress_bar(total: int | None, *, unit: str, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar on stderr when it is a terminal; where it is not (a log file, CI), a log line every
    LOG_EVERY_SECONDS instead of silence; nothing when `enabled` is False."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(total, unit=unit, desc=desc, initial=initial)
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, initial=initial, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


class LogProgress:
    """The part of tqdm's interface featcache uses, reporting by log lines every few seconds."""

    def __init__(self, total, *, unit: str, desc: str, initial: int = 0, every: float = LOG_EVERY_SECONDS):
        self.total, self.unit, self.desc, self.n, self.every = total, unit, desc, initial, every
        self.start, self.initial = time.monotonic(), initial
        self.last, self.postfix = self.start, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._log(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        """tqdm's signature: a mapping and keywords, both shown; `refresh` matters only to a terminal."""
        shown = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in shown.items())

    def _log(self, now: float) -> None:
        rate = (self.n - self.initial) / max(now - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        log.info("%s: %s%s %s, %.1f %s/s%s", self.desc, f"{self.n:,}", of, self.unit, rate, self.unit,
                 f" ({self.postfix})" if self.postfix else "")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- Ctrl-C

_interrupted = threading.Event()


def _remember_and_raise(signum, frame):
    _interrupted.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_kept():
    """Within the block, a Ctrl-C is remembered as well as raised, and raised again by `stop_if_interrupted()`.

    Python runs a signal handler at the next bytecode of the main thread, which may be a weakref callback or a
    `__del__` (TensorFlow runs many): an exception raised there is printed as "Exception ignored in ..." and
    dropped, and the command carried on as if never interrupted. Long loops call `stop_if_interrupted()` (each
    call into a model's training steps, each extracted batch), which raises the dropped interrupt; the dropped one
    is not printed.
    Yields an event set, once the block has ended, if a Ctrl-C came within it: a library may turn the interrupt into
    an error of its own (SQLAlchemy's session closed mid-commit) or swallow it, and the caller still knows.
    Outside the main thread (where signals cannot be handled) the block changes nothing."""
    came = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    previous, previous_hook = signal.signal(signal.SIGINT, _remember_and_raise), sys.unraisablehook

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    _interrupted.clear()
    sys.unraisablehook = hook
    try:
        yield came
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        sys.unraisablehook = previous_hook
        if _interrupted.is_set():
            came.set()
        _interrupted.clear()


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came within `interrupts_kept()` (its own raise may have been dropped)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


# --------------------------------------------------------------------------- worker processes

def start_worker(parent: int, poll_seconds: float = 1.0) -> None:
    """Call first in a spawned worker: ignore SIGINT (only the main process handles Ctrl-C, by stopping its
    pools) and exit once `parent` (passed in: a worker that starts after its parent died is someone else's
    child) is gone, since a pool worker never sees its parent die (it holds its own end of the task queue)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="featcache-parent-watch", daemon=True).start()


#: Seconds a pool's processes have to start and answer before the run stops (they take about one here).
START_SECONDS = 60.0


def unspawnable_main() -> str | None:
    """Why processes started by spawning cannot start from this program, or None. A spawned process re-imports the
    main script by its file name; a script read from standard input (`python - <<EOF`) or typed at a prompt has
    none, so every such process dies at its start."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:
        return None   # `python -m ...`, or an embedding program: re-imported by module name
    path = getattr(main, "__file__", None)
    if path is None or os.path.isfile(path):
        return None   # an interactive prompt or a notebook (spawn skips the main module), or a script file
    return f"the main script {path!r} is not a file that the processes can import again"


def pool_pids(pool) -> list[int]:
    """The process ids of a ProcessPoolExecutor's workers (concurrent.futures keeps them in a private dict, read in
    this one place)."""
    return sorted(getattr(pool, "_processes", None) or {})


def spawn_pool(n: int, initializer, *initargs, what: str = "worker", fix: str = ""):
    """A ProcessPoolExecutor of `n` spawned workers (nothing of TensorFlow is copied into them), each running
    `initializer(*initargs)` after `start_worker`, all started and answering before it is returned: a pool that
    cannot start is a WorkerError within START_SECONDS naming the cause and `fix`, never a hang."""
    from concurrent.futures import TimeoutError as PoolTimeout
    from concurrent.futures.process import BrokenProcessPool

    fix = f"; fix: {fix}" if fix else ""
    why = unspawnable_main()
    if why:
        raise WorkerError(f"featcache's {what} processes cannot start: {why} (a script read from standard input?)"
                          f"{fix}, or save the script to a file")
    try:
        pool = _SpawnedPool(n, initializer, initargs)
    except OSError as e:   # a full or unwritable temporary folder
        where = "free space there or point TMPDIR at another folder"
        fix = f"{fix}, or {where}" if fix else f"; fix: {where}"
        raise WorkerError(f"featcache's {what} processes cannot start: their start arguments could not be written "
                          f"to {tempfile.gettempdir()} ({e.strerror or e}){fix}") from e
    try:   # all n started now (they start on demand), each answering, so each has read its start arguments
        with _sigint_blocked():   # inherited: a Ctrl-C as they start is not a traceback from each of them
            answered, deadline = set(), time.monotonic() + START_SECONDS
            while len(answered) < n:
                answered.update(pool.map(_pid_after, [0.05] * n, timeout=max(0.0, deadline - time.monotonic())))
        pool._remove_arguments()   # read by all: gone now, not only at shutdown (a SIGKILL never gets there)
    except (BrokenProcessPool, PoolTimeout) as e:
        workers = pool_pids(pool)   # read before shutdown forgets them
        pool.shutdown(wait=False, cancel_futures=True)
        for pid in workers:   # a worker stuck at its start
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        cause = ("one died at its start: see its error above; a script that starts them keeps its work under "
                 "`if __name__ == '__main__':`, which each of them skips as it imports the script again"
                 if isinstance(e, BrokenProcessPool) else f"they did not answer within {START_SECONDS:.0f} s")
        raise WorkerError(f"featcache's {what} processes could not start ({cause}){fix}") from e
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool


class _SpawnedPool(ProcessPoolExecutor):
    """A pool of spawned workers whose start arguments travel in a file (removed by spawn_pool once all have read
    it, else at shutdown). Passed the usual way, they go down a pipe that the parent fills while the worker
    reads; a worker that dies first (a script without a main guard) left the parent blocked for ever on arguments
    beyond the pipe's 64 KB (a cache's labels, a folder's file list)."""

    def __init__(self, n: int, initializer, initargs: tuple):
        fd, path = tempfile.mkstemp(prefix=f"featcache-pool-{os.getpid()}-", suffix=".pickle")
        self._remove_arguments = weakref.finalize(self, _remove_quietly, path)
        with os.fdopen(fd, "wb") as f:
            pickle.dump((initializer, initargs), f, protocol=pickle.HIGHEST_PROTOCOL)
        super().__init__(n, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                         initargs=(os.getpid(), path))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        self._remove_arguments()


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT blocked in this thread: processes it starts begin with it blocked (the mask survives exec), so that
    a Ctrl-C while they import (before `start_worker` ignores it) does not interrupt them. This process still
    gets it: the kernel hands it to another thread, or delivers it once unblocked."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _start(parent: int, arguments: str) -> None:
    start_worker(parent)
    with open(arguments, "rb") as f:
        initializer, initargs = pickle.load(f)
    initializer(*initargs)


# --------------------------------------------------------------------------- Keras in featcache's processes

def keras_without_tensorflow() -> None:
    """On a Keras backend other than TensorFlow, tell Keras that TensorFlow is missing. Keras imports TensorFlow
    wherever it is installed, to seed its generators (`keras.utils.set_random_seed`) and to save a model (its
    serializer checks for TensorFlow's types): 2 s and 450 MB a process here, for nothing JAX or PyTorch uses. For
    featcache's own processes (a command, a Ray worker): a notebook keeps Keras' behaviour. What needs TensorFlow
    (`export --format saved_model|onnx`) imports it itself. A Keras without this lazy module imports it as before."""
    if "tensorflow" in sys.modules:
        return
    try:
        import keras
        from keras.src.utils import module_utils
    except ImportError:
        return
    lazy = getattr(module_utils, "tensorflow", None)
    if keras.backend.backend() != "tensorflow" and lazy is not None and getattr(lazy, "_available", False) is None:
        lazy._available = False   # not asked yet: Keras' next question gets this answer


# --------------------------------------------------------------------------- native log lines

@contextlib.contextmanager
def quiet_stderr():
    """Native libraries' log lines (TensorFlow's C++ core writes straight to file descriptor 2, which
    sys.stderr cannot filter) kept in a temporary file for the block, and printed only if it raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
