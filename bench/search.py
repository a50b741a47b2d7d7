"""make bench, part 8: head experiments per minute, `featcache search` (one process, features read once) against
one `featcache train-head` process per configuration, side by side on the same cache and configurations.

    python bench/search.py --cache cache/<the block3_pool cache> [--per-class 200] [--repeats 2] [--out docs/results]
                           [--part small|grid|both]

small (section 11): the dense head at six dropout rates, on --per-class images per class, no pruning (so both
sides train the same six models; the search then trains its winner once more and tests it), alternated.
grid (section 12): the issue's 24-configuration grid of dense heads (units x dropout x lr x batch size, 50 epochs
at most, patience 5) on the whole training split, as 24 processes, and as one search training its trials together
(`--together 24`: the 12 trials of each batch size share a pass) without pruning and with the median pruner, and
(where Ray is installed) as one search on Ray with 2 workers fitting 12 trials each, two passes at once; epochs run,
best validation figures, and a head's epoch against its arithmetic floor.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, float32_peak, machine, out_folder, write_sections

DROPOUTS = ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6")
CLI = [sys.executable, "-m", "featcache.cli"] if (ROOT / "featcache" / "cli" / "__main__.py").exists() else \
    [str(Path(sys.executable).parent / "featcache")]


def processes(cache: str, per_class: int, runs: Path) -> float:
    t0 = time.perf_counter()
    for d in DROPOUTS:
        subprocess.run([*CLI, "-q", "train-head", "--cache", cache, "--head", "dense", "--per-class", str(per_class),
                        "--dropout", d, "--runs-dir", str(runs), "--no-progress"], check=True, capture_output=True)
    return time.perf_counter() - t0


def one_search(cache: str, per_class: int, runs: Path, name: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([*CLI, "-q", "search", "--cache", cache, "--head", "dense", "--per-class", str(per_class),
                    "--param", "dropout=" + "|".join(DROPOUTS), "--pruner", "none", "--name", name,
                    "--runs-dir", str(runs), "--no-progress"], check=True, capture_output=True)
    return time.perf_counter() - t0


GRID = {"units": ("256", "400,256,256"), "dropout": ("0.1", "0.3", "0.5"), "lr": ("0.001", "0.003"),
        "batch_size": ("128", "256")}


def grid_configs() -> list[dict]:
    import itertools

    return [dict(zip(GRID, combo)) for combo in itertools.product(*GRID.values())]


def grid_processes(cache: str, runs: Path) -> tuple[float, list[dict]]:
    t0, out = time.perf_counter(), []
    for c in grid_configs():
        done = subprocess.run([*CLI, "-q", "train-head", "--cache", cache, "--head", "dense", "--runs-dir", str(runs),
                               "--no-progress", *[a for k, v in c.items() for a in (f"--{k.replace('_', '-')}", v)]],
                              check=True, capture_output=True, text=True)
        m = json.loads((Path(done.stdout.strip()) / "metrics.json").read_text())
        out.append({**c, "val_loss": m["val_loss"], "val_accuracy": m["val_accuracy"], "epochs": m["epochs_run"],
                    "seconds_per_epoch": m["seconds_per_epoch"], "n_train": m["n_train"]})
        print(len(out), round(time.perf_counter() - t0), flush=True)
    return time.perf_counter() - t0, out


def grid_search(cache: str, runs: Path, pruner: str, together: int, *engine: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    done = subprocess.run([*CLI, "-q", "search", "--cache", cache, "--head", "dense", "--pruner", pruner,
                           "--name", f"grid-{pruner}-{together}", "--runs-dir", str(runs), "--no-progress",
                           "--trials", "24", "--together", str(together), *engine,
                           *[a for k, v in GRID.items() for a in ("--param", f"{k}={'|'.join(v)}")]],
                          check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, json.loads((Path(done.stdout.strip()) / "search.json").read_text())


def head_flops_per_row(units: str, n_in: int = 256, n_classes: int = 10) -> int:
    """Forward and backward through the dense layers: 6 x multiply-adds per row."""
    sizes = [n_in, *map(int, units.split(",")), n_classes]
    return 6 * sum(a * b for a, b in zip(sizes, sizes[1:]))


SIDES = (("processes", "24 `featcache train-head` processes"),
         ("search", "one search, `--together 24`, no pruning"),
         ("search_pruned", "one search, `--together 24`, median pruner"),
         ("search_ray", "one search, `--engine ray --workers 2 --together 12`, no pruning"))


def grid_part(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t_proc, procs = grid_processes(args.cache, Path(tmp) / "p")
        searches = {"search": grid_search(args.cache, Path(tmp), "none", 24),
                    "search_pruned": grid_search(args.cache, Path(tmp), "median", 24)}
        if importlib.util.find_spec("ray") is not None:   # two passes at once: the cores a lone pass leaves idle
            searches["search_ray"] = grid_search(args.cache, Path(tmp), "none", 12, "--engine", "ray", "--workers", "2")
    rate, n_train, backend = float32_peak(), procs[0]["n_train"], keras_backend()
    floor = {c["units"]: head_flops_per_row(c["units"]) * n_train / (rate * 1e9) for c in procs}
    summary = {"processes": {"seconds": t_proc, "epochs": sum(p["epochs"] for p in procs),
                             "best_val_loss": min(p["val_loss"] for p in procs),
                             "best_val_accuracy": max(p["val_accuracy"] for p in procs),
                             "epoch_vs_floor": statistics.median(p["seconds_per_epoch"] / floor[p["units"]]
                                                                 for p in procs)},
               **{k: search_summary(t, rec, floor) for k, (t, rec) in searches.items()},
               "fma_peak_gflops": rate, "n_train": n_train, "machine": machine(), "backend": backend}
    suffix = "" if backend == "tensorflow" else f"-{backend}"
    (args.out / f"benchmarks-search-grid{suffix}.json").write_text(json.dumps({"summary": summary, "processes": procs},
                                                                     indent=2) + "\n")
    write_sections(args.out / "benchmarks.md", grid_section(summary))


def keras_backend() -> str:
    """The backend the processes and searches run on: Keras' own answer (KERAS_BACKEND, else keras.json)."""
    import keras

    return keras.backend.backend()


