"""Heads at every dataset size: the default head on a few hundred rows, --per-class subsets, the curve."""

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.errors import BadInputError
from heads import train as ht
from heads.provenance import Provenance
from heads.train import TrainConfig, TrainData


def backbone_like(per_class=30, n_classes=10, n_test=300, seed=0):
    """Features shaped like frozen-backbone activations: non-negative, in the thousands, a third zeros,
    classes separable but noisy, a (2, 2, 64) map per image."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1500.0, (n_classes, 2, 2, 64))

    def make(y):
        x = centres[y] * rng.lognormal(0, 0.5, (len(y), 2, 2, 64)) + rng.normal(0, 800, (len(y), 2, 2, 64))
        x[rng.random(x.shape) < 0.33] = 0
        return np.clip(x, 0, 6e4).astype(np.float16)   # within float16, as extraction guarantees

    y = np.repeat(np.arange(n_classes), per_class)
    yt = rng.integers(0, n_classes, n_test)
    return TrainData(make(y), y, make(yt), yt, tuple(f"c{i}" for i in range(n_classes)), "features",
                     provenance=Provenance(other={"synthetic": True}))


@pytest.mark.slow
def test_default_head_works_on_a_small_dataset_of_realistic_scale(tmp_path):
    """300 rows (270 for training): BatchNormalization alone never learns statistics in the thousands in a
    few steps; the default head must beat chance widely and come within a few points of the probe."""
    import keras

    data = backbone_like()
    assert float(np.abs(data.x_train).max()) > 5000
    dense = ht.train(data, TrainConfig(), runs_dir=tmp_path, progress=False)
    probe = ht.train(data, TrainConfig(model="linear"), runs_dir=None, progress=False)
    chance = 1 / 10
    assert probe.metrics["test_accuracy"] > 0.7, probe.metrics["test_accuracy"]
    assert dense.metrics["test_accuracy"] > chance + 0.5, dense.metrics
    assert dense.metrics["test_accuracy"] >= probe.metrics["test_accuracy"] - 0.05
    assert dense.metrics["best_epoch"] > 1 and dense.metrics["batch_size"] < 256
    # the standardisation lives in the saved model: loading it reproduces the reported test accuracy
    model = keras.models.load_model(dense.run_dir / "model.keras", safe_mode=True)
    pred = ht.predict(model, data.x_test, 64).argmax(1)
    assert np.mean(pred == data.y_test) == pytest.approx(dense.metrics["test_accuracy"])
    norm = model.get_layer("standardise")
    assert float(np.asarray(norm.adapt_mean).mean()) > 100   # statistics of the raw features, not (0, 1)


@pytest.mark.slow
def test_linear_probe_is_solved_with_l2_chosen_on_validation(tmp_path):
    import keras

    data = backbone_like(per_class=20)
    result = ht.train(data, TrainConfig(model="linear"), runs_dir=tmp_path, progress=False)
    h, m = result.history, result.metrics
    assert len(h["C"]) == m["epochs_run"] > 5 and m["C"] == h["C"][int(np.argmin(h["val_loss"]))]
    assert m["val_loss"] == min(h["val_loss"])
    model = keras.models.load_model(result.run_dir / "model.keras", safe_mode=True)
    pred = ht.predict(model, data.x_test, 64).argmax(1)
    assert np.mean(pred == data.y_test) == pytest.approx(m["test_accuracy"])
    assert "C=" in (result.run_dir / "classification_report.txt").read_text()


@pytest.mark.slow
def test_per_class_subset_is_exact_seeded_and_from_the_training_split_only(monkeypatch):
    y = np.repeat(np.arange(4), [50, 30, 40, 20])
    rows = ht.stratified_subset(y, 7, seed=1)
    assert np.array_equal(np.bincount(y[rows]), [7, 7, 7, 7])
    assert np.array_equal(rows, ht.stratified_subset(y, 7, seed=1))
    assert not np.array_equal(rows, ht.stratified_subset(y, 7, seed=2))
    with pytest.raises(BadInputError, match=r"--per-class 21 is more than the 20 training images of class 'd'"):
        ht.stratified_subset(y, 21, seed=0, class_names=("a", "b", "c", "d"))

    data = backbone_like(per_class=30, n_classes=4, n_test=50)
    data.x_test[:] = np.nan   # training or validation on a test row would poison the run
    seen = {}
    real = ht.split_indices
    monkeypatch.setattr(ht, "split_indices", lambda y, *a: seen.setdefault("y", y) is y and real(y, *a))
    monkeypatch.setattr(ht, "predict", lambda model, x, bs: np.eye(4)[np.zeros(len(x), int)])
    result = ht.train(data, TrainConfig(per_class=5, subset_seed=3, epochs=2), runs_dir=None, progress=False)
    assert np.array_equal(np.bincount(seen["y"]), [5, 5, 5, 5])
    assert result.metrics["n_train"] + result.metrics["n_val"] == 20 and result.metrics["n_val"] == 4
    assert np.isfinite(result.history["loss"]).all() and np.isfinite(result.history["val_loss"]).all()


def test_validation_split_of_a_tiny_training_split():
    y = np.repeat(np.arange(10), 3)   # 10% of 30 rows is 3: fewer than the 10 classes
    tr, va = ht.split_indices(y, 0.1, seed=0)
    assert np.array_equal(np.bincount(y[va]), [1] * 10) and np.array_equal(np.bincount(y[tr]), [2] * 10)
    tr, va = ht.split_indices(np.repeat(np.arange(3), 4), 0.9, seed=0)   # sklearn would raise here
    assert len(tr) == 3 and len(va) == 9
    with pytest.raises(BadInputError, match="class 'b' has 1 training image.*--per-class"):
        ht.split_indices(np.array([0, 0, 1, 2, 2]), 0.1, seed=0, class_names=("a", "b", "c"))


def test_a_class_of_one_image_gets_a_fix_that_can_work():
    # the fixes went round in a circle: "raise --per-class to 2", then "pass --per-class 1 or less"
    y, names = np.array([0] * 5 + [1] * 5 + [2]), ("a", "b", "c")
    with pytest.raises(BadInputError, match="give class 'c' at least 2 training images") as raised:
        ht.stratified_subset(y, 2, seed=0, class_names=names)
    assert "or less" not in str(raised.value)
    with pytest.raises(BadInputError, match="give that class at least 2 training images"):
        ht.split_indices(y, 0.1, seed=0, class_names=names)
    with pytest.raises(BadInputError, match="pass --per-class 5 or less"):
        ht.stratified_subset(y[:10], 6, seed=0, class_names=names[:2])


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_cli_per_class_is_recorded_and_shown(tiny_cache, tmp_path):
    r = run("train-head", "--cache", tiny_cache, "--per-class", "3", "--subset-seed", "2", "--epochs", "2",
            "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "runs" / r.stdout.strip().split("/")[-1] / "config.json").read_text())
    assert config["per_class"] == 3 and config["subset_seed"] == 2 and config["data"]["per_class"] == 3
    table = run("runs", "--runs-dir", tmp_path / "runs").stdout
    assert "3/class seed=2" in table and "tiny" in table
    too_many = run("train-head", "--cache", tiny_cache, "--per-class", "5", "--runs-dir", tmp_path / "runs")
    errors = [line for line in too_many.stderr.splitlines() if not line.startswith("WARNING: these features")]
    assert too_many.exit_code == 2 and len(errors) == 1
    assert "--per-class 5 is more than the 4 training images of class 'ant'" in too_many.stderr
    lone = run("train-head", "--cache", tiny_cache, "--per-class", "1", "--runs-dir", tmp_path / "runs")
    last = lone.stderr.splitlines()[-1]   # lowering --val-fraction cannot help: every class needs a validation row
    assert lone.exit_code == 2 and "--per-class: 2 or more" in last and "--val-fraction" not in last


@pytest.mark.slow
def test_curve_end_to_end_reads_the_cache_once(tiny_cache, tmp_path, monkeypatch):
    from featcache.cache import pooled

    reads = []
    real = pooled.pooled
    monkeypatch.setattr(pooled, "pooled", lambda cache, *a: reads.append(a) or real(cache, *a))
    r = run("curve", "--cache", tiny_cache, "--sizes", "3,all", "--repeats", "2", "--epochs", "1",
            "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.exit_code == 0, r.output
    out = tmp_path / "runs" / r.stdout.strip().split("/")[-1]
    assert sorted(p.name for p in out.iterdir()) == ["curve.json", "curve.md", "curve.png"]
    assert reads == []   # the maps fit in RAM: read once (auto's conv head trains on them), pooled in memory
    curve = json.loads((out / "curve.json").read_text())
    assert curve["sizes"] == [3, "all"] and len(curve["runs"]) == 2 * 2 * 3
    for row in curve["summary"]:
        for head in ("auto", "linear", "knn"):
            accs = [x["test_accuracy"] for x in curve["runs"]
                    if (x["per_class"] or "all") == row["per_class"] and x["head"] == head]
            assert len(accs) == 2 and row[head]["mean"] == pytest.approx(np.mean(accs))
            assert row[head]["std"] == pytest.approx(np.std(accs))
    assert [x["n_train"] + x["n_val"] for x in curve["runs"] if x["per_class"] == 3][0] == 9
    assert "| 3 |" in (out / "curve.md").read_text() and "auto chose" in (out / "curve.md").read_text()
    assert all(x["chosen"] in ("conv", "linear") for x in curve["runs"] if x["head"] == "auto")
    bad = run("curve", "--cache", tiny_cache, "--sizes", "1,x")
    assert bad.exit_code == 2 and "--sizes" in bad.stderr


@pytest.mark.slow
def test_auto_head_keeps_the_lower_validation_loss_and_tests_only_it(monkeypatch, tmp_path):
    """The default head fits the conv head (maps in RAM) and the probe on the same rows, keeps the one with the lower
    validation loss (the probe where the other is ahead by noise only: `choose`), and predicts the test split
    once, with that one."""
    import keras

    seen = []
    real = ht.predict
    monkeypatch.setattr(ht, "predict", lambda model, x, bs: seen.append(model) or real(model, x, bs))
    small = backbone_like(per_class=12)
    result = ht.train(small, TrainConfig(model="auto"), runs_dir=tmp_path, progress=False)
    m = result.metrics
    assert len(seen) == 1 and seen[0] is result.model
    losses = {name: c["val_loss"] for name, c in m["candidates"].items()}
    lowest = min(losses, key=losses.get)
    assert set(losses) == {"conv", "linear"}
    assert m["chosen"] == ("linear" if m.get("probe_kept_within_standard_errors") else lowest)
    assert m["val_loss"] == losses[m["chosen"]]
    model = keras.models.load_model(result.run_dir / "model.keras", safe_mode=True)
    pred = ht.predict(model, small.x_test, 64).argmax(1)
    assert np.mean(pred == small.y_test) == pytest.approx(m["test_accuracy"])
    from heads.reports import collect_runs

    assert collect_runs(tmp_path)[0]["model"] == f"auto ({m['chosen']})"


@pytest.mark.slow
def test_long_tail_table_end_to_end(tiny_cache, tmp_path):
    from heads.longtail import TAIL_HEADS, tail_counts

    assert list(tail_counts(100, 5, 10, "exp", np.array([4, 3, 2, 1, 0]))) == [10, 17, 31, 56, 100]
    assert list(tail_counts(100, 4, 10, "step", np.arange(4))) == [100, 100, 10, 10]
    r = run("curve", "--cache", tiny_cache, "--long-tail", "2", "--tail-max", "4", "--repeats", "1", "--epochs", "1",
            "--runs-dir", tmp_path / "runs", "--no-progress")
    assert r.exit_code == 0, r.output
    out = tmp_path / "runs" / r.stdout.strip().split("/")[-1]
    table = json.loads((out / "longtail.json").read_text())
    assert len(table["runs"]) == 2 * len(TAIL_HEADS) and [s["shape"] for s in table["summary"]] == ["exp", "step"]
    assert {x["head"]: x["class_weight"] for x in table["runs"]}["probe, unweighted"] == "none"
    assert {x["shape"]: sorted(x["counts"]) for x in table["runs"]} == {"exp": [2, 2, 4], "step": [2, 4, 4]}
    assert "| exp | 4 / 2 |" in (out / "longtail.md").read_text()
    for bad in (("--tail-max", "5"), ("--long-tail", "x"), ("--long-tail", "0.5")):
        args = ("--long-tail", "2", *bad) if bad[0] == "--tail-max" else bad
        r = run("curve", "--cache", tiny_cache, *args, "--runs-dir", tmp_path / "runs")
        assert r.exit_code == 2 and bad[0] in r.stderr, r.output


def test_curve_options_are_one_declared_set_checked_from_python_too(tiny_cache, tmp_path):
    """CurveConfig checks the curve's own options wherever they come from: sizes given as a tuple from Python
    reached the subset code unchecked (a TypeError there), and the command line refuses them before any work."""
    from featcache.errors import BadInputError
    from heads.curve import data_efficiency_curve
    from heads.longtail import long_tail_table

    runs = tmp_path / "runs"
    with pytest.raises(BadInputError, match="--sizes must be images per class"):
        data_efficiency_curve(tiny_cache, sizes=("ten",), runs_dir=runs, progress=False)
    with pytest.raises(BadInputError, match="--long-tail must be ratios of at least 1"):
        long_tail_table(tiny_cache, ratios=(0.5,), runs_dir=runs, progress=False)
    assert not runs.exists()   # nothing written

    from heads.curve import CurveConfig

    with pytest.raises(BadInputError, match="--repeats must be at least 1"):
        CurveConfig(repeats=0)
    assert CurveConfig(sizes=(5, None)).sizes == (5, None) and CurveConfig(long_tail="10,50").long_tail == (10, 50)


def where_maps(counts, n_test_per_class=20, seed=0):
    """(4, 4, 8) maps whose class is where a feature fires, not how strongly: class c lights cell c with the same
    values for every class, so globally pooled features look alike across classes and only a head that keeps the
    map's cells can tell them apart. `counts`: training images of each class."""
    rng = np.random.default_rng(seed)

    def make(y):
        x = rng.gamma(2.0, 50.0, (len(y), 16, 8))
        x[np.arange(len(y)), y] += 2000 + rng.normal(0, 200, (len(y), 8))
        return x.reshape(len(y), 4, 4, 8).astype(np.float16)

    y = np.repeat(np.arange(len(counts)), counts)
    yt = np.repeat(np.arange(len(counts)), n_test_per_class)
    return TrainData(make(y), y, make(yt), yt, tuple(f"c{i}" for i in range(len(counts))), "features",
                     provenance=Provenance(other={"synthetic": True}))


