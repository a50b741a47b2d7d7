"""When a pass of heads trained together goes on without its stopped heads: three rules side by side on the same
pass, the batch-256 half of section 12's grid (twelve dense heads: units 256 or 400,256,256 x dropout 0.1, 0.3,
0.5 x lr 0.001, 0.003; 50 epochs at most, patience 5) on a cache's pooled vectors, at each training split size.
Restarting drops the stopped heads' arithmetic but traces and compiles a smaller model; the rules:
- at once: a new model as soon as a head stops;
- half the weights: once the stopped heads hold half the model's weights (featcache's rule until 2026-12-07);
- half the weights, if paid back (featcache, heads.together.Restarts): as the rule before, but only once what the
  stopped heads have wasted since, with what the epochs the pass surely runs yet would waste, reaches a start's cost.
The rules change when the arithmetic is done, not what it computes: each head's figures are the same under all three
on TensorFlow; on JAX a model of other heads sums in another order (0.0013 of best validation loss here).

    python bench/restarts.py --cache cache/<the block3_pool cache> [--per-class 200,all] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from common import ROOT, machine, out_folder, write_sections

GRID = {"units": ((256,), (400, 256, 256)), "dropout": (0.1, 0.3, 0.5), "lr": (0.001, 0.003)}
RULES = {"at once": lambda self, seconds, stopped, ahead: stopped > 0,
         "half the weights": lambda self, seconds, stopped, ahead: stopped >= 0.5,
         "half the weights, if paid back (featcache)": None}


def one_pass(cache: str, per_class: int | None, rule) -> dict:
    """The pass under `rule` (None: featcache's): its seconds, models started, and its heads' best val loss."""
    from heads import together
    from heads.config import TrainConfig
    from heads.train import fit_and_choose_all
    from heads.trial import SearchData

    configs = [TrainConfig(model="dense", units=u, dropout=d, lr=lr, batch_size=256, per_class=per_class)
               for u, d, lr in itertools.product(*GRID.values())]
    data, pooled = SearchData([cache]).get(configs[0])
    featcaches = together.Restarts.now
    together.Restarts.now = rule or featcaches
    try:
        t0 = time.perf_counter()
        fits = fit_and_choose_all(data, configs, pooled=pooled)
        seconds = time.perf_counter() - t0
    finally:
        together.Restarts.now = featcaches
    models = len({n for v in fits for n in v.chosen.history["shared_by"]})
    return {"seconds": seconds, "models": models, "epochs": sum(len(v.chosen.history["val_loss"]) for v in fits),
            "best_val_loss": min(v.chosen.val_loss for v in fits)}


def section(cache: str, results: dict, repeats: int) -> str:
    m = machine()
    import keras

    lines = [f"## 18. When a pass goes on without its stopped heads: three rules (Keras on {keras.backend.backend()})", "",
             f"`KERAS_BACKEND={keras.backend.backend()} python bench/restarts.py --cache {cache} --repeats {repeats}`: "
             "one pass of twelve dense heads (the batch-256 half of section 12's grid) under each rule, the rules "
             f"alternated, medians of {repeats}; the pass's seconds from its first batch (validation included). "
             "A model started: the first, and each restart. At once: a smaller model as soon as a head stops; half "
             "the weights: once the stopped heads hold half the weights (the rule until 2026-12-07); featcache's: the "
             "same, but only once what the stopped heads have wasted since, with what the epochs the pass surely runs "
             "yet (the live heads' early stopping cannot end them sooner) would waste, reaches a start's cost "
             "(measured on each model). Host: "
             f"{m['cpu']}, {m['cores']} logical CPUs.", "",
             "| training split | rule | pass (s) | / featcache's | models started | head epochs | best val loss |",
             "|---|---|---|---|---|---|---|"]
    for split, by_rule in results.items():
        ours = statistics.median(r["seconds"] for r in by_rule["half the weights, if paid back (featcache)"])
        for rule, runs in by_rule.items():
            s = statistics.median(r["seconds"] for r in runs)
            lines.append(f"| {split} | {rule} | {s:.1f} | {s / ours:.2f} | {runs[0]['models']} | {runs[0]['epochs']} "
                         f"| {runs[0]['best_val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--per-class", default="200,all", help="training split sizes: images per class, or all")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    args = p.parse_args()
    results: dict = {}
    for size in args.per_class.split(","):
        per_class = None if size == "all" else int(size)
        split = "whole" if per_class is None else f"{per_class} per class"
        results[split] = {rule: [] for rule in RULES}
        for _ in range(args.repeats):
            for rule, now in RULES.items():
                results[split][rule].append(one_pass(args.cache, per_class, now))
                print(split, rule, results[split][rule][-1], flush=True)
    text = section(args.cache, results, args.repeats)
    print(text)
    write_sections(args.out / "benchmarks.md", text)


if __name__ == "__main__":
    main()
