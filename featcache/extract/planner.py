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
from featcache.extract.spec import KEY_OPTIONS, ExtractSpec
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
    return ds, CacheMeta(
        layer=spec.layer, feature_shape=shapes if len(shapes) > 1 else shapes[spec.layers[0]],
        backbone=spec.backbone,
        weights=backbones.weights_identity(spec.weights, seed=spec.seed, backbone=spec.backbone),
        weights_source=_weights_source(spec.weights), input_shape=(*size, 3), preprocessing=bspec.preprocessing,
        resize=_resize(spec, ds), dtype=spec.dtype, dataset_name=ds.name, dataset_source=ds.source,
        dataset_fingerprint=ds.fingerprint, limit=ds.limit or 0, n_train=len(ds.train), n_test=len(ds.test),
        versions=system.package_versions(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        views=spec.views, augment=spec.augment, augment_seed=spec.augment_seed,
        skipped_images=tuple(tuple(x) for x in ds.skipped), precision=_precision(spec.precision),
        backbone_config=backbones.hub.config_files(bspec) if backbones.hub.is_hub(spec.backbone) else {})


def _resize(spec: ExtractSpec, ds: Dataset) -> str:
    """How images become inputs: image files at an --input-size (or a preset's own size) have their JPEGs
    DCT-scaled first (RESIZE_DCT); without one, every image must be the first's size, so no JPEG is ever scaled
    (and caches keep their keys). A backbone may ask for a centre crop and its own interpolation (a preset's)."""
    bspec = spec.backbone_spec
    resized = bool(spec.input_size or bspec.native_input_size) and ds.train.files is not None
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
    # the cache's own options fill in what was not given, so only the given ones can differ
    spec = ExtractSpec(data=given.get("data", m.dataset_source), backbone=given.get("backbone", m.backbone),
                       layer=given.get("layer", m.layer), views=given.get("views", m.views),
                       augment=given.get("augment", m.augment or "flip,crop"),
                       augment_seed=given.get("augment_seed", m.augment_seed), seed=given.get("seed", 0))
    wanted = {}
    if "data" in given or "limit" in given:
        ds = load_dataset(spec.data, limit=given.get("limit", m.limit or None),
                          skip_bad_images=given.get("skip_bad_images", False) or bool(m.skipped_images),
                          fingerprint_by="stat" if m.dataset_fingerprint.startswith("stat:") else "content")
        wanted.update(dataset_fingerprint=ds.fingerprint, limit=ds.limit or 0)
    if "backbone" in given:
        wanted["backbone"] = spec.backbone
    if "weights" in given:
        wanted["weights"] = backbones.weights_identity(given["weights"], seed=spec.seed, backbone=spec.backbone)
    if "layer" in given and not set(spec.layers) <= set(m.layers):
        wanted["layer"] = spec.layer
    if given.get("input_size") is not None:
        wanted["input_shape"] = (given["input_size"], given["input_size"], 3)
    if "dtype" in given:
        wanted["dtype"] = given["dtype"]
    if "precision" in given:
        wanted["precision"] = backbones.resolve_precision(given["precision"])
    if "views" in given:
        wanted["views"] = spec.views
    if "augment" in given and spec.views > 1:
        wanted["augment"] = spec.augment
    if "augment_seed" in given and spec.views > 1:
        wanted["augment_seed"] = spec.augment_seed
    diffs = differences(m, wanted)
    if diffs:
        raise CacheError(f"{cache.path} does not match what was asked ({'; '.join(diffs)}); fix: leave out --cache "
                         "to use or build the matching cache, or drop the options that differ")
    return cache
