"""make bench, part 3: heads on caches bigger than memory.

- Head epoch seconds on the CIFAR-10 cache, maps streamed from disk vs held in RAM (page cache warm,
  alternated, same head): the reference dense head on flattened maps, the head that needs them.
- Peak resident memory (VmHWM, its own process) of `featcache train-head` on a synthetic cache of
  `--synthetic-gb` GB with a 2 GB `--memory-budget`: once with the flatten head (maps streamed), once
  with the default head (vectors pooled once into a derived cache).

Merges its keys into docs/results/benchmarks.json and writes docs/results/benchmarks-stream.md.

    python bench/stream.py --cache CIFAR_CACHE.h5 [--synthetic-gb 12] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import ROOT, machine, out_folder, write_synthetic_cache

BUDGET = "2GB"


def epoch_seconds(cache: str, epochs: int, repeats: int) -> dict:
    """Median epoch seconds of the flatten dense head, streamed and in RAM, alternated `repeats` times."""
    from heads.train import train_head

    times = {"stream": [], "ram": []}
    for _ in range(repeats):
        for mode in times:
            r = train_head(cache, model="dense", pooling="flatten", epochs=epochs, patience=epochs, runs_dir=None,
                           progress=False, stream=mode == "stream")
            times[mode] += r.history["seconds"][1:]   # the first epoch also builds and traces: left out
    med = {mode: statistics.median(t) for mode, t in times.items()}
    return {"stream_epoch_seconds": med["stream"], "ram_epoch_seconds": med["ram"],
            "stream_vs_ram_epoch_ratio": med["stream"] / med["ram"], "epochs_timed": {m: len(t) for m, t in times.items()}}


def peak_rss(args: list[str], tmp: Path) -> tuple[int, float]:
    """(peak RSS of a train-head process, seconds)."""
    report = tmp / "peak_rss"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "peak_rss.py"), *args], cwd=ROOT,
                          env={**os.environ, "PEAK_RSS_FILE": str(report)}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"train-head failed:\n{proc.stderr[-3000:]}")
    return int(report.read_text()), time.perf_counter() - t0


def reader_peak_rss(path: Path, batches: int = 200) -> int:
    """Largest VmHWM of the streaming reader processes after `batches` training and validation-like batches.
    (Read from /proc: a spawned child's rusage starts from its parent's high-water mark.)"""
    import numpy as np

    from featcache import open_cache
    from heads.feed import CachedRows, Stream

    cache = open_cache(path)
    x = CachedRows(path, "train/features")
    y = np.zeros(len(x), np.int64)
    with Stream(x, None, y, budget=2_000_000_000) as stream:
        for positions, shuffle in ((np.arange(len(x)), True), (np.arange(0, len(x), 10), False)):   # train, "val"
            for k, _ in enumerate(stream.dataset(positions, 256, shuffle=shuffle)):
                if k == batches:
                    break
        peaks = []
        for pid in stream.reader_pids():
            status = Path(f"/proc/{pid}/status").read_text()
            peaks.append(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)
    del cache
    return max(peaks)


def big_cache(gb: float, tmp: Path) -> dict:
    shape = (8, 8, 512)   # block4_pool of VGG16 at 128 px: 64 KiB a row in float16
    n_train = int(gb * 1e9 / (2 * 8 * 8 * 512) / 1.1)
    t0 = time.perf_counter()
    path = write_synthetic_cache(tmp / "big.h5", n_train=n_train, n_test=n_train // 10, shape=shape)
    made = time.perf_counter() - t0
    common = ["train-head", "--cache", str(path), "--memory-budget", BUDGET, "--epochs", "1", "--no-progress",
              "--runs-dir", str(tmp / "runs")]
    flatten_peak, flatten_s = peak_rss(common + ["--head", "dense", "--pooling", "flatten", "--units", "64"], tmp)
    default_peak, default_s = peak_rss(common, tmp)
    worker_peak = reader_peak_rss(path)
    return {"stream_cache_bytes": path.stat().st_size, "stream_budget_bytes": 2_000_000_000,
            "stream_peak_rss_bytes": max(flatten_peak, default_peak), "flatten_peak_rss_bytes": flatten_peak,
            "flatten_worker_peak_rss_bytes": worker_peak,
            "flatten_seconds": flatten_s, "default_head_peak_rss_bytes": default_peak, "default_head_seconds": default_s,
            "synthetic_rows": n_train, "synthetic_shape": shape, "synthetic_write_seconds": made}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="the CIFAR-10 cache (make extract)")
    p.add_argument("--synthetic-gb", type=float, default=12.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.synthetic_gb, args.epochs, args.repeats = 0.05, 2, 1
    t0 = time.perf_counter()
    results = epoch_seconds(args.cache, args.epochs, args.repeats)
    with tempfile.TemporaryDirectory(prefix="featcache-stream-", dir=ROOT / "cache") as tmp:
        results.update(big_cache(args.synthetic_gb, Path(tmp)))
    results.update(stream_machine=machine(), stream_command=" ".join(sys.argv), stream_seconds=time.perf_counter() - t0)
    bench_json = args.out / "benchmarks.json"
    merged = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    merged.update(results)
    bench_json.write_text(json.dumps(merged, indent=2) + "\n")
    (args.out / "benchmarks-stream.md").write_text(report(results))
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))


def report(r: dict) -> str:
    m = r["stream_machine"]
    gb = lambda n: f"{n / 1e9:.2f} GB"   # noqa: E731
    return "\n".join([
        f"# Heads on caches bigger than memory ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, no GPU; TensorFlow {m.get('tensorflow', '?')}. "
        f"`python {r['stream_command']}` (part of `make bench`; {r['stream_seconds'] / 60:.1f} min).", "",
        "## Epoch time, streamed vs in RAM (CIFAR-10 cache, page cache warm)", "",
        "The reference dense head on flattened block3_pool maps (the head that needs maps), alternated, median "
        "epoch after the first:", "",
        "| maps | epoch (s) |", "|---|---|",
        f"| in RAM | {r['ram_epoch_seconds']:.2f} |",
        f"| streamed from the cache | {r['stream_epoch_seconds']:.2f} |", "",
        f"**stream ÷ RAM: {r['stream_vs_ram_epoch_ratio']:.2f}** (`stream_vs_ram_epoch_ratio`).", "",
        f"## Peak memory on a {gb(r['stream_cache_bytes'])} cache with a {gb(r['stream_budget_bytes'])} budget", "",
        f"Synthetic cache: {r['synthetic_rows']:,} training rows of {'x'.join(map(str, r['synthetic_shape']))} "
        f"float16 maps (a tenth as many test rows), written in {r['synthetic_write_seconds']:.0f} s. "
        "Peak resident memory (VmHWM) of `featcache train-head ... --memory-budget 2GB --epochs 1` in its own "
        "process (the streaming reader processes have their own memory: their VmHWM is read from /proc after 200 training and 200 validation batches):", "",
        "| head | how it reads the cache | peak RSS | run (s) |", "|---|---|---|---|",
        f"| dense on flattened maps (`--pooling flatten --units 64`) | maps streamed | "
        f"{gb(r['flatten_peak_rss_bytes'])} (+ {gb(r['flatten_worker_peak_rss_bytes'])} per reading process) | "
        f"{r['flatten_seconds']:.0f} |",
        f"| default (`auto`: dense and probe on GAP vectors) | pooled once into a derived cache | "
        f"{gb(r['default_head_peak_rss_bytes'])} | {r['default_head_seconds']:.0f} |", "",
        f"`stream_peak_rss_bytes` = {r['stream_peak_rss_bytes']:,} (the larger of the two), "
        f"`stream_cache_bytes` = {r['stream_cache_bytes']:,}, `stream_budget_bytes` = {r['stream_budget_bytes']:,}.", ""])


if __name__ == "__main__":
    main()
