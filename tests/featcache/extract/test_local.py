"""The local engine's decoding workers: processes give the rows threads give, and none outlives the run."""

import os

import numpy as np
import pytest

import featcache
from featcache.errors import BadInputError
from featcache.extract import ExtractSpec, extract
from featcache.extract import local as engine


@pytest.mark.slow
def test_decoding_processes_give_the_rows_threads_give_and_are_stopped(image_folder, tmp_path, monkeypatch):
    pids = []
    start = engine.decode_processes

    def recorded(n, splits):
        ctx = start(n, splits)
        if not n:
            return ctx
        pool = ctx.__enter__()
        original = pool.submit

        def submit(*a, **kw):
            future = original(*a, **kw)
            pids.extend(p for p in pool._processes if p not in pids)
            return future
        pool.submit = submit

        class Context:
            def __enter__(self):
                return pool

            def __exit__(self, *exc):
                return ctx.__exit__(*exc)
        return Context()

    monkeypatch.setattr(engine, "decode_processes", recorded)
    opts = dict(data=image_folder, weights="random", batch_size=4, views=2, decode_workers=3, progress=False)
    a = featcache.open_cache(extract(**opts, decoder="threads", cache_dir=tmp_path / "threads"))
    assert pids == []
    b = featcache.open_cache(extract(**opts, decoder="processes", cache_dir=tmp_path / "processes"))
    assert 1 <= len(pids) <= 3
    for pid in pids:   # shut down and reaped when the extraction returns
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert a.meta.key == b.meta.key
    for split in ("train", "test"):
        for x, y in zip(a.load(split), b.load(split)):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.load_views(), b.load_views())


def test_decoder_choice_is_checked():
    with pytest.raises(BadInputError, match="--decoder must be one of auto, threads, processes"):
        ExtractSpec(data="x", decoder="fibers")
