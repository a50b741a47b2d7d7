"""The HDF5 feature cache: its format, the files around it, writing, reading, pooled vectors, shards.

Layers inside: `format` (what a file holds) ◄ `files` (partial, lock, resume point, the one write-verify-
rename path) ◄ `write` ◄ `shards` (join, consolidate); `files` ◄ `pooled` ◄ `read` (open_cache,
FeatureCache, streams). Reading never imports writing. Nothing here imports extraction: caches are made by `featcache.extract`, read by anyone.
"""

from featcache.cache.format import (FORMAT_VERSION, SPLITS, CacheMeta, cache_filename, cache_key, dataset_path,
                                    differences, expected_bytes, feature_datasets, row_bytes)
from featcache.cache.read import FeatureCache, SplitInfo, open_cache

__all__ = ["FORMAT_VERSION", "SPLITS", "CacheMeta", "FeatureCache", "SplitInfo", "cache_filename", "cache_key",
           "dataset_path", "differences", "expected_bytes", "feature_datasets", "open_cache", "row_bytes"]
