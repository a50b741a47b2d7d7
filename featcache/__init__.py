"""featcache: run a frozen Keras backbone once, cache its features in HDF5, train heads in seconds.

`featcache.extract.extract(...)` builds (or reuses) a cache; `featcache.open_cache(path)` reads one.
"""

from featcache.data import Dataset, load_dataset
from featcache.errors import BadInputError, CacheError, FeatcacheError
from featcache.spec import ExtractSpec
from featcache.store import CacheMeta, FeatureCache, open_cache

__all__ = ["open_cache", "load_dataset", "Dataset", "ExtractSpec", "CacheMeta", "FeatureCache",
           "FeatcacheError", "BadInputError", "CacheError"]
__version__ = "0.2.0"
