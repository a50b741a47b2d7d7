"""make bench, part 4: the Ray engine against the local one, side by side in one run, and the join.

- the same extraction (the whole dataset, or the first --limit rows of each split) by the local engine
  (1 process, 2 threads) and by the Ray engine (--workers 2: 2 actors x 1 thread on a local cluster):
  whole-call seconds (Ray's includes starting the cluster and building the model in each worker), the
  workers' own compute time (from the shard files), and whether the two caches are equal row for row;
- the default head trained on each cache (seed 0): test accuracies;
- the join of 1,281 synthetic shards (ImageNet's training split in 1,000-row shards has as many):
  verifying them, writing the virtual cache, opening it, reading it back.

Merges its keys into docs/results/benchmarks.json and writes docs/results/benchmarks-scaling.md.

    python bench/scaling.py --data DIR --weights FILE [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from common import ROOT, machine, out_folder

import featcache
from featcache import cache as store
from featcache.cache import shards as join
from featcache.cache import write as cache_write
from featcache.extract import extract
from featcache.extract import plan as planning


def engines(args, tmp: Path) -> dict:
    opts = dict(data=args.data, weights=args.weights, limit=args.limit, progress=False)
    t = time.perf_counter()
    local = featcache.open_cache(extract(**opts, cache_dir=tmp / "local", decode_workers=2))
    local_s = time.perf_counter() - t
    t = time.perf_counter()
    ray = featcache.open_cache(extract(**opts, cache_dir=tmp / "ray", engine="ray", workers=2))
    ray_s = time.perf_counter() - t
    shard_s = [featcache.open_cache(ROOT / ray.path.parent / s["file"]).extract_seconds for s in ray.shards]
    images = local.meta.n_train + local.meta.n_test
    equal = local.meta.key == ray.meta.key and all(
        np.array_equal(a, b) for split in ("train", "test") for a, b in zip(local.load(split), ray.load(split)))
    from heads.train import train_head

    # the default head (what `featcache train-head` trains), same seed, on each cache
    accuracy = {name: train_head(c.path, seed=0, runs_dir=None, progress=False).metrics["test_accuracy"]
                for name, c in (("local", local), ("ray", ray))}
    return {"images": images, "head_test_accuracy": accuracy, "shards": len(ray.shards), "shard_rows": ray.shards[0]["stop"] - ray.shards[0]["start"],
            "local_seconds": local_s, "local_loop_seconds": local.extract_seconds, "ray_seconds": ray_s,
            "ray_worker_seconds_sum": sum(shard_s),
            "ray_vs_local_throughput": local_s / ray_s,
            "ray_workers_vs_local_loop_throughput": local.extract_seconds / (sum(shard_s) / 2),
            "equal_row_for_row": bool(equal)}


def join_cost(tmp: Path, n_shards: int = 1281, rows: int = 16) -> dict:
    """Verify + join + open + read of `n_shards` small shards (the join is metadata: its cost follows the
    number of shards, not their size)."""
    meta = store.CacheMeta(
        backbone="vgg16", layer="block3_pool", weights="random:seed=0", weights_source="random",
        input_shape=(32, 32, 3), feature_shape=(4, 4, 256), preprocessing="caffe", resize="bilinear",
        dtype="float16", dataset_name="synthetic", dataset_source="synthetic", dataset_fingerprint="0",
        limit=0, n_train=n_shards * rows, n_test=rows, versions={}, created="now")
    final = tmp / "join" / store.cache_filename(meta)
    shards = join.folder(final)
    shards.mkdir(parents=True)
    units = planning.units(meta, rows)
    rng = np.random.default_rng(0)
    for u in units:
        n = u.stop - u.start
        other = "test" if u.split == "train" else "train"
        with cache_write.create(join.shard_path(shards, u), meta, labels={u.split: np.zeros(n, np.int64),
                                                                    other: np.zeros(0, np.int64)},
                          paths={}, class_names=["a"], batch_size=rows, shard=u) as f:
            f[store.dataset_path(meta, u.split, meta.layer)][...] = rng.standard_normal((n, 4, 4, 256))
            f["progress"][0 if u.split == "train" else 1] = n
            cache_write.finish(f, max_abs_activation=1.0)
    t = time.perf_counter()
    verified = join.verify(meta, units, shards)
    verify_s = time.perf_counter() - t
    t = time.perf_counter()
    join.join(final, meta, verified, labels={"train": np.zeros(meta.n_train, np.int64),
                                             "test": np.zeros(meta.n_test, np.int64)}, paths={}, class_names=["a"])
    join_s = time.perf_counter() - t
    t = time.perf_counter()
    cache = featcache.open_cache(final)
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    x, _ = cache.load("train")
    read_s = time.perf_counter() - t
    return {"shards": len(units), "rows_per_shard": rows, "verify_seconds": verify_s, "join_seconds": join_s,
            "open_seconds": open_s, "read_seconds": read_s, "read_mb_per_s": x.nbytes / 1e6 / read_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--limit", type=int, default=None, help="first N rows of each split (default: all)")
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp:
        tmp = Path(tmp)
        results = {"ray_vs_local": engines(args, tmp), "join_1281_shards": join_cost(tmp),
                   "machine_scaling": machine()}
        print(json.dumps(results, indent=2), flush=True)
    bench_json = args.out / "benchmarks.json"
    merged = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    merged.update(results)
    bench_json.write_text(json.dumps(merged, indent=2) + "\n")
    (args.out / "benchmarks-scaling.md").write_text(report(results, " ".join(sys.argv)))


def report(r: dict, command: str) -> str:
    e, j, m = r["ray_vs_local"], r["join_1281_shards"], r["machine_scaling"]
    return "\n".join([
        f"# Ray engine vs local engine, and the join ({time.strftime('%Y-%m-%d')})", "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, no GPU; TensorFlow {m.get('tensorflow', '?')}. "
        f"Measured side by side in one run by `python {command}` (part of `make bench`).", "",
        f"The same extraction ({e['images']:,} images, VGG16 to block3_pool at 32 px, float16 storage), first by the "
        "local engine (one process: 2 decoding threads, TensorFlow's 2 threads), then by `--engine ray --workers 2` "
        f"(a local Ray cluster; 2 actors of 1 thread each, {e['shards']} shards of {e['shard_rows']:,} rows):", "",
        "| engine | whole call (s) | compute (s) | images/s (whole call) |", "|---|---|---|---|",
        f"| local, 1 process x 2 threads | {e['local_seconds']:.1f} | {e['local_loop_seconds']:.1f} (loop) | "
        f"{e['images'] / e['local_seconds']:.0f} |",
        f"| ray, 2 workers x 1 thread | {e['ray_seconds']:.1f} | {e['ray_worker_seconds_sum'] / 2:.1f} (shard time "
        f"per worker) | {e['images'] / e['ray_seconds']:.0f} |", "",
        f"Ray ÷ local throughput, whole call (Ray's includes starting the cluster and a model per worker): "
        f"**{e['ray_vs_local_throughput']:.2f}**; workers' compute ÷ local loop: "
        f"**{e['ray_workers_vs_local_loop_throughput']:.2f}**. Caches equal row for row: "
        f"**{'yes' if e['equal_row_for_row'] else 'NO'}**. The default head (`featcache train-head --seed 0`) on each: "
        f"test accuracy {e['head_test_accuracy']['local']:.4f} (local) and {e['head_test_accuracy']['ray']:.4f} "
        "(ray).", "",
        f"Join of {j['shards']:,} synthetic shards ({j['rows_per_shard']} rows each; the join writes metadata only, "
        "so its cost follows the number of shards, not their size):", "",
        "| verify every shard | write the virtual cache | open it (checks each shard's size) | read the train split |",
        "|---|---|---|---|",
        f"| {j['verify_seconds']:.2f} s | {j['join_seconds']:.2f} s | {j['open_seconds']:.3f} s | "
        f"{j['read_seconds']:.2f} s ({j['read_mb_per_s']:.0f} MB/s from the page cache) |", ""])


if __name__ == "__main__":
    main()
