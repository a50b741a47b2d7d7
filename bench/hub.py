"""KerasHub presets' extraction speed and feature shapes here, beside VGG16 at the same input size, in one run.

No preset weights can be downloaded on these machines, so each preset is its published architecture (DINOv2
ViT-S/14, CLIP ViT-B/16's vision tower, SigLIP base patch16 at 224 px) built with random weights and saved as a
preset folder: the speed and shapes are the real presets', the features are not (no accuracy is measured).
Each backbone extracts the same real CIFAR-10 images (--limit per split) at 224 px, once; the whole `extract`
call is timed (model build included), and its images/s is given with the ratio to VGG16 in the same run.

Writes docs/results/benchmarks-hub.json and its section of docs/results/benchmarks.md.

    python bench/hub.py --data ../shared/datasets/cifar10-jpeg [--limit 64] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


from common import ROOT, machine, out_folder, write_sections

import featcache
from featcache.extract import extract

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: (name, KerasHub class, converter class, configuration): the published sizes of each family's small preset
ARCHITECTURES = (
    ("dinov2_small (ViT-S/14)", "DINOV2Backbone", "DINOV2ImageConverter",
     dict(patch_size=14, num_layers=12, hidden_dim=384, num_heads=6, intermediate_dim=1536,
          position_embedding_shape=(518, 518, 3))),
    ("clip_vit_base_patch16 (vision tower, ViT-B/16)", "CLIPVisionEncoder", "CLIPImageConverter",
     dict(patch_size=16, num_layers=12, hidden_dim=768, num_heads=12, intermediate_dim=3072)),
    ("siglip_base_patch16_224 (vision tower)", "SigLIPVisionEncoder", "SigLIPImageConverter",
     dict(patch_size=16, num_layers=12, hidden_dim=768, num_heads=12, intermediate_dim=3072)),
)


def save_architecture(folder: Path, model_class: str, converter_class: str, config: dict, size: int,
                      smoke: bool) -> Path:
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    if smoke:   # a few small layers: the script's path, in seconds
        config = {**config, "num_layers": 1, "hidden_dim": 32, "num_heads": 2, "intermediate_dim": 64}
    getattr(keras_hub.models, model_class)(**config, image_shape=(size, size, 3)).save_to_preset(str(folder))
    getattr(keras_hub.layers, converter_class)(image_size=(size, size), scale=[1 / (255 * s) for s in STD],
                                               offset=[-m / s for m, s in zip(MEAN, STD)]).save_to_preset(str(folder))
    return folder


def timed_extract(tmp: Path, name: str, **options) -> dict:
    t0 = time.perf_counter()
    path = extract(cache_dir=tmp / "cache" / name.split()[0], progress=False, dtype="float16", **options)
    seconds = time.perf_counter() - t0
    c = featcache.open_cache(path)
    shapes = {layer: list(shape) for layer, shape in c.meta.shapes.items()}
    return {"seconds": seconds, "images": c.meta.n_train + c.meta.n_test, "shapes": shapes,
            "images_per_s": (c.meta.n_train + c.meta.n_test) / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="an image folder ROOT/{train,test}/<class>/")
    p.add_argument("--limit", type=int, default=64, help="images per split")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", type=out_folder, default=ROOT / "docs" / "results")
    p.add_argument("--smoke", action="store_true", help="tiny models and 4 images per split: the path, not figures")
    args = p.parse_args()
    limit = 4 if args.smoke else args.limit
    common = dict(data=args.data, limit=limit, input_size=args.size)
    results = {"date": date.today().isoformat(), "machine": machine(), "limit_per_split": limit, "size": args.size,
               "command": " ".join(["python bench/hub.py", *sys.argv[1:]]), "backbones": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["backbones"]["vgg16 (block3_pool, random weights)"] = timed_extract(tmp, "vgg16", weights="random",
                                                                                    **common)
        for name, model_class, converter_class, config in ARCHITECTURES:
            folder = save_architecture(tmp / name.split()[0], model_class, converter_class, config, args.size,
                                       args.smoke)
            layer = "cls_patch_mean,patch_tokens" if "siglip" not in name else "patch_mean,pooled"
            results["backbones"][name] = timed_extract(tmp, name, backbone=f"hub:{folder}", layer=layer,
                                                       weights="random", **common)
    report(results, args.out, args.smoke)


def report(results: dict, out: Path, smoke: bool) -> None:
    rows = results["backbones"]
    vgg = next(iter(rows.values()))["images_per_s"]
    m = results["machine"]
    lines = ["## 15. KerasHub presets: extraction speed and feature shapes", "",
             f"Measured by `{results['command']}` on {results['date']}, {m['cpu']}, {m['cores']} cores"
             + (" (SMOKE RUN: tiny models, not figures)" if smoke else "") + ". Each preset is its published "
             "architecture with random weights (none can be downloaded here): speed and shapes only, no accuracy. "
             f"{2 * results['limit_per_split']} real CIFAR-10 images resized to {results['size']} px, the whole "
             "`extract` call timed once (model build included), float16 storage, float32 compute.", "",
             "| backbone | feature shapes | images/s | vs VGG16 |", "|---|---|---:|---:|"]
    for name, r in rows.items():
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r["shapes"].items())
        lines.append(f"| {name} | {shapes} | {r['images_per_s']:.1f} | {r['images_per_s'] / vgg:.2f} |")
    out.mkdir(parents=True, exist_ok=True)
    if not smoke:
        (out / "benchmarks-hub.json").write_text(json.dumps(results, indent=2) + "\n")
        write_sections(out / "benchmarks.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
