"""featcache.cluster: the one distributor of work split into tasks, its local twin, and worker planning (the Ray
side runs in tests/integration/test_ray.py)."""

import os

import pytest

from featcache.cluster import distribute
from featcache.errors import BadInputError


class Doubler:
    """A worker as `distribute` builds one: once, from args_for(threads); ready(); run(*task)."""

    built = []

    def __init__(self, threads, error=None):
        Doubler.built.append(threads)
        self.error = error

    def ready(self):
        return self.error

    def run(self, value, offset=0):
        return 2 * value + offset


def test_the_local_twin_builds_one_worker_and_runs_the_tasks_in_order():
    Doubler.built = []
    with distribute(Doubler, lambda threads: (threads,), [(1,), (2, 10), (3,)], engine="local") as done:
        assert list(done) == [2, 14, 6]
    assert Doubler.built == [len(os.sched_getaffinity(0))]


def test_a_worker_that_cannot_start_stops_the_run_before_any_task():
    started = []

    def tasks():
        started.append(True)
        yield (1,)

    with pytest.raises(BadInputError, match="no backbone"):
        with distribute(Doubler, lambda t: (t, BadInputError("no backbone")), tasks(), engine="local") as done:
            list(done)
    assert started == []


def test_an_unknown_engine_is_one_line():
    with pytest.raises(BadInputError, match="engine must be one of local, ray, got 'spark'"):
        with distribute(Doubler, lambda t: (t,), [], engine="spark"):
            pass
