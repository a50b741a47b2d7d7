"""make bench, part 8: head experiments per minute, `featcache search` (one process, features read once) against
one `featcache train-head` process per configuration, side by side on the same cache and configurations.

    python bench/search.py --cache cache/<the block3_pool cache> [--per-class 200] [--repeats 2] [--out docs]
                           [--part small|grid|both]

small (section 11): the dense head at six dropout rates, on --per-class images per class, no pruning (so both
sides train the same six models; the search then trains its winner once more and tests it), alternated.
grid (section 12): the issue's 24-configuration grid of dense heads (units x dropout x lr x batch size, 50 epochs
at most, patience 5) on the whole training split, as 24 processes, as one search without pruning and as one with
the median pruner; epochs run, best validation figures, and the head's epoch against its arithmetic floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from run import write_sections  # noqa: E402

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


def grid_search(cache: str, runs: Path, pruner: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    done = subprocess.run([*CLI, "-q", "search", "--cache", cache, "--head", "dense", "--pruner", pruner,
                           "--name", f"grid-{pruner}", "--runs-dir", str(runs), "--no-progress", "--trials", "24",
                           *[a for k, v in GRID.items() for a in ("--param", f"{k}={'|'.join(v)}")]],
                          check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, json.loads((Path(done.stdout.strip()) / "search.json").read_text())


def float32_peak() -> float:
    """The float32 FMA peak measured here (bench/peak_flops.c; GFLOP/s): the arithmetic floor's yardstick."""
    from precision import fma_peak

    with tempfile.TemporaryDirectory() as tmp:
        return fma_peak(["float32"], Path(tmp))["float32"]


def head_flops_per_row(units: str, n_in: int = 256, n_classes: int = 10) -> int:
    """Forward and backward through the dense layers: 6 x multiply-adds per row."""
    sizes = [n_in, *map(int, units.split(",")), n_classes]
    return 6 * sum(a * b for a, b in zip(sizes, sizes[1:]))


def grid_part(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t_proc, procs = grid_processes(args.cache, Path(tmp) / "p")
        t_none, none = grid_search(args.cache, Path(tmp), "none")
        t_median, median = grid_search(args.cache, Path(tmp), "median")
    rate = float32_peak()
    n_train = procs[0]["n_train"]
    floors = [head_flops_per_row(p["units"]) * n_train / (rate * 1e9) for p in procs]
    epoch_ratio = statistics.median(p["seconds_per_epoch"] / f for p, f in zip(procs, floors))
    summary = {
        "processes": {"seconds": t_proc, "epochs": sum(p["epochs"] for p in procs),
                      "best_val_loss": min(p["val_loss"] for p in procs),
                      "best_val_accuracy": max(p["val_accuracy"] for p in procs)},
        **{name: {"seconds": t, "epochs": sum(tr["epochs"] or 0 for tr in rec["trials"]),
                  "pruned": sum(tr["pruned"] for tr in rec["trials"]),
                  "best_val_loss": min(tr["val_loss"] for tr in rec["trials"] if tr["val_loss"] is not None),
                  "best_val_accuracy": max(tr["val_accuracy"] for tr in rec["trials"]
                                           if tr["val_accuracy"] is not None),
                  "winner_test_accuracy": rec["winner"]["test_accuracy"]}
           for name, t, rec in (("search", t_none, none), ("search_pruned", t_median, median))},
        "fma_peak_gflops": rate, "epoch_vs_floor_median": epoch_ratio, "n_train": n_train}
    (args.out / "benchmarks-search-grid.json").write_text(json.dumps({"summary": summary, "processes": procs},
                                                                     indent=2) + "\n")
    s = summary
    row = lambda label, k: (f"| {label} | {s[k]['seconds']:.0f} | {s[k]['epochs']} | {s[k]['best_val_loss']:.4f} | "  # noqa: E731
                            f"{s[k]['best_val_accuracy']:.4f} |")
    write_sections(args.out / "benchmarks.md", "\n".join([
        "## 12. A 24-configuration grid: one search vs 24 processes, with and without pruning", "",
        "`python bench/search.py --cache <the block3_pool cache> --part grid`: dense heads, units x dropout x lr x "
        f"batch size ({' x '.join(str(len(v)) for v in GRID.values())}), 50 epochs at most, patience 5, on the whole "
        f"training split ({n_train} rows), one after another in one run. Host: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs.", "",
        "| side | seconds | epochs in all | best val loss | best val accuracy |", "|---|---|---|---|---|",
        row("24 `featcache train-head` processes", "processes"), row("one search, no pruning", "search"),
        row("one search, median pruner", "search_pruned"), "",
        f"Search / processes: **{s['search']['seconds'] / s['processes']['seconds']:.2f}** of the time (target 1/3); "
        f"pruning ran **{s['search']['epochs'] / max(1, s['search_pruned']['epochs']):.2f}x** fewer epochs "
        f"(target 2x; {s['search_pruned']['pruned']} trials pruned) and its best validation accuracy is "
        f"{100 * (s['search_pruned']['best_val_accuracy'] - s['search']['best_val_accuracy']):+.2f} points from the "
        "unpruned search's. The searches' winners were tested once each: "
        f"{s['search']['winner_test_accuracy']:.4f} (no pruning), {s['search_pruned']['winner_test_accuracy']:.4f} "
        "(pruned).", "",
        f"Head epoch vs its arithmetic floor: the dense layers' forward and backward (6 x multiply-adds x "
        f"{n_train} rows) at the float32 FMA peak measured here ({rate:.0f} GFLOP/s, bench/peak_flops.c): "
        f"the epochs the processes timed are a median **{epoch_ratio:.1f}x** their floor (target 2x).", ""]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
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
