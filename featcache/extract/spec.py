"""Every extraction option in one place: its default, its environment variable and its constraints.

`ExtractSpec` is the one source for the Python API (`featcache.extract.extract(**options)`), the
CLI (which builds its options from the fields' declarations, `featcache.options`), `check_cache`
and the benchmarks. It is validated once, when it is made, by the one validator of option sets
plus the cross-field rules below; every later step can trust it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from featcache import augment as aug
from featcache import backbones
from featcache.cluster import ENGINES
from featcache.errors import BadInputError
from featcache.options import declared, option, validate
from featcache.sources import FINGERPRINTS

DTYPES = ("float16", "float32")
DECODERS = ("auto", "threads", "processes")
CACHE_DIR_ENV = "FEATCACHE_CACHE_DIR"
#: The cache key, declared once: each option that decides which cache a spec leads to, with the CacheMeta fields
#: it sets (what `CacheMeta.key` hashes, besides the format version that the layers decide). `planner.key_values`
#: derives the fields, for `plan` to name a new cache and for `check_cache` to compare a given one field by field.
#: The other options only say how to build a cache.
KEY = {
    "data": ("dataset_fingerprint", "limit"),
    "limit": ("dataset_fingerprint", "limit"),
    "backbone": ("backbone",),
    "weights": ("weights",),
    "layer": ("layer",),
    "input_size": ("input_shape", "resize"),   # files at an --input-size are DCT-scaled: another resize method
    "dtype": ("dtype",),
    "precision": ("precision",),
    "views": ("views",),
    "augment": ("augment",),
    "augment_seed": ("augment_seed",),
}
KEY_OPTIONS = tuple(KEY)


@dataclass(frozen=True)
class ExtractSpec:
    data: object = option(
        "cifar10", "'cifar10' (Keras download), an image folder ROOT/{train,test}/<class>/, a cifar-10-batches-py "
        "folder or cifar-10-python.tar.gz, or an .npz (x_train, y_train, x_test, y_test).", kind="any")
    backbone: str = option(backbones.DEFAULT_BACKBONE, "Frozen backbone: a Keras application ("
                            f"{', '.join(backbones.BACKBONES)}) or a KerasHub preset, hub:NAME "
                            "(downloaded) or hub:PATH (a local preset folder); `featcache backbones` lists them with "
                            "their layers.", kind="str")
    weights: str = option("imagenet", "'imagenet' (Keras download; for a KerasHub preset: the preset's own "
                           "weights), a path to the backbone's no-top weights file (e.g. "
                           "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5, or a preset's .weights.h5), or "
                           "'random' (tests only; flagged everywhere).", kind="path")
    layer: str | None = option(None, "Layer to cut the backbone at (default: the backbone's own, block3_pool for "
                                "vgg16); several, comma-separated, share one forward pass and one cache file "
                                "(train-head concatenates their pooled features; with --cache, picks these layers "
                                "from the file).", kind="any")
    input_size: int | None = option(None, "Resize images to NxN (N >= the backbone's minimum, 32). Default: the "
                                     "images' own size (32 for CIFAR-10).", kind="int")
    dtype: str = option("float16", "Storage dtype; float16 halves the file and refuses activations beyond its "
                         "range.", kind="str", choices=DTYPES)
    limit: int | None = option(None, "Keep only the first N images of each split, in source order (smoke tests: an "
                                "image folder is in class order, so few classes may remain; part of the cache key). "
                                "For a balanced subset use train-head --per-class.", kind="int", low=1)
    precision: str = option("float32", "Compute precision of the backbone (storage is --dtype). 'auto' picks "
                             "bfloat16 on CPUs with native bf16 (AVX512_BF16, AMX) and on GPUs of compute "
                             "capability 8.0+, float16 on older GPUs, float32 otherwise: about 2x faster where it "
                             "applies, features within ~0.5% of float32. Part of the cache key.",
                             kind="str", choices=backbones.PRECISIONS)
    views: int = option(1, "Feature views per training image: the original plus VIEWS-1 augmented copies.", kind="int", low=1)
    augment: str = option(aug.DEFAULT_AUGMENT, "Augmentations of views 2.. (flip: horizontal flip; crop: pad 1/8 "
                           "and random crop).", kind="str")
    augment_seed: int = option(0, "Seed of the augmented views.", kind="int")
    skip_bad_images: bool = option(False, "Decode every image once first and leave out those that fail (recorded "
                                    "in the cache, shown by `info`) instead of stopping at the first.", kind="bool",
                                    flag=True)
    fingerprint: str = option("auto", "How an image folder is fingerprinted (its part of the cache key): 'content' "
                               "hashes every byte (a full read of the dataset on every run), 'stat' each file's "
                               "size and modification time; 'auto' hashes content up to 100,000 images and stats "
                               "above. In-memory sources are always hashed by content.", kind="str",
                               choices=FINGERPRINTS)
    cache_dir: str | None = option(None, f"Cache folder [default: ${CACHE_DIR_ENV} or ./cache].", kind="path", env=CACHE_DIR_ENV,
                                path=True)
    batch_size: int = option(128, "Images per forward pass.", kind="int", low=1, cli="extract")
    decode_workers: int | None = option(None, "Workers decoding images ahead of the model [default: the number of "
                                         "CPU cores, at most 8]. --engine local only.", kind="int", low=1,
                                         cli="extract")
    decoder: str = option("auto", "Where images decode: 'threads' (one process; enough for a few cores), "
                           "'processes' (decoding scales with cores, for image files feeding a GPU) or 'auto' "
                           "(processes for image files when there are more than 4 decode workers). "
                           "--engine local only.", kind="str", choices=DECODERS, cli="extract")
    engine: str = option("local", "Who runs the extraction: 'local' (this process) or 'ray' (shards on Ray actors, "
                          "one per GPU or per --workers, on the cluster at --ray-address or a local one, each "
                          "decoding in its own threads; needs `pip install featcache[ray]`). Both give the same "
                          "cache.", kind="str", choices=ENGINES, cli="extract")
    ray_address: str | None = option(None, "Ray cluster to run on (e.g. ray://head:10001 or auto) [default: "
                                      "$RAY_ADDRESS, else a local cluster started and stopped by featcache].",
                                      kind="str", cli="extract")
    workers: int | None = option(None, "Ray workers [default: one per GPU of the cluster, else one per CPU]; "
                                  "each builds the backbone once and runs shard after shard.", kind="int", low=1,
                                  cli="extract")
    shard_rows: int | None = option(None, "Rows per shard with --engine ray [default: about 256 shards: the rows / "
                                     "256 rounded up to whole 1,024s, at most 65,536 rows and 4 GiB a shard].",
                                     kind="int", low=1, cli="extract")
    seed: int = option(0, "Seed of 'random' weights.", kind="int", cli=False)

    def __post_init__(self):
        validate(self)   # every field against its declaration; what follows are the rules across fields
        spec = backbones.get(self.backbone)   # the one check of --backbone: a registry name or a preset
        set_ = lambda name, value: object.__setattr__(self, name, value)   # noqa: E731  (frozen)
        set_("backbone", spec.name)   # a bare preset name, or a folder, as caches record it
        set_("layer", ",".join(backbones.check_layers(spec, self.layer or spec.default_layer)))
        backbones.check_input_size(self.input_size, spec)
        set_("augment", ",".join(aug.parse(self.augment)) if self.views > 1 else "")
        if self.views == 1:
            set_("augment_seed", 0)
        if self.cache_dir is None:
            set_("cache_dir", os.environ.get(CACHE_DIR_ENV) or "cache")
        if self.engine == "ray" and (self.decoder != "auto" or self.decode_workers is not None):
            raise BadInputError("--decoder and --decode-workers apply to --engine local; under Ray each worker "
                                "decodes in threads, one per CPU it holds")
        if self.decode_workers is None:
            set_("decode_workers", min(8, os.cpu_count() or 1))
        if self.engine == "local" and (self.ray_address or self.workers or self.shard_rows):
            raise BadInputError("--ray-address, --workers and --shard-rows need --engine ray")

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.layer.split(","))

    @property
    def backbone_spec(self) -> backbones.BackboneSpec:
        return backbones.get(self.backbone)


def options() -> list:
    """The declared fields of ExtractSpec, in order (what the CLI turns into options)."""
    return declared(ExtractSpec)
