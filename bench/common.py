"""What the benchmarks share: timing side by side, the machine a figure came from, FLOP counts, the extraction
loop's own timings, synthetic JPEGs, and the sections of docs/results/benchmarks*.md each script keeps.

Run as `python bench/<script>.py`, a script finds this module beside it. Importing it also puts the checkout on the
path, so the scripts run from a checkout featcache is not installed from (as on the lent GPU machine)."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Time a and b alternately `repeats` times each; returns both lists of seconds."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    return ta, tb


def epoch_seconds(model, batches, epochs: int = 2) -> list[float]:
    """Seconds of each epoch of one `fit` call but the first: what an epoch costs in a training run,
    without what `fit` pays once a call (callbacks, the data adapter, the first trace of a step)."""
    import keras

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.t0)

    times = EpochTimes()
    model.fit(batches, epochs=epochs, verbose=0, callbacks=[times])
    return times.seconds[1:]


def conv_gflop(model) -> float:
    """Multiply-adds x 2 of every Conv2D up to the model's output, per image (pooling and ReLU not counted)."""
    flops = 0
    for layer in model.layers:
        if type(layer).__name__ == "Conv2D":
            kh, kw, cin, cout = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            flops += 2 * h * w * cin * cout * kh * kw
    return flops / 1e9


def peak_rss(cli_args: list[str], tmp: Path) -> tuple[int, float]:
    """Peak resident memory (bytes) and seconds of a `featcache` CLI run in its own process."""
    report = tmp / "peak_rss"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "peak_rss.py"), *cli_args], cwd=ROOT,
                          env={**os.environ, "PEAK_RSS_FILE": str(report)}, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"featcache {cli_args} failed: {proc.stderr[-2000:]}")
    return int(report.read_text()), seconds


class LoopTimes(logging.Handler):
    """Collects the images and seconds of each extraction loop (model built, files open) from featcache's log."""

    def __init__(self):
        super().__init__()
        self.runs = []

    def emit(self, record):
        if hasattr(record, "images"):
            self.runs.append((record.images, record.seconds))


def machine() -> dict:
    import tensorflow as tf

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "tensorflow": tf.__version__, "python": platform.python_version(),
            "device": ", ".join(d.device_type for d in tf.config.list_physical_devices()) or "CPU"}


def out_folder(value: str) -> Path:
    """The argparse type of every script's --out: the folder, made before the run (a run that only found out at its
    end that it could not write its figures would be lost)."""
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot make the folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {path}: pass a writable --out")
    return path


def vector_bench(doc: str, epochs: int, width: int, classes: int) -> tuple:
    """The command line of a bench on synthetic pooled vectors (--rows, --epochs, --out), parsed, and its rows:
    (args, x, y), the same rows for every such bench."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=45000)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    return args, rng.standard_normal((args.rows, width)).astype(np.float32), rng.integers(0, classes, args.rows)


def write_sections(path: Path, text: str) -> None:
    """Write `text` (a head, or none, then `## ` sections) into the markdown file `path`: each of its sections
    replaces the file's section of the same heading, or is appended; the file's other sections stay where they
    are. So each bench script keeps its own part of docs/results/benchmarks.md up to date and leaves the others'."""
    def split(md: str) -> tuple[str, dict]:
        head, *parts = ("\n" + md).split("\n## ")
        return head.strip("\n"), {part.split("\n", 1)[0]: "## " + part.strip("\n") for part in parts}

    old_head, sections = split(path.read_text()) if path.exists() else ("# Benchmarks", {})
    head, new = split(text)
    sections.update(new)
    path.write_text("\n\n".join([head or old_head, *sections.values()]) + "\n")


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
    from featcache.sources import load_dataset

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


def extraction_rates(data: Path, size: int, precision: str, args, tmp: Path) -> dict:
    """One row of the loop-vs-bare table: the extraction loop's images/s at `size` and `precision` (median of
    --repeats runs), the bare compiled model's, and decoding's alone (threads and processes)."""
    from featcache import backbones
    from featcache.extract import extract
    from featcache.sources import load_dataset

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


