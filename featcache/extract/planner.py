"""Planning an extraction: which cache the options lead to (`plan`), the units of work it is cut into
(`units`), and whether an existing cache matches given options (`check_cache`). Nothing is computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from featcache import backbones, sources, system
from featcache.cache import CacheMeta, FeatureCache, differences, open_cache
from featcache.errors import BadInputError, CacheError
from featcache.extract.spec import KEY, KEY_OPTIONS, ExtractSpec
from featcache.sources import Dataset, load_dataset

log = logging.getLogger(__name__)

#: Rows per unit: a few minutes of work for VGG16 at 32 px on 2 CPU cores.
SHARD_ROWS = 65536


def plan(spec: ExtractSpec | None = None, **options) -> tuple[Dataset, CacheMeta]:
    """Describe the cache that `spec` (or the options of an ExtractSpec) leads to, without running the backbone."""
    spec = spec if spec is not None else ExtractSpec(**options)
    bspec = spec.backbone_spec
    data = spec.data
    ds = data if isinstance(data, Dataset) else load_dataset(data, limit=spec.limit,
                                                             skip_bad_images=spec.skip_bad_images,
                                                             fingerprint_by=spec.fingerprint)
    if spec.input_size or bspec.native_input_size:   # a preset's own size, unless one is given
        size = (spec.input_size or bspec.native_input_size,) * 2
    else:
        size = ds.default_input_size(bspec.min_input_size)
        if ds.test.pixels is not None and ds.test.native_size() != ds.train.native_size():
            raise BadInputError(f"train images are {ds.train.native_size()} but test images are "
                                f"{ds.test.native_size()}; fix: pass --input-size N")
    all_shapes = backbones.output_shapes(spec.backbone, size)
    shapes = {name: all_shapes[name] for name in spec.layers}
    key = key_values(spec, KEY_FIELDS, ds=ds, size=size, files=ds.train.files is not None)
    return ds, CacheMeta(
        **key, feature_shape=shapes if len(shapes) > 1 else shapes[spec.layers[0]],
        weights_source=_weights_source(spec.weights), preprocessing=bspec.preprocessing,
        dataset_name=ds.name, dataset_source=ds.source, n_train=len(ds.train), n_test=len(ds.test),
        versions=system.package_versions(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        skipped_images=tuple(tuple(x) for x in ds.skipped),
        backbone_config=backbones.hub.config_files(bspec) if backbones.hub.is_hub(spec.backbone) else {})


#: Every CacheMeta field the key options set (spec.KEY), in the order they are declared.
KEY_FIELDS = tuple(dict.fromkeys(f for fields in KEY.values() for f in fields))


def key_values(spec: ExtractSpec, fields, *, ds: Dataset | None = None, size: tuple[int, int] | None = None,
               files: bool = False) -> dict:
    """The key `fields` of the cache `spec` leads to: the one derivation that `plan` (naming a new cache) and
    `check_cache` (comparing a given one) share. Only the fields asked for are computed: the dataset's need `ds`,
    input_shape needs `size`, resize whether the images are files, and weights hashes a weights file."""
    derive = {
        "dataset_fingerprint": lambda: ds.fingerprint, "limit": lambda: ds.limit or 0,
        "backbone": lambda: spec.backbone, "layer": lambda: spec.layer,
        "weights": lambda: backbones.weights_identity(spec.weights, seed=spec.seed, backbone=spec.backbone),
        "input_shape": lambda: (*size, 3), "resize": lambda: _resize(spec, files),
        "dtype": lambda: spec.dtype, "precision": lambda: _precision(spec.precision),
        "views": lambda: spec.views, "augment": lambda: spec.augment, "augment_seed": lambda: spec.augment_seed,
    }
    return {name: derive[name]() for name in fields}


def _resize(spec: ExtractSpec, files: bool) -> str:
    """How images become inputs: image `files` at an --input-size (or a preset's own size) have their JPEGs
    DCT-scaled first (RESIZE_DCT); without one, every image must be the first's size, so no JPEG is ever scaled
    (and caches keep their keys). A backbone may ask for a centre crop and its own interpolation (a preset's)."""
    bspec = spec.backbone_spec
    resized = bool(spec.input_size or bspec.native_input_size) and files
    return sources.resize_text(dct=resized, crop=bspec.crop, interpolation=bspec.interpolation)


def _weights_source(weights) -> str:
    """What the user passed, with a file made absolute: predict and export find it again from any folder."""
    return str(weights) if str(weights) in ("imagenet", "random") else str(Path(weights).expanduser().absolute())


def _precision(asked: str) -> str:
    chosen = backbones.resolve_precision(asked)
    if asked == "auto":
        log.info("--precision auto: computing in %s on this machine", chosen)
    return chosen


@dataclass(frozen=True)
class Unit:
    split: str          # "train" or "test"
    start: int          # first row
    stop: int           # one past the last row

    def done(self, progress: dict) -> bool:
        return progress[self.split] >= self.stop


def units(meta: CacheMeta, shard_rows: int = SHARD_ROWS) -> list[Unit]:
    """Every row of both splits, in order, cut into units of at most `shard_rows` rows."""
    return [Unit(split, s, min(s + shard_rows, n))
            for split, n in (("train", meta.n_train), ("test", meta.n_test)) for s in range(0, n, shard_rows)]


def check_cache(path: str | Path, **given) -> FeatureCache:
    """Open a complete cache and check it against the extraction options `given` (any key option of
    ExtractSpec: data, backbone, weights, layer, input_size, dtype, limit, views, augment, augment_seed);
    a CacheError names each field that differs."""
    unknown = set(given) - set(KEY_OPTIONS) - {"skip_bad_images", "seed"}
    if unknown:
        raise TypeError(f"check_cache() got options it cannot compare: {', '.join(sorted(unknown))}")
    cache = open_cache(path)
    m = cache.meta
    backbones.hub.recall(m.backbone, m.backbone_config)   # a preset folder that has moved: its graph from the cache
    if given:   # asked for something: the file must really be it (its shapes, the backbone's at that layer)
        backbones.check_cached_shapes(cache.path, m.backbone, m.input_shape[:2], m.shapes)
    if given.get("input_size") is None:
        given.pop("input_size", None)   # not asked: the cache's own size
    # the cache's own options fill in what was not given, so only the given ones can differ
    spec = ExtractSpec(data=given.get("data", m.dataset_source), backbone=given.get("backbone", m.backbone),
                       weights=given.get("weights", m.weights_source), layer=given.get("layer", m.layer),
                       input_size=given.get("input_size"), dtype=given.get("dtype", m.dtype),
                       precision=given.get("precision", m.precision), views=given.get("views", m.views),
                       augment=given.get("augment", m.augment or "flip,crop"),
                       augment_seed=given.get("augment_seed", m.augment_seed), seed=given.get("seed", 0))
    fields = [f for f in KEY_FIELDS if any(f in KEY[option] for option in given if option in KEY)]
    if "layer" in fields and set(spec.layers) <= set(m.layers):
        fields.remove("layer")   # picking layers of a several-layer file
    ds = None
    if "dataset_fingerprint" in fields:
        ds = load_dataset(spec.data, limit=given.get("limit", m.limit or None),
                          skip_bad_images=given.get("skip_bad_images", False) or bool(m.skipped_images),
                          fingerprint_by="stat" if m.dataset_fingerprint.startswith("stat:") else "content")
    size = (spec.input_size,) * 2 if spec.input_size else None
    files = "resize" in fields and (ds.train.files if ds is not None else cache.paths("train")) is not None
    wanted = key_values(spec, fields, ds=ds, size=size, files=files)
    diffs = differences(m, wanted)
    if diffs:
        differing = {f for f in wanted if differences(m, {f: wanted[f]})}
        options = [f"--{o.replace('_', '-')}" for o in given if differing & set(KEY.get(o, ()))]
        raise CacheError(f"{cache.path} does not match what was asked ({'; '.join(diffs)}); fix: leave out --cache "
                         f"to use or build the matching cache, or drop {', '.join(options)}")
    return cache
