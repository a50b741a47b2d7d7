"""make bench: speed, size and memory of featcache, measured side by side; writes docs/results/benchmarks.{md,json}.

Every comparison is a ratio of two things timed in the same run, alternating A, B, A, B..., and
reported as the ratio of medians, because these machines are noisy. Absolute figures are only
meaningful with the machine they came from, which the report names.

    python bench/run.py --data DIR --weights FILE --cache cache/NAME.h5 [--out docs/results]
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
from common import (
    ROOT,
    LoopTimes,
    alternate,
    conv_gflop,
    epoch_seconds,
    machine,
    out_folder,
    peak_rss,
    timed,
    write_sections,
)

from featcache import backbones as bb
from featcache import cache as store
from featcache.cache import write as cache_write
from featcache.extract import extract
from featcache.sources import load_dataset
from heads import fit as hf
from heads import train as ht
from heads.feed import in_ram_dataset

# --------------------------------------------------------------------------- the five measurements

def bench_extraction(args, tmp: Path) -> dict:
    n = args.extract_images
    ds = load_dataset(args.data, limit=n // 2)
    model = bb.build(weights=args.weights)
    from keras.applications.vgg16 import preprocess_input

    pixels = np.concatenate([ds.train.load(0, len(ds.train), (32, 32)), ds.test.load(0, len(ds.test), (32, 32))])
    x = preprocess_input(pixels.astype("float32"))
    model.model.predict(x[:256], batch_size=args.batch_size, verbose=0)       # warm up both paths
    run = iter(range(1000))

    def featcache_extract():
        extract(data=args.data, weights=args.weights, limit=n // 2, cache_dir=tmp / f"x{next(run)}",
                batch_size=args.batch_size, progress=False)

    def bare_predict():
        model.model.predict(x, batch_size=args.batch_size, verbose=0)

    loops = LoopTimes()
    logging.getLogger("featcache.extract.local").addHandler(loops)
    logging.getLogger("featcache.extract.local").setLevel(logging.INFO)
    featcache_extract()
    loops.runs.clear()
    t_extract, t_predict = alternate(featcache_extract, bare_predict, args.repeats)
    t_loop = [seconds for _, seconds in loops.runs]
    gflop = conv_gflop(model.model)
    ips_e, ips_p = n / statistics.median(t_extract), n / statistics.median(t_predict)
    ips_loop = n / statistics.median(t_loop)
    return {"images": n, "batch_size": args.batch_size, "extract_seconds": t_extract, "extract_loop_seconds": t_loop,
            "predict_seconds": t_predict, "extract_images_per_s": ips_e, "extract_loop_images_per_s": ips_loop,
            "predict_images_per_s": ips_p, "extract_vs_predict_ratio": ips_loop / ips_p,
            "extract_call_vs_predict_ratio": ips_e / ips_p, "startup_seconds": statistics.median(t_extract) - n / ips_loop,
            "gflop_per_image": gflop, "extract_gflop_per_s": ips_loop * gflop, "predict_gflop_per_s": ips_p * gflop}


def bench_cached_vs_end_to_end(args, data) -> dict:
    """The reference head trained on cached features vs on top of the frozen VGG16 fed raw images."""
    import keras
    import tensorflow as tf

    from heads.builders import MODELS, dense_head

    tr, _ = ht.split_indices(data.y_train, 0.1, 0)
    head, (x_fit,) = hf.fixed_pooling_split(dense_head(data.x_train.shape[1:], 10), MODELS["dense"],
                                             {"pooling": "gap"}, [data.x_train])  # as train()
    head.compile("adam", "sparse_categorical_crossentropy", steps_per_execution=hf.STEPS_PER_EXECUTION,
                 jit_compile=False)
    x_all, y_all = hf.as_tensors(x_fit, data.y_train)
    cached = in_ram_dataset(x_all, y_all, tr, args.head_batch_size, shuffle=True)

    n_e2e = args.e2e_images
    ds = load_dataset(args.data, limit=n_e2e)
    pixels = ds.train.load(0, n_e2e, (32, 32))
    backbone = bb.build(weights=args.weights)
    inputs = keras.Input((32, 32, 3))
    feats = backbone.model(keras.applications.vgg16.preprocess_input(inputs), training=False)
    seed_way = keras.Model(inputs, dense_head(backbone.output_shapes[0], 10)(feats))
    seed_way.compile("adam", "sparse_categorical_crossentropy")
    raw = tf.data.Dataset.from_tensor_slices((pixels.astype("float32"), ds.train.labels)).batch(args.head_batch_size)
    head.fit(cached.take(2), verbose=0)
    seed_way.fit(raw.take(2), verbose=0)
    t_cached, t_e2e = [], []
    for _ in range(args.repeats):   # alternated, a fit call each, its first epoch left out
        t_cached += epoch_seconds(head, cached)
        t_e2e += epoch_seconds(seed_way, raw)
    per_img_cached = statistics.median(t_cached) / len(tr)
    per_img_e2e = statistics.median(t_e2e) / n_e2e
    return {"cached_images": len(tr), "e2e_images": n_e2e, "batch_size": args.head_batch_size,
            "cached_epoch_seconds": t_cached, "e2e_epoch_seconds": t_e2e,
            "cached_seconds_per_image": per_img_cached, "e2e_seconds_per_image": per_img_e2e,
            "cached_vs_end_to_end_speedup": per_img_e2e / per_img_cached,
            "projected_50_epochs_cached_s": 50 * per_img_cached * len(tr),
            "projected_50_epochs_e2e_s": 50 * per_img_e2e * len(tr)}


def bench_head_vs_floor(args, data) -> dict:
    """Seconds per epoch of the reference head vs just streaming the same batches, for several batch sizes."""
    from heads.builders import MODELS, dense_head

    tr, _ = ht.split_indices(data.y_train, 0.1, 0)
    t0 = time.perf_counter()
    _, (x_fit,) = hf.fixed_pooling_split(dense_head(data.x_train.shape[1:], 10), MODELS["dense"],
                                          {"pooling": "gap"}, [data.x_train])
    pool_seconds = time.perf_counter() - t0
    x_all, y_all = hf.as_tensors(x_fit, data.y_train)
    rows = []
    for bs in args.floor_batch_sizes:
        batches = in_ram_dataset(x_all, y_all, tr, bs, shuffle=True)
        head, _ = hf.fixed_pooling_split(dense_head(data.x_train.shape[1:], 10), MODELS["dense"],
                                          {"pooling": "gap"}, [data.x_train[:1]])
        head.compile("adam", "sparse_categorical_crossentropy", steps_per_execution=hf.STEPS_PER_EXECUTION,
                     jit_compile=False)
        head.fit(batches.take(2), verbose=0)

        def stream():
            for _ in batches:
                pass

        t_head, t_floor = [], []
        for _ in range(args.repeats):
            t_head += epoch_seconds(head, batches)
            t_floor.append(timed(stream))
        rows.append({"batch_size": bs, "head_epoch_s": statistics.median(t_head),
                     "floor_epoch_s": statistics.median(t_floor),
                     "head_epoch_vs_floor_ratio": statistics.median(t_head) / statistics.median(t_floor)})
    macs = sum(int(np.prod(w.shape)) for layer in head.layers if type(layer).__name__ == "Dense"
               for w in layer.weights[:1])
    return {"rows": rows, "pool_once_seconds": pool_seconds, "train_gflop_per_epoch": 6 * macs * len(tr) / 1e9,
            "head_epoch_vs_floor_ratio": next(r["head_epoch_vs_floor_ratio"] for r in rows
                                                            if r["batch_size"] == 256)}


def bench_size_and_load(args, cache_path: Path, tmp: Path) -> dict:
    cache = store.open_cache(cache_path)
    x, y = cache.load("train")
    x = x[:args.size_rows]
    rows = []
    for dtype in ("float16", "float32"):
        for compression in (None, "lzf", "gzip"):
            path = tmp / f"{dtype}-{compression}.h5"
            meta = store.CacheMeta(**{**cache.meta.__dict__, "dtype": dtype, "n_train": len(x), "n_test": 1})
            t_write = timed(lambda: _write(path, meta, x, compression))
            os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)   # best effort: cold-ish read
            t_load = min(timed(lambda: store.open_cache(path).load("train")) for _ in range(3))
            rows.append({"dtype": dtype, "compression": compression or "none", "bytes": path.stat().st_size,
                         "write_s": t_write, "load_s": t_load})
            path.unlink()
    full = next(r for r in rows if r["dtype"] == "float16" and r["compression"] == "none")
    return {"rows_measured": len(x), "rows": rows, "cache_bytes_float16": cache.size_bytes,
            "full_cache_rows": cache.meta.n_train + cache.meta.n_test,
            "bytes_per_row_float16": full["bytes"] / len(x)}


def _write(path, meta, x, compression):
    f = cache_write.create(path, meta, labels={"train": np.zeros(len(x), np.int64), "test": np.zeros(1, np.int64)},
                     paths={}, class_names=["x"], batch_size=128,
                     compression=compression)
    with f:
        for s in range(0, len(x), 1024):
            f["train/features"][s:s + 1024] = x[s:s + 1024].astype(meta.dtype)
        cache_write.finish(f, max_abs_activation=0.0)


def bench_float16_vs_float32(args, tmp: Path) -> dict:
    """The reference head trained on float16 and on float32 features of the same stratified subset."""
    ds = load_dataset(args.data)
    subset = {}
    for name, split, n in (("train", ds.train, args.dtype_train), ("test", ds.test, args.dtype_test)):
        rows = np.linspace(0, len(split) - 1, n).astype(int)      # evenly spaced: every class, in proportion
        subset[f"x_{name}"] = np.stack([split.load(int(i), int(i) + 1, (32, 32))[0] for i in rows])
        subset[f"y_{name}"] = split.labels[rows]
    npz = tmp / "subset.npz"
    np.savez(npz, **subset, class_names=np.array(ds.class_names))
    out = {"train_images": args.dtype_train, "test_images": args.dtype_test}
    for dtype in ("float16", "float32"):
        path = extract(data=npz, weights=args.weights, dtype=dtype, cache_dir=tmp / "dtype", progress=False)
        result = ht.train_head(path, runs_dir=None, progress=False, epochs=50, patience=5)
        out[dtype] = {"test_accuracy": result.metrics["test_accuracy"], "val_accuracy": result.metrics["val_accuracy"],
                      "best_epoch": result.metrics["best_epoch"]}
    out["test_accuracy_difference"] = out["float32"]["test_accuracy"] - out["float16"]["test_accuracy"]
    return out


def bench_memory(args, cache_path: Path, tmp: Path) -> dict:
    rows = []
    for limit in args.rss_limits:
        rss, seconds = peak_rss(["-q", "extract", "--data", str(args.data), "--weights", str(args.weights),
                                 "--limit", str(limit), "--cache-dir", str(tmp / "rss"), "--no-progress"], tmp)
        rows.append({"what": f"extract, {2 * limit} images", "peak_rss_bytes": rss, "seconds": seconds})
    rss, seconds = peak_rss(["-q", "train-head", "--cache", str(cache_path), "--head", "dense", "--epochs", "1",
                             "--runs-dir", str(tmp / "runs"), "--no-progress"], tmp)
    rows.append({"what": f"train-head --head dense, 1 epoch on {cache_path.name}", "peak_rss_bytes": rss,
                 "seconds": seconds})
    return {"rows": rows, "extract_peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows[:-1]),
            "head_peak_rss_bytes": rows[-1]["peak_rss_bytes"]}


# --------------------------------------------------------------------------- report


def write_report(results: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bench_json = out / "benchmarks.json"   # other bench scripts (precision.py) keep their keys in it too
    merged = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    bench_json.write_text(json.dumps({**merged, **results}, indent=2) + "\n")
    m, e, c, f, s, d, r = (results[k] for k in ("machine", "extraction", "cached_vs_end_to_end", "head_vs_floor",
                                                "size_and_load", "float16_vs_float32", "memory"))
    mb = lambda b: f"{b / 1e6:,.1f} MB"  # noqa: E731
    lines = [
        "# Benchmarks", "",
        f"Measured by `{command}` on {results['date']}.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, devices {m['device']}; TensorFlow {m['tensorflow']}, "
        f"Python {m['python']}. Absolute times hold for this machine only; ratios are of two things timed "
        f"alternately in this one run ({results['repeats']} times each, medians).", "",
        "## 1. Extraction throughput", "",
        f"{e['images']} real CIFAR-10 images (JPEG folder), batch {e['batch_size']}, VGG16 to block3_pool at 32 px, "
        "ImageNet weights. `featcache extract` includes listing and fingerprinting the folder, JPEG decoding, "
        "preprocessing, the forward pass and HDF5 writes; the bare `model.predict` gets the same images "
        "already decoded and preprocessed in memory.", "",
        "| path | images/s | GFLOP/s |", "|---|---|---|",
        f"| featcache extract: batch loop (decode, preprocess, forward, write) | {e['extract_loop_images_per_s']:.0f} | "
        f"{e['extract_gflop_per_s']:.0f} |",
        f"| bare model.predict | {e['predict_images_per_s']:.0f} | {e['predict_gflop_per_s']:.0f} |",
        f"| **ratio** | **{e['extract_vs_predict_ratio']:.3f}** | |", "",
        f"The whole `extract()` call adds a fixed {e['startup_seconds']:.1f} s (fingerprinting the images, hashing the "
        f"weights file, building the model, tracing the first batch): {e['extract_images_per_s']:.0f} images/s over "
        f"{e['images']} images (ratio {e['extract_call_vs_predict_ratio']:.3f}), a cost that vanishes over 60,000.", "",
        f"GFLOP counted as 2 x multiply-adds of the seven Conv2D layers up to block3_pool "
        f"({e['gflop_per_image']:.3f} GFLOP per image; pooling, bias and ReLU not counted).", "",
        "## 2. Cached head vs end to end", "",
        f"The reference head (GAP, BN, Dense 400/256/256, Dropout 0.2), batch {c['batch_size']}: one epoch on "
        f"{c['cached_images']} cached feature rows, versus the seed's way, the same head on top of the frozen VGG16 "
        f"fed raw images ({c['e2e_images']} images per epoch, scaled per image). Epochs are timed inside `fit` "
        "calls of 2 epochs, the first left out (it pays the call's one-off start), alternating the two ways.", "",
        "| way | seconds per image | 50 epochs on the training split (projected) |", "|---|---|---|",
        f"| cached features | {c['cached_seconds_per_image'] * 1e6:.1f} µs | {c['projected_50_epochs_cached_s']:.0f} s |",
        f"| end to end (frozen VGG16 each step) | {c['e2e_seconds_per_image'] * 1e6:.0f} µs | "
        f"{c['projected_50_epochs_e2e_s'] / 60:.0f} min |",
        f"| **speed-up** | **{c['cached_vs_end_to_end_speedup']:.0f}x** | |", "",
        "The one-off extraction (section 1) is paid once and shared by every head experiment.", "",
        "## 3. Head epoch vs its floor", "",
        "Seconds per epoch of the reference head on the full cached training split (timed inside `fit` calls of 2 "
        "epochs, the first left out), versus streaming the same batches (shuffled index batches gathered from RAM "
        "and cast to float32) without a model. Global average "
        "pooling has no weights, so `heads.train` pools the cached maps once per run "
        f"({f['pool_once_seconds']:.2f} s here) and fits the rest of the head on 256-wide vectors; the saved model "
        "still takes the feature maps. The head's own arithmetic is about "
        f"{f['train_gflop_per_epoch']:.0f} GFLOP per epoch (forward and backward through its Dense layers, "
        "6 x multiply-adds x rows); at the GFLOP/s VGG16 reaches in section 1 "
        f"({results['extraction']['predict_gflop_per_s']:.0f}) that alone is "
        f"{f['train_gflop_per_epoch'] / results['extraction']['predict_gflop_per_s']:.2f} s.", "",
        "| batch size | head epoch (s) | stream only (s) | ratio |", "|---|---|---|---|",
        *[f"| {x['batch_size']} | {x['head_epoch_s']:.2f} | {x['floor_epoch_s']:.2f} | "
          f"{x['head_epoch_vs_floor_ratio']:.1f} |" for x in f["rows"]], "",
        "## 4. Cache size and load", "",
        f"{s['rows_measured']} training rows of the block3_pool cache (4x4x256 per row) written with each dtype and "
        "compression through `featcache.cache.write`; load = `open_cache(...).load('train')`, best of 3.", "",
        "| dtype | compression | bytes on disk | bytes/row | write (s) | load to RAM (s) |", "|---|---|---|---|---|---|",
        *[f"| {x['dtype']} | {x['compression']} | {mb(x['bytes'])} | {x['bytes'] / s['rows_measured']:,.0f} | "
          f"{x['write_s']:.2f} | {x['load_s']:.2f} |" for x in s["rows"]], "",
        f"The full float16 cache of {s['full_cache_rows']:,} images is {mb(s['cache_bytes_float16'])}.", "",
        f"Reference head trained (early stopping on validation) on {d['train_images']} training and "
        f"{d['test_images']} test images (evenly spaced through each split, so every class is in), once from float16 "
        "and once from float32 features of the same images:", "",
        "| features | val accuracy | test accuracy | best epoch |", "|---|---|---|---|",
        *[f"| {k} | {d[k]['val_accuracy']:.4f} | {d[k]['test_accuracy']:.4f} | {d[k]['best_epoch']} |"
          for k in ("float16", "float32")],
        f"| **float32 - float16** | | **{d['test_accuracy_difference']:+.4f}** | |", "",
        "## 5. Memory", "",
        "Peak resident memory (VmHWM) of a whole `featcache` process (Python, TensorFlow and the model included), "
        "read by the process itself at exit (bench/peak_rss.py).", "",
        "| run | peak RSS | seconds |", "|---|---|---|",
        *[f"| {x['what']} | {mb(x['peak_rss_bytes'])} | {x['seconds']:.0f} |" for x in r["rows"]], "",
    ]
    write_sections(out / "benchmarks.md", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--cache", required=True, type=Path, help="the full cache made by `make extract`")
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--extract-images", type=int, default=4096)
    p.add_argument("--e2e-images", type=int, default=2048)
    p.add_argument("--head-batch-size", type=int, default=256)
    p.add_argument("--floor-batch-sizes", type=int, nargs="+", default=[128, 256, 1024])
    p.add_argument("--size-rows", type=int, default=10000)
    p.add_argument("--dtype-train", type=int, default=10000)
    p.add_argument("--dtype-test", type=int, default=2000)
    p.add_argument("--rss-limits", type=int, nargs="+", default=[500, 2500])
    args = p.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "machine": machine()}
    data = ht.data_from_cache(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        steps = [("extraction", lambda: bench_extraction(args, tmp)),
                 ("cached_vs_end_to_end", lambda: bench_cached_vs_end_to_end(args, data)),
                 ("head_vs_floor", lambda: bench_head_vs_floor(args, data)),
                 ("size_and_load", lambda: bench_size_and_load(args, args.cache, tmp)),
                 ("float16_vs_float32", lambda: bench_float16_vs_float32(args, tmp)),
                 ("memory", lambda: bench_memory(args, args.cache, tmp))]
        for name, step in steps:
            t0 = time.perf_counter()
            results[name] = step()
            print(f"bench: {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for key in ("extract_vs_predict_ratio",):
        results[key] = results["extraction"][key]
    results["cached_vs_end_to_end_speedup"] = results["cached_vs_end_to_end"]["cached_vs_end_to_end_speedup"]
    results["head_epoch_vs_floor_ratio"] = results["head_vs_floor"]["head_epoch_vs_floor_ratio"]
    results["cache_bytes_float16"] = results["size_and_load"]["cache_bytes_float16"]
    results["extract_peak_rss_bytes"] = results["memory"]["extract_peak_rss_bytes"]
    command = "make bench"
    write_report(results, args.out, command)
    print(json.dumps({k: results[k] for k in ("extract_vs_predict_ratio", "cached_vs_end_to_end_speedup",
                                               "head_epoch_vs_floor_ratio", "cache_bytes_float16",
                                               "extract_peak_rss_bytes")}, indent=2))


if __name__ == "__main__":
    main()
