"""What heads train on: `TrainData` and where it comes from (one cache or several layers, in RAM, as
pooled vectors or streamed from disk; raw pixels for the baselines), and the seeded subsets and
stratified validation splits carved from its training split."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from featcache.cache import FeatureCache, dataset_path, expected_bytes, open_cache
from featcache.cache import pooled as pooled_vectors
from featcache.errors import BadInputError
from heads import feed as feeds
from heads.builders import GLOBAL_POOLINGS
from heads.provenance import CachedLayer, Provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedPlan:
    """How the features reach the head: "pooled" vectors, maps in "ram", or maps to "stream" from the cache,
    within `memory_budget_bytes`. Control data for training, and recorded in the run's config.json."""

    mode: str
    memory_budget_bytes: int
    maps_bytes: int | None = None
    stream_forced: bool = False     # --stream: stream even when the maps would fit the budget
    subset_read: bool = False       # streamed maps whose rows in use (a --per-class subset) were read into RAM

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, False)}


@dataclass
class TrainData:
    """Arrays to train on, with the record of where they came from (`provenance`, written into config.json)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    kind: str                      # "features" or "pixels"
    provenance: Provenance = field(default_factory=Provenance)
    random_weights: bool = False
    x_views: np.ndarray | None = None   # (n_train, views - 1, ...) augmented training views, if cached
    #: set when the x arrays hold pooled vectors of maps of `map_shape` (pooled by `pooled_by`, once, in
    #: a derived cache): models are built for the maps and fitted past their pooling layer
    map_shape: tuple | None = None
    pooled_by: str | None = None
    feed: FeedPlan | None = None        # None: arrays given directly (pixels, or a caller's own TrainData)

    @property
    def n_views(self) -> int:
        return 1 if self.x_views is None else 1 + self.x_views.shape[1]


def data_from_cache(cache, layer: str | None = None) -> TrainData:
    """One layer of a complete cache (a path or an opened FeatureCache), both splits read once into RAM.

    `layer` may be left out when the cache holds one layer."""
    cache = _open(cache)
    (x_train, y_train), (x_test, y_test) = cache.load("train", layer), cache.load("test", layer)
    return TrainData(x_train, y_train, x_test, y_test, cache.class_names, "features",
                     provenance=_provenance(cache, cache.select_layer(layer)), random_weights=cache.meta.random_weights,
                     x_views=cache.load_views(layer))


def data_from_caches(caches, pooling: str = "gap", layers=None, *, prepooled: bool = False,
                     memory_budget: int | None = None, stream: bool = False, maps_if_they_fit: bool = False,
                     lazy: bool = False) -> TrainData:
    """Features of `layers` (default: every layer) found in `caches`, the same images in each.

    Several layers are each pooled (gap or max), then concatenated per row. One layer: its pooled
    vectors when the model pools first (`prepooled`); else its maps, in RAM when they fit
    `memory_budget` bytes (default: half the available memory), streamed from disk otherwise or with
    `stream`. With `prepooled` and `maps_if_they_fit`, one layer's maps all the same where they fit in RAM
    (--head auto). Pooled vectors come from derived caches that pool each layer once (featcache.cache.pooled).
    `lazy`: maps are left on disk until the rows in use are known, then read into RAM if those fit
    (`in_ram_if_it_fits`, after a --per-class subset), so a subset never reads the whole split.
    How the data is fed is `TrainData.feed`."""
    memory_budget, stream = feeds.checked_feed(memory_budget, stream)
    sources = layer_sources(open_caches(caches), layers)
    budget = feeds.default_budget() if memory_budget is None else memory_budget
    if len(sources) == 1 and maps_if_they_fit and _maps_fit(*sources[0], budget, stream):
        prepooled = False
    if len(sources) == 1 and not (prepooled and pooling in GLOBAL_POOLINGS):
        return _maps(*sources[0], budget, stream, lazy)
    if pooling not in GLOBAL_POOLINGS:
        raise BadInputError(f"concatenating layers needs --pooling gap or max, got {pooling!r}")
    parts = [_pooled(c, layer, pooling) for c, layer in sources]
    plan = FeedPlan("pooled", budget)
    if len(parts) == 1:
        return replace(parts[0], feed=plan)
    first, layers = parts[0], tuple(p.provenance.layers[0] for p in parts)
    for p, part in zip(parts[1:], layers[1:]):
        same = (part.cache_meta["dataset_fingerprint"] == layers[0].cache_meta["dataset_fingerprint"]
                and part.cache_meta["input_shape"] == layers[0].cache_meta["input_shape"]
                and p.n_views == first.n_views)
        if not same:
            raise BadInputError(f"{part.cache} and {layers[0].cache} hold different images, input sizes or views; "
                                "fix: extract every layer with the same options")
    cat = lambda xs: None if xs[0] is None else np.concatenate(xs, axis=-1)   # noqa: E731
    return TrainData(
        cat([p.x_train for p in parts]), first.y_train, cat([p.x_test for p in parts]), first.y_test,
        first.class_names, "features", provenance=Provenance(layers, pooling),
        random_weights=any(p.random_weights for p in parts), x_views=cat([p.x_views for p in parts]), feed=plan)


def _maps(cache, layer: str, budget: int, stream: bool, lazy: bool = False) -> TrainData:
    """One layer's maps: in RAM when they fit `budget` (and not `lazy`), else (or with `stream`) read from disk as
    training needs."""
    maps = expected_bytes(cache.meta, [layer])
    fits = feeds.keeps_in_ram(maps, budget, stream=stream)
    mode = "ram" if fits and not lazy else "stream"
    if not fits:
        log.info("streaming %s from %s: %s of maps, memory budget %s", layer, cache.path, _gb(maps), _gb(budget))
    data = _streamed(cache, layer) if mode == "stream" else data_from_cache(cache, layer)
    return replace(data, feed=FeedPlan(mode, budget, maps, stream_forced=stream))


def _maps_fit(cache, layer: str, budget: int, stream: bool) -> bool:
    """Whether a layer's cached maps (h, w, c) would be held in RAM (feed.keeps_in_ram)."""
    return (len(cache.meta.shapes[layer]) == 3
            and feeds.keeps_in_ram(expected_bytes(cache.meta, [layer]), budget, stream=stream))


