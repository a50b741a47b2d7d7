"""make bench, part 6: the default head's training time and figures, this tree against an earlier commit, side by
side in one run (alternated before, after, before, after) on the same cache.

    python bench/default_head.py --cache cache/<the block3_pool cache> [--before REF] [--per-class 100]
                                 [--repeats 2] [--out docs/results]

Each side runs `featcache train-head --cache CACHE` (every default) in a fresh process, on the whole training
split and on a --per-class subset; reported: seconds of training (metrics.json `seconds`: every candidate's fit),
the process's wall time, each candidate's seconds, the head chosen, validation loss and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, out_folder, write_sections

#: The CLI of the tree the process starts in (`python -c` puts the working folder first on sys.path).
CLI = ("import os, sys, featcache; assert featcache.__file__.startswith(os.getcwd()), featcache.__file__\n"
       "from featcache.cli import main; sys.exit(main())")


def checkout(ref: str, where: Path) -> Path:
    """A detached worktree of `ref` (removed by the caller's temporary folder and `git worktree prune`)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), ref], check=True)
    return where


def one_run(tree: Path, cache: str, runs: Path, extra: list[str]) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CLI, "-q", "train-head", "--cache", str(Path(cache).resolve()),
                          "--runs-dir", str(runs.resolve()), "--no-progress", *extra], env=env, cwd=tree, check=True,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = json.loads((Path(out.stdout.strip()) / "metrics.json").read_text())
    return {"wall_s": round(wall, 2), "train_s": m["seconds"], "chosen": m.get("chosen"),
            "candidates_s": {k: v["seconds"] for k, v in m.get("candidates", {}).items()},
            "val_loss": round(m["val_loss"], 4), "test_accuracy": m["test_accuracy"]}


def measure(trees: dict, cache: str, splits: dict, repeats: int, tmp: Path) -> dict:
    results = {split: {side: [] for side in trees} for split in splits}
    for split, extra in splits.items():
        for r in range(repeats):
            for side, tree in trees.items():
                results[split][side].append(one_run(tree, cache, tmp / f"runs-{side}", extra))
                print(split, side, r, results[split][side][-1], flush=True)
    return results


def section(results: dict, before: str, after: str) -> str:
    lines = ["## 9. The default head: training time, before and after", "",
             f"`python bench/default_head.py --cache <the block3_pool cache> --before {before}` (before: {before}, "
             f"after: {after}): `featcache train-head` with every default, each side in a fresh process, alternated; "
             f"medians. Host: {machine()['cpu']}, {os.cpu_count()} logical CPUs.", "",
             "| training split | side | training s (median) | process s | candidates s | chosen | val loss | test acc |",
             "|---|---|---|---|---|---|---|---|"]
    for split, sides in results.items():
        for side, runs in sides.items():
            cands = ", ".join(f"{k} {statistics.median(r['candidates_s'][k] for r in runs):.1f}"
                              for k in runs[0]["candidates_s"])
            lines.append(f"| {split} | {side} | {statistics.median(r['train_s'] for r in runs):.1f} | "
                         f"{statistics.median(r['wall_s'] for r in runs):.1f} | {cands} | {runs[0]['chosen']} | "
                         f"{runs[0]['val_loss']} | {runs[0]['test_accuracy']:.4f} |")
        b, a = (statistics.median(r["train_s"] for r in sides[s]) for s in ("before", "after"))
        lines.append(f"| {split} | after / before | **{a / b:.2f}** | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--before", default="ef3fa2c", help="the commit to compare with (default: before issue 25)")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    args = p.parse_args()
    after = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, check=True).stdout.strip()
    splits = {"whole (45,000 rows)": [], f"{args.per_class} per class": ["--per-class", str(args.per_class)]}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trees = {"before": checkout(args.before, Path(tmp) / "before"), "after": ROOT}
            results = measure(trees, args.cache, splits, args.repeats, Path(tmp))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "before")],
                           capture_output=True)
    (args.out / "benchmarks-default-head.json").write_text(json.dumps(
        {"before": args.before, "after": after, "results": results}, indent=2) + "\n")
    write_sections(args.out / "benchmarks.md", section(results, args.before, after))


if __name__ == "__main__":
    main()
