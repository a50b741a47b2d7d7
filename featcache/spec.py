"""Every extraction option in one place: its default, its environment variable and its check.

`ExtractSpec` is the one source for the Python API (`featcache.extract.extract(**options)`), the
CLI (which builds its options from the fields' metadata), `check_cache` and the benchmarks. It is
validated once, when it is made; every later step can trust it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from featcache import augment as aug
from featcache import backbones
from featcache.data import FINGERPRINTS
from featcache.errors import BadInputError

DTYPES = ("float16", "float32")
DECODERS = ("auto", "threads", "processes")
ENGINES = ("local", "ray")
CACHE_DIR_ENV = "FEATCACHE_CACHE_DIR"
#: The options that decide which cache a spec leads to (its key); the others only say how to build it.
KEY_OPTIONS = ("data", "backbone", "weights", "layer", "input_size", "dtype", "precision", "limit", "views",
               "augment", "augment_seed")


def _option(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class ExtractSpec:
    data: object = _option(
        "cifar10", "'cifar10' (Keras download), an image folder ROOT/{train,test}/<class>/, a cifar-10-batches-py "
        "folder or cifar-10-python.tar.gz, or an .npz (x_train, y_train, x_test, y_test).")
    backbone: str = _option(backbones.DEFAULT_BACKBONE, "Frozen Keras backbone (`featcache backbones` lists them "
                            "with their layers).", choices=tuple(backbones.BACKBONES))
    weights: str = _option("imagenet", "'imagenet' (Keras download), a path to the backbone's no-top weights file "
                           "(e.g. vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5), or 'random' (tests only; "
                           "flagged everywhere).")
    layer: str | None = _option(None, "Layer to cut the backbone at (default: the backbone's own, block3_pool for "
                                "vgg16); several, comma-separated, share one forward pass and one cache file "
                                "(train-head concatenates their pooled features; with --cache, picks these layers "
                                "from the file).")
    input_size: int | None = _option(None, "Resize images to NxN (N >= the backbone's minimum, 32). Default: the "
                                     "images' own size (32 for CIFAR-10).")
    dtype: str = _option("float16", "Storage dtype; float16 halves the file and refuses activations beyond its "
                         "range.", choices=DTYPES)
    limit: int | None = _option(None, "Keep only the first N images of each split, in source order (smoke tests: an "
                                "image folder is in class order, so few classes may remain; part of the cache key). "
                                "For a balanced subset use train-head --per-class.", min=1)
    precision: str = _option("float32", "Compute precision of the backbone (storage is --dtype). 'auto' picks "
                             "bfloat16 on CPUs with native bf16 (AVX512_BF16, AMX) and on GPUs of compute "
                             "capability 8.0+, float16 on older GPUs, float32 otherwise: about 2x faster where it "
                             "applies, features within ~0.5% of float32. Part of the cache key.",
                             choices=backbones.PRECISIONS)
    views: int = _option(1, "Feature views per training image: the original plus VIEWS-1 augmented copies.", min=1)
    augment: str = _option(aug.DEFAULT_AUGMENT, "Augmentations of views 2.. (flip: horizontal flip; crop: pad 1/8 "
                           "and random crop).")
    augment_seed: int = _option(0, "Seed of the augmented views.")
    skip_bad_images: bool = _option(False, "Decode every image once first and leave out those that fail (recorded "
                                    "in the cache, shown by `info`) instead of stopping at the first.", flag=True)
    fingerprint: str = _option("auto", "How an image folder is fingerprinted (its part of the cache key): 'content' "
                               "hashes every byte (a full read of the dataset on every run), 'stat' each file's "
                               "size and modification time; 'auto' hashes content up to 100,000 images and stats "
                               "above. In-memory sources are always hashed by content.", choices=FINGERPRINTS)
    cache_dir: str | None = _option(None, f"Cache folder [default: ${CACHE_DIR_ENV} or ./cache].", env=CACHE_DIR_ENV)
    batch_size: int = _option(128, "Images per forward pass.", min=1, cli="extract")
    decode_workers: int | None = _option(None, "Workers decoding images ahead of the model [default: the number of "
                                         "CPU cores, at most 8]. --engine local only.", min=1, cli="extract")
    decoder: str = _option("auto", "Where images decode: 'threads' (one process; enough for a few cores), "
                           "'processes' (decoding scales with cores, for image files feeding a GPU) or 'auto' "
                           "(processes for image files when there are more than 4 decode workers). "
                           "--engine local only.", choices=DECODERS, cli="extract")
    engine: str = _option("local", "Who runs the extraction: 'local' (this process) or 'ray' (shards on Ray actors, "
                          "one per GPU or per --workers, on the cluster at --ray-address or a local one, each "
                          "decoding in its own threads; needs `pip install featcache[ray]`). Both give the same "
                          "cache.", choices=ENGINES, cli="extract")
    ray_address: str | None = _option(None, "Ray cluster to run on (e.g. ray://head:10001 or auto) [default: "
                                      "$RAY_ADDRESS, else a local cluster started and stopped by featcache].",
                                      cli="extract")
    workers: int | None = _option(None, "Ray workers [default: one per GPU of the cluster, else one per CPU]; "
                                  "each builds the backbone once and runs shard after shard.", min=1, cli="extract")
    shard_rows: int | None = _option(None, "Rows per shard with --engine ray [default: about 256 shards: the rows / "
                                     "256 rounded up to whole 1,024s, at most 65,536 rows and 4 GiB a shard].", min=1,
                                     cli="extract")
    seed: int = _option(0, "Seed of 'random' weights.", cli=False)

    def __post_init__(self):
        spec = backbones.get(self.backbone)
        layers = backbones.check_layers(spec, self.layer or spec.default_layer)
        set_ = lambda name, value: object.__setattr__(self, name, value)   # noqa: E731  (frozen)
        set_("layer", ",".join(layers))
        backbones.check_input_size(self.input_size, spec)
        if self.dtype not in DTYPES:
            raise BadInputError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name, low in (("limit", 1), ("views", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if value is None and name == "limit":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BadInputError(f"--{name.replace('_', '-')} must be at least {low}, got {value!r}")
        set_("augment", ",".join(aug.parse(self.augment)) if self.views > 1 else "")
        if self.views == 1:
            set_("augment_seed", 0)
        if self.cache_dir is None:
            set_("cache_dir", os.environ.get(CACHE_DIR_ENV) or "cache")
        if self.precision not in backbones.PRECISIONS:
            raise BadInputError(f"--precision must be one of {', '.join(backbones.PRECISIONS)}, "
                                f"got {self.precision!r}")
        if self.engine == "ray" and (self.decoder != "auto" or self.decode_workers is not None):
            raise BadInputError("--decoder and --decode-workers apply to --engine local; under Ray each worker "
                                "decodes in threads, one per CPU it holds")
        if self.decode_workers is None:
            set_("decode_workers", min(8, os.cpu_count() or 1))
        elif isinstance(self.decode_workers, bool) or not isinstance(self.decode_workers, int) \
                or self.decode_workers < 1:
            raise BadInputError(f"--decode-workers must be at least 1, got {self.decode_workers!r}")
        if self.fingerprint not in FINGERPRINTS:
            raise BadInputError(f"--fingerprint must be one of {', '.join(FINGERPRINTS)}, got {self.fingerprint!r}")
        if self.engine not in ENGINES:
            raise BadInputError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        for name in ("workers", "shard_rows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise BadInputError(f"--{name.replace('_', '-')} must be at least 1, got {value!r}")
        if self.engine == "local" and (self.ray_address or self.workers or self.shard_rows):
            raise BadInputError("--ray-address, --workers and --shard-rows need --engine ray")
        if self.decoder not in DECODERS:
            raise BadInputError(f"--decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.layer.split(","))

    @property
    def backbone_spec(self) -> backbones.BackboneSpec:
        return backbones.get(self.backbone)


def options() -> list:
    """The dataclass fields of ExtractSpec, in order (what the CLI turns into options)."""
    return list(fields(ExtractSpec))
