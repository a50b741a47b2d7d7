"""make study: which (input size, layer, views, head) gives the best honest CIFAR-10 accuracy on frozen VGG16?

Each cell trains a head on cached features; the configuration is chosen on validation accuracy
alone (validation is carved from the training split). Test accuracy is reported for every cell
for transparency, but never used to choose. Writes docs/results/study.md and docs/results/study.json.

    python bench/study.py --data DIR --weights FILE [--cache-dir cache] [--runs-dir runs/study]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import ROOT, out_folder

from featcache import open_cache
from featcache.extract import extract
from heads.train import train_head

HEAD_BUDGET_S = 60
#: (input size, views, layers): each one forward pass into one cache file.
EXTRACTIONS = [(32, 1, "block3_pool,block4_pool"), (64, 1, "block3_pool,block4_pool"),
               (32, 4, "block3_pool,block4_pool"), (64, 4, "block3_pool,block4_pool"),
               (96, 1, "block3_pool,block4_pool,block5_pool")]
#: (input size, views) -> [(layers, head options)]
CELLS = {
    (32, 1): [(("block3_pool",), dict(model="dense", pooling="gap")),
              (("block3_pool",), dict(model="dense", pooling="flatten")),
              (("block3_pool",), dict(model="conv")),
              (("block4_pool",), dict(model="dense", pooling="gap")),
              (("block4_pool",), dict(model="dense", pooling="flatten")),
              (("block4_pool",), dict(model="conv")),
              (("block3_pool", "block4_pool"), dict(model="dense", pooling="gap"))],
    (64, 1): [(("block3_pool",), dict(model="dense", pooling="gap")),
              (("block3_pool",), dict(model="conv")),
              (("block4_pool",), dict(model="dense", pooling="gap")),
              (("block4_pool",), dict(model="dense", pooling="flatten")),
              (("block4_pool",), dict(model="conv")),
              (("block4_pool",), dict(model="conv", filters=64, units=(256,))),
              (("block3_pool", "block4_pool"), dict(model="dense", pooling="gap"))],
    (32, 4): [(("block3_pool",), dict(model="dense", pooling="flatten")),
              (("block3_pool",), dict(model="conv")),
              (("block4_pool",), dict(model="dense", pooling="flatten")),
              (("block4_pool",), dict(model="conv"))],
    (64, 4): [(("block4_pool",), dict(model="dense", pooling="gap")),
              (("block3_pool", "block4_pool"), dict(model="dense", pooling="gap")),
              (("block4_pool",), dict(model="dense", pooling="flatten")),
              (("block4_pool",), dict(model="conv")),
              (("block4_pool",), dict(model="conv", filters=64, units=(256,)))],
    (96, 1): [(("block4_pool",), dict(model="dense", pooling="gap")),
              (("block5_pool",), dict(model="dense", pooling="gap")),
              (("block4_pool", "block5_pool"), dict(model="dense", pooling="gap")),
              (("block3_pool", "block4_pool", "block5_pool"), dict(model="dense", pooling="gap")),
              (("block5_pool",), dict(model="dense", pooling="flatten")),
              (("block5_pool",), dict(model="conv")),
              (("block5_pool",), dict(model="conv", filters=64, units=(256,))),
              (("block4_pool",), dict(model="conv", filters=64, units=(256,)))],
}
#: The ideas of the study, in the order the curve adds them, each with a test of whether a row uses it.
IDEAS = [
    ("deeper or several layers", lambda r: r["layers"] != ["block3_pool"]),
    ("64 px input", lambda r: r["input_size"] > 32),
    ("spatial heads (flatten, 1x1 conv)", lambda r: not (r["model"] == "dense" and r.get("pooling") == "gap")),
    ("4 cached views (flip, crop)", lambda r: r["views"] > 1),
    ("96 px input (and block5_pool)", lambda r: r["input_size"] > 64),
]
TRAINING = dict(epochs=40, patience=3, seed=0)


def run(args) -> dict:
    rows = []
    for size, views, layers_extracted in EXTRACTIONS:
        t0 = time.perf_counter()
        path = extract(data=args.data, weights=args.weights, layer=layers_extracted, input_size=size, views=views,
                       cache_dir=args.cache_dir, progress=not args.no_progress)
        seconds = open_cache(path).extract_seconds
        print(f"study: extraction {size}px views={views}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for layers, head in CELLS[(size, views)]:
            name = f"{size}px-{'+'.join(layers)}-v{views}-{_head_name(head)}"
            result = train_head(path, layer=layers, runs_dir=args.runs_dir, name=name, progress=False, **head,
                                **TRAINING)
            m = result.metrics
            rows.append({
                "name": name, "input_size": size, "layers": list(layers), "views": views,
                "views_mode": "sample" if views > 1 else None, **head, "val_accuracy": m["val_accuracy"],
                "test_accuracy": m["test_accuracy"], "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                "head_seconds": m["seconds"], "within_budget": m["seconds"] <= HEAD_BUDGET_S,
                "extract_seconds": seconds,
                "run_dir": str(result.run_dir)})
            print(f"study: {name}: val {m['val_accuracy']:.4f} test {m['test_accuracy']:.4f} "
                  f"{m['seconds']:.0f} s", file=sys.stderr, flush=True)
    chosen = choose(rows)
    return {"date": time.strftime("%Y-%m-%d"), "training": TRAINING, "head_budget_s": HEAD_BUDGET_S,
            "chosen": {k: chosen.get(k) for k in ("name", "input_size", "layers", "views", "views_mode", "model",
                                                  "pooling", "filters", "units", "val_accuracy", "test_accuracy",
                                                  "head_seconds")},
            "curve": curve(rows), "rows": rows}


def choose(rows: list[dict]) -> dict:
    """The row with the best validation accuracy among heads within the budget (faster wins a tie).

    Test accuracy is never looked at here."""
    return _best([r for r in rows if r["within_budget"]] or rows)


def _best(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: (r["val_accuracy"], -r["head_seconds"])) if rows else None


def _head_name(head: dict) -> str:
    """dense-gap, conv, conv-f64-u256: the model, its pooling and any non-default width."""
    parts = [head["model"], head.get("pooling")]
    parts += [f"f{head['filters']}"] if "filters" in head else []
    parts += ["u" + "x".join(map(str, head["units"]))] if "units" in head else []
    return "-".join(p for p in parts if p)


def curve(rows: list[dict]) -> list[dict]:
    """What each idea added: the best row (by validation) using only the ideas enabled so far."""
    summary = lambda r: r and {k: r[k] for k in ("name", "val_accuracy", "test_accuracy", "head_seconds")}  # noqa: E731
    steps = []
    for i in range(len(IDEAS) + 1):
        allowed = [r for r in rows if not any(uses(r) for _, uses in IDEAS[i:])]
        steps.append({"added": IDEAS[i - 1][0] if i else "seed's configuration",
                      "within_budget": summary(_best([r for r in allowed if r["within_budget"]])),
                      "any_time": summary(_best(allowed))})
    return steps


def _head_label(row: dict) -> str:
    """'dense flatten', 'conv (64 filters, units 256)': the head column of the table."""
    widths = ([f"{row['filters']} filters"] if "filters" in row else []) + \
             ([f"units {','.join(map(str, row['units']))}"] if "units" in row else [])
    return f"{row['model']} {row.get('pooling') or ''}".strip() + (f" ({', '.join(widths)})" if widths else "")


def write(study: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    c = study["chosen"]
    lines = [
        "# Study: frozen VGG16 features on CIFAR-10, toward 85% honest test accuracy", "",
        f"Measured by `{command}` on {study['date']} (2-core CPU, real ImageNet VGG16 weights, the cifar10-jpeg copy "
        "of CIFAR-10). Every head: Adam, early stopping on validation loss "
        f"(patience {study['training']['patience']}, at most {study['training']['epochs']} epochs, best weights "
        f"restored), validation = 10% of the training split (stratified, seed {study['training']['seed']}).", "",
        f"**Chosen on validation accuracy alone** (among heads within the {study['head_budget_s']} s budget): "
        f"`{c['name']}`: validation {c['val_accuracy']:.4f}, **test {c['test_accuracy']:.4f}**, "
        f"head {c['head_seconds']:.0f} s.", "",
        "| input | layer(s) | views | head | val acc | test acc | epochs run/best | head s | extract s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(study["rows"], key=lambda r: -r["val_accuracy"]):
        head = _head_label(r)
        ext = f"{r['extract_seconds']:.0f}" if r["extract_seconds"] else "n/a"
        lines.append(f"| {r['input_size']} px | {'+'.join(r['layers'])} | {r['views']} | {head} | "
                     f"{r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['epochs_run']}/{r['best_epoch']} | "
                     f"{r['head_seconds']:.0f}{'' if r['within_budget'] else ' (over budget)'} | {ext} |")
    lines += ["", "Rows are ordered by validation accuracy. Test accuracy is shown for every row for transparency; "
              "it was not used to choose anything. *head s*: the wall time of training (every epoch, with its "
              "validation pass), not of reading the cache. *extract s*: the wall time of the one forward pass that "
              "produced the cache file, shared by all its layers (n/a: a cache written before the time was "
              "recorded).", "",
              "## What each idea added", "",
              "Each line enables one more idea and shows the best cell (by validation accuracy) that uses only the "
              "ideas enabled so far: within the head budget, and regardless of time.", "",
              f"| added | best within {study['head_budget_s']} s: val / test (head s) | best at any head time: "
              "val / test (head s) |", "|---|---|---|"]
    cell = lambda b: f"{b['val_accuracy']:.4f} / {b['test_accuracy']:.4f} ({b['head_seconds']:.0f} s)" if b else "-"
    for step in study["curve"]:
        lines.append(f"| {step['added']} | {cell(step['within_budget'])} | {cell(step['any_time'])} |")
    lines.append("")
    (out / "study.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--runs-dir", default="runs/study")
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    study = run(args)
    write(study, args.out, "make study")
    print(json.dumps(study["chosen"], indent=2))


if __name__ == "__main__":
    main()
