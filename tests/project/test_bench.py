"""The benchmarks stay runnable: their smoke or quick modes on the CPU, tiny sizes."""

import json
import subprocess
import sys

import pytest

from tests.support import ROOT


def run_bench(script: str, mode: str, out) -> tuple[dict, str]:
    """Run bench/<script>.py in `mode` (--smoke, --quick) writing into `out`: its JSON result and its page."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), mode, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    name = f"benchmarks-{script}"
    return json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text()


def test_a_bench_refuses_an_out_folder_it_cannot_make_before_it_runs(tmp_path):
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "head_epoch.py"), "--rows", "512", "--epochs", "2",
                           "--out", str(tmp_path / "a-file" / "results")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot make the folder" in done.stderr and "a-file" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_gpu_bench_smoke_runs_on_cpu(tmp_path):
    result, page = run_bench("gpu", "--smoke", tmp_path)
    assert {(r["size"], r["precision"]) for r in result["rows"]} >= {(32, "float32"), (64, "float32")}
    assert all(r["loop_images_per_s"] > 0 and r["bare_images_per_s"] > 0 for r in result["rows"])
    assert "| 64 px | float32 |" in page


@pytest.mark.slow
def test_decode_bench_quick_runs(tmp_path):
    result, page = run_bench("decode", "--quick", tmp_path)
    assert all(v["dct_images_per_s"] > 0 and v["full_images_per_s"] > 0 for v in result["decode"]["threads"].values())
    assert "loop ÷ min(decode, bare)" in page


@pytest.mark.slow
def test_head_epoch_bench_runs_small(tmp_path):
    out = tmp_path / "results" / "new"   # made by the script, before its run
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "head_epoch.py"), "--rows", "2048", "--epochs", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (out / "benchmarks.md").read_text()
    assert "## 14. Where a dense head's epoch goes (Keras on tensorflow)" in page
    # six models (Keras' own Adam and mixed bfloat16 among them) and the products alone, each against the floor
    assert page.count("x |") == 7
    assert "| 512 |" in page and "ms per step" in page   # the reference head by batch size


@pytest.mark.slow
def test_stacked_heads_bench_runs_small(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "stacked_heads.py"), "--rows", "1024", "--epochs", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "benchmarks.md").read_text()
    assert "## 17. Stacking a pass's heads of one architecture (Keras on tensorflow)" in page
    assert page.count("x |") == 3   # each set of heads, side by side against its floor


@pytest.mark.slow
def test_epoch_start_bench_runs_small(tmp_path):
    from tests.support import bench_script

    cache = bench_script("common").write_synthetic_cache(tmp_path / "synthetic.h5", n_train=600, n_test=50,
                                                         shape=(2, 2, 16))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "epoch_start.py"), "--cache", str(cache), "--epochs",
                           "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "benchmarks.md").read_text()
    assert "## 16. The start of an epoch: tf.data's autotuner off and on" in page
    assert "| autotuner off (featcache) |" in page and "| autotuner on, AUTOTUNE parallelism and read-ahead |" in page


@pytest.mark.slow
def test_restarts_bench_runs_small(tmp_path):
    from tests.support import bench_script

    cache = bench_script("common").write_synthetic_cache(tmp_path / "synthetic.h5", n_train=600, n_test=50,
                                                         shape=(2, 2, 16))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "restarts.py"), "--cache", str(cache), "--per-class",
                           "20", "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "benchmarks.md").read_text()
    assert "## 18. When a pass goes on without its stopped heads: three rules (Keras on tensorflow)" in page
    rows = [line for line in page.splitlines() if line.startswith("| 20 per class |")]
    assert len(rows) == 3 and len({row.split(" | ")[-1] for row in rows}) == 1   # the same best val loss each rule
