"""Where featcache meets the machine: memory, disk, folders, package versions, progress, worker processes.

Every probe of the operating system lives here, so the layers above ask one question ("how much
memory may I use?", "does this fit the disk?") in one way. Nothing here knows about caches or heads.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

from featcache.errors import BadInputError

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


def check_free_space(folder: Path, need: int, *, have: int = 0, what: str = "the cache", fix: str) -> None:
    """Refuse before any work when `need` bytes (of which `have` are written already) cannot fit `folder`."""
    free = shutil.disk_usage(folder).free
    if need - have > free:
        raise BadInputError(f"{what} needs {need / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free; "
                            f"fix: {fix}")


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

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

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


def spawn_pool(n: int, initializer, *initargs):
    """A ProcessPoolExecutor of `n` spawned workers (nothing of TensorFlow is copied into them), each running
    `initializer(*initargs)` after `start_worker`."""
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                               initargs=(os.getpid(), initializer, initargs))


def _start(parent: int, initializer, initargs) -> None:
    start_worker(parent)
    initializer(*initargs)


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
