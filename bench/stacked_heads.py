"""Would a pass be faster with its heads of one architecture stacked? heads.together trains a pass's heads side by
side, each with its own layers and weights (one softmax over their stacked logits). The alternative: each
architecture's heads as one set of layers whose weights carry a heads axis, (heads, in, out), so that a layer of
K heads is one batched matrix product, one BatchNorm (the batch statistics of the shared input computed once) and
one dropout mask, a few ops per layer whatever K; and the same with every head's first layer, all architectures
together, as one product of the shared input (its BatchNorm's scale and shift folded into the kernel), ten times
the largest product of one head: small products are what oneDNN runs on one thread. All on synthetic rows of the CIFAR-10 block3_pool
pooled width (256), batch 256, with featcache's Adam, feed and step options; the search grid's dense heads at one
batch size: six of units 256, six of 400,256,256, and all twelve (dropout 0.1, 0.3, 0.5 twice; one learning rate:
speed only).

    python bench/stacked_heads.py [--rows 45000] [--epochs 6]          # writes its section of benchmarks.md
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from common import float32_peak, machine, vector_bench, write_sections

WIDTH, CLASSES, BATCH, DROPOUTS = 256, 10, 256, (0.1, 0.3, 0.5, 0.1, 0.3, 0.5)
SETS = {"six heads of units 256": ((256,),), "six heads of 400,256,256": ((400, 256, 256),),
        "all twelve": ((256,), (400, 256, 256))}


def side_by_side(inputs, archs: tuple):
    """Each head its own BatchNorm, Dense layers and Dropout, as heads.builders builds the dense head."""
    import keras

    logits = []
    for units in archs:
        for rate in DROPOUTS:
            x = keras.layers.BatchNormalization()(inputs)
            for n in units:
                x = keras.layers.Dense(n, activation="relu")(x)
            logits.append(keras.layers.Dense(CLASSES)(keras.layers.Dropout(rate)(x)))
    return keras.ops.stack(logits, axis=1)


def stacked(inputs, archs: tuple):
    """Each architecture's heads as one set of layers with a heads axis: (heads, batch, features) throughout."""
    import keras

    logits, layers = [], _stacked_layers()
    for units in archs:
        x = layers["norm"](len(DROPOUTS))(inputs)
        for n in units:
            x = layers["dense"](len(DROPOUTS), n, relu=True)(x)
        x = layers["dropout"](DROPOUTS)(x)
        logits.append(layers["dense"](len(DROPOUTS), CLASSES, relu=False)(x))
    return keras.ops.transpose(keras.ops.concatenate(logits, axis=0), (1, 0, 2))


def first_shared(inputs, archs: tuple):
    """`stacked`, with every head's first Dense layer, all architectures together, as one product of the shared
    normalised input: each head's BatchNorm scale and shift folded into its columns of one (in, sum of units)
    kernel: the pass's largest products become one, ten times the largest of one head."""
    import keras

    layers, k = _stacked_layers(), len(DROPOUTS)
    first = layers["first"](k, [units[0] for units in archs])(inputs)
    logits = []
    for units, x in zip(archs, first):
        for n in units[1:]:
            x = layers["dense"](k, n, relu=True)(x)
        x = layers["dropout"](DROPOUTS)(x)
        logits.append(layers["dense"](k, CLASSES, relu=False)(x))
    return keras.ops.transpose(keras.ops.concatenate(logits, axis=0), (1, 0, 2))


def _stacked_layers() -> dict:
    import keras

    class Norm(keras.layers.Layer):   # the shared input's batch statistics once, each head's scale and shift
        def __init__(self, heads):
            super().__init__()
            self.heads = heads

        def build(self, shape):
            self.gamma = self.add_weight((self.heads, 1, shape[-1]), initializer="ones")
            self.beta = self.add_weight((self.heads, 1, shape[-1]), initializer="zeros")
            self.mean = self.add_weight((shape[-1],), initializer="zeros", trainable=False)
            self.var = self.add_weight((shape[-1],), initializer="ones", trainable=False)

        def normalised(self, x, training):
            mean, var = keras.ops.moments(x, axes=[0]) if training else (self.mean, self.var)
            if training:
                self.mean.assign(0.99 * self.mean + 0.01 * mean)
                self.var.assign(0.99 * self.var + 0.01 * var)
            return (x - mean) * keras.ops.rsqrt(var + 1e-3)

        def call(self, x, training=False):
            return self.normalised(x, training)[None] * self.gamma + self.beta

    class Dense(keras.layers.Layer):
        def __init__(self, heads, units, relu):
            super().__init__()
            self.heads, self.units, self.relu = heads, units, relu

        def build(self, shape):
            self.kernel = self.add_weight((self.heads, shape[-1], self.units), initializer="glorot_uniform")
            self.bias = self.add_weight((self.heads, 1, self.units), initializer="zeros")

        def call(self, x):
            y = keras.ops.matmul(x, self.kernel) + self.bias
            return keras.ops.relu(y) if self.relu else y

    class Dropout(keras.layers.Layer):   # one mask for all heads, each head's own rate
        def __init__(self, rates):
            super().__init__()
            self.rates = np.asarray(rates, np.float32).reshape(-1, 1, 1)
            self.seed = keras.random.SeedGenerator(1)

        def call(self, x, training=False):
            if not training:
                return x
            keep = keras.random.uniform(keras.ops.shape(x), seed=self.seed) >= self.rates
            return keras.ops.where(keep, x / (1 - self.rates), 0.0)

    class First(Norm):   # Norm's statistics, then K heads of each width in one product
        def __init__(self, heads, widths):
            super().__init__(heads * len(widths))
            self.k, self.widths = heads, widths
            self.owner = np.repeat(np.arange(heads * len(widths)), np.repeat(widths, heads))   # head of each column

        def build(self, shape):
            super().build(shape)
            self.kernel = self.add_weight((shape[-1], len(self.owner)), initializer="glorot_uniform")
            self.bias = self.add_weight((len(self.owner),), initializer="zeros")

        def call(self, x, training=False):
            scale = keras.ops.transpose(keras.ops.take(self.gamma[:, 0], self.owner, axis=0))   # (in, columns)
            shift = keras.ops.transpose(keras.ops.take(self.beta[:, 0], self.owner, axis=0))
            y = keras.ops.matmul(self.normalised(x, training), self.kernel * scale)
            y = keras.ops.relu(y + keras.ops.sum(shift * self.kernel, axis=0) + self.bias)
            out, start = [], 0
            for w in self.widths:   # each width's heads: (K, batch, width)
                part = keras.ops.reshape(y[:, start:start + self.k * w], (-1, self.k, w))
                out.append(keras.ops.transpose(part, (1, 0, 2)))
                start += self.k * w
            return out

    return {"norm": Norm, "dense": Dense, "dropout": Dropout, "first": First}


