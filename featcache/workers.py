"""What every worker process featcache spawns (image decoders, cache readers) does when it starts.

Ctrl-C reaches the whole process group; only the main process handles it (it stops its pools), so
workers ignore SIGINT. A main process killed outright (SIGTERM, SIGKILL, OOM) cannot stop them, and
a pool worker never sees its parent go (it holds its own end of the task queue), so each worker
watches its parent and exits when it is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time


def start_worker(parent: int, poll_seconds: float = 1.0) -> None:
    """Call first in a worker's initializer; `parent` is the pid of the process that started the pool
    (passed in: a worker that starts after its parent died is already someone else's child)."""
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
