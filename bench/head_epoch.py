"""Where a dense head's epoch goes: the reference head (400,256,256) compiled as featcache compiles it, against the
same model with Keras' own Adam (featcache's fuses each weight's step on TensorFlow), without its metrics, without
BatchNorm and Dropout, with plain SGD too, and under Keras' mixed bfloat16 policy (AMX multiplies bfloat16 in
hardware), and its matrix products alone inside one compiled loop (a TensorFlow graph, or one JAX jit); each against
the arithmetic floor at this CPU's float32 FMA peak. Synthetic rows of the CIFAR-10 block3_pool pooled width (256),
batch 256, fed as featcache feeds a head (heads.feed.keras_batches), on the Keras backend KERAS_BACKEND names. Then
the reference head at batch sizes 64 to 512, split by least squares into a fixed cost per step and a cost per row:
what heads trained together can share (a step's fixed cost) and what they cannot (each head's rows).

    python bench/head_epoch.py [--rows 45000] [--epochs 8]          # writes its section of benchmarks.md
"""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
from common import float32_peak, machine, vector_bench, write_sections

UNITS, WIDTH, CLASSES, BATCH = (400, 256, 256), 256, 10, 256
#: Around the batch sizes heads train at: larger batches spill the caches and cost more per row (on JAX, 4096).
BATCHES = (64, 128, 256, 512)
#: (name, optimizer: featcache's Adam, Keras' own or SGD, BatchNorm and Dropout, accuracy metric, dtype policy)
VARIANTS = (("the reference head", "adam", True, True, "float32"),
            ("the same with Keras' own Adam", "keras-adam", True, True, "float32"),
            ("without the accuracy metric", "adam", True, False, "float32"),
            ("without BatchNorm and Dropout", "adam", False, True, "float32"),
            ("plain SGD, nothing else", "sgd", False, False, "float32"),
            ("the reference head, mixed bfloat16", "adam", True, True, "mixed_bfloat16"))


def head(bn_and_dropout: bool, policy: str = "float32"):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((WIDTH,))
    x = keras.layers.BatchNormalization(dtype=policy)(inputs) if bn_and_dropout else inputs
    for n in UNITS:
        x = keras.layers.Dense(n, activation="relu", dtype=policy)(x)
    if bn_and_dropout:
        x = keras.layers.Dropout(0.2, dtype=policy)(x)
    # the output layer and the loss in float32, as Keras' mixed precision guide (and heads.fit's finetune) has it
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax", dtype="float32")(x))


