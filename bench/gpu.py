"""make bench-gpu: extraction throughput on the available accelerator, prepared to finish in under 5 minutes.

For 32 px and 224 px inputs, at float32 and at the precision `auto` picks (bfloat16 on recent GPUs),
it times featcache's extraction loop (JPEG decoding in `--decode-workers` threads, model, float16 writes)
and the bare compiled model on the same images in memory, and writes docs/results/benchmarks-gpu.md (and .json).
The images are synthetic JPEGs written first (smooth random patterns, 256 px), so nothing is downloaded.
`--smoke` runs tiny sizes on whatever device there is (CI runs it on the CPU to keep it working).

    python bench/gpu.py [--weights imagenet|PATH|random] [--images 4096] [--smoke --out DIR]
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
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
from run import LoopTimes, conv_gflop  # noqa: E402

from featcache import backbones  # noqa: E402
from featcache.extract import extract  # noqa: E402
from featcache.sources import load_dataset  # noqa: E402


def write_images(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    """ROOT/{train,test}/<class>/*.jpg: smooth random patterns (they compress like photographs, unlike noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("test", max(1, n // 8))):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
        for i in range(count):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
            img.save(root / split / ("a", "b")[i % 2] / f"{i:06d}.jpg", quality=90)
    return root


def bare_forward(model, x: np.ndarray):
    """The fastest plain way to run `model` on a batch already in device memory: a compiled function of
    the backend (tf.function or jax.jit), its output copied back to the host as extraction does."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        state = [v.value for v in model.non_trainable_variables]
        trainable = [v.value for v in model.trainable_variables]
        compiled = jax.jit(lambda t: model.stateless_call(trainable, state, t, training=False)[0])
        on_device = jax.device_put(x)
        return lambda: np.asarray(compiled(on_device))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(lambda t: model(t, training=False))
        on_device = tf.constant(x)
        return lambda: compiled(on_device).numpy()
    raise SystemExit(f"bench/gpu.py: no bare baseline for the {keras.backend.backend()} backend; "
                     "use KERAS_BACKEND=tensorflow or jax")


def device_name() -> str:
    """The accelerators Keras' backend sees, or "CPU"."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return ", ".join(d.device_kind for d in jax.devices() if d.platform != "cpu") or "CPU"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    return ", ".join(tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus) or "CPU"


def decode_rate(data: Path, size: int, workers: int, batch_size: int, decoder: str, scale_jpegs: bool = True) -> float:
    """Images/s of JPEG decoding and resizing alone (the training split, `workers` threads or processes), as an
    extraction at that --input-size decodes (DCT-scaled; `scale_jpegs=False`: every pixel decoded, then resized)."""
    from concurrent.futures import ThreadPoolExecutor

    from featcache import sources
    from featcache.extract import local as engine

    ds = load_dataset(data)
    splits = {"train": ds.train, "test": ds.test}
    resizing = sources.RESIZE_DCT if scale_jpegs else sources.RESIZE
    decode = engine.Decoding(size=(size, size), require_native=None, resizing=resizing).rows
    chunks = [("train", s, min(s + batch_size, len(ds.train))) for s in range(0, len(ds.train), batch_size)]
    with engine.decode_processes(workers if decoder == "processes" else 0, splits) as processes:
        if processes:   # started and warm before the clock, as in an extraction
            list(processes.map(decode, [None] * workers, *zip(*chunks[:workers])))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda c: processes.submit(decode, None, *c).result() if processes else decode(splits, *c),
                          chunks))
        return len(ds.train) / (time.perf_counter() - t0)


def measure(data: Path, size: int, precision: str, args, tmp: Path) -> dict:
    loops = LoopTimes()
    logging.getLogger("featcache.extract.local").addHandler(loops)
    logging.getLogger("featcache.extract.local").setLevel(logging.INFO)
    for k in range(args.repeats):
        extract(data=str(data), weights=args.weights, input_size=size, precision=precision, batch_size=args.batch_size,
                cache_dir=tmp / f"{size}-{precision}-{k}", progress=False, decode_workers=args.decode_workers,
                decoder=args.decoder)
    logging.getLogger("featcache.extract.local").removeHandler(loops)
    images, seconds = loops.runs[-1][0], statistics.median(s for _, s in loops.runs)
    bb = backbones.build(weights=args.weights, input_size=(size, size), precision=precision)
    ds = load_dataset(data)
    x = bb.preprocess(ds.train.load(0, min(len(ds.train), args.batch_size), (size, size)))
    forward = bare_forward(bb.model, np.resize(x, (args.batch_size, *x.shape[1:])))
    forward()
    steps = max(1, images // args.batch_size)
    t0 = time.perf_counter()
    for _ in range(steps):
        forward()
    bare = steps * args.batch_size / (time.perf_counter() - t0)
    gflop = conv_gflop(bb.model)
    return {"size": size, "precision": precision, "images": images, "loop_images_per_s": images / seconds,
            "bare_images_per_s": bare, "loop_vs_bare": images / seconds / bare,
            "decode_threads_images_per_s": decode_rate(data, size, args.decode_workers, args.batch_size, "threads"),
            "decode_processes_images_per_s": decode_rate(data, size, args.decode_workers, args.batch_size,
                                                         "processes"), "gflop_per_image": gflop,
            "loop_tflop_per_s": gflop * images / seconds / 1e3}


def main() -> None:
    import keras

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="random", help="random (default: throughput does not depend on the numbers), "
                                                       "imagenet or a weights file")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--decoder", default="auto", choices=("auto", "threads", "processes"))
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CI)")
    args = p.parse_args()
    if args.smoke:
        args.images, args.batch_size, args.repeats, args.sizes = 32, 16, 1, [32, 64]
    device = device_name()
    backend = f"Keras {keras.__version__} on {keras.backend.backend()} {_backend_version()}"
    auto = backbones.resolve_precision("auto")
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featcache-gpu-") as tmp:
        tmp = Path(tmp)
        data = write_images(tmp / "images", args.images)
        for size in args.sizes:
            for precision in dict.fromkeys(("float32", auto)):
                rows.append(measure(data, size, precision, args, tmp))
                print(json.dumps(rows[-1]), flush=True)
    result = {"device": device, "precision_auto": auto, "decode_workers": args.decode_workers, "decoder": args.decoder,
              "cpu_cores": os.cpu_count(), "backend": backend, "seconds": time.perf_counter() - t_start,
              "command": " ".join(sys.argv), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks-gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Extraction on {device} ({time.strftime('%Y-%m-%d')})", "",
             f"`python {result['command']}` ({result['seconds']:.0f} s; {backend}, "
             f"{os.cpu_count()} CPU cores, {result['decode_workers']} decode workers, decoder {args.decoder}; `auto` = "
             f"{auto}).", "",
             "| input | precision | extraction loop (img/s) | bare compiled model (img/s) | loop ÷ bare | decoding alone, "
             "threads (img/s) | decoding alone, processes (img/s) | loop TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} px | {r['precision']} | {r['loop_images_per_s']:.0f} | {r['bare_images_per_s']:.0f} | "
              f"{r['loop_vs_bare']:.2f} | {r['decode_threads_images_per_s']:.0f} | {r['decode_processes_images_per_s']:.0f} | "
              f"{r['loop_tflop_per_s']:.2f} |" for r in rows]
    (args.out / "benchmarks-gpu.md").write_text("\n".join(lines) + "\n")


def _backend_version() -> str:
    import importlib

    import keras

    return importlib.import_module(keras.backend.backend()).__version__


if __name__ == "__main__":
    main()
