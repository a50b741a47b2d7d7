"""featcache.system: progress where stderr is not a terminal, memory and disk probes."""

import logging
import os
import signal

import psutil
import pytest

from featcache import system
from featcache.errors import BadInputError


def test_progress_on_a_non_terminal_stderr_is_a_log_line_every_few_seconds(caplog, monkeypatch):
    monkeypatch.setattr(system.sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="featcache.system")
    bar = system.progress_bar(1000, unit="img", desc="extract")
    assert isinstance(bar, system.LogProgress)
    bar.every = 0.0   # a line at every update, instead of every 10 s
    bar.update(250)
    bar.close()
    assert "extract: 250/1,000 img" in caplog.text and "img/s" in caplog.text


def test_log_progress_takes_postfix_as_tqdm_does(caplog, monkeypatch):
    # a training epoch passed a dict positionally, as tqdm allows, and the log-line bar refused it
    monkeypatch.setattr(system.sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="featcache.system")
    bar = system.progress_bar(10, unit="epoch", desc="train")
    bar.every = 0.0
    bar.set_postfix({"loss": "0.500"}, refresh=False, val_loss="0.600")
    bar.update(1)
    assert "(loss=0.500, val_loss=0.600)" in caplog.text


def test_no_progress_means_no_lines(caplog, monkeypatch):
    monkeypatch.setattr(system.sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="featcache.system")
    bar = system.progress_bar(10, unit="img", desc="extract", enabled=False)
    bar.update(10)
    bar.close()
    assert "extract" not in caplog.text


def test_free_space_is_checked_against_the_whole_need(tmp_path):
    with pytest.raises(BadInputError, match="needs .* MB more .* but .* free; fix: pass another"):
        system.check_free_space(tmp_path, 1 << 62, what="the copy", fix="pass another -o")
    system.check_free_space(tmp_path, 1 << 62, have=1 << 62, fix="unused")   # all of it written already


def test_available_memory_is_a_positive_number_of_bytes():
    assert system.available_memory() > 1 << 20


@pytest.mark.slow
def test_a_script_on_standard_input_fails_at_once_with_decoding_processes_and_runs_with_auto(tmp_path):
    """Spawned processes re-import the main script; one read from stdin has no file, so they died at start and the
    parent waited for ever (7 minutes, then killed). Now: one line within seconds, and `auto` decodes in threads."""
    import subprocess
    import sys

    from tests.support import write_folder

    data = write_folder(tmp_path / "d", n_train=2, n_test=1)
    script = (f"from featcache.extract import extract\n"
              f"extract(data={str(data)!r}, weights='random', cache_dir={str(tmp_path / 'c')!r}, progress=False, "
              f"decoder={{decoder!r}}, decode_workers=6)\nprint('done')\n")
    for decoder, ok in (("processes", False), ("auto", True)):
        p = subprocess.run([sys.executable, "-"], input=script.format(decoder=decoder), capture_output=True,
                           text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if ok:
            assert p.returncode == 0 and "done" in p.stdout, p.stderr[-2000:]
        else:
            assert p.returncode == 1 and "decoding processes cannot start" in p.stderr \
                and "standard input" in p.stderr and "--decoder threads" in p.stderr, p.stderr[-2000:]


def test_a_script_without_a_main_guard_gets_one_line_not_a_hang(tmp_path):
    """A script's code outside `if __name__ == "__main__":` runs again in each spawned process, which dies at
    its start. With start arguments larger than a pipe's buffer (a cache's labels, a folder's file list) the
    parent blocked for ever writing them to the dead process; now the pool fails within seconds, saying why."""
    import subprocess
    import sys

    script, temp = tmp_path / "unguarded.py", tmp_path / "temp"
    temp.mkdir()
    script.write_text("from featcache import system\n"
                      "pool = system.spawn_pool(2, len, bytes(1 << 20), what='test')\n"
                      "pool.shutdown()\nprint('started')\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(system.Path(system.__file__).parents[1]),
                            "TMPDIR": str(temp)})
    assert p.returncode == 1 and "started" not in p.stdout, p.stderr[-2000:]
    assert "test processes could not start (one died at its start" in p.stderr \
        and "if __name__ == '__main__':" in p.stderr, p.stderr[-2000:]
    assert not list(temp.iterdir()), "the start arguments' file is removed"
    # each process the script started inherited TMPDIR; one killed just now may take a moment to go
    left = [q for q in psutil.process_iter() if _environ(q).get("TMPDIR") == str(temp)]
    assert not psutil.wait_procs(left, timeout=10)[1], f"processes of the script left: {left}"


