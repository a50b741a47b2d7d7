"""make bench, part 2: compute precision and decoding, side by side in one run.

- extraction loop vs an honest bare baseline (a compiled tf.function over preprocessed tensors already in
  memory: the fastest way to run the same truncated model), at float32 and at the precision `auto` picks;
- achieved GFLOP/s against the machine's peak (multiply-add chains in registers on every core, bench/peak_flops.c;
  and, for comparison, a large matrix product through TensorFlow), same precision;
- decode-only throughput (JPEG decode + resize, `--decode-workers` threads) at 32, 64 and 224 px;
- the whole dataset extracted at float32 and at `auto`, and the reference head and linear probe trained on each.

Merges its keys into docs/results/benchmarks.json, writes docs/results/benchmarks-precision.md and its section of docs/results/benchmarks.md.

    python bench/precision.py --data DIR --weights FILE [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from common import ROOT, LoopTimes, conv_gflop, fma_peak, machine, out_folder, write_sections

from featcache import backbones
from featcache.extract import extract
from featcache.sources import load_dataset


def bare_and_loop(args, precision: str, tmp: Path) -> dict:
    """Images/s of the extraction loop and of the bare compiled model on the same images, alternated."""
    import tensorflow as tf

    n = args.images
    ds = load_dataset(args.data, limit=n // 2)
    bb = backbones.build(weights=args.weights, precision=precision)
    pixels = np.concatenate([ds.train.load(0, len(ds.train), (32, 32)), ds.test.load(0, len(ds.test), (32, 32))])
    batches = [tf.constant(bb.spec.preprocess(pixels[i:i + args.batch_size].astype("float32")))
               for i in range(0, len(pixels), args.batch_size)]
    forward = tf.function(lambda t: bb.model(t, training=False))
    loops = LoopTimes()
    logging.getLogger("featcache.extract.local").addHandler(loops)
    logging.getLogger("featcache.extract.local").setLevel(logging.INFO)

    def bare():
        for x in batches:
            forward(x).numpy()

    def loop(k):
        extract(data=args.data, weights=args.weights, precision=precision, limit=n // 2, batch_size=args.batch_size,
                cache_dir=tmp / f"{precision}-{k}", progress=False)

    bare()
    loop(-1)   # warm up: model build, file system
    loops.runs.clear()
    t_bare = []
    for k in range(args.repeats):
        t0 = time.perf_counter()
        bare()
        t_bare.append(time.perf_counter() - t0)
        loop(k)
    logging.getLogger("featcache.extract.local").removeHandler(loops)
    t_loop = [seconds for _, seconds in loops.runs]
    ips_bare, ips_loop = len(pixels) / statistics.median(t_bare), len(pixels) / statistics.median(t_loop)
    # each loop is compared with the bare run just before it: this host's speed drifts by several percent
    # between minutes, more than the gap measured, so a ratio of medians taken apart mixes in that drift
    pair_ratios = [b / loop for b, loop in zip(t_bare, t_loop)]
    gflop = conv_gflop(bb.model)
    return {"precision": precision, "images": len(pixels), "bare_seconds": t_bare, "loop_seconds": t_loop,
            "bare_images_per_s": ips_bare, "loop_images_per_s": ips_loop,
            "loop_vs_bare": statistics.median(pair_ratios), "loop_vs_bare_pairs": pair_ratios,
            "gflop_per_image": gflop, "loop_gflop_per_s": gflop * ips_loop, "bare_gflop_per_s": gflop * ips_bare}


def matmul_peak(precision: str, size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of a size^3 matrix product in the compute type of `precision`: the practical peak."""
    import tensorflow as tf

    dtype = {"float32": tf.float32, "bfloat16": tf.bfloat16, "float16": tf.float16}[precision]
    a = tf.random.normal((size, size), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    mm = tf.function(lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y), tf.float32)))
    mm(a, b).numpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).numpy()
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / min(times) / 1e9