def compiled(build, archs: tuple):
    import keras

    from heads import optimizers
    from heads.fit import step_options

    keras.utils.set_random_seed(0)
    inputs = keras.Input((WIDTH,))
    model = keras.Model(inputs, keras.layers.Activation("softmax")(build(inputs, archs)))

    def summed(y, p):   # each head's cross-entropy, summed over heads (as heads.together scores a pass)
        labels = keras.ops.repeat(keras.ops.reshape(keras.ops.cast(y, "int32"), (-1, 1)), p.shape[1], axis=1)
        return keras.ops.sum(keras.losses.sparse_categorical_crossentropy(labels, p), axis=1)

    model.compile(optimizers.adam(1e-3), loss=summed, **step_options())
    return model


def epoch_seconds(x, y, epochs: int) -> dict:
    """(set, way) -> median seconds of an epoch after the first; the models take their epochs in turn."""
    from heads import feed

    models = {(name, way): compiled(build, archs) for name, archs in SETS.items()
              for way, build in (("side by side", side_by_side), ("stacked", stacked),
                                 ("first layers one product", first_shared))}
    times: dict = {key: [] for key in models}
    with feed.keras_batches(x, None, y, (np.arange(len(y)), None), BATCH, seed=0) as (batches, _):
        for _ in range(epochs):
            for key, model in models.items():
                t0 = time.perf_counter()
                model.fit(batches, epochs=1, shuffle=False, verbose=0)
                times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t[1:]) for key, t in times.items()}


def floor_seconds(archs: tuple, rows: int, peak: float) -> float:
    """The Dense layers' forward and backward (6 x multiply-adds x rows) of six heads of each of `archs`."""
    macs = sum(a * b for units in archs for sizes in [(WIDTH, *units, CLASSES)] for a, b in zip(sizes, sizes[1:]))
    return 6 * len(DROPOUTS) * macs * rows / (peak * 1e9)


def section(rows: int, peak: float, seconds: dict) -> str:
    import keras

    m, backend = machine(), keras.backend.backend()
    lines = [f"## 17. Stacking a pass's heads of one architecture (Keras on {backend})", "",
             f"`KERAS_BACKEND={backend} python bench/stacked_heads.py --rows {rows}`: heads trained together side by "
             "side, each its own layers (as heads.together trains a pass), against the same heads stacked, each "
             "architecture one set of layers with a heads axis (one batched matrix product per layer), and stacked with "
             "every head's first layer in one product of the shared input (BatchNorm folded in); synthetic "
             f"rows of 256 features, batch {BATCH}, featcache's Adam, feed and step options, the median epoch after "
             "the first, the models taking their epochs in turn. Floor: the Dense layers' forward and backward at "
             f"the float32 FMA peak measured here ({peak:.0f} GFLOP/s, bench/peak_flops.c). Host: {m['cpu']}, "
             f"{m['cores']} logical CPUs.", "",
             "| heads | side by side (s) | stacked (s) | stacked, first layers one product (s) | stacked / side by "
             "side | first layers one product / side by side | floor (s) | side by side / floor |",
             "|---|---|---|---|---|---|---|---|"]
    for name, archs in SETS.items():
        apart, stack, first = (seconds[(name, way)] for way in ("side by side", "stacked", "first layers one product"))
        floor = floor_seconds(archs, rows, peak)
        lines.append(f"| {name} | {apart:.2f} | {stack:.2f} | {first:.2f} | **{stack / apart:.2f}** | "
                     f"**{first / apart:.2f}** | {floor:.2f} | {apart / floor:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args, x, y = vector_bench(__doc__, 6, WIDTH, CLASSES)
    seconds = epoch_seconds(x, y, args.epochs)
    for key, s in seconds.items():
        print(*key, f"{s:.2f} s", flush=True)
    peak = float32_peak()
    text = section(args.rows, peak, seconds)
    write_sections(args.out / "benchmarks.md", text)
    print(text)


if __name__ == "__main__":
    main()