def in_ram_if_it_fits(data: TrainData) -> TrainData:
    """Streamed training maps read into RAM after all when the rows in use (a --per-class subset, say) fit
    the memory budget; the test split stays streamed."""
    plan = data.feed
    rows = [x for x in (data.x_train, data.x_views) if x is not None]
    if not feeds.is_streamed(data.x_train) or plan is None or not feeds.keeps_in_ram(
            sum(x.nbytes for x in rows), plan.memory_budget_bytes, stream=plan.stream_forced):
        return data
    log.info("the %d training rows in use fit the memory budget: read into RAM", len(data.x_train))
    read = lambda x: None if x is None else x[np.arange(len(x))]   # noqa: E731
    return replace(data, x_train=read(data.x_train), x_views=read(data.x_views),
                   feed=replace(plan, mode="ram", subset_read=True))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _provenance(cache, layer: str, pooled: str | None = None) -> Provenance:
    """Rows of one layer of `cache` (read as vectors `pooled` so, if given)."""
    return Provenance((CachedLayer(str(cache.path), cache.meta.key, layer, cache.meta.to_dict(), pooled),))


def _pooled(cache, layer: str, pooling: str) -> TrainData:
    """One layer's pooled vectors (both splits, views), from its derived pooled cache."""
    p = pooled_vectors.pooled(cache, layer, pooling)
    return TrainData(p["train"], p["train_labels"], p["test"], p["test_labels"], cache.class_names, "features",
                     provenance=_provenance(cache, layer, pooling), random_weights=cache.meta.random_weights,
                     x_views=p["views"], map_shape=tuple(cache.meta.shapes[layer]), pooled_by=pooling)


def _streamed(cache, layer: str) -> TrainData:
    """One layer's maps as CachedRows, read from disk as training needs them; labels in RAM."""
    import h5py

    with h5py.File(cache.path, "r") as f:
        y_train, y_test = f["train/labels"][...], f["test/labels"][...]
    rows = {split: feeds.CachedRows(cache.path, dataset_path(cache.meta, split, layer)) for split in ("train", "test")}
    views = feeds.CachedRows(cache.path, dataset_path(cache.meta, "train", layer, views=True)) if cache.meta.views > 1 else None
    return TrainData(rows["train"], y_train, rows["test"], y_test, cache.class_names, "features",
                     provenance=_provenance(cache, layer), random_weights=cache.meta.random_weights, x_views=views)


def _open(cache):
    return cache if isinstance(cache, FeatureCache) else open_cache(cache)


def open_caches(caches) -> list[FeatureCache]:
    return [_open(c) for c in caches]


def layer_sources(caches, layers) -> list[tuple]:
    """(cache, layer) for each layer asked for (a name, "a,b" or a sequence; None: all), first cache holding it."""
    if layers is None:
        sources = [(c, layer) for c in caches for layer in c.layers]
        names = [layer for _, layer in sources]
        for name in names:
            if names.count(name) > 1:
                raise BadInputError(f"{name} is in more than one cache given; fix: pick the layers to train on "
                                    "with --layer")
        return sources
    names = tuple(x.strip() for x in layers.split(",")) if isinstance(layers, str) else tuple(layers)
    if not names or len(set(names)) != len(names):
        raise BadInputError(f"--layer must name distinct layers separated by commas, got {layers!r}")
    sources = []
    for layer in names:   # checked against what the caches hold, whatever backbone made them
        holder = next((c for c in caches if layer in c.layers), None)
        if holder is None:
            held = ", ".join(sorted({name for c in caches for name in c.layers}))
            raise BadInputError(f"no cache given holds {layer} (they hold {held}); fix: extract it, or pick "
                                "one of those layers with --layer")
        sources.append((holder, layer))
    return sources