def decode_throughput(args, tmp: Path) -> dict:
    """Images/s of decoding and resizing alone, with --decode-workers threads, at 32, 64 and 224 px."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    ds = load_dataset(args.data, limit=args.decode_images)
    big = tmp / "jpeg256" / "train" / "x"   # 256 px JPEGs (CIFAR images upsampled) stand in for photo-size files
    big.mkdir(parents=True)
    (tmp / "jpeg256" / "test" / "x").mkdir(parents=True)
    for i, img in enumerate(ds.train.load(0, len(ds.train), (256, 256))):
        Image.fromarray(img).save(big / f"{i:05d}.jpg", quality=90)
        if i == 0:
            Image.fromarray(img).save(tmp / "jpeg256" / "test" / "x" / "0.jpg", quality=90)
    large = load_dataset(tmp / "jpeg256")
    workers = min(8, os.cpu_count() or 1)
    out = {"workers": workers}
    for size, split in ((32, ds.train), (64, ds.train), (224, large.train)):
        chunks = [(s, min(s + 128, len(split))) for s in range(0, len(split), 128)]
        for w in sorted({1, workers}):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(w) as pool:
                list(pool.map(lambda c: split.load(c[0], c[1], (size, size)), chunks))
            out[f"{size}px_{w}_workers_images_per_s"] = len(split) / (time.perf_counter() - t0)
    return out


SEEDS = (0, 1, 2)


def whole_dataset(args, tmp: Path, auto: str) -> dict:
    """The whole dataset extracted at float32 and at `auto` (alternated), then the reference head and probe."""
    from featcache.cache import open_cache
    from heads.train import train_head

    out = {}
    for precision in ("float32", auto):
        t0 = time.perf_counter()
        path = extract(data=args.data, weights=args.weights, precision=precision, cache_dir=tmp / "whole",
                       progress=False, force=True)
        seconds = time.perf_counter() - t0
        cache = open_cache(path)
        # the reference head over SEEDS: one seed's test accuracy moves by a few tenths of a point on its own
        heads = [train_head(path, model="dense", seed=seed, runs_dir=None, progress=False).metrics for seed in SEEDS]
        probe = train_head(path, model="linear", runs_dir=None, progress=False).metrics
        out[precision] = {"extract_seconds": seconds, "loop_seconds": cache.extract_seconds,
                          "images": cache.meta.n_train + cache.meta.n_test,
                          "head_test_accuracy": statistics.mean(h["test_accuracy"] for h in heads),
                          "head_test_accuracy_by_seed": [h["test_accuracy"] for h in heads],
                          "head_val_accuracy": statistics.mean(h["val_accuracy"] for h in heads),
                          "probe_test_accuracy": probe["test_accuracy"], "max_abs_activation": cache.max_abs_activation}
        path.unlink()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    p.add_argument("--images", type=int, default=4096, help="images of the loop-vs-bare comparison")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="bare/loop pairs of the comparison")
    p.add_argument("--decode-images", type=int, default=2048)
    p.add_argument("--quick", action="store_true", help="skip the whole-dataset extractions (smoke test)")
    args = p.parse_args()
    auto = backbones.resolve_precision("auto")
    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp:
        tmp = Path(tmp)
        compare = {prec: bare_and_loop(args, prec, tmp) for prec in dict.fromkeys(("float32", auto))}
        peaks = {prec: matmul_peak(prec) for prec in compare}
        fma = fma_peak(compare, tmp)
        decode = decode_throughput(args, tmp)
        whole = None if args.quick else whole_dataset(args, tmp, auto)
    results = {"precision_auto": auto, "extract_vs_bare_float32": compare["float32"]["loop_vs_bare"],
               "extract_vs_bare_auto": compare[auto]["loop_vs_bare"], "precision_compare": compare,
               "matmul_peak_gflop_per_s": peaks, "fma_peak_gflop_per_s": fma, "decode": decode, "machine_precision": machine()}
    if whole:
        results.update(whole_dataset=whole,
                       auto_vs_float32_extract_speedup=whole["float32"]["extract_seconds"] / whole[auto]["extract_seconds"],
                       auto_minus_float32_test_accuracy=whole[auto]["head_test_accuracy"]
                       - whole["float32"]["head_test_accuracy"])
    bench_json = args.out / "benchmarks.json"
    merged = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    merged.update(results)
    bench_json.write_text(json.dumps(merged, indent=2) + "\n")
    (args.out / "benchmarks-precision.md").write_text(report(results, " ".join(sys.argv)))
    write_sections(args.out / "benchmarks.md", summary(results, " ".join(sys.argv)))
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2))


SECTION = "6. Compute precision and decoding"


def compare_table(r: dict) -> list[str]:
    """Loop vs bare model per precision, with the GFLOP/s reached against the peaks."""
    lines = ["| precision | extraction loop (img/s) | bare compiled model (img/s) | loop ÷ bare (median of pairs) | "
             "loop GFLOP/s | FMA peak GFLOP/s (loop's share) | matmul GFLOP/s |", "|---|---|---|---|---|---|---|"]
    fma = r.get("fma_peak_gflop_per_s", {})
    for prec, c in r["precision_compare"].items():
        share = f"{fma[prec]:.0f} ({c['loop_gflop_per_s'] / fma[prec]:.0%})" if prec in fma else "n/a"
        lines.append(f"| {prec} | {c['loop_images_per_s']:.0f} | {c['bare_images_per_s']:.0f} | "
                     f"{c['loop_vs_bare']:.2f} | {c['loop_gflop_per_s']:.0f} | {share} | "
                     f"{r['matmul_peak_gflop_per_s'][prec]:.0f} |")
    return lines


def summary(r: dict, command: str) -> str:
    """The section of docs/results/benchmarks.md: the headline figures; the details are in benchmarks-precision.md."""
    auto = r["precision_auto"]
    lines = [f"## {SECTION}", "", f"`python {command}` ({time.strftime('%Y-%m-%d')}; details, method and decoding "
             "throughput in [benchmarks-precision.md](benchmarks-precision.md)). `--precision auto` chose "
             f"**{auto}** here.", "",
             *compare_table(r)]
    if "whole_dataset" in r:
        w = r["whole_dataset"]
        lines += ["", f"All 60,000 images: float32 {w['float32']['extract_seconds']:.1f} s, {auto} "
                  f"{w[auto]['extract_seconds']:.1f} s (**{r['auto_vs_float32_extract_speedup']:.2f}x**); reference "
                  f"head test accuracy (mean of seeds {', '.join(map(str, SEEDS))}) {w['float32']['head_test_accuracy']:.4f} "
                  f"vs {w[auto]['head_test_accuracy']:.4f} (**{100 * r['auto_minus_float32_test_accuracy']:+.2f} "
                  "points**)."]
    return "\n".join(lines) + "\n"


def report(r: dict, command: str) -> str:
    auto, m = r["precision_auto"], r["machine_precision"]
    lines = [f"# Compute precision and decoding ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, no GPU; TensorFlow {m.get('tensorflow', '?')}. "
             f"Measured side by side in one run by `python {command}` (part of `make bench`).", "",
             f"`--precision auto` chose **{auto}** here.", "",
             *compare_table(r)]
    lines += ["", f"Both on {r['precision_compare']['float32']['images']} CIFAR-10 JPEGs at 32 px, batch 128; the loop "
              "decodes the JPEGs, runs the model, checks and writes float16 features to HDF5; the bare model is a "
              "`tf.function` over preprocessed tensors already in memory (the fastest way to run the same truncated "
              "model), alternated with the loop; img/s are medians of the repeats, loop ÷ bare the median of the ratios of "
              "each loop to the bare run just before it (range: "
              + "; ".join(f"{p} {min(c['loop_vs_bare_pairs']):.2f}-{max(c['loop_vs_bare_pairs']):.2f}"
                          for p, c in r["precision_compare"].items()) + "). GFLOP/s counts the convolutions "
              f"({r['precision_compare']['float32']['gflop_per_image']:.3f} GFLOP per image). The peak is measured, "
              "not a datasheet figure: every core runs chains of fused multiply-adds (float32) or VDPBF16PS bfloat16 "
              "dot products in registers (`bench/peak_flops.c`, built here with the C compiler for the widest vectors "
              "the CPU has), best of 5; that is cores x FLOP per cycle x the clock the cores hold under load, which a "
              "virtual machine does not report. For comparison, the last column is a 4096x4096x4096 matrix product "
              "through TensorFlow in the same compute type, best of 5: oneDNN's convolutions here run closer to the "
              "peak than that product does.", "", "Decoding and resizing alone (images/s):", "",
              "| size | 1 thread | " + f"{r['decode']['workers']} threads |", "|---|---|---|"]
    d, workers = r["decode"], r["decode"]["workers"]
    for size in (32, 64, 224):
        one, many = d[f"{size}px_1_workers_images_per_s"], d[f"{size}px_{workers}_workers_images_per_s"]
        lines.append(f"| {size} px | {one:.0f} | {many:.0f} |")
    lines += ["", "32 and 64 px: the CIFAR-10 JPEGs (64 px: resized); 224 px: 256 px JPEGs written from upsampled "
              "CIFAR-10 images, decoded and resized to 224."]
    if "whole_dataset" in r:
        w = r["whole_dataset"]
        lines += ["", "The whole dataset (`featcache extract --force`, all 60,000 images), then the reference head "
                  f"(`train-head --head dense`, seeds {', '.join(map(str, SEEDS))}) and the linear probe on each "
                  "cache:", "",
                  "| precision | whole call (s) | loop (s) | reference head test acc (mean; by seed) | "
                  "linear probe test acc |", "|---|---|---|---|---|"]
        for prec, x in w.items():
            by_seed = ", ".join(f"{a:.4f}" for a in x["head_test_accuracy_by_seed"])
            lines.append(f"| {prec} | {x['extract_seconds']:.1f} | {x['loop_seconds']:.1f} | "
                         f"{x['head_test_accuracy']:.4f} ({by_seed}) | {x['probe_test_accuracy']:.4f} |")
        lines += ["", f"auto ÷ float32 extraction speed-up: **{r['auto_vs_float32_extract_speedup']:.2f}x**; "
                  f"reference head test accuracy auto − float32 (mean of the seeds): "
                  f"**{100 * r['auto_minus_float32_test_accuracy']:+.2f} points**."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