def search_summary(seconds: float, rec: dict, floor: dict) -> dict:
    """A search's side: time, epochs, best validation figures, and its trials' training time (each trial's share of
    its pass) against the arithmetic floor of the epochs they ran."""
    trials = [t for t in rec["trials"] if t["val_loss"] is not None]
    return {"seconds": seconds, "epochs": sum(t["epochs"] or 0 for t in trials),
            "pruned": sum(t["pruned"] for t in rec["trials"]),
            "best_val_loss": min(t["val_loss"] for t in trials),
            "best_val_accuracy": max(t["val_accuracy"] for t in trials if t["val_accuracy"] is not None),
            "winner_test_accuracy": rec["winner"]["test_accuracy"],
            "epoch_vs_floor": sum(t["seconds"] for t in trials) / sum(
                (t["epochs"] or 0) * floor[str(t["params"]["units"])] for t in trials)}


def grid_section(s: dict) -> str:
    row = lambda k, label: (f"| {label} | {s[k]['seconds']:.0f} | {s[k]['epochs']} | {s[k]['best_val_loss']:.4f} | "  # noqa: E731
                            f"{s[k]['best_val_accuracy']:.4f} | {s[k]['epoch_vs_floor']:.1f}x |")
    m = s["machine"]
    return "\n".join([
        "## 12. A 24-configuration grid: one search training its trials together vs 24 processes (Keras on "
        f"{s['backend']})", "",
        f"`KERAS_BACKEND={s['backend']} python bench/search.py --cache <the block3_pool cache> --part grid`: dense "
        "heads, units x dropout x lr x "
        f"batch size ({' x '.join(str(len(v)) for v in GRID.values())}), 50 epochs at most, patience 5, on the whole "
        f"training split ({s['n_train']} rows), one after another in one run. Host: {m['cpu']}, {m['cores']} logical "
        "CPUs. A head epoch's floor: the dense layers' forward and backward (6 x multiply-adds x rows) at the float32 "
        f"FMA peak measured here ({s['fma_peak_gflops']:.0f} GFLOP/s, bench/peak_flops.c); for the searches, the "
        "trials' training time (each its share of its batch: the batch's time over its trials) over the floor of the "
        "epochs they ran.", "",
        "| side | seconds | epochs in all | best val loss | best val accuracy | head epoch / floor |",
        "|---|---|---|---|---|---|", *(row(k, label) for k, label in SIDES if k in s), "",
        f"Search / processes: **{s['search']['seconds'] / s['processes']['seconds']:.2f}** of the time (target 1/3), "
        f"best validation loss {s['search']['best_val_loss'] - s['processes']['best_val_loss']:+.4f} from the "
        f"processes'; with the median pruner **{s['search_pruned']['seconds'] / s['processes']['seconds']:.2f}** "
        f"({s['search_pruned']['pruned']} trials pruned, {s['search']['epochs'] / max(1, s['search_pruned']['epochs']):.2f}x "
        f"fewer epochs, best validation accuracy "
        f"{100 * (s['search_pruned']['best_val_accuracy'] - s['search']['best_val_accuracy']):+.2f} points from the "
        "unpruned search's). The searches' winners were tested once each: "
        f"{s['search']['winner_test_accuracy']:.4f} (no pruning), {s['search_pruned']['winner_test_accuracy']:.4f} "
        "(pruned).", "", *_ray_line(s)])


