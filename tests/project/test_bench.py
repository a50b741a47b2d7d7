"""The benchmarks stay runnable: their smoke or quick modes on the CPU, tiny sizes."""

import json
import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.slow
def test_gpu_bench_smoke_runs_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "benchmarks-gpu.json").read_text())
    assert {(r["size"], r["precision"]) for r in result["rows"]} >= {(32, "float32"), (64, "float32")}
    assert all(r["loop_images_per_s"] > 0 and r["bare_images_per_s"] > 0 for r in result["rows"])
    assert "| 64 px | float32 |" in (tmp_path / "benchmarks-gpu.md").read_text()


@pytest.mark.slow
def test_decode_bench_quick_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "benchmarks-decode.json").read_text())
    assert all(v["dct_images_per_s"] > 0 and v["full_images_per_s"] > 0 for v in result["decode"]["threads"].values())
    assert "loop ÷ min(decode, bare)" in (tmp_path / "benchmarks-decode.md").read_text()
