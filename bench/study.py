"""make study: which (input size, layer, views, head) gives the best honest CIFAR-10 accuracy on frozen VGG16?

Each cell trains a head on cached features; the configuration is chosen on validation accuracy
alone (validation is carved from the training split). Test accuracy is reported for every cell
for transparency, but never used to choose. Writes docs/study.md and docs/study.json.

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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featcache import open_cache  # noqa: E402
from featcache.extract import extract_all  # noqa: E402
from heads.train import train_head  # noqa: E402

HEAD_BUDGET_S = 60
#: (input size, views): each one forward pass for block3_pool and block4_pool together.
EXTRACTIONS = [(32, 1), (64, 1), (32, 4)]
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
              (("block3_pool", "block4_pool"), dict(model="dense", pooling="gap"))],
    (32, 4): [(("block3_pool",), dict(model="dense", pooling="flatten")),
              (("block3_pool",), dict(model="conv")),
              (("block4_pool",), dict(model="dense", pooling="flatten")),
              (("block4_pool",), dict(model="conv"))],
}
TRAINING = dict(epochs=40, patience=3, seed=0)


def run(args) -> dict:
    rows = []
    for size, views in EXTRACTIONS:
        t0 = time.perf_counter()
        paths = extract_all(data=args.data, weights=args.weights, layer="block3_pool,block4_pool", input_size=size,
                            views=views, cache_dir=args.cache_dir, progress=not args.no_progress)
        by_layer = {open_cache(p).meta.layer: p for p in paths}
        seconds = {layer: open_cache(p).extract_seconds for layer, p in by_layer.items()}
        print(f"study: extraction {size}px views={views}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for layers, head in CELLS[(size, views)]:
            name = f"{size}px-{'+'.join(layers)}-v{views}-{head['model']}-{head.get('pooling', '')}".rstrip("-")
            result = train_head([by_layer[layer] for layer in layers], runs_dir=args.runs_dir, name=name,
                                progress=False, **head, **TRAINING)
            m = result.metrics
            rows.append({
                "name": name, "input_size": size, "layers": list(layers), "views": views,
                "views_mode": "sample" if views > 1 else None, **head, "val_accuracy": m["val_accuracy"],
                "test_accuracy": m["test_accuracy"], "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                "head_seconds": m["seconds"], "within_budget": m["seconds"] <= HEAD_BUDGET_S,
                "extract_seconds": {layer: seconds[layer] for layer in layers},
                "run_dir": str(result.run_dir)})
            print(f"study: {name}: val {m['val_accuracy']:.4f} test {m['test_accuracy']:.4f} "
                  f"{m['seconds']:.0f} s", file=sys.stderr, flush=True)
    eligible = [r for r in rows if r["within_budget"]] or rows
    chosen = max(eligible, key=lambda r: (r["val_accuracy"], -r["head_seconds"]))
    return {"date": time.strftime("%Y-%m-%d"), "training": TRAINING, "head_budget_s": HEAD_BUDGET_S,
            "chosen": {k: chosen[k] for k in ("name", "input_size", "layers", "views", "views_mode", "model",
                                              "val_accuracy", "test_accuracy", "head_seconds")}
            | {"pooling": chosen.get("pooling")},
            "rows": rows}


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
        "| input | layer(s) | views | head | val acc | test acc | epochs run/best | head s | extract s (per layer) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(study["rows"], key=lambda r: -r["val_accuracy"]):
        head = r["model"] + (f" {r['pooling']}" if r.get("pooling") else "")
        ext = ", ".join(f"{k}: {v:.0f}" if v else f"{k}: n/a" for k, v in r["extract_seconds"].items())
        lines.append(f"| {r['input_size']} px | {'+'.join(r['layers'])} | {r['views']} | {head} | "
                     f"{r['val_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['epochs_run']}/{r['best_epoch']} | "
                     f"{r['head_seconds']:.0f}{'' if r['within_budget'] else ' (over budget)'} | {ext} |")
    lines += ["", "Rows are ordered by validation accuracy. Test accuracy is shown for every row for transparency; "
              "it was not used to choose anything.", ""]
    (out / "study.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--runs-dir", default="runs/study")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    study = run(args)
    write(study, args.out, "make study")
    print(json.dumps(study["chosen"], indent=2))


if __name__ == "__main__":
    main()
