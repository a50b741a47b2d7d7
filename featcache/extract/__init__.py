"""Extraction: run a frozen backbone once over a dataset and write its features to an HDF5 cache.

`spec` (every option, declared once) → `plan` (the cache they lead to, cut into units of rows) →
an engine (`local`, or `ray` on a cluster) → the cache (`featcache.cache`). `build.extract` orchestrates:
a cache hit, a combination of one-layer caches, or a run under the cache's lock.
"""

from featcache.extract.build import extract
from featcache.extract.planner import Unit, check_cache, plan, units
from featcache.extract.spec import ExtractSpec

__all__ = ["ExtractSpec", "Unit", "check_cache", "extract", "plan", "units"]
