"""make bench-gpu: extraction throughput on the available accelerator, prepared to finish in under 5 minutes.

For 32 px and 224 px inputs, at float32 and at the precision `auto` picks (bfloat16 on recent GPUs),
it times featcache's extraction loop (JPEG decoding in `--decode-workers` threads, model, float16 writes)
and the bare compiled model on the same images in memory, and writes docs/results/benchmarks-gpu.md (and .json).
The images are synthetic JPEGs written first (smooth random patterns, 256 px), so nothing is downloaded.
`--smoke` runs tiny sizes on whatever device there is (CI runs it on the CPU to keep it working).

    python bench/gpu.py [--weights imagenet|PATH|random] [--images 4096] [--smoke --out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from common import ROOT, device_name, extraction_rates, out_folder, write_images

from featcache import backbones


def main() -> None:
    import keras

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="random", help="random (default: throughput does not depend on the numbers), "
                                                       "imagenet or a weights file")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--decode-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--decoder", default="auto", choices=("auto", "threads", "processes"))
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CI)")
    args = p.parse_args()
    if args.smoke:
        args.images, args.batch_size, args.repeats, args.sizes = 32, 16, 1, [32, 64]
    device = device_name()
    backend = f"Keras {keras.__version__} on {keras.backend.backend()} {_backend_version()}"
    auto = backbones.resolve_precision("auto")
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featcache-gpu-") as tmp:
        tmp = Path(tmp)
        data = write_images(tmp / "images", args.images)
        for size in args.sizes:
            for precision in dict.fromkeys(("float32", auto)):
                rows.append(extraction_rates(data, size, precision, args, tmp))
                print(json.dumps(rows[-1]), flush=True)
    result = {"device": device, "precision_auto": auto, "decode_workers": args.decode_workers, "decoder": args.decoder,
              "cpu_cores": os.cpu_count(), "backend": backend, "seconds": time.perf_counter() - t_start,
              "command": " ".join(sys.argv), "rows": rows}
    (args.out / "benchmarks-gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Extraction on {device} ({time.strftime('%Y-%m-%d')})", "",
             f"`python {result['command']}` ({result['seconds']:.0f} s; {backend}, "
             f"{os.cpu_count()} CPU cores, {result['decode_workers']} decode workers, decoder {args.decoder}; `auto` = "
             f"{auto}).", "",
             "| input | precision | extraction loop (img/s) | bare compiled model (img/s) | loop ÷ bare | decoding alone, "
             "threads (img/s) | decoding alone, processes (img/s) | loop TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} px | {r['precision']} | {r['loop_images_per_s']:.0f} | {r['bare_images_per_s']:.0f} | "
              f"{r['loop_vs_bare']:.2f} | {r['decode_threads_images_per_s']:.0f} | {r['decode_processes_images_per_s']:.0f} | "
              f"{r['loop_tflop_per_s']:.2f} |" for r in rows]
    (args.out / "benchmarks-gpu.md").write_text("\n".join(lines) + "\n")


def _backend_version() -> str:
    import importlib

    import keras

    return importlib.import_module(keras.backend.backend()).__version__


if __name__ == "__main__":
    main()