def _ray_line(s: dict) -> list[str]:
    if "search_ray" not in s:
        return []
    r = s["search_ray"]
    return [f"On Ray, two passes at once: **{r['seconds'] / s['processes']['seconds']:.2f}** of the processes' time, "
            f"**{r['seconds'] / s['search']['seconds']:.2f}** of the one-process search's (its Ray start and, its "
            "winner fitted in an actor, the winner trained once more included), best validation loss "
            f"{r['best_val_loss'] - s['processes']['best_val_loss']:+.4f} from the processes'; winner tested once: "
            f"{r['winner_test_accuracy']:.4f}. Its head epoch / floor counts each pass's own time, while two ran at "
            "once.", ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    p.add_argument("--part", choices=("small", "grid", "both"), default="both")
    args = p.parse_args()
    if args.part in ("grid", "both"):
        grid_part(args)
    if args.part == "grid":
        return
    times = {"processes": [], "search": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            times["processes"].append(processes(args.cache, args.per_class, Path(tmp) / f"p{r}"))
            times["search"].append(one_search(args.cache, args.per_class, Path(tmp), f"s{r}"))
            print({k: round(v[-1], 1) for k, v in times.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_minute = {k: len(DROPOUTS) * 60 / v for k, v in med.items()}
    (args.out / "benchmarks-search.json").write_text(json.dumps(
        {"per_class": args.per_class, "configurations": len(DROPOUTS), "seconds": times, "per_minute": per_minute},
        indent=2) + "\n")
    write_sections(args.out / "benchmarks.md", "\n".join([
        "## 11. Head experiments per minute: search vs one process each", "",
        f"`python bench/search.py --cache <the block3_pool cache> --per-class {args.per_class}`: the dense head at "
        f"{len(DROPOUTS)} dropout rates on {args.per_class} images per class, no pruning; alternated, medians of "
        f"{args.repeats}. Host: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs. The "
        "search's time includes training its winner again and testing it.", "",
        "| side | seconds for the 6 | experiments per minute |", "|---|---|---|",
        f"| one `featcache train-head` process each | {med['processes']:.1f} | {per_minute['processes']:.1f} |",
        f"| one `featcache search` | {med['search']:.1f} | {per_minute['search']:.1f} |",
        f"| search / processes | **{med['search'] / med['processes']:.2f}** | |", ""]))


if __name__ == "__main__":
    main()
