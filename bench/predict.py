"""make bench, part 5: `predict` on the CIFAR-10 test JPEGs against extraction's batch loop on the same images,
side by side in one run, and the exported model's accuracy against the run's own test accuracy.

    python bench/predict.py --run runs/<a head on the block3_pool cache> --data ../shared/datasets/cifar10-jpeg
                            [--out docs/results] [--repeats 2]

Both sides decode the same JPEGs, run the same backbone in the cache's precision and batch size 128;
predict adds the head and the top-k. Alternated A, B, A, B; the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from common import ROOT, LoopTimes, out_folder, write_sections

from featcache.extract import extract
from heads import inference


def loop_rate(test: Path, meta: dict, weights: str, tmp: Path) -> float:
    """Images/s of extraction's batch loop (decode, preprocess, forward, write) over the test JPEGs, read from its
    log: a dataset whose train and test splits are both the test folder, so the loop sees those images only."""
    data = tmp / "test-as-both"
    if not data.exists():
        data.mkdir()
        (data / "train").symlink_to(test)
        (data / "test").symlink_to(test)
    loops = LoopTimes()
    logger = logging.getLogger("featcache.extract.local")
    logger.addHandler(loops)
    logger.setLevel(logging.INFO)
    try:
        extract(data=str(data), weights=weights, layer=meta["layer"], precision=meta.get("precision", "float32"),
                dtype=meta["dtype"], cache_dir=str(tmp / "cache"), force=True, progress=False, batch_size=128)
    finally:
        logger.removeHandler(loops)
    images, seconds = loops.runs[-1]
    return images / seconds


def predict_rate(run: Path, test: Path, model) -> tuple[float, float, int]:
    """(images/s, accuracy, images) of predict over the test JPEGs, the model built before the clock starts."""
    t0 = time.perf_counter()
    result = inference.predict(run, [test], model=model, progress=False, batch_size=128)
    seconds = time.perf_counter() - t0
    truth = [f.parent.name for f in result.files]
    accuracy = float(np.mean([result.class_names[i] == t for i, t in zip(result.indices, truth)]))
    return len(result.files) / seconds, accuracy, len(result.files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--weights", default=None, help="default: the file the run's cache recorded")
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    info = inference.load_run(args.run)
    meta = info.cache_metas[0]
    weights = args.weights or meta["weights_source"]
    model = inference.end_to_end(info, weights=args.weights)
    test = (args.data / "test").resolve()
    run_metrics = json.loads((args.run / "metrics.json").read_text())
    loops, preds, accs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            loops.append(loop_rate(test, meta, weights, Path(tmp)))
            rate, acc, images = predict_rate(args.run, test, model)
            preds.append(rate)
            accs.append(acc)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "precision": meta.get("precision", "float32"), "images": images,
              "extract_loop_images_per_s": loops, "predict_images_per_s": preds,
              "predict_vs_extract_loop": statistics.median(preds) / statistics.median(loops),
              "predict_accuracy": accs[0], "run_test_accuracy": run_metrics["test_accuracy"]}
    (args.out / "benchmarks-predict.json").write_text(json.dumps(result, indent=2) + "\n")
    write_sections(args.out / "benchmarks.md", report(result, args))
    print(json.dumps(result, indent=2))


def report(r: dict, args) -> str:
    return "\n".join([
        "## 8. Predict vs the extraction loop", "",
        f"`python bench/predict.py --run {args.run} --data {args.data}` ({r['machine']}; backbone in {r['precision']}, "
        "batch 128). Both decode the CIFAR-10 test JPEGs and run the same backbone; predict adds the head and the "
        "top-k; its model is built before the clock starts. Alternated, ratio of medians.", "",
        "| way | images/s (each run) |", "|---|---|",
        f"| extract: batch loop | {', '.join(f'{x:.0f}' for x in r['extract_loop_images_per_s'])} |",
        f"| predict (decode, backbone, head) | {', '.join(f'{x:.0f}' for x in r['predict_images_per_s'])} |",
        f"| **predict ÷ extract loop** | **{r['predict_vs_extract_loop']:.2f}** |", "",
        f"The exported model's argmax accuracy on the raw test JPEGs: {r['predict_accuracy']:.4f}; the run's "
        f"test accuracy on the cached test features: {r['run_test_accuracy']:.4f}.", ""])


if __name__ == "__main__":
    main()
