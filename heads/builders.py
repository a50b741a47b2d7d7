"""Model builders: each returns an uncompiled keras.Model; `MODELS` is the one registry.

`dense` and `linear` read cached features; `ann` and `cnn` are the scratch baselines on raw
uint8 pixels (they rescale to [0, 1] themselves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from featcache.cache.pooled import GLOBAL_POOLINGS
from featcache.errors import BadInputError
from heads.fitting import EPOCHS, Fitting, of_optimizer

#: How a head turns maps into vectors: the global poolings (computed once, see featcache.cache.pooled) or flatten.
POOLINGS = ("gap", "flatten", "max")
#: Name of the layer whose statistics `heads.train` sets from the training rows before fitting.
STANDARDISE = "standardise"


def _pool(x, pooling: str):
    """Global pooling of a feature map; vectors (pooled and concatenated layers) pass through."""
    import keras

    if len(x.shape) == 2:
        return x
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    layer = {"gap": keras.layers.GlobalAveragePooling2D, "flatten": keras.layers.Flatten,
             "max": keras.layers.GlobalMaxPooling2D}[pooling]
    return layer(name=f"pool_{pooling}")(x)


def standardise():
    """Per-feature (x - mean) / std with statistics that `heads.train` sets from the training rows.

    Features of a frozen backbone reach tens of thousands; a BatchNormalization layer starts from
    moving statistics (0, 1) and needs hundreds of steps to learn their scale, which a small
    training split never gives it. Standardised once up front, the features already have the
    statistics BatchNormalization starts with, at every dataset size, and the layer is saved with
    the model.
    """
    import keras

    return keras.layers.Normalization(axis=-1, name=STANDARDISE)


def _kernels(l2: float) -> dict:
    """Weight decay on a layer's kernel (L2 strength `l2`; 0: none, the default)."""
    import keras

    return {"kernel_regularizer": keras.regularizers.L2(l2)} if l2 else {}


def dense_head(input_shape, n_classes: int, *, units=(400, 256, 256), pooling: str = "gap",
               batchnorm: bool = True, dropout: float = 0.2, l2: float = 0.0, out_dtype: str | None = None):
    """The reference head: pooling -> standardise -> BatchNorm -> Dense(units, relu)... -> Dropout -> softmax."""
    import keras

    inputs = keras.Input(input_shape, name="features")
    x = standardise()(_pool(inputs, pooling))
    if batchnorm:
        x = keras.layers.BatchNormalization(name="batchnorm")(x)
    for i, n in enumerate(units):
        x = keras.layers.Dense(n, activation="relu", name=f"dense_{i}", **_kernels(l2))(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="classes", dtype=out_dtype,
                                 **_kernels(l2))(x)
    return keras.Model(inputs, outputs, name="dense_head")


def linear_probe(input_shape, n_classes: int, *, pooling: str = "gap"):
    """Multinomial logistic regression on standardised pooled features.

    Its weights are not trained by gradient steps but fitted to convergence by L-BFGS, with the L2
    strength chosen on the validation split (`heads.probe`), as CLIP's and VISSL's linear
    benchmarks do: a probe still improving at its last epoch is no baseline.
    """
    import keras

    inputs = keras.Input(input_shape, name="features")
    x = standardise()(_pool(inputs, pooling))
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name="linear_probe")


def knn_head(input_shape, n_classes: int, *, pooling: str = "gap", bank_size: int = 1):
    """pooling -> standardise -> L2-normalise -> a temperature-weighted vote of the k most similar of
    `bank_size` training rows (heads.knn: the rows, k and temperature are set when fitted)."""
    import keras

    from heads.knn import KnnVote

    inputs = keras.Input(input_shape, name="features")
    x = keras.layers.UnitNormalization(name="unit_norm")(standardise()(_pool(inputs, pooling)))
    outputs = KnnVote(bank_size, n_classes, name="knn")(x)
    return keras.Model(inputs, outputs, name="knn_head")