def compiled(optimizer: str, bn_and_dropout: bool, metric: bool, policy: str = "float32"):
    import keras

    from heads import optimizers
    from heads.fit import step_options

    model = head(bn_and_dropout, policy)
    model.compile(optimizer={"adam": optimizers.adam, "keras-adam": keras.optimizers.Adam,
                             "sgd": keras.optimizers.SGD}[optimizer](1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"] if metric else None, **step_options())
    return model


def interleaved(runs: dict, x, y, epochs: int) -> dict:
    """{name: (model, batch size)} -> each model's median seconds of an epoch after its first (which traces and
    compiles the step); the models take their epochs in turn, so that this host's swings (30% between minutes) fall
    on all of them alike."""
    from heads import feed

    times: dict = {name: [] for name in runs}
    with contextlib.ExitStack() as stack:
        fed = {b: stack.enter_context(feed.keras_batches(x, None, y, (np.arange(len(y)), None), b, seed=0))[0]
               for b in {b for _, b in runs.values()}}
        for _ in range(epochs):
            for name, (model, b) in runs.items():
                t0 = time.perf_counter()
                model.fit(fed[b], epochs=1, shuffle=False, verbose=0)   # the feed shuffles
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def epoch_seconds(x, y, epochs: int) -> dict:
    """Each variant's median epoch at batch BATCH."""
    return interleaved({name: (compiled(*options), BATCH) for name, *options in VARIANTS}, x, y, epochs)


def batch_seconds(x, y, epochs: int) -> dict:
    """The reference head's median epoch at each of BATCHES."""
    return interleaved({b: (compiled("adam", True, True), b) for b in BATCHES}, x, y, epochs)


def products_seconds(rows: int) -> tuple[str, float] | None:
    """(where, seconds) of one epoch's matrix products (3 per Dense layer and batch, each of the forward product's
    shape and arithmetic) in one compiled loop: a TensorFlow graph, or one JAX jit; None on another backend."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        return "in one JAX jit (a fori_loop)", _best_of_3(_jax_products(rows))
    if backend != "tensorflow":
        return None
    import tensorflow as tf

    sizes = [WIDTH, *UNITS, CLASSES]
    a = [tf.random.normal((BATCH, n)) for n in sizes[:-1]]
    w = [tf.random.normal((n, m)) / 30 for n, m in zip(sizes, sizes[1:])]
    steps = -(-rows // BATCH)

    @tf.function
    def epoch():
        total = tf.constant(0.0)
        for i in tf.range(steps):
            eps = tf.cast(i, tf.float32) * 1e-9   # a new input each step: nothing is hoisted out of the loop
            for x, k in zip(a, w):   # the forward product, and two of its shape for the backward ones
                for j in range(3):   # three inputs: identical products would be computed once
                    total += tf.reduce_sum(tf.matmul(x + eps * (j + 1), k))
        return total

    return "in one TensorFlow graph loop", _best_of_3(lambda: epoch().numpy())


def _jax_products(rows: int):
    """The JAX twin of the TensorFlow loop above: the same products, each step's inputs new."""
    import jax
    import jax.numpy as jnp

    sizes = [WIDTH, *UNITS, CLASSES]
    keys = jax.random.split(jax.random.key(0), 2 * len(sizes))
    a = [jax.random.normal(keys[i], (BATCH, n)) for i, n in enumerate(sizes[:-1])]
    w = [jax.random.normal(keys[len(sizes) + i], (n, m)) / 30 for i, (n, m) in enumerate(zip(sizes, sizes[1:]))]

    @jax.jit
    def epoch(a, w):
        def step(i, total):
            eps = i.astype(jnp.float32) * 1e-9
            for x, k in zip(a, w):
                for j in range(3):
                    total += jnp.sum((x + eps * (j + 1)) @ k)
            return total

        return jax.lax.fori_loop(0, -(-rows // BATCH), step, jnp.float32(0.0))

    return lambda: float(epoch(a, w))


def _best_of_3(run) -> float:
    """The quickest of three timed calls of `run`, after one that compiles it."""
    run()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def section(rows: int, floor: float, peak: float, epochs: dict, products: tuple | None, backend: str) -> str:
    m = machine()
    lines = [f"## 14. Where a dense head's epoch goes (Keras on {backend})", "",
             f"`KERAS_BACKEND={backend} python bench/head_epoch.py --rows {rows}`: the reference dense head "
             f"({','.join(map(str, UNITS))}) on {rows} synthetic rows of 256 features, batch {BATCH}, compiled and fed as "
             "featcache compiles and feeds it (`heads.fit.step_options`, `heads.feed.keras_batches`), the median of its epochs after the first, against "
             "the same model stripped of its parts, and under Keras' mixed bfloat16 policy (its output layer and loss in "
             "float32), the variants taking their epochs in turn. The floor: the Dense "
             "layers' forward and backward (6 x multiply-adds x rows) at the float32 FMA peak measured here "
             f"({peak:.0f} GFLOP/s, bench/peak_flops.c): "
             f"{floor:.2f} s. Host: {m['cpu']}, {m['cores']} logical CPUs.", "",
             "| model | epoch (s) | / floor |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.2f} | {seconds / floor:.1f}x |" for name, seconds in epochs.items()]
    if products is not None:
        where, seconds = products
        lines.append(f"| its matrix products alone, {where} | {seconds:.2f} | {seconds / floor:.1f}x |")
    return "\n".join(lines) + "\n"


def batch_table(rows: int, floor: float, by_batch: dict) -> str:
    """The reference head's epoch by batch size, and its least-squares split into a fixed cost per step and a cost
    per row."""
    steps = {b: -(-rows // b) for b in by_batch}
    per_row, fixed = np.polyfit([rows / steps[b] for b in by_batch], [by_batch[b] / steps[b] for b in by_batch], 1)
    shared = fixed / (fixed + per_row * BATCH)
    split = (f"A step costs about {1000 * fixed:.2f} ms plus {1e6 * per_row:.1f} us per row (least squares over the "
             f"sizes); a row's arithmetic at the floor is {1e6 * floor / rows:.1f} us, so the rows cost "
             f"{per_row * rows / floor:.1f}x their arithmetic. At batch {BATCH} the fixed cost is {shared:.2f} of a "
             f"step: heads trained together that shared all of it would still cost {1 - shared:.2f} of each trained "
             "alone.") if fixed > 0 and per_row > 0 else "These sizes do not split into a fixed and a per-row cost."
    lines = ["", "The reference head by batch size (the same feed and compile, the sizes taking their epochs in turn):",
             "", "| batch size | epoch (s) | ms per step |", "|---|---|---|",
             *(f"| {b} | {seconds:.2f} | {1000 * seconds / steps[b]:.2f} |" for b, seconds in by_batch.items()), "",
             split]
    return "\n".join(lines) + "\n"


def main() -> None:
    import keras

    args, x, y = vector_bench(__doc__, 8, WIDTH, CLASSES)
    epochs = epoch_seconds(x, y, args.epochs)
    for name, seconds in epochs.items():
        print(f"{name}: {seconds:.2f} s", flush=True)
    products = products_seconds(args.rows)
    peak = float32_peak()
    sizes = [WIDTH, *UNITS, CLASSES]
    floor = 6 * sum(a * b for a, b in zip(sizes, sizes[1:])) * args.rows / (peak * 1e9)
    by_batch = batch_seconds(x, y, args.epochs)
    text = section(args.rows, floor, peak, epochs, products, keras.backend.backend()) + batch_table(args.rows, floor,
                                                                                                   by_batch)
    print(text)
    write_sections(args.out / "benchmarks.md", text)


if __name__ == "__main__":
    main()
