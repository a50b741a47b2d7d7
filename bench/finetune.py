"""make bench, part 9: one fine-tuning epoch from the cache against the same model trained end to end from images.

    python bench/finetune.py --data DIR --weights FILE --cache <a VGG16 block2_pool cache> [--rows 2048] [--out docs/results]

Both sides train the same model: VGG16's block3 (initialised from the cache's weights) and the dense head, every
layer of block3 trainable. The cached way reads the block2_pool maps from the cache (in RAM); the end-to-end way
decodes the JPEGs and runs blocks 1-2 (frozen, forward only) at every step, as training on images does. One epoch
of --rows training images each, timed after an epoch that traces the step; side by side, alternated, twice. The
arithmetic floor of each: its convolutions' FLOPs per image (the trained ones x 3: forward, and the gradients of
inputs and weights) x images / the float32 FMA peak measured here (bench/peak_flops.c).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from common import ROOT, conv_gflop, float32_peak, machine, out_folder, write_sections

import featcache
from heads import inference
from heads.builders import finetune_head, tuned_layers
from heads.data import data_from_cache


def models(data, n_classes: int):
    """(cached-way model on block2_pool maps, end-to-end model on uint8 images), the same tuned layers and head."""
    import keras

    cached = finetune_head(data.x_train.shape[1:], n_classes, provenance=data.provenance, train_precision="float32")
    meta, layer = data.provenance.layers[0].cache_meta, data.provenance.layers[0].layer
    frozen = inference.frozen_backbone(meta, [layer], None)
    images = keras.Input((*meta["input_shape"][:2], 3), dtype="uint8")
    x = inference.affine_preprocessing(frozen.spec, name="preprocess")(keras.layers.Identity(dtype="float32")(images))
    twin = finetune_head(data.x_train.shape[1:], n_classes, provenance=data.provenance, train_precision="float32")
    end_to_end = keras.Model(images, twin(frozen.model(x)))
    for m in (cached, end_to_end):
        m.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    return cached, end_to_end, frozen.model


def epoch(model, x, y, batch_size: int = 256) -> float:
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--weights", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    args = p.parse_args()
    cache = featcache.open_cache(args.cache)
    data = data_from_cache(cache)
    rows = np.random.default_rng(0).choice(len(data.y_train), args.rows, replace=False)
    x_maps, y = data.x_train[rows].astype(np.float32), data.y_train[rows]
    files = [args.data / p for p in np.asarray(cache.paths("train"))[rows]]
    size = tuple(data.provenance.layers[0].cache_meta["input_shape"][:2])
    cached, end_to_end, frozen = models(data, len(data.class_names))
    pixels, _, _ = inference.decode_batch(files, size, False)
    epoch(cached, x_maps, y), epoch(end_to_end, pixels, y)   # trace both steps
    times = {"cached": [], "end_to_end": [], "decode": []}
    for _ in range(args.repeats):
        times["cached"].append(epoch(cached, x_maps, y))
        t0 = time.perf_counter()
        pixels, _, _ = inference.decode_batch(files, size, False)
        times["decode"].append(time.perf_counter() - t0)
        times["end_to_end"].append(epoch(end_to_end, pixels, y) + times["decode"][-1])
        print({k: round(v[-1], 1) for k, v in times.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = float32_peak()
    tuned = conv_gflop(tuned_layers(cached))
    flop = {"cached": 3 * tuned, "end_to_end": 3 * tuned + conv_gflop(frozen)}
    floors = {k: v * args.rows / peak if peak else None for k, v in flop.items()}
    record = {"rows": args.rows, "seconds": times, "median": med, "gflop_per_image": flop, "fma_peak_gflops": peak,
              "floor_seconds": floors, "machine": machine()}
    (args.out / "benchmarks-finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    floor = (lambda k: f"{floors[k]:.1f} s ({med[k] / floors[k]:.1f}x)" if peak else "n/a")  # noqa: E731
    write_sections(args.out / "benchmarks.md", "\n".join([
        "## 13. A fine-tuning epoch: from the cache vs end to end from images", "",
        f"`python bench/finetune.py --data <the JPEG folder> --weights <the VGG16 file> --cache <the block2_pool "
        f"cache> --rows {args.rows}`: VGG16's block3 (trainable, from the cache's weights) and the dense head, "
        f"{args.rows} CIFAR-10 training images at 32 px, batch 256, one epoch each way, alternated, medians of "
        f"{args.repeats}, after an epoch that traced each step. Host: {record['machine']['cpu']}, "
        f"{record['machine']['cores']} logical CPUs. The floor is the convolutions' FLOPs (trained layers x 3) x "
        f"images at the float32 FMA peak measured here ({peak or 0:.0f} GFLOP/s).", "",
        "| way | seconds per epoch | GFLOP per image | floor (measured / floor) |", "|---|---|---|---|",
        f"| from the cached block2_pool maps | {med['cached']:.1f} | {flop['cached']:.3f} | {floor('cached')} |",
        f"| end to end from the JPEGs (decode {med['decode']:.1f} s, blocks 1-2 frozen, recomputed) | "
        f"{med['end_to_end']:.1f} | {flop['end_to_end']:.3f} | {floor('end_to_end')} |",
        f"| end to end / cached | **{med['end_to_end'] / med['cached']:.2f}** | "
        f"{flop['end_to_end'] / flop['cached']:.2f} | |", ""]))


if __name__ == "__main__":
    main()
