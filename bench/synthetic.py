"""A synthetic feature cache of any size, in featcache's format, without running a backbone.

Each row is its class's pattern plus noise, so heads learn something and accuracy can be compared;
the file is flagged as made from random weights. Used by tests (small) and by the streaming
benchmark (larger than this machine's memory budget).

    python bench/synthetic.py OUT.h5 --rows 100000 [--shape 8,8,512] [--views 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import write_synthetic_cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--rows", type=int, required=True, help="training rows (test: a tenth)")
    p.add_argument("--shape", default="8,8,512")
    p.add_argument("--views", type=int, default=1)
    args = p.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    write_synthetic_cache(args.out, n_train=args.rows, n_test=max(1, args.rows // 10), shape=shape, views=args.views)
    print(args.out)


if __name__ == "__main__":
    main()
