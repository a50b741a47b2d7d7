"""`featcache search`: trials on features read once, scored on validation only; the winner alone tested;
an Optuna study in SQLite that a killed search continues."""

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache.cli import main
from tests.support import ROOT

QUICK = ("--epochs", "3", "--patience", "1", "--units", "8", "--no-progress")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_grid_search_tests_only_its_winner_and_records_every_trial(tiny_cache, tmp_path, monkeypatch):
    from featcache.cache import pooled
    from heads import train as ht

    tested, reads = [], []
    real_predict, real_pooled = ht.predict, pooled.pooled
    monkeypatch.setattr(ht, "predict", lambda model, x, b: tested.append(len(x)) or real_predict(model, x, b))
    monkeypatch.setattr(pooled, "pooled", lambda cache, *a: reads.append(a) or real_pooled(cache, *a))
    r = run("search", "--cache", tiny_cache, "--param", "head=dense|linear", "--param", "dropout=0.1|0.3",
            "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 0, r.output
    folder = Path(r.stdout.strip())
    assert folder == tmp_path / "search-search"
    record = json.loads((folder / "search.json").read_text())
    assert record["sampler"] == "grid" and len(record["trials"]) == 4
    assert {(t["params"]["model"], t["params"]["dropout"]) for t in record["trials"]} == {
        ("dense", 0.1), ("dense", 0.3), ("linear", 0.1), ("linear", 0.3)}
    done = [t for t in record["trials"] if t["state"] == "complete"]
    assert record["best_trial"] == min(done, key=lambda t: t["value"])["trial"]
    assert not any("test" in key for t in record["trials"] for key in t)   # trials: validation figures only
    assert tested == [6]   # one look at the test split (3 classes x 2 images), for the winner
    assert reads == [("block3_pool", "gap")]   # the cache's vectors read once for every trial and the winner
    winner = folder / record["winner"]["run"]
    metrics = json.loads((winner / "metrics.json").read_text())
    assert metrics["test_accuracy"] == record["winner"]["test_accuracy"] and (winner / "model.keras").exists()
    md = (folder / "search.md").read_text()
    assert "Only the winner was evaluated on the test split" in md and md.count("| complete |") == len(done)
    assert (folder / "history.png").exists() and (folder / "slice.png").exists()
    table = run("runs", "--runs-dir", tmp_path).stdout
    assert "search-search" in table and record["winner"]["run"] in table


@pytest.mark.parametrize("together, trial_fits", [(1, 2), (2, 0)])   # 2 trials: one by one, or in one pass
def test_a_search_tests_its_winning_trials_head_without_training_it_again(tiny_cache, tmp_path, monkeypatch,
                                                                          together, trial_fits):
    from heads import train as ht

    fits, real = [], ht.fit_and_choose
    monkeypatch.setattr(ht, "fit_and_choose", lambda *a, **k: fits.append(1) or real(*a, **k))
    r = run("search", "--cache", tiny_cache, "--head", "dense", "--param", "dropout=0.1|0.3", "--together", together,
            "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 0, r.output
    folder = Path(r.stdout.strip())
    record = json.loads((folder / "search.json").read_text())
    assert len(fits) == trial_fits   # the trials' fits only: the winner is not fitted once more
    best = next(t for t in record["trials"] if t["trial"] == record["best_trial"])
    assert record["winner"]["val_loss"] == best["val_loss"] and record["winner"]["trained_again"] is False
    metrics = json.loads((folder / record["winner"]["run"] / "metrics.json").read_text())
    assert metrics["test_accuracy"] == record["winner"]["test_accuracy"] and metrics["val_loss"] == best["val_loss"]
    assert "(the head its trial trained)" in (folder / "search.md").read_text()


@pytest.mark.parametrize("together", [1, 2])
def test_a_diverging_trial_fails_alone_and_the_search_goes_on(tiny_cache, tmp_path, together):
    r = run("search", "--cache", tiny_cache, "--head", "dense", "--param", "lr=0.001|1e30", "--together", together,
            "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 0, r.output
    folder = Path(r.stdout.strip())
    record = json.loads((folder / "search.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"{c} in search.json: not strict JSON"))
    states = {t["params"]["lr"]: t["state"] for t in record["trials"]}
    assert states == {0.001: "complete", 1e30: "fail"} and record["winner"]["params"]["lr"] == 0.001


def test_search_md_lists_finished_trials_before_pruned_ones():
    from heads.trials import _markdown

    rows = [{"trial": 0, "params": {"lr": 0.1}, "value": 0.5, "val_accuracy": 0.8, "epochs": 2, "state": "pruned",
             "seconds": 1.0},
            {"trial": 1, "params": {"lr": 0.01}, "value": 0.6, "val_accuracy": 0.7, "epochs": 9, "state": "complete",
             "seconds": 3.0}]
    record = {"name": "s", "objective": "val_loss", "sampler": "grid", "pruner": "median", "best_trial": 1,
              "winner": {"params": {"lr": 0.01}, "run": "r", "trained_again": False, "test_accuracy": 0.7}}
    table = [line for line in _markdown(rows, record, 0).splitlines() if line.startswith("| ") and "|" in line[2:]]
    assert "| complete |" in table[1] and "| pruned |" in table[2]   # a pruned trial's value is a partial one


def test_a_search_run_again_does_not_test_its_winner_again(tiny_cache, tmp_path, monkeypatch):
    from heads import train as ht

    tested, real_predict = [], ht.predict
    monkeypatch.setattr(ht, "predict", lambda model, x, b: tested.append(len(x)) or real_predict(model, x, b))
    search = ("search", "--cache", tiny_cache, "--head", "dense", "--param", "dropout=0.1|0.3", "--runs-dir", tmp_path,
              *QUICK)
    first = run(*search)
    assert first.exit_code == 0, first.output
    folder = Path(first.stdout.strip())
    record = json.loads((folder / "search.json").read_text())
    again = run(*search)   # every trial done: nothing to run, the same winner
    assert again.exit_code == 0, again.output
    assert tested == [6]   # one look at the test split in all
    assert [p.name for p in folder.glob("*-winner*")] == [record["winner"]["run"]]
    assert json.loads((folder / "search.json").read_text())["winner"] == record["winner"]


def test_a_search_continued_with_another_space_is_refused_in_one_line(tiny_cache, tmp_path):
    import optuna

    first = run("search", "--cache", tiny_cache, "--head", "dense", "--param", "dropout=0.1|0.3", "--runs-dir",
                tmp_path, *QUICK)
    assert first.exit_code == 0, first.output
    db = f"sqlite:///{tmp_path / 'search-search' / 'study.db'}"
    before = len(optuna.load_study(study_name="search", storage=db).trials)
    for other in (("--param", "units=8|16"), ("--param", "dropout=0.1:0.3")):   # another name; another kind
        r = run("search", "--cache", tiny_cache, "--head", "dense", *other, "--runs-dir", tmp_path, *QUICK)
        assert r.exit_code == 2 and "was started with the space dropout=0.1|0.3" in r.stderr, r.output
        assert "Traceback" not in r.stderr and len(optuna.load_study(study_name="search", storage=db).trials) == before


def test_a_search_continued_on_another_cache_or_with_other_fixed_options_is_refused(tiny_cache, tmp_path):
    """Its trials and the new ones were ranked in one table, and search.json described them all by the new
    cache and options (a winner trained on block3_pool recorded as trained on block2_pool)."""
    import optuna

    from tests.support import bench_script

    search = ("search", "--head", "dense", "--param", "dropout=0.1|0.3", "--runs-dir", tmp_path, *QUICK)
    first = run(*search, "--cache", tiny_cache)
    assert first.exit_code == 0, first.output
    db = f"sqlite:///{tmp_path / 'search-search' / 'study.db'}"
    before = len(optuna.load_study(study_name="search", storage=db).trials)
    other = bench_script("common").write_synthetic_cache(tmp_path / "other.h5", n_train=40, n_test=10, shape=(2, 2, 8))
    for change, said in ((("--cache", other), "caches "), (("--cache", tiny_cache, "--epochs", "2"), "--epochs 3 then, 2 now")):
        r = run(*search, *change)
        assert r.exit_code == 2 and "was started with another setting" in r.stderr and said in r.stderr, r.output
        assert "Traceback" not in r.stderr and len(optuna.load_study(study_name="search", storage=db).trials) == before
    again = run(*search, "--cache", tiny_cache, "--refit", "--pruner", "none")   # neither changes a trial
    assert again.exit_code == 0, again.output


def test_a_refitted_winner_is_recorded_and_reported_as_refitted(tiny_cache, tmp_path):
    # search.md said "the head its trial trained" and search.json nothing, of a winner refitted on train + validation
    r = run("search", "--cache", tiny_cache, "--head", "dense", "--param", "dropout=0.1|0.3", "--refit",
            "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 0, r.output
    winner = json.loads((tmp_path / "search-search" / "search.json").read_text())["winner"]
    report = (tmp_path / "search-search" / "search.md").read_text()
    assert winner["refit"]["rows"] > 0 and winner["trained_again"], winner
    assert f"refitted on training + validation ({winner['refit']['rows']} rows)" in report, report
    assert "the head its trial trained" not in report, report


def test_a_searched_probe_on_streamed_maps_is_refused_before_any_trial(tiny_cache, tmp_path):
    # it stopped the whole search at the first probe trial, with other trials done or running
    r = run("search", "--cache", tiny_cache, "--param", "head=linear|dense", "--pooling", "flatten", "--stream",
            "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 2 and "needs its training rows in memory" in r.stderr \
        and "leave linear out of the searched heads" in r.stderr, r.output
    assert _states(tmp_path / "search-search" / "study.db") == []
    ok = run("search", "--cache", tiny_cache, "--param", "head=linear|dense", "--stream", "--runs-dir",
             tmp_path / "gap", *QUICK)   # pooled vectors are never streamed
    assert ok.exit_code == 0, ok.output


def test_a_batch_refused_for_its_data_leaves_no_trial_running(tiny_cache, tmp_path):
    import optuna

    r = run("search", "--cache", tiny_cache, "--head", "dense", "--param", "dropout=0.1|0.3", "--per-class", "1",
            "--runs-dir", tmp_path, *QUICK)   # one image per class: no validation split
    assert r.exit_code == 2 and "1 training image" in r.stderr, r.output
    db = f"sqlite:///{tmp_path / 'search-search' / 'study.db'}"
    states = [t.state.name for t in optuna.load_study(study_name="search", storage=db).trials]
    assert states and "RUNNING" not in states, states   # failed, not left for a rerun to wait on


def test_a_grid_no_larger_than_together_says_the_median_pruner_prunes_nothing(tiny_cache, tmp_path):
    grid = ("search", "--cache", tiny_cache, "--head", "dense", "--param", "dropout=0.1|0.2|0.3|0.4", *QUICK)
    r = run(*grid, "--runs-dir", tmp_path / "a")   # four points, --together 8 by default
    assert r.exit_code == 0 and "nothing will be pruned" in r.stderr, r.output
    r = run(*grid, "--together", "2", "--runs-dir", tmp_path / "b")
    assert r.exit_code == 0 and "nothing will be pruned" not in r.stderr, r.output


@pytest.mark.parametrize("together", [1, 2])
def test_auto_trials_try_the_conv_head_as_train_head_auto_does(tiny_cache, tmp_path, monkeypatch, together):
    # the search read pooled vectors for auto trials, so their conv candidate never saw the maps
    from heads import train as ht

    grids, real = [], ht.auto_grid
    monkeypatch.setattr(ht, "auto_grid", lambda *a, **k: grids.append([c.model for c in real(*a, **k)]) or real(*a, **k))
    r = run("search", "--cache", tiny_cache, "--param", "dropout=0.1|0.3", "--together", together, "--runs-dir",
            tmp_path, *QUICK)   # --head auto, the default
    assert r.exit_code == 0, r.output
    assert grids and all("conv" in g for g in grids), grids


def test_a_winner_kept_in_one_process_is_not_carried_to_another():
    import pickle

    from heads.trials import Kept

    kept = Kept()
    kept.offer(0, 0.9, "trial 0", "val_loss")
    kept.offer(1, float("nan"), "trial 1", "val_loss")   # a failed trial is never the winner
    kept.offer(2, 0.5, "trial 2", "val_loss")
    kept.offer(3, 0.7, "trial 3", "val_loss")
    assert kept.of(2) == "trial 2" and kept.of(3) is None
    assert pickle.loads(pickle.dumps(kept)).of(2) is None   # a Ray actor's copy: its winner is trained again
    by_accuracy = Kept()
    for n, value in enumerate((0.6, 0.8, 0.7)):
        by_accuracy.offer(n, value, f"trial {n}", "val_accuracy")
    assert by_accuracy.of(1) == "trial 1"


def test_searchers_sharing_a_node_hold_maps_within_their_share_of_the_memory_budget(tiny_cache, tmp_path,
                                                                                     monkeypatch):
    # Ray actors on one node each see the same free memory: each taking the whole budget would hold k times it
    import pickle

    from heads import feed
    from heads import search as hs
    from heads.config import TrainConfig
    from heads.trial import SearchData
    from heads.trials import Searcher, SearchJob

    conv = TrainConfig(model="conv")
    maps = SearchData([tiny_cache]).get(conv)[0].feed.maps_bytes
    monkeypatch.setattr(feed, "default_budget", lambda: feed.RAM_FACTOR * maps)   # the maps just fit all of it
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    job = SearchJob(SearchData([tiny_cache]), [hs.parse_param("dropout=0.1|0.2")], conv, hs.SearchConfig(), "grid",
                    tmp_path)
    alone = Searcher(job)   # the local engine: the process's whole budget
    assert alone.ready() is None and alone.job.data.get(conv)[0].feed.mode == "ram"
    on_ray = Searcher(pickle.loads(pickle.dumps(job)), 1)   # an actor given 1 of its node's 4 CPUs
    fed = on_ray.job.data.get(conv)[0].feed
    assert on_ray.ready() is None and fed.mode == "stream" and fed.memory_budget_bytes == feed.RAM_FACTOR * maps // 4


def test_bad_search_options_are_one_line_errors(tiny_cache, tmp_path):
    for args, says in ((("--param", "nonsense=1|2"), "--param must be NAME="),
                       (("--param", "dropout=0.5:0.1"), "low < high"),
                       (("--param", "lr=1e-4:1e-2", "--sampler", "grid"), "--sampler grid needs"),
                       (("--param", "dropout=0.1|3"), "--dropout must be in [0, 1)"),
                       (("--param", "units=abc"), "not a list of layer sizes"),
                       (("--param", "refit=true|false"), "pass --refit to refit the winner"),
                       (("--param", "per-class=5|10"), "fix: pass --per-class once, for every trial"),
                       (("--param", "dropout=0.1|0.2", "--pruner", "none", "--timeout", "0.001"), "fix: a longer --timeout"),
                       (("--param", "dropout=0.1|0.2", "--storage", "nosuch://x"), "cannot open the study storage"),
                       ((), "at least one --param")):
        r = run("search", "--cache", tiny_cache, *args, "--runs-dir", tmp_path)
        assert r.exit_code == 2 and says in r.stderr, (args, r.output)
        assert len([line for line in r.stderr.splitlines() if not line.startswith("WARNING")]) == 1, (args, r.stderr)


def test_search_options_are_refused_before_any_cache_is_built(image_folder, cache_dir, tmp_path):
    """The search's own options are one declared set (SearchConfig), checked with the training options before any
    work: a local search given --workers refuses at once, where it used to extract the cache first."""
    r = run("search", "--data", image_folder, "--weights", "random", "--param", "dropout=0.1|0.3", "--workers", "2",
            "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 2 and "--ray-address and --workers need --engine ray" in r.stderr, r.output
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_the_search_command_takes_its_options_from_their_declaration():
    import click

    from heads.search import search_options

    params = {p.name: p for p in main.get_command(click.Context(main), "search").params}
    for f in search_options():
        assert params[f.name].help == f.metadata["help"], f.name
        assert params[f.name].default == f.default, f.name


@pytest.mark.slow
def test_run_search_takes_its_config_objects_from_python(tiny_cache, tmp_path):
    from heads.config import TrainConfig
    from heads.search import SearchConfig, parse_param
    from heads.trials import run_search

    params = [parse_param("dropout=0.1|0.3")]
    fixed = TrainConfig(model="dense", epochs=2, patience=1, units=(8,))
    folder = run_search(tiny_cache, params, search=SearchConfig(name="py", pruner="none"), config=fixed,
                        runs_dir=tmp_path, progress=False)
    record = json.loads((folder / "search.json").read_text())
    assert record["name"] == "py" and record["fixed"]["units"] == [8] and len(record["trials"]) == 2
    with pytest.raises(TypeError, match="inside the SearchConfig"):
        run_search(tiny_cache, params, search=SearchConfig(), trials=3, runs_dir=tmp_path)


@pytest.mark.slow
def test_a_search_without_a_trial_count_runs_until_its_timeout(tiny_cache, tmp_path):
    from heads.search import parse_param
    from heads.trials import run_search

    started = time.monotonic()
    folder = run_search(tiny_cache, [parse_param("dropout=0.1:0.5")], trials=None, timeout=2, model="dense",
                        epochs=2, patience=1, units=(8,), pruner="none", together=2, runs_dir=tmp_path, progress=False)
    record = json.loads((folder / "search.json").read_text())
    assert len(record["trials"]) >= 2 and all(t["state"] == "complete" for t in record["trials"])
    assert time.monotonic() - started < 120   # batches stop being started at the timeout


@pytest.mark.slow
def test_space_file_and_ranges(tiny_cache, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('[params]\nunits = ["4", "8,4"]\nlr = {low = 1e-4, high = 1e-2, log = true}\n')
    r = run("search", "--cache", tiny_cache, "--space", space, "--head", "dense", "--trials", "3",
            "--pruner", "none", "--name", "ranges", "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "search-ranges" / "search.json").read_text())
    assert record["sampler"] == "tpe" and len(record["trials"]) == 3
    assert all(1e-4 <= t["params"]["lr"] <= 1e-2 and t["params"]["units"] in ("4", "8,4") for t in record["trials"])


@pytest.mark.slow
def test_a_search_leaves_the_callers_warning_filters_as_they_were(tiny_cache, tmp_path):
    # a notebook that runs a search keeps seeing its own warnings (Optuna's were silenced process-wide)
    import warnings

    before = list(warnings.filters)
    r = run("search", "--cache", tiny_cache, "--param", "dropout=0.1|0.3", "--head", "dense", "--pruner", "none",
            "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 0, r.output
    assert warnings.filters == before


@pytest.mark.slow
@pytest.mark.parametrize("stop, rerun_at_once", [(signal.SIGKILL, False), (signal.SIGKILL, True),
                                                  (signal.SIGINT, True)])
def test_a_killed_search_continues_from_its_finished_trials(tiny_cache, tmp_path, stop, rerun_at_once):
    # run again at once, before the killed trials' heartbeats were stale, a search left them running and stopped
    # short of its trials; Ctrl-C left them running too
    import optuna

    grace = 15 if rerun_at_once else 2   # a rerun at once starts (imports) well within it
    code = (f"import sys; import heads.search as s; s.HEARTBEAT_S, s.GRACE_S = 1, {grace}\n"
            "from featcache.cli import main; sys.exit(main())")
    args = [sys.executable, "-c", code, "search", "--cache", tiny_cache, "--param", "dropout=0.1|0.2|0.3|0.4",
            "--head", "dense", "--epochs", "100", "--patience", "100", "--units", "8", "--pruner", "none",
            "--together", "2", "--runs-dir", str(tmp_path), "--no-progress"]   # two batches of two trials
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    db = f"sqlite:///{tmp_path / 'search-search' / 'study.db'}"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:   # until one batch is done and the next one asked
            time.sleep(0.2)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]   # ended before it could be killed
            states = _states(tmp_path / "search-search" / "study.db")
            if states.count("COMPLETE") == 2 and states.count("RUNNING") == 2:
                break
        else:
            pytest.fail("the search never started its second batch")
        time.sleep(0.5)
        os.killpg(proc.pid, stop)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    left = [t.state.name for t in optuna.load_study(study_name="search", storage=db).trials]
    # killed mid-batch; interrupted, its batch is failed at once and the command says how to go on
    assert left.count("RUNNING" if stop == signal.SIGKILL else "FAIL") == 2 and left.count("COMPLETE") == 2, left
    if stop == signal.SIGINT:
        stderr = proc.stderr.read().decode()
        assert proc.returncode == 130 and "rerun the same command" in stderr, stderr[-3000:]
    if not rerun_at_once:
        time.sleep(3)   # past the grace period: the killed trial's heartbeat is stale
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    trials = optuna.load_study(study_name="search", storage=db).trials
    complete = sorted(t.params["dropout"] for t in trials if t.state.name == "COMPLETE")
    assert complete == [0.1, 0.2, 0.3, 0.4]   # every grid point, the interrupted one re-run
    assert [t.state.name for t in trials].count("FAIL") == 2   # the killed batch, failed by its stale heartbeats
    record = json.loads((tmp_path / "search-search" / "search.json").read_text())
    assert record["winner"]["run"] and Path(again.stdout.strip()) == tmp_path / "search-search"


def _tags(folder: Path) -> set:
    """The summary tags and plugin names written under `folder` (TensorBoard event files, read back)."""
    import tensorflow as tf

    out = set()
    for events in folder.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                out |= {value.tag, value.metadata.plugin_data.plugin_name}
    return out


@pytest.mark.slow
def test_runs_and_search_trials_write_tensorboard_logs_with_hparams(tiny_cache, tmp_path):
    r = run("train-head", "--cache", tiny_cache, "--head", "dense", "--runs-dir", tmp_path / "runs", *QUICK)
    assert r.exit_code == 0, r.output
    run_dir = Path(r.stdout.strip())
    assert {"epoch_loss", "epoch_accuracy"} <= _tags(run_dir / "tensorboard")   # Keras' per-epoch scalars
    assert (run_dir / "tensorboard" / "validation").is_dir()
    assert not list((tmp_path / "runs").glob(".tensorboard-*"))   # moved into the run, nothing left behind
    r = run("search", "--cache", tiny_cache, "--head", "dense", "--param", "dropout=0.1|0.3", "--runs-dir",
            tmp_path, *QUICK)
    assert r.exit_code == 0, r.output
    logs = Path(r.stdout.strip()) / "tensorboard"
    assert "hparams" in _tags(logs) and sorted(p.name for p in logs.glob("trial-*")) == ["trial-0", "trial-1"]
    trial = _tags(logs / "trial-0")
    assert {"hparams", "val_loss", "val_accuracy", "epoch_loss"} <= trial


def test_a_probe_run_has_no_empty_tensorboard_folder(tiny_cache, tmp_path):
    r = run("train-head", "--cache", tiny_cache, "--head", "linear", "--runs-dir", tmp_path, "--no-progress")
    assert r.exit_code == 0, r.output
    assert not (Path(r.stdout.strip()) / "tensorboard").exists() and not list(tmp_path.glob(".tensorboard-*"))


@pytest.mark.slow
def test_the_layer_set_of_a_several_layer_cache_is_a_search_parameter(image_folder, cache_dir, tmp_path,
                                                                       monkeypatch):
    from heads import data as hd

    r = run("extract", "--data", image_folder, "--weights", "random", "--layer", "block2_pool,block3_pool",
            "--no-progress")
    assert r.exit_code == 0, r.output
    cache = r.stdout.strip()
    widths, real = {}, hd.data_from_caches
    monkeypatch.setattr(hd, "data_from_caches", lambda caches, pooling, layers, **kw: widths.setdefault(
        layers, real(caches, pooling, layers, **kw)))
    r = run("search", "--cache", cache, "--param", "layers=block2_pool|block3_pool|block2_pool,block3_pool",
            "--head", "dense", "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 0, r.output
    record = json.loads(Path(r.stdout.strip(), "search.json").read_text())
    assert sorted(t["params"]["layers"] for t in record["trials"]) == [
        "block2_pool", "block2_pool,block3_pool", "block3_pool"]
    # each layer set read once, pooled: VGG16's block2 has 128 channels, block3 256, both 384
    assert {k: v.x_train.shape[-1] for k, v in widths.items()} == {
        ("block2_pool",): 128, ("block3_pool",): 256, ("block2_pool", "block3_pool"): 384}
    r = run("search", "--cache", cache, "--param", "layers=block3_pool|block9_pool", "--runs-dir", tmp_path, *QUICK)
    assert r.exit_code == 2 and "no cache given holds block9_pool" in r.stderr
    assert not (tmp_path / "search-search" / "tensorboard" / "trial-3").exists()   # refused before any trial


@pytest.mark.slow
def test_two_processes_share_one_study(tiny_cache, tmp_path):
    import optuna

    args = [sys.executable, "-m", "featcache.cli", "search", "--cache", tiny_cache, "--param", "dropout=0.0:0.5",
            "--sampler", "random", "--trials", "8", "--head", "dense", "--epochs", "20", "--patience", "20",
            "--units", "8", "--pruner", "none", "--together", "2", "--runs-dir", str(tmp_path), "--no-progress"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'search-search' / 'study.db'}")
    ended = sorted((t.datetime_start, t.datetime_complete) for t in study.trials if t.state.name == "COMPLETE")
    assert len(ended) == 8   # --trials counts the study's trials in all (asked for under the study's lock)
    assert any(b[0] < a[1] for a, b in zip(ended, ended[1:])), "no two trials ran at once: not two processes"
    assert len({t.params["dropout"] for t in study.trials}) == len(study.trials)   # no trial sampled twice


@pytest.mark.slow
def test_a_grid_point_another_process_started_is_not_run_again(tiny_cache, tmp_path, monkeypatch):
    """Two searches sharing a grid: once every point had been started, Optuna's grid sampler ran a point that
    another process was still running a second time (issue 32)."""
    from heads import search as hs

    monkeypatch.setattr(hs, "HEARTBEAT_S", 1)   # it waits for the other's trial as long as a dead one's takes
    monkeypatch.setattr(hs, "GRACE_S", 2)      # to be failed, then leaves it to its live process

    grid = ("--param", "dropout=0.1|0.2", "--param", "lr=0.001|0.01")
    params = [hs.parse_param(grid[1]), hs.parse_param(grid[3])]
    folder = tmp_path / "search-search"
    folder.mkdir()
    other = hs.make_study(folder, "search", params, sampler="grid", pruner="none", objective="val_loss",
                          storage=None, seed=0)
    elsewhere = other.ask()   # another process's trial, still running on its grid point
    running = {p.name: hs.suggest(elsewhere, p) for p in params}
    r = run("search", "--cache", tiny_cache, *grid, "--head", "dense", "--pruner", "none", "--seed", "7",
            "--runs-dir", tmp_path, *QUICK)   # another seed: the grid's order must not depend on it
    assert r.exit_code == 0, r.output
    record = json.loads(Path(r.stdout.strip(), "search.json").read_text())
    done = [t["params"] for t in record["trials"] if t["state"] == "complete"]
    assert len(done) == 3 and {str(v) for v in running.values()} != set() and all(
        {k: float(v) for k, v in d.items()} != running for d in done), (done, running)
    assert len(record["trials"]) == 4   # the three run here and the one running elsewhere; none skipped shows


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_engine_gives_the_local_figures_of_a_grid_and_leaves_no_process(tiny_cache, tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'featcache[ray]')")
    from tests.support import Descendants, assert_all_gone

    monkeypatch.setitem(sys.modules, "ray.tune", None)   # searchers on the distributor's actors: no Ray Tune

    grid = ("search", "--cache", tiny_cache, "--param", "dropout=0.1|0.3", "--param", "lr=0.001|0.01", "--head",
            "dense", "--pruner", "none", *QUICK)
    r = run(*grid, "--runs-dir", tmp_path / "local")
    assert r.exit_code == 0, r.output
    local = json.loads(Path(r.stdout.strip(), "search.json").read_text())
    with Descendants(os.getpid()) as seen:
        r = run(*grid, "--runs-dir", tmp_path / "ray", "--engine", "ray", "--together", "2")   # 2 searchers, 2 each
    assert r.exit_code == 0, r.output
    assert_all_gone(seen.seen)
    on_ray = json.loads(Path(r.stdout.strip(), "search.json").read_text())
    assert on_ray["engine"] == "ray" and len(on_ray["trials"]) == 4 and seen.seen   # Ray processes did run

    def figures(record):
        return {tuple(sorted(t["params"].items())): (t["value"], t["val_accuracy"], t["epochs"], t["state"])
                for t in record["trials"]}

    for key, (value, accuracy, epochs, state) in figures(local).items():
        ray_value, ray_accuracy, ray_epochs, ray_state = figures(on_ray)[key]
        assert ray_value == pytest.approx(value, rel=1e-4) and (ray_accuracy, ray_epochs, ray_state) == (
            accuracy, epochs, state)
    assert on_ray["winner"]["params"] == local["winner"]["params"]
    assert sorted(p.name for p in (Path(r.stdout.strip()) / "tensorboard").glob("trial-*")) == [
        f"trial-{i}" for i in range(4)]
    r = run(*grid, "--runs-dir", tmp_path / "bad", "--workers", "2")
    assert r.exit_code == 2 and "--workers need --engine ray" in r.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_a_ray_search_on_streamed_maps_gives_the_local_figures_and_leaves_no_process(tiny_cache, tmp_path):
    # searchers on Ray stream maps (reader processes inside an actor) as the local engine does
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'featcache[ray]')")
    from tests.support import Descendants, assert_all_gone

    grid = ("search", "--cache", tiny_cache, "--head", "conv", "--stream", "--param", "dropout=0.1|0.3", "--pruner",
            "none", "--together", "1", *QUICK)
    records = {}
    for engine in ("local", "ray"):
        with Descendants(os.getpid()) as seen:
            r = run(*grid, "--runs-dir", tmp_path / engine, "--engine", engine,
                    *(("--workers", "2") if engine == "ray" else ()))
        assert r.exit_code == 0, r.output
        assert_all_gone(seen.seen)
        records[engine] = json.loads(Path(r.stdout.strip(), "search.json").read_text())
        winner = json.loads(Path(r.stdout.strip(), records[engine]["winner"]["run"], "config.json").read_text())
        assert winner["data"]["feed"]["mode"] == "stream"
    assert {str(t["params"]): t["value"] for t in records["ray"]["trials"]} == pytest.approx(
        {str(t["params"]): t["value"] for t in records["local"]["trials"]}, rel=1e-4)
    assert records["ray"]["winner"]["test_accuracy"] == records["local"]["winner"]["test_accuracy"]


def test_a_bad_memory_budget_is_refused_before_any_trial(tiny_cache, tmp_path):
    r = run("search", "--cache", tiny_cache, "--param", "dropout=0.1|0.3", "--memory-budget", "2XB", "--runs-dir",
            tmp_path / "runs", *QUICK)
    assert r.exit_code == 2 and "--memory-budget must be a size like 2GB" in r.stderr
    assert not (tmp_path / "runs").exists()


def _states(db: Path) -> list:
    """The study's trial states, read-only (Optuna's own loading would create the tables a search is creating)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            return [row[0] for row in c.execute("SELECT state FROM trials")]
    except sqlite3.Error:   # not created yet
        return []


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_a_ray_search_whose_driver_was_killed_runs_to_its_end_again_and_leaves_no_process(tiny_cache, tmp_path):
    """The driver killed mid-batch: its Ray processes are stopped by the next run (recorded in the search folder),
    the killed batch's trials are failed by their stale heartbeats and run again, and every grid point ends."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'featcache[ray]')")
    import psutil

    from heads.search import GRACE_S
    from tests.support import Descendants, assert_all_gone

    args = [sys.executable, "-m", "featcache.cli", "search", "--cache", tiny_cache, "--param",
            "dropout=0.1|0.2|0.3|0.4", "--head", "dense", "--epochs", "100", "--patience", "100", "--units", "8",
            "--pruner", "none", "--together", "2", "--engine", "ray", "--workers", "1", "--runs-dir", str(tmp_path),
            "--no-progress"]   # one searcher, two batches of two trials
    db = tmp_path / "search-search" / "study.db"
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with Descendants(first.pid) as watch:
        deadline = time.monotonic() + 300
        # into the second batch: its two trials asked (a fixed second was too short on a loaded machine)
        while _states(db).count("COMPLETE") < 2 or _states(db).count("RUNNING") < 2:
            if first.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        watch.poll()
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert _states(db).count("COMPLETE") == 2 and _states(db).count("RUNNING") == 2, _states(db)
    time.sleep(GRACE_S + 2)   # past the grace period: the killed batch's heartbeats are stale
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with Descendants(os.getpid(), exclude=before) as rerun:
        again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(_states(db)) == ["COMPLETE"] * 4 + ["FAIL"] * 2, _states(db)
    assert_all_gone({**watch.seen, **rerun.seen})   # the killed driver's cluster too, stopped by the rerun


@pytest.mark.parametrize("order", ["best first", "worst first"])
def test_asha_judges_trials_that_reach_a_rung_together_by_value_not_by_order(tmp_path, order):
    # the heads of a pass report one epoch together: Optuna's SuccessiveHalvingPruner kept every head when they
    # reported worst first and one when best first

    from heads import search as hs

    study = hs.make_study(tmp_path, "s", [hs.parse_param("dropout=0.1:0.5")], sampler="random", pruner="asha",
                          objective="val_loss", storage=None, seed=0)
    trials = [study.ask() for _ in range(8)]
    reporting = range(8) if order == "best first" else range(7, -1, -1)
    live, pruned = set(range(8)), {}
    for epoch in range(9):
        now = [i for i in reporting if i in live]
        for i in now:
            trials[i].report(1.0 + 0.01 * i - 0.001 * epoch, epoch)   # trial 0 best at every epoch
        for i in now:
            if trials[i].should_prune():
                live.discard(i)
                pruned[i] = epoch
    assert pruned == {**{i: 2 for i in range(2, 8)}, 1: 8}   # the best 8 // 4 at epoch 2, then 2 // 4 (one) at 8


def test_asha_in_one_pass_keeps_the_trials_best_at_its_rung(tiny_cache, tmp_path):
    import optuna

    r = run("search", "--cache", tiny_cache, "--head", "dense", "--param", "dropout=0.1|0.2|0.3|0.4", "--pruner",
            "asha", "--together", "4", "--runs-dir", tmp_path, "--epochs", "4", "--patience", "5", "--units", "8",
            "--no-progress")
    assert r.exit_code == 0, r.output
    folder = Path(r.stdout.strip())
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{folder / 'study.db'}")
    at_rung = {t.number: t.intermediate_values[2] for t in study.trials}   # epoch 3 (counted from 0: 2)
    assert [t.number for t in study.trials if t.state.name == "COMPLETE"] == [min(at_rung, key=at_rung.get)]
    record = json.loads((folder / "search.json").read_text())
    pruned = [t for t in record["trials"] if t["pruned"]]
    assert len(pruned) == 3
    # a pruned trial's figures are those of the epoch it was pruned at, whose loss is its value (they came from
    # the best epoch, before early stopping's first counted epoch the first one)
    assert all(t["value"] == t["val_loss"] and t["epochs"] == 3 for t in pruned), pruned


def test_a_median_pruner_that_can_prune_nothing_says_so(caplog):
    # all trials fitted together finish together: the median pruner never has a finished trial to compare with
    from heads.search import SearchConfig

    with caplog.at_level(logging.WARNING, logger="heads.search"):
        SearchConfig(trials=4, together=4)
    assert "nothing will be pruned" in caplog.text and "--together" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heads.search"):
        SearchConfig(trials=24, together=8)
        SearchConfig(trials=4, together=4, pruner="asha")
    assert caplog.text == ""