def data_from_dataset(ds, input_size: int | None = None) -> TrainData:
    """Raw uint8 pixels of both splits of a featcache Dataset (for the scratch baselines), resized to
    `input_size` x `input_size` when given (images of mixed sizes need it)."""
    x_train = ds.train.all_pixels((input_size, input_size) if input_size else None)
    x_test = ds.test.all_pixels(x_train.shape[1:3])
    return TrainData(x_train, ds.train.labels, x_test, ds.test.labels, ds.class_names, "pixels",
                     provenance=Provenance(other={"dataset": ds.source, "dataset_name": ds.name,
                                                  "dataset_fingerprint": ds.fingerprint, "limit": ds.limit or 0}))


def stratified_subset(y: np.ndarray, per_class, seed: int, class_names=None) -> np.ndarray:
    """Sorted row indices of `per_class` rows of each class (an int, or one count per class), drawn without
    replacement (seeded)."""
    n_classes = len(class_names) if class_names is not None else int(y.max()) + 1
    counts = np.bincount(y, minlength=n_classes)
    wanted = np.asarray(per_class, np.int64)
    if wanted.ndim and wanted.shape != (n_classes,):
        raise BadInputError(f"per-class counts must give one count for each of the {n_classes} classes, got "
                            f"{len(wanted)}")
    wanted = np.broadcast_to(wanted, (n_classes,))
    short = np.flatnonzero(counts < wanted)
    if len(short):
        c = int(short[0])
        name = class_names[c] if class_names is not None else str(c)
        fewest = class_names[int(counts.argmin())] if class_names is not None else str(int(counts.argmin()))
        fix = ("ask for fewer images of it" if np.ndim(per_class) else
               f"pass --per-class {counts.min()} or less" if counts.min() >= 2 else   # below 2: no validation row
               f"give class {fewest!r} at least 2 training images (a validation split needs 2 of each class), or "
               "leave it out")
        raise BadInputError(f"--per-class {wanted[c]} is more than the {counts[c]} training images of class "
                            f"{name!r}; fix: {fix}")
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), wanted[c], replace=False)
                                   for c in range(n_classes)]))


def split_indices(y: np.ndarray, val_fraction: float, seed: int, class_names=None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train, validation) row indices into the training split.

    Every class present gets at least one validation row and keeps at least one training row, also
    when `val_fraction` of a small split is fewer rows than there are classes; a class with a
    single row cannot be split and is refused.
    """
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    if np.count_nonzero(counts) < 2:
        held = [class_names[c] if class_names is not None else str(c) for c in np.flatnonzero(counts)]
        raise BadInputError(f"the training split holds one class ({', '.join(held) or 'none'}); a classifier needs at "
                            "least two; fix: give images of more classes (--limit keeps the first images in source "
                            "order, often of one class: train-head --per-class N draws N of every class)")
    if (counts == 1).any():
        lone = int(np.flatnonzero(counts == 1)[0])
        name = class_names[lone] if class_names is not None else str(lone)
        raise BadInputError(f"class {name!r} has 1 training image; a validation split needs at least 2 per class; "
                            "fix: give that class at least 2 training images, or leave it out (with --per-class: "
                            "2 or more)")
    present = counts[counts > 0]
    n_val = round(val_fraction * len(y))
    idx = np.arange(len(y))
    if len(present) <= n_val <= len(y) - len(present):
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=y)
        return np.sort(tr), np.sort(va)
    rng = np.random.default_rng(seed)   # too few rows for sklearn's proportions: at least one each side per class
    va = []
    for c in np.flatnonzero(counts):
        rows = rng.permutation(np.flatnonzero(y == c))
        va.append(rows[:min(len(rows) - 1, max(1, round(val_fraction * len(rows))))])
    va = np.sort(np.concatenate(va))
    return np.setdiff1d(idx, va), va


def subset(data: TrainData, per_class, seed: int) -> TrainData:
    """`data` with `per_class` training images per class (an int, or one count per class: a long-tailed
    subset), drawn stratified and seeded; the test split untouched."""
    rows = stratified_subset(data.y_train, per_class, seed, data.class_names)
    pick = lambda x: None if x is None else x.take(rows) if feeds.is_streamed(x) else x[rows]   # noqa: E731
    recorded = per_class if np.ndim(per_class) == 0 else [int(n) for n in per_class]
    return replace(data, x_train=pick(data.x_train), y_train=data.y_train[rows], x_views=pick(data.x_views),
                   provenance=replace(data.provenance, per_class=recorded, subset_seed=seed))