def pooled_like_today(data: TrainData) -> TrainData:
    """The same images as globally average-pooled vectors (what auto trained on before the conv head)."""
    gap = lambda x: x.astype(np.float32).mean(axis=(1, 2))   # noqa: E731
    return replace(data, x_train=gap(data.x_train), x_test=gap(data.x_test), map_shape=data.x_train.shape[1:],
                   pooled_by="gap")


@pytest.mark.slow
def test_auto_on_maps_in_ram_tries_the_conv_head_which_sees_where_a_feature_fired():
    data = where_maps([40] * 4)
    m = ht.train(data, TrainConfig(model="auto"), runs_dir=None, progress=False).metrics
    assert set(m["candidates"]) == {"conv", "linear"} and m["chosen"] == "conv", m["candidates"]
    assert m["candidates"]["conv"]["options"] == {"filters": 512 // 16}
    assert m["test_accuracy"] > 0.9, m
    today = ht.train(pooled_like_today(data), TrainConfig(model="auto"), runs_dir=None, progress=False).metrics
    assert set(today["candidates"]) == {"dense", "linear"} and today["test_accuracy"] < 0.6   # pooled: near chance


@pytest.mark.slow
@pytest.mark.parametrize("counts", [[5] * 10, [40, 30, 20, 12, 8, 6, 5, 4, 4, 3]], ids=["5-per-class", "long-tail"])
def test_auto_on_maps_chooses_as_well_as_on_pooled_vectors_on_small_and_long_tailed_splits(counts):
    """Where the maps hold nothing GAP misses, the larger grid costs no accuracy: on 5 images a class and on a
    long tail (13x), auto on the maps tests within a few points of auto on pooled vectors (its grid before)."""
    rng = np.random.default_rng(1)
    full = backbone_like(per_class=max(counts), n_test=400, seed=2)
    keep = np.concatenate([rng.choice(np.flatnonzero(full.y_train == c), n, replace=False)
                           for c, n in enumerate(counts)])
    data = replace(full, x_train=full.x_train[keep], y_train=full.y_train[keep])
    new = ht.train(data, TrainConfig(model="auto"), runs_dir=None, progress=False).metrics
    old = ht.train(pooled_like_today(data), TrainConfig(model="auto"), runs_dir=None, progress=False).metrics
    assert set(new["candidates"]) == {"conv", "linear"}
    assert new["test_accuracy"] >= old["test_accuracy"] - 0.05, (new, old)


def test_auto_grid_follows_what_the_rows_are():
    """The conv head joins auto's grid only on one layer's maps held in RAM, with filters that keep its flattened
    output near 512 values; pooled vectors, concatenated layers and 1x1 maps keep the dense head."""
    base = where_maps([2] * 4)

    def grid(data):
        return [(c.model, c.filters if c.model == "conv" else None) for c in ht.auto_grid(TrainConfig(model="auto"),
                                                                                          data)]

    maps = lambda shape: replace(base, x_train=np.zeros((8, *shape), np.float16))   # noqa: E731
    assert grid(base) == [("conv", 32), ("linear", None)]
    assert grid(maps((8, 8, 4)))[0] == ("conv", 8) and grid(maps((2, 2, 4)))[0] == ("conv", 128)
    assert grid(maps((1, 1, 4)))[0] == ("dense", None)
    assert grid(pooled_like_today(base))[0] == ("dense", None)
    assert grid(replace(base, x_train=np.zeros((8, 64), np.float32)))[0] == ("dense", None)


def test_auto_reads_maps_only_where_they_fit_in_memory(tiny_cache):
    """`train_head`'s auto loads one layer's maps when they fit the memory budget (and not --stream); else the
    pooled vectors, never streamed maps (the probe needs its rows in RAM, the dense head pools first)."""
    from heads.data import data_from_caches

    def loaded(**kw):
        d = data_from_caches([tiny_cache], "gap", None, prepooled=True, maps_if_they_fit=True, **kw)
        return d.feed.mode, d.x_train.ndim

    assert loaded() == ("ram", 4)
    assert loaded(memory_budget="1KB") == ("pooled", 2)
    assert loaded(stream=True) == ("pooled", 2)


@pytest.mark.slow
def test_a_per_class_subset_of_maps_reads_its_own_rows_only(tiny_cache, tmp_path, monkeypatch):
    """--per-class on maps that fit in RAM: only the subset's rows are read, not the whole training split first
    (auto read all of CIFAR-10's block3_pool maps, 0.45 GB more memory, for 100 images a class)."""
    from featcache.cache.read import FeatureCache, open_cache

    whole = []
    real = FeatureCache.load
    monkeypatch.setattr(FeatureCache, "load", lambda self, split, *a, **k: whole.append(split) or real(self, split, *a, **k))
    result = ht.train_head(tiny_cache, per_class=2, epochs=2, units=(8,), runs_dir=tmp_path, progress=False)
    feed = json.loads((result.run_dir / "config.json").read_text())["data"]["feed"]
    assert "train" not in whole and feed["mode"] == "ram" and feed["subset_read"], (whole, feed)
    assert result.metrics["n_train"] + result.metrics["n_val"] == 2 * len(open_cache(tiny_cache).class_names)


def test_auto_keeps_the_probe_unless_another_head_is_ahead_by_more_than_noise():
    """On a small validation split a larger head's lower loss may be noise (at 25 images a class one subset of
    CIFAR-10 chose the conv head by validation loss and tested 2 points under the probe): the probe stays unless
    the other is ahead by more than one standard error of their row-by-row difference."""
    from heads.fit import Fitted

    rng = np.random.default_rng(0)
    probe_rows = rng.gamma(2.0, 0.5, 30)
    noise = rng.normal(0, 0.5, 30)

    def fitted(model, rows):
        return Fitted(TrainConfig(model=model), None, None, {"val_loss": [float(rows.mean())]}, 0, 0.0, rows)

    probe = fitted("linear", probe_rows)
    noisy = fitted("conv", probe_rows - 0.02 + noise - noise.mean())   # lower on average, by far less than noise
    clear = fitted("conv", probe_rows * 0.5)
    assert noisy.val_loss < probe.val_loss
    assert ht.choose([noisy, probe]) is probe and ht.choose([clear, probe]) is clear
    assert ht.choose([noisy, fitted("dense", probe_rows + 1)]) is noisy   # no probe: the lowest loss
    assert ht.choose([replace(noisy, val_rows=None), probe]).config.model == "conv"   # no rows to compare
    diverged = fitted("linear", np.full(30, np.nan))
    assert ht.choose([noisy, diverged]) is noisy   # a probe whose loss is not finite never stays
