"""featcache: run a frozen VGG16 backbone once, cache its features in HDF5, train heads in seconds."""

from featcache.data import Dataset, load_dataset
from featcache.errors import BadInputError, CacheError, FeatcacheError
from featcache.extract import extract
from featcache.store import CacheMeta, FeatureCache, open_cache

__all__ = ["extract", "open_cache", "load_dataset", "Dataset", "CacheMeta", "FeatureCache",
           "FeatcacheError", "BadInputError", "CacheError"]
__version__ = "0.1.0"