def _environ(process) -> dict:
    try:
        return process.environ()
    except (psutil.Error, OSError):
        return {}


def test_a_file_is_hashed_once_while_unchanged(tmp_path, monkeypatch):
    import builtins
    import hashlib

    path = tmp_path / "w.h5"
    path.write_bytes(b"a" * 3000)
    opened = []
    real = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    first = system.file_sha256(path)
    assert system.file_sha256(path) == first == hashlib.sha256(b"a" * 3000).hexdigest() and len(opened) == 1
    stat = path.stat()
    path.write_bytes(b"b" * 3000)   # the same size, its times set back: still hashed again (ctime moved)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert system.file_sha256(path) == hashlib.sha256(b"b" * 3000).hexdigest() and len(opened) == 2


def test_the_one_file_lock_waits_says_so_reenters_and_dies_with_its_holder(tmp_path, caplog):
    """system.file_lock serves the cache's lock and the search folder's: another holder makes a process wait (and
    say so), a reentrant lock taken again inside its block goes straight in, and a killed holder frees it."""
    import subprocess
    import sys
    import time

    from featcache.system import file_lock, is_locked

    lock = tmp_path / "x.lock"
    with file_lock(lock, reentrant=True):
        with file_lock(lock, reentrant=True):   # would wait for ever if it took the flock again
            assert is_locked(lock)
    assert not is_locked(lock)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from featcache.system import file_lock\n"
                               f"with file_lock({str(lock)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_locked(lock)
        holder.kill()
        holder.wait(timeout=10)
        t0 = time.monotonic()
        with caplog.at_level("WARNING"), file_lock(lock, waiting="waiting for the other one"):
            pass
        assert time.monotonic() - t0 < 5 and "waiting for the other one" not in caplog.text   # freed by the kill
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert holder.poll() is not None   # no process left


def test_a_ctrl_c_dropped_where_python_ignores_exceptions_is_raised_at_the_next_check(capsys):
    class Dropped:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)   # the handler raises here, where Python prints and drops it

    before = signal.getsignal(signal.SIGINT)
    with system.interrupts_kept():
        Dropped()
        with pytest.raises(KeyboardInterrupt):
            system.stop_if_interrupted()
    system.stop_if_interrupted()   # forgotten once the block ends
    assert signal.getsignal(signal.SIGINT) is before
    assert "KeyboardInterrupt" not in capsys.readouterr().err


def test_a_pool_whose_start_arguments_cannot_be_written_says_where_and_what_to_do(tmp_path, monkeypatch):
    from featcache.errors import WorkerError

    monkeypatch.setattr(system.tempfile, "tempdir", str(tmp_path / "missing"))
    with pytest.raises(WorkerError, match=r"test processes cannot start: their start arguments could not be "
                                          r"written to .*missing .*; fix: decode in threads, or .*TMPDIR"):
        system.spawn_pool(1, len, b"", what="test", fix="decode in threads")


def _sigint_blocked_at_start(_=None) -> bool:
    with open("/proc/self/status") as f:
        blocked = int(next(line.split()[1] for line in f if line.startswith("SigBlk:")), 16)
    return bool(blocked & (1 << (signal.SIGINT - 1)))


def test_pool_workers_begin_with_ctrl_c_blocked_and_the_caller_keeps_it():
    # a Ctrl-C while reading or decoding processes started printed a KeyboardInterrupt traceback from each of them,
    # raised in their imports before start_worker ignores it
    pool = system.spawn_pool(2, int)
    try:
        assert all(pool.map(_sigint_blocked_at_start, range(4)))
        assert len(system.pool_pids(pool)) == 2
        left = list(system.Path(system.tempfile.gettempdir()).glob(f"featcache-pool-{os.getpid()}-*"))
        assert not left, "start arguments removed once all read them, not at shutdown (a SIGKILL never gets there)"
    finally:
        pool.shutdown()
    assert not _sigint_blocked_at_start(), "the caller's own mask is restored"
