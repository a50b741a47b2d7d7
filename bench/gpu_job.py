"""The whole job on an accelerator, with Keras on whatever backend is set (JAX on the lent GPU machine, which has no
TensorFlow): extract the CIFAR-10 JPEGs, train the default head on that cache, run an 8-configuration search,
predict the 10,000 test images; each step is a `featcache` command in its own process, timed from outside (wall
seconds, start-up and compilation included) and from the records it writes. Then bench/gpu.py's synthetic
32/224 px extraction table. Writes gpu-job.json and gpu-job.md into --out.

    KERAS_BACKEND=jax python bench/gpu_job.py --data cifar10-jpeg.tar.gz --out DIR [--weights random] [--smoke]

`--data` is an image folder, or a .tar.gz of one (unpacked into a temporary folder first). `--smoke` runs a few
hundred images and tiny sizes on whatever device there is, to rehearse the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import ROOT, out_folder

GRID = ["--param", "units=256|400,256,256", "--param", "dropout=0.2|0.4", "--param", "lr=1e-3|3e-3"]
#: The search's trials train at most this many epochs (early stopping and median pruning end most sooner), so that
#: the whole job stays within 5 minutes of a lent GPU.
SEARCH_EPOCHS = ["--epochs", "10"]


def featcache(*args, env: dict, log: Path) -> tuple[str, float]:
    """Run `featcache -q ARGS`; (its stdout, wall seconds). Its stderr goes to `log`; a failure stops the job."""
    t0 = time.perf_counter()
    with log.open("a") as err:
        err.write(f"\n$ featcache {' '.join(map(str, args))}\n")
        err.flush()
        p = subprocess.run([sys.executable, "-m", "featcache.cli", "-q", *map(str, args)], env=env, stdout=subprocess.PIPE,
                           stderr=err, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"featcache {args[0]} failed ({p.returncode}); see {log}")
    return p.stdout.strip(), seconds


def image_folder(data: Path, scratch: Path, per_class: int | None = None) -> Path:
    """`data` itself, or the one folder its .tar.gz unpacks to (holding train/ and test/); with `per_class`, a
    folder of links to the first images of every class (a quarter of them in test)."""
    if not data.is_dir():
        with tarfile.open(data) as tar:
            tar.extractall(scratch, filter="data")
        data = next(p.parent for p in scratch.rglob("train") if (p.parent / "test").is_dir())
    if per_class is None:
        return data
    subset = scratch / "subset"
    for split, n in (("train", per_class), ("test", max(1, per_class // 4))):
        for folder in sorted((data / split).iterdir()):
            (subset / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:n]:
                (subset / split / folder.name / image.name).symlink_to(image)
    return subset


def job(folder: Path, work: Path, args, env: dict, log: Path) -> dict:
    """The four steps; their figures."""
    select = ["--data", folder, "--weights", args.weights, "--no-progress"]
    epochs = ["--epochs", "3"] if args.smoke else []
    out = {}
    cache, out["extract_seconds"] = featcache("extract", *select, env=env, log=log)
    info = json.loads(featcache("info", "--json", cache, env=env, log=log)[0])
    images = info["splits"]["train"]["n"] + info["splits"]["test"]["n"]
    out["extract"] = {"images": images, "loop_seconds": info["extract_seconds"],
                      "loop_images_per_second": images / info["extract_seconds"], "stages": info["extract_stages"]}
    run, out["default_head_seconds"] = featcache("train-head", *select, *epochs, "--runs-dir", work / "runs", env=env,
                                                 log=log)
    metrics = json.loads((Path(run) / "metrics.json").read_text())
    out["default_head"] = {k: metrics.get(k) for k in ("chosen", "test_accuracy", "val_loss", "seconds",
                                                       "seconds_per_epoch", "epochs_run", "n_train")}
    search, out["search_seconds"] = featcache("search", *select, *(epochs or SEARCH_EPOCHS), "--head", "dense", *GRID,
                                              "--trials", "8",
                                              "--runs-dir", work / "runs", "--name", "grid", env=env, log=log)
    summary = json.loads((Path(search) / "search.json").read_text())
    out["search"] = {"trials": len(summary["trials"]), "best_trial": summary["best_trial"], "winner": summary["winner"]}
    test = folder / "test"
    _, out["predict_seconds"] = featcache("predict", run, test, "--format", "csv", "-o", work / "predictions.csv",
                                          "--no-progress", env=env, log=log)
    rows = (work / "predictions.csv").read_text().count("\n") - 1
    out["predict"] = {"images": rows, "images_per_second_wall": rows / out["predict_seconds"]}
    return out


def markdown(result: dict) -> str:
    e, d, s, p = result["extract"], result["default_head"], result["search"], result["predict"]
    return "\n".join([
        f"# The whole job on {result['device']} ({result['date']})", "",
        f"`{result['command']}` at commit {result['commit']} (Keras {result['keras']} on {result['backend']}).", "",
        "| step | wall s (process) | figures |", "|---|---|---|",
        f"| extract {e['images']} CIFAR-10 JPEGs | {result['extract_seconds']:.1f} | loop {e['loop_seconds']:.1f} s, "
        f"{e['loop_images_per_second']:.0f} img/s; waiting for decoding {e['stages']['decode_wait']} s, model "
        f"{e['stages']['model']} s, waiting for writes {e['stages']['write_wait']} s |",
        f"| default head (`train-head`) | {result['default_head_seconds']:.1f} | chose {d['chosen']}, fit "
        f"{d['seconds']} s, {d['seconds_per_epoch']} s/epoch, {d['epochs_run']} epochs on {d['n_train']} rows |",
        f"| 8-configuration grid (`search`, at most 10 epochs a trial) | {result['search_seconds']:.1f} | "
        f"{s['trials']} trials; winner {s['winner']['params']} |",
        f"| `predict` {p['images']} test images | {result['predict_seconds']:.1f} | "
        f"{p['images_per_second_wall']:.0f} img/s, start-up included |", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--weights", default="random")
    p.add_argument("--out", type=out_folder, required=True)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    log = args.out / "gpu-job.log"
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        env = {**os.environ, "FEATCACHE_CACHE_DIR": str(work / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}
        folder = image_folder(args.data, work / "data", 40 if args.smoke else None)
        result = job(folder, work, args, env, log)
    import keras


    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    result.update(device=_device(),
                  date=time.strftime("%Y-%m-%d"), keras=keras.__version__, backend=keras.backend.backend(),
                  commit=commit.stdout.strip() or "(no git)", command=" ".join(["python", *sys.argv]))
    (args.out / "gpu-job.json").write_text(json.dumps(result, indent=2))
    (args.out / "gpu-job.md").write_text(markdown(result))
    print(markdown(result))


def _device() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.devices()[0].device_kind
    return "CPU"


if __name__ == "__main__":
    main()
