"""Where a run's rows came from, as one typed record: the cached layers a head trained on (with each cache's
metadata), or what describes other rows (a dataset's raw pixels), and the --per-class subset drawn from them.

It travels with the data (`TrainData.provenance`) and is written into each run's config.json as `data`. The
shapes of that record are the ones runs have always had, so older run folders read back the same:
- one cached layer: {"cache", "cache_key", "layer", "cache_meta"} (and "pooled" when read as pooled vectors);
- several layers, each pooled, concatenated: {"caches": [one record per layer], "pooling"};
- anything else (raw pixels): the fields that describe it ({"dataset", "dataset_name", ...});
- a subset adds "per_class" and "subset_seed".
"""

from __future__ import annotations

from dataclasses import dataclass, field

_SUBSET = ("per_class", "subset_seed")


@dataclass(frozen=True)
class CachedLayer:
    """One cached layer a head trains on: the cache file, its key, the layer, and the cache's metadata."""

    cache: str
    cache_key: str | None
    layer: str
    cache_meta: dict
    pooled: str | None = None      # the global pooling its maps were read through (pooled vectors), if any

    def record(self) -> dict:
        out = {"cache": self.cache, "cache_key": self.cache_key, "layer": self.layer, "cache_meta": self.cache_meta}
        return out | ({"pooled": self.pooled} if self.pooled else {})

    @classmethod
    def of_record(cls, d: dict) -> CachedLayer:
        return cls(d.get("cache", ""), d.get("cache_key"), d.get("layer", ""), d.get("cache_meta", {}), d.get("pooled"))


@dataclass(frozen=True)
class Provenance:
    """Where a run's rows came from (see the module's doc)."""

    layers: tuple[CachedLayer, ...] = ()
    pooling: str | None = None     # several layers: how each was pooled before they were concatenated
    other: dict = field(default_factory=dict)   # rows not from a cache: what describes them
    per_class: int | list | None = None
    subset_seed: int | None = None

    @property
    def joined(self) -> bool:
        """Several layers, each pooled, concatenated per row (in `layers` order)."""
        return self.pooling is not None

    @property
    def metas(self) -> list[dict]:
        """The metadata of each cache the rows came from, in the head's order (none for raw pixels)."""
        return [part.cache_meta for part in self.layers if part.cache_meta]

    def record(self) -> dict:
        """The JSON record of config.json's `data`."""
        subset = {k: getattr(self, k) for k in _SUBSET if getattr(self, k) is not None}
        if self.joined:
            return {"caches": [part.record() for part in self.layers], "pooling": self.pooling} | subset
        if self.layers:
            return self.layers[0].record() | subset
        return dict(self.other) | subset

    def brief(self) -> dict:
        """The record without the caches' metadata (each cache is still named, with its key): for the records of a
        curve, a long-tail table or a search, which point at their runs. (Joined layers kept theirs before.)"""
        strip = lambda d: {k: v for k, v in d.items() if k != "cache_meta"}   # noqa: E731
        record = strip(self.record())
        return record | ({"caches": [strip(c) for c in record["caches"]]} if "caches" in record else {})

    @classmethod
    def of_record(cls, d: dict) -> Provenance:
        """The Provenance of a config.json `data` record (a run's `feed` record beside it is left out)."""
        d = {k: v for k, v in (d or {}).items() if k != "feed"}
        subset = {k: d.pop(k) for k in _SUBSET if k in d}
        if "caches" in d:
            return cls(tuple(CachedLayer.of_record(c) for c in d["caches"]), d.get("pooling"), **subset)
        if "cache_meta" in d:
            return cls((CachedLayer.of_record(d),), **subset)
        return cls(other=d, **subset)
