"""featcache: run a frozen Keras backbone once, cache its features in HDF5, train heads in seconds.

`featcache.extract.extract(...)` builds (or reuses) a cache; `featcache.open_cache(path)` reads one.
"""

from featcache.cache import CacheMeta, FeatureCache, open_cache
from featcache.errors import BadInputError, CacheError, FeatcacheError
from featcache.sources import Dataset, load_dataset

__all__ = ["open_cache", "load_dataset", "Dataset", "ExtractSpec", "CacheMeta", "FeatureCache",
           "FeatcacheError", "BadInputError", "CacheError"]
__version__ = "0.2.0"


def __getattr__(name: str):
    """`featcache.ExtractSpec`, imported when asked for: reading a cache needs nothing of extraction."""
    if name == "ExtractSpec":
        from featcache.extract.spec import ExtractSpec

        return ExtractSpec
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")
