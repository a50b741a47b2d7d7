"""make bench, part 10: DCT-scaled JPEG decoding, and whether the extraction loop keeps up, side by side in one run.

- Decode rate of 256 px JPEGs to a 32 px input: every pixel decoded then resized (before) against decoded at
  1/8 scale in the DCT domain then resized (now, `featcache.sources.RESIZE_DCT`), alternated, in one thread and in
  `--decode-workers` threads; and how far apart the two decodes' pixels are.
- The extraction loop against the slower of decoding alone and the bare compiled model, at 32 and 224 px
  (bench/gpu.py's measurement, on this machine): the loop should reach at least 0.8 of it.

Writes docs/results/benchmarks-decode.md (and .json).

    python bench/decode.py [--images 1024] [--weights random] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from common import ROOT, decode_rate, extraction_rates, machine, out_folder, write_images

from featcache import backbones
from featcache.sources import RESIZE_DCT, Split, load_dataset


def decode_side_by_side(data: Path, args) -> dict:
    """img/s of full and DCT-scaled decoding to 32 px, alternated `args.repeats` times (medians), per thread count."""
    out = {}
    for workers in dict.fromkeys((1, args.decode_workers)):
        rates = {"full": [], "dct": []}
        for _ in range(args.repeats):
            for name in rates:
                rates[name].append(decode_rate(data, 32, workers, args.batch_size, "threads",
                                               scale_jpegs=name == "dct"))
        full, dct = statistics.median(rates["full"]), statistics.median(rates["dct"])
        out[workers] = {"full_images_per_s": full, "dct_images_per_s": dct, "speedup": dct / full}
    split = load_dataset(data).train
    some = Split(labels=split.labels[:256], files=split.files[:256])
    full, dct = some.load(0, len(some), (32, 32)), some.load(0, len(some), (32, 32), resizing=RESIZE_DCT)
    diff = np.abs(full.astype(np.int16) - dct)
    return {"threads": out, "pixel_mean_abs_diff": float(diff.mean()), "pixel_max_abs_diff": int(diff.max())}


def report(r: dict) -> str:
    m, lines = r["machine"], []
    lines += [f"# JPEG decoding and the extraction loop ({time.strftime('%Y-%m-%d')})", "",
              f"`python {r['command']}` ({r['seconds']:.0f} s; {m['cpu']}, {m['cores']} cores, TensorFlow "
              f"{m['tensorflow']}; {r['images']} synthetic 256 px JPEGs, smooth random patterns at quality 90, which "
              "compress like photographs; `auto` = " + r["precision_auto"] + ").", "",
              "## Decoding 256 px JPEGs for a 32 px input", "",
              "Side by side, alternated: every pixel decoded by libjpeg-turbo, then resized (PIL bilinear), against "
              "decoded at 1/8 scale in the DCT domain (the smallest scale still at least 32 px), then resized, as "
              "`extract --input-size 32` on image files now does (recorded in the cache as its `resize`, part of "
              "its key).", "", "| threads | full decode (img/s) | DCT-scaled decode (img/s) | speed-up |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['full_images_per_s']:.0f} | {v['dct_images_per_s']:.0f} | {v['speedup']:.2f}x |"
              for k, v in r["decode"]["threads"].items()]
    lines += ["", f"The two decodes' 32 px pixels differ by {r['decode']['pixel_mean_abs_diff']:.2f} on average "
              f"(at most {r['decode']['pixel_max_abs_diff']}) of 255: the DCT scaling averages 8x8 blocks where the "
              "bilinear resize samples, so the cache key tells them apart.", "",
              "## Does the extraction loop keep up?", "",
              "The loop (decoding in threads, the model, float16 writes) against the slower of decoding alone and "
              "the bare compiled model (a `tf.function` over preprocessed tensors in memory); the goal is 0.8. "
              "Where decoding and the model share the same cores, no loop can beat their serial sum, "
              "1 / (1/bare + 1/decode): the last column compares the loop with that bound.", "",
              "| input | precision | loop (img/s) | bare model (img/s) | decoding alone (img/s) | "
              "loop ÷ min(decode, bare) | serial bound (img/s) | loop ÷ serial bound |", "|---|---|---|---|---|---|---|---|"]
    for x in r["loop"]:
        bound = 1 / (1 / x["bare_images_per_s"] + 1 / x["decode_threads_images_per_s"])
        lines.append(f"| {x['size']} px | {x['precision']} | {x['loop_images_per_s']:.0f} | "
                     f"{x['bare_images_per_s']:.0f} | {x['decode_threads_images_per_s']:.0f} | "
                     f"{x['loop_vs_slower']:.2f} | {bound:.0f} | {x['loop_images_per_s'] / bound:.2f} |")
    lines += ["", "The extraction's stage timers (`featcache -v extract`; a cache's `extract_stages` attribute) put "
              "nearly all of a 32 px loop's time in the model stage, with no wait for decoded batches: the "
              "decoding threads run beside the model on the same cores and slow it by their own CPU time. On two "
              "cores a fast model (bfloat16 on AMX) cannot reach 0.8 of it; the loop reaches the serial bound's "
              "share in the last column."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--weights", default="random", help="random (throughput does not depend on the numbers) or a file")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    args = p.parse_args()
    args.decoder = "threads"
    if args.quick:
        args.images, args.batch_size, args.repeats, args.sizes = 64, 16, 1, [32]
    t0, auto = time.perf_counter(), backbones.resolve_precision("auto")
    with tempfile.TemporaryDirectory(prefix="featcache-decode-") as tmp:
        data = write_images(Path(tmp) / "images", args.images)
        decode = decode_side_by_side(data, args)
        loop = []
        for size in args.sizes:
            for precision in dict.fromkeys(("float32", auto)):
                row = extraction_rates(data, size, precision, args, Path(tmp))
                row["loop_vs_slower"] = row["loop_images_per_s"] / min(row["bare_images_per_s"],
                                                                        row["decode_threads_images_per_s"])
                loop.append(row)
                print(json.dumps(row), flush=True)
    r = {"command": "bench/decode.py " + " ".join(sys.argv[1:]), "seconds": time.perf_counter() - t0,
         "images": args.images, "precision_auto": auto, "machine": machine(), "decode": decode, "loop": loop}
    (args.out / "benchmarks-decode.json").write_text(json.dumps(r, indent=2) + "\n")
    (args.out / "benchmarks-decode.md").write_text(report(r))
    print(report(r))


if __name__ == "__main__":
    main()
