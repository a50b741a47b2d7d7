"""featcache.system: progress where stderr is not a terminal, memory and disk probes."""

import logging

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


def test_no_progress_means_no_lines(caplog, monkeypatch):
    monkeypatch.setattr(system.sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="featcache.system")
    bar = system.progress_bar(10, unit="img", desc="extract", enabled=False)
    bar.update(10)
    bar.close()
    assert "extract" not in caplog.text


def test_free_space_is_checked_against_the_whole_need(tmp_path):
    with pytest.raises(BadInputError, match="needs .* GB but .* free; fix: pass another"):
        system.check_free_space(tmp_path, 1 << 62, what="the copy", fix="pass another -o")
    system.check_free_space(tmp_path, 1 << 62, have=1 << 62, fix="unused")   # all of it written already


def test_available_memory_is_a_positive_number_of_bytes():
    assert system.available_memory() > 1 << 20