def float32_peak() -> float | None:
    """The float32 FMA peak measured here (bench/peak_flops.c; GFLOP/s), the arithmetic floors' yardstick: `fma_peak`
    for float32 alone, built in a folder of its own (None where it cannot be built)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return fma_peak(["float32"], Path(tmp)).get("float32")


def fma_peak(precisions, tmp: Path, repeats: int = 5) -> dict:
    """GFLOP/s of register-only multiply-add chains on every core (bench/peak_flops.c), best of `repeats`,
    for each precision the CPU has a kernel for: the hardware's peak at the clock it runs at under load.
    Empty where no C compiler, no OpenMP or no AVX2/AVX-512 is there."""
    import shutil

    from featcache import backbones

    flags = backbones.cpu_flags()
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or not flags & {"avx512f", "avx2"}:
        return {}
    isa = ["-mavx512f"] + (["-mavx512bf16"] if "avx512_bf16" in flags else []) if "avx512f" in flags \
        else ["-mavx2", "-mfma"]
    exe = tmp / "peak_flops"

    def build(flags):
        return subprocess.run([cc, "-O3", "-funroll-loops", "-fopenmp", *flags, str(ROOT / "bench" / "peak_flops.c"),
                               "-o", str(exe)], capture_output=True, text=True)

    built = build(isa)
    if built.returncode and "-mavx512bf16" in isa:   # an older compiler: keep the float32 peak at least
        built = build([f for f in isa if f != "-mavx512bf16"])
    if built.returncode:
        last = (built.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"bench/peak_flops.c did not build ({last}); FMA peak left out", file=sys.stderr)
        return {}
    env = dict(os.environ, OMP_NUM_THREADS=str(len(os.sched_getaffinity(0))), OMP_PROC_BIND="spread")
    out = {}
    for precision in precisions:
        runs = [subprocess.run([str(exe), precision], capture_output=True, text=True, env=env)
                for _ in range(repeats)]
        if all(r.returncode == 0 for r in runs):
            out[precision] = max(float(r.stdout) for r in runs)
    return out


def write_synthetic_cache(path, *, n_train: int, n_test: int, shape=(4, 4, 256), n_classes: int = 10,
                          views: int = 1, seed: int = 0, noise: float = 2.0, block_rows: int = 1024) -> Path:
    from featcache import cache as store
    from featcache.cache import write as cache_write

    path = Path(path)
    rng = np.random.default_rng(seed)
    patterns = rng.normal(0, 1, (n_classes, *shape)).astype(np.float32)
    labels = {split: rng.integers(0, n_classes, n) for split, n in (("train", n_train), ("test", n_test))}
    meta = store.CacheMeta(
        backbone="vgg16", layer="block3_pool", weights=f"random:seed={seed}", weights_source="random",
        input_shape=(32, 32, 3), feature_shape=tuple(shape), preprocessing="synthetic", resize="none",
        dtype="float16", dataset_name="synthetic", dataset_source=f"synthetic:seed={seed}",
        dataset_fingerprint=f"{seed:064x}", limit=0, n_train=n_train, n_test=n_test, versions={},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), views=views,
        augment="flip" if views > 1 else "")
    f = cache_write.create(path, meta, labels=labels, paths={"train": None, "test": None},
                     class_names=[f"class{c}" for c in range(n_classes)], batch_size=block_rows)
    with f:
        for split, y in labels.items():
            for s in range(0, len(y), block_rows):
                e = min(s + block_rows, len(y))
                rows = patterns[y[s:e]] + noise * rng.standard_normal((e - s, *shape), dtype=np.float32)
                # ReLU-like; cast here, HDF5's is slow; written as extraction writes, with digests
                cache_write.write_rows(f, store.dataset_path(meta, split, meta.layer), s,
                                       np.maximum(rows, 0).astype(np.float16))
                if split == "train" and views > 1:
                    extra = patterns[y[s:e]][:, None] + noise * rng.standard_normal((e - s, views - 1, *shape),
                                                                                    dtype=np.float32)
                    cache_write.write_rows(f, store.dataset_path(meta, split, meta.layer, views=True), s,
                                           np.maximum(extra, 0).astype(np.float16))
        f["progress"][...] = [n_train, n_test]
        cache_write.finish(f, max_abs_activation=float(noise * 10))
    return path
