"""The start of an epoch with tf.data's autotuner off (featcache) and on (TensorFlow's default), in a pass of heads
trained together (`heads.together.fit_together`) on a cache's pooled vectors: the batch-256 half of the search
grid's dense heads (units 256 or 400,256,256 x dropout 0.1, 0.3, 0.5 x lr 0.001, 0.003; twelve heads), a few epochs
with early stopping out of reach, fed featcache's in-RAM batches (`heads.feed.keras_batches`, whose pipelines end
with `featcache.cache.read.steady`), then the same pass fed the same batches built as before `steady` (gathered
with AUTOTUNE parallelism, read ahead by AUTOTUNE, the autotuner on). For each: its epochs' seconds.

    python bench/epoch_start.py --cache cache/<the block3_pool cache> [--epochs 8]   # writes its section of benchmarks.md
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import numpy as np
from common import ROOT, machine, out_folder, write_sections

GRID = {"units": ((256,), (400, 256, 256)), "dropout": (0.1, 0.3, 0.5), "lr": (0.001, 0.003)}


def autotuned(x, y, positions, batch_size: int, *, shuffle: bool, seed: int = 0, n_views: int = 1,
              all_views: bool = False, class_weights=None):
    """heads.feed.in_ram_dataset as it was before `steady` (the same batches, in the same order; no views or class
    weights): AUTOTUNE parallelism and read-ahead, the autotuner on, as tf.data's guide builds a pipeline."""
    import tensorflow as tf

    from heads.batches import batches_per_epoch, epochs_of_plans

    assert n_views == 1 and class_weights is None, "the grid's pass has neither views nor class weights"

    plans = epochs_of_plans(positions, batch_size, shuffle=shuffle, seed=seed, block_rows=1)
    x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(np.asarray(y, np.int64))
    ds = tf.data.Dataset.from_generator(plans, output_signature=tf.TensorSpec((None, 2), tf.int64))
    ds = ds.apply(tf.data.experimental.assert_cardinality(batches_per_epoch(positions, batch_size, shuffle=shuffle)))
    return ds.map(lambda pairs: (tf.cast(tf.gather(x, pairs[:, 0]), tf.float32), tf.gather(y, pairs[:, 0])),
                  num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def pass_epochs(cache: str, epochs: int) -> list[float]:
    """Seconds of each epoch of the pass (validation included), the first (which traces the step) left out."""
    from heads.config import TrainConfig
    from heads.data import split_indices
    from heads.together import fit_together
    from heads.trial import SearchData

    configs = [TrainConfig(model="dense", units=u, dropout=d, lr=lr, batch_size=256, epochs=epochs, patience=epochs) for u, d, lr in itertools.product(*GRID.values())]
    data, pooled = SearchData([cache]).get(configs[0])
    tr, va = split_indices(data.y_train, configs[0].val_fraction, configs[0].seed, data.class_names)
    history = fit_together(data, configs, tr, va, pooled=pooled)[0].history
    return [s * n for s, n in zip(history["seconds"], history["shared_by"])][1:]


def section(cache: str, epochs: dict) -> str:
    m = machine()
    lines = ["## 16. The start of an epoch: tf.data's autotuner off and on", "",
             f"`python bench/epoch_start.py --cache {cache}`: one pass of twelve dense heads trained together (the "
             "batch-256 half of section 12's grid) on the cache's pooled vectors, fed featcache's batches, then fed "
             "the same batches built as before `featcache.cache.read.steady` (AUTOTUNE parallelism and read-ahead, "
             "the autotuner on); each epoch with validation, the first left out. Host: "
             f"{m['cpu']}, {m['cores']} logical CPUs.", "",
             "| feed | epoch (s), median | fastest | slowest | epochs |", "|---|---|---|---|---|"]
    for name, seconds in epochs.items():
        lines.append(f"| {name} | {statistics.median(seconds):.2f} | {min(seconds):.2f} | {max(seconds):.2f} | "
                     f"{', '.join(f'{s:.1f}' for s in seconds)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from heads import feed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    args = p.parse_args()
    times = {"autotuner off (featcache)": pass_epochs(args.cache, args.epochs)}
    steady_batches, feed.in_ram_dataset = feed.in_ram_dataset, autotuned
    try:
        times["autotuner on, AUTOTUNE parallelism and read-ahead"] = pass_epochs(args.cache, args.epochs)
    finally:
        feed.in_ram_dataset = steady_batches
    text = section(args.cache, times)
    print(text)
    write_sections(args.out / "benchmarks.md", text)


if __name__ == "__main__":
    main()
