"""Build a cache, or reuse it: the orchestration of an extraction.

`extract(**options)` validates the options once (`ExtractSpec`), plans the cache they lead to
(`featcache.extract.planner`), and reuses it when it exists. Otherwise the file is built under
``<name>.partial`` by an engine (`featcache.extract.local` here, `featcache.extract.ray` on a
cluster: units of rows, written batch by batch and counted in the file's `/progress`) and renamed
into place when complete, so an interrupted run resumes and a finished name is never half-written.
The cache's lock (`featcache.cache.files`) keeps two processes from building it at once. Several
layers share one forward pass and one file; cached augmentation views of the training split are
computed in the same pass.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from featcache import backbones, system
from featcache.cache import CacheMeta, FeatureCache, cache_filename, differences, expected_bytes, open_cache
from featcache.cache.files import cache_lock, partial_path, publish, resume_point
from featcache.cache.read import verify
from featcache.cache.write import combine
from featcache.errors import BadInputError, CacheError
from featcache.extract import local
from featcache.extract.planner import plan
from featcache.extract.spec import CACHE_DIR_ENV, ExtractSpec

log = logging.getLogger(__name__)


def extract(*, force: bool = False, progress: bool = True, after_batch=None, **options) -> Path:
    """Extract the features that `options` (the fields of `featcache.ExtractSpec`: data, backbone,
    weights, layer, input_size, dtype, limit, views, augment, augment_seed, skip_bad_images, cache_dir,
    batch_size, seed, engine...) describe, and return the cache's path.

    Several layers ("block3_pool,block4_pool") share one forward pass and one file. A complete cache
    with the same key is reused at once; `force` recomputes it. With `views` > 1 the training split
    also gets views - 1 augmented copies per image; test features are always of the original images.
    `cache_dir` defaults to $FEATCACHE_CACHE_DIR, then ./cache. `after_batch(split, start, stop)`, if
    given, is called (in the process that computed it) once each batch is on disk.
    """
    spec = ExtractSpec(**options)
    ds, meta = plan(spec)
    final = Path(spec.cache_dir).expanduser() / cache_filename(meta)
    if final.exists() and not force:   # complete by construction (renamed into place): no lock, no write access
        return _hit(final, meta)
    system.writable_folder(spec.cache_dir, what="cache folder", fix=f"pass a writable --cache-dir or set "
                                                                     f"{CACHE_DIR_ENV}")
    with cache_lock(final):
        if final.exists() and not force:
            return _hit(final, meta)
        any_size = spec.input_size or spec.backbone_spec.native_input_size   # every image resized
        decoding = local.Decoding.of(meta, None if any_size else ds.train.native_size())
        _build(ds, meta, final, spec, force=force, progress=progress, decoding=decoding, after_batch=after_batch)
        publish(partial_path(final), final, lambda written: verify(written, meta))
        log.info("cache: %s (%s)", final, system.megabytes(open_cache(final).size_bytes))
    return final


def _build(ds, meta: CacheMeta, final: Path, spec: ExtractSpec, *, force: bool, progress: bool,
           decoding: local.Decoding, after_batch) -> None:
    """Write the cache of `meta` at its partial name: combined from one-layer caches, or computed."""
    partial = partial_path(final)
    singles = None if force else _single_layer_caches(final.parent, meta)
    if singles:
        log.info("combining %s into one file (rows copied, no forward pass)", ", ".join(str(c.path) for c in singles))
        _check_disk_space(final.parent, meta, 0)
        combine(singles, partial, batch_size=spec.batch_size)
    elif spec.engine == "ray":
        from featcache.extract import ray

        _check_disk_space(final.parent, meta, 0 if force else ray.done_bytes(final, meta, spec))
        check_batch_memory(meta, spec)
        ray.run(ds, meta, partial, spec=spec, progress=progress, force=force, decoding=decoding,
                after_batch=after_batch)
    else:
        _report_ray_leftovers(final)
        if force:
            partial.unlink(missing_ok=True)
        start = resume_point(partial, meta)
        _check_disk_space(final.parent, meta, partial.stat().st_size if start is not None else 0)
        check_batch_memory(meta, spec)
        local.run_local(ds, meta, partial, start, spec=spec, progress=progress, decoding=decoding,
                        after_batch=after_batch)


def _report_ray_leftovers(final: Path) -> None:
    """A local run beside the shard folder of an interrupted Ray run: say what is left and how to stop it."""
    from featcache.cache.shards import folder

    shards = folder(final)
    if not shards.is_dir():
        return
    running = ""
    if (shards / "ray-processes.json").exists():
        try:
            from featcache import cluster

            alive = cluster.leftovers(shards)
            running = f"; {len(alive)} of the Ray processes it started still run (pids {[p.pid for p in alive]})"
        except ImportError:   # no psutil: say what the record is, without looking
            running = "; it recorded the Ray processes it started in ray-processes.json"
    log.warning("%s holds shards of an interrupted --engine ray run of this cache, not used by --engine local%s; a "
                "rerun with --engine ray resumes them and stops its leftover processes; or delete the folder",
                shards, running)


def _hit(final: Path, meta: CacheMeta) -> Path:
    cached = open_cache(final)
    if cached.meta.shapes != meta.shapes:   # same key, other shapes: the attributes were edited
        backbones.check_cached_shapes(final, meta.backbone, meta.input_shape[:2], cached.meta.shapes)
    if cached.meta.key != meta.key:
        diffs = differences(cached.meta, meta.key_fields())
        raise CacheError(f"{final} holds another extraction ({'; '.join(diffs)}); fix: rerun with --force to "
                         "rebuild it")
    log.info("cache hit: %s (%s)", final, system.megabytes(cached.size_bytes))
    return final


def _single_layer_caches(folder: Path, meta: CacheMeta) -> list[FeatureCache] | None:
    """For several layers: complete one-layer caches of each, with the same options, if all exist."""
    if len(meta.layers) == 1:
        return None
    found = []
    for layer, shape in meta.shapes.items():
        single = dataclasses.replace(meta, layer=layer, feature_shape=shape)
        try:
            cache = open_cache(folder / cache_filename(single))
        except CacheError:
            return None
        if cache.meta.key != single.key:
            return None
        found.append(cache)
    return found


def _check_disk_space(folder: Path, meta: CacheMeta, have: int) -> None:
    """Log the expected size; refuse before any work when what is left to write (`have` bytes are written
    already) cannot fit the free space."""
    need = expected_bytes(meta)
    log.info("expected cache size: %s", system.megabytes(need))
    system.check_free_space(folder, need, have=have, fix="free some space, pass another --cache-dir, or lower "
                                                         "--input-size or --views")


def check_batch_memory(meta: CacheMeta, spec: ExtractSpec) -> None:
    """Refuse a batch whose forward pass cannot fit in memory, before any work (instead of a crash later)."""
    h, w = meta.input_shape[:2]
    per_pixel = spec.backbone_spec.peak_bytes_per_pixel
    batch_size = min(spec.batch_size, max(meta.n_train, meta.n_test))   # the largest batch that will run
    need = batch_size * h * w * per_pixel
    have = system.available_memory()
    if need > 0.8 * have:
        fits = max(0, int(0.8 * have // (h * w * per_pixel)))
        fix = f"pass --batch-size {fits} or less" if fits else "lower --input-size"
        raise BadInputError(f"one batch of {batch_size} images at {h}x{w} needs about {need / 1e9:.1f} GB but "
                            f"{have / 1e9:.1f} GB of memory is available; fix: {fix}")