def ann(input_shape, n_classes: int, *, units=(512, 256, 128)):
    """Scratch baseline: Flatten -> three Dense(relu) -> softmax, on pixels scaled to [0, 1]."""
    import keras

    inputs = keras.Input(input_shape, name="pixels")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    for i, n in enumerate(units):
        x = keras.layers.Dense(n, activation="relu", name=f"dense_{i}")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name="ann")


def cnn(input_shape, n_classes: int, *, dropout: float = 0.2, seed: int = 0):
    """Scratch baseline: augmentation -> Conv64+pool -> Conv128+pool -> Dropout -> Dense(200) -> softmax."""
    import keras
    from keras import layers

    inputs = keras.Input(input_shape, name="pixels")
    x = layers.RandomFlip("horizontal", seed=seed)(inputs)       # augmentation is active in training only
    x = layers.RandomRotation(0.1, seed=seed)(x)
    x = layers.RandomZoom(0.1, seed=seed)(x)
    x = layers.Rescaling(1 / 255)(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(200, activation="relu")(layers.Flatten()(x))
    outputs = layers.Dense(n_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name="cnn")


def conv_head(input_shape, n_classes: int, *, filters: int = 128, units=(400, 256, 256), dropout: float = 0.2,
              l2: float = 0.0):
    """standardise -> BN -> 1x1 Conv(filters, relu) -> Flatten -> Dropout -> Dense(units, relu)... -> softmax.

    The 1x1 convolution shrinks the channels before flattening, so the head keeps where in the image
    a feature fired (which GAP throws away) at a fraction of the flatten head's weights.
    """
    import keras
    from keras import layers

    inputs = keras.Input(input_shape, name="features")
    x = layers.BatchNormalization(name="batchnorm")(standardise()(inputs))
    x = layers.Conv2D(filters, 1, activation="relu", name="conv1x1", **_kernels(l2))(x)
    x = layers.Dropout(dropout, name="dropout_maps")(layers.Flatten()(x))
    for i, n in enumerate(units):
        x = layers.Dense(n, activation="relu", name=f"dense_{i}", **_kernels(l2))(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="classes", **_kernels(l2))(x)
    return keras.Model(inputs, outputs, name="conv_head")


def finetune_head(input_shape, n_classes: int, *, provenance, tune_to: str | None = None, units=(400, 256, 256),
                  pooling: str = "gap", batchnorm: bool = True, dropout: float = 0.2, l2: float = 0.0,
                  train_precision: str = "float32", map_shift: int = 0, seed: int = 0):
    """The backbone's layers above the cached one, up to `tune_to` (default: the end of the next block), with
    the weights the cache was made from (featcache.backbones.cut), then the dense head: trained by heads.fit in
    two stages (the head alone, then all of it). `provenance` (heads.provenance.Provenance) says which cache and layer the maps are of. With a
    bfloat16 or float16 `train_precision`, layers compute in it (Keras mixed precision); the class layer, its
    softmax and the loss stay float32. `map_shift` > 0 shifts each map by up to that many cells in training
    (`shift_maps`)."""
    import keras

    from featcache.backbones import POLICIES, resolve_precision
    from featcache.backbones.cut import default_tune_to, upper, weights_of_cache

    if provenance.joined or len(provenance.layers) != 1:
        raise ValueError("--head finetune trains on one cached layer's maps, not on pooled vectors of several layers")
    meta, layer = provenance.layers[0].cache_meta, provenance.layers[0].layer
    weights, seed = weights_of_cache(meta)
    precision = resolve_precision(train_precision)
    tuned = upper(meta["backbone"], layer, tune_to or default_tune_to(meta["backbone"], layer), weights=weights,
                  seed=seed, input_size=tuple(meta["input_shape"][:2]), precision=precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(POLICIES[precision])
    try:
        head = dense_head(tuple(tuned.output.shape[1:]), n_classes, units=units, pooling=pooling,
                          batchnorm=batchnorm, dropout=dropout, l2=l2, out_dtype="float32")
        inputs = keras.Input(input_shape, name="features")
        maps = shift_maps(inputs, map_shift, seed) if map_shift else inputs
        return keras.Model(inputs, head(tuned(maps)), name="finetune_head")
    finally:
        keras.config.set_dtype_policy(previous)


def shift_maps(maps, cells: int, seed: int):
    """Training-time augmentation of cached maps: each shifted by a whole number of cells, up to `cells` each
    way (RandomTranslation with nearest-cell rounding, zero-filled; nothing at inference). A convolutional
    backbone is translation-equivariant, so on a map that subsamples its input by s it is what translating the
    image by a multiple of s pixels gives, away from the borders: the padded random crop of CIFAR training,
    done on the cache (a VGG16 block2_pool cell is 4 input pixels)."""
    import keras

    height, width = maps.shape[1:3]
    if cells >= min(height, width):
        raise BadInputError(f"--map-shift {cells} would shift the cached {height}x{width} maps out of view; fix: "
                            f"--map-shift {max(0, min(height, width) // 2)} or less")
    # float32 whatever the mixed-precision policy: a whole-cell shift only moves values, so at inference it is the
    # identity on every CPU (under mixed bfloat16 it rounded the maps, on CPUs where `auto` picks bfloat16)
    return keras.layers.RandomTranslation(cells / height, cells / width, fill_mode="constant", fill_value=0.0,
                                          interpolation="nearest", seed=seed, name="shift_maps",
                                          dtype="float32")(maps)


def tuned_layers(model):
    """The backbone's layers inside a finetune model (`finetune_head`)."""
    return next(layer for layer in model.layers if layer.name.startswith("tuned_"))


@dataclass(frozen=True)
class ModelSpec:
    build: Callable
    input: str            # "features" (from a cache) or "pixels" (raw images)
    optimizer: str        # "adam", "sgd", "lbfgs" (fitted to convergence by heads.probe, no epochs) or "knn"
    lr: float
    options: tuple        # TrainConfig fields this builder takes
    pools_first: bool = False   # the model starts with `_pool(inputs, options["pooling"])`
    tunes_backbone: bool = False   # built from the cache's backbone (needs the data's provenance), trained in two stages

    @property
    def fitting(self) -> Fitting:
        """How this kind of head is fitted and what validation chooses for it (heads.fitting)."""
        return of_optimizer(self.optimizer)

    def prepooled(self, options: dict) -> str | None:
        """The global pooling the built model starts with ("gap", "max"), or None: it can run once, before training."""
        pooling = options.get("pooling")
        return pooling if self.pools_first and pooling in GLOBAL_POOLINGS else None


MODELS = {
    "dense": ModelSpec(dense_head, "features", "adam", 1e-3, ("units", "pooling", "batchnorm", "dropout", "l2"),
                       pools_first=True),
    "linear": ModelSpec(linear_probe, "features", "lbfgs", 0.0, ("pooling",), pools_first=True),
    "knn": ModelSpec(knn_head, "features", "knn", 0.0, ("pooling",), pools_first=True),
    "conv": ModelSpec(conv_head, "features", "adam", 1e-3, ("filters", "units", "dropout", "l2")),
    "finetune": ModelSpec(finetune_head, "features", "adam", 1e-3, ("tune_to", "units", "pooling", "batchnorm",
                                                                    "dropout", "l2", "train_precision",
                                                                    "map_shift", "seed"),
                          tunes_backbone=True),
    "ann": ModelSpec(ann, "pixels", "sgd", 1e-2, ()),
    "cnn": ModelSpec(cnn, "pixels", "adam", 1e-3, ("dropout", "seed")),
}
HEADS = tuple(k for k, v in MODELS.items() if v.input == "features")
BASELINES = tuple(k for k, v in MODELS.items() if v.input == "pixels")


def fitting_of(config: dict, metrics: dict) -> Fitting:
    """The Fitting of a run on disk, from its records: the head `auto` chose, or the model it names (a model this
    version does not know was fitted by epochs: only the probe and kNN are not)."""
    model = metrics.get("chosen", config.get("model"))
    return MODELS[model].fitting if model in MODELS else EPOCHS
