"""A synthetic feature cache of any size, in featcache's format, without running a backbone.

Each row is its class's pattern plus noise, so heads learn something and accuracy can be compared;
the file is flagged as made from random weights. Used by tests (small) and by the streaming
benchmark (larger than this machine's memory budget).

    python bench/synthetic.py OUT.h5 --rows 100000 [--shape 8,8,512] [--views 1]
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featcache import cache as store  # noqa: E402
from featcache.cache import write as cache_write  # noqa: E402


def write_synthetic_cache(path, *, n_train: int, n_test: int, shape=(4, 4, 256), n_classes: int = 10,
                          views: int = 1, seed: int = 0, noise: float = 2.0, block_rows: int = 1024) -> Path:
    path = Path(path)
    rng = np.random.default_rng(seed)
    patterns = rng.normal(0, 1, (n_classes, *shape)).astype(np.float32)
    labels = {split: rng.integers(0, n_classes, n) for split, n in (("train", n_train), ("test", n_test))}
    meta = store.CacheMeta(
        backbone="vgg16", layer="block3_pool", weights=f"random:seed={seed}", weights_source="random",
        input_shape=(32, 32, 3), feature_shape=tuple(shape), preprocessing="synthetic", resize="none",
        dtype="float16", dataset_name="synthetic", dataset_source=f"synthetic:seed={seed}",
        dataset_fingerprint=f"{seed:064x}", limit=0, n_train=n_train, n_test=n_test, versions={},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), views=views,
        augment="flip" if views > 1 else "")
    f = cache_write.create(path, meta, labels=labels, paths={"train": None, "test": None},
                     class_names=[f"class{c}" for c in range(n_classes)], batch_size=block_rows)
    with f:
        for split, y in labels.items():
            for s in range(0, len(y), block_rows):
                e = min(s + block_rows, len(y))
                rows = patterns[y[s:e]] + noise * rng.standard_normal((e - s, *shape), dtype=np.float32)
                # ReLU-like; cast here, HDF5's is slow; written as extraction writes, with digests
                cache_write.write_rows(f, store.dataset_path(meta, split, meta.layer), s,
                                       np.maximum(rows, 0).astype(np.float16))
                if split == "train" and views > 1:
                    extra = patterns[y[s:e]][:, None] + noise * rng.standard_normal((e - s, views - 1, *shape),
                                                                                    dtype=np.float32)
                    cache_write.write_rows(f, store.dataset_path(meta, split, meta.layer, views=True), s,
                                           np.maximum(extra, 0).astype(np.float16))
        f["progress"][...] = [n_train, n_test]
        cache_write.finish(f, max_abs_activation=float(noise * 10))
    return path


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
