"""The `featcache` command line: `group` (the click group, errors, TensorFlow start-up), `cache` (extract, info,
consolidate, backbones) and `train` (train-head, train-baseline, curve, runs), `use` (predict, export); options from `options`.

The CLI is the composition root: the one place that imports both featcache and heads.
"""

from featcache.cli import cache, train, use  # noqa: F401  (importing them registers their commands)
from featcache.cli.group import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
