"""make bench, part 8: head experiments per minute, `featcache search` (one process, features read once) against
one `featcache train-head` process per configuration, side by side (alternated) on the same cache and configurations.

    python bench/search.py --cache cache/<the block3_pool cache> [--per-class 200] [--repeats 2] [--out docs]

The configurations: the dense head at six dropout rates, on --per-class images per class, no pruning (so both
sides train the same six models; the search then trains its winner once more and tests it).
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args()
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
