"""`predict(run, images)`: class probabilities of image files from a trained head, the images decoded and resized
as the extraction does, the model rebuilt by `heads.endtoend`; `engine="ray"` runs shards on Ray
(`heads.predict_ray`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import system
from featcache.cluster import ENGINES
from featcache.errors import BadInputError, MissingInputError
from featcache.options import declared, given_or_built, option, validate
from featcache.sources.images import is_system_file, pillow_extensions
from heads.endtoend import end_to_end, load_run
from heads.imagebatch import predict_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictConfig:
    """How `predict` runs, every option declared once (the command line's options are built from it)."""

    batch_size: int = option(128, "Images per forward pass.", kind="int", low=1)
    weights: str | None = option(None, "The backbone weights file, if it moved since the cache was made (its hash "
                                 "must be the one the cache recorded).", kind="path")
    skip_bad_images: bool = option(False, "Leave out unreadable images (listed on stderr) instead of stopping at the "
                                   "end with an error.", kind="bool", flag=True)
    engine: str = option("local", "ray: shards of the images on Ray actors (each builds the model once), on "
                         "--ray-address or a local cluster featcache starts and stops, as `extract --engine ray`; the "
                         "same rows come back.", kind="str", choices=ENGINES)
    ray_address: str | None = option(None, "Ray cluster to run on [default: $RAY_ADDRESS, else a local one].",
                                     kind="str")
    workers: int | None = option(None, "Ray workers [default: one per GPU of the cluster, else one per CPU].",
                                 kind="int", low=1)

    def __post_init__(self):
        validate(self)
        if self.engine == "local" and (self.ray_address or self.workers):
            raise BadInputError("--ray-address and --workers need --engine ray")


def predict_options() -> list:
    """The declared fields of PredictConfig (what `featcache predict` turns into options)."""
    return declared(PredictConfig)


def image_files(paths) -> list[Path]:
    """The image files among `paths`, folders walked recursively in sorted order (hidden and system files left out)."""
    exts = pillow_extensions()
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts
                          and not any(is_system_file(part) for part in f.relative_to(p).parts))
        elif p.is_file():   # a FIFO, socket or device is never opened (reading a FIFO waits for ever)
            out.append(p)
        elif p.exists():
            raise BadInputError(f"{p} is not a regular file; expected an image file or a folder of them")
        else:
            raise MissingInputError(f"no image or folder at {p}; fix: check the path")
    if not out:
        raise BadInputError(f"no image files in {', '.join(map(str, paths))}; expected images or folders of images")
    return out


@dataclass
class Predictions:
    files: list[Path]
    probabilities: np.ndarray      # (n, n_classes), rows in `files` order
    class_names: tuple[str, ...]
    bad: list[tuple[Path, str]]    # unreadable images: (file, why)

    @property
    def indices(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """Per image, the k most probable (class name, probability), most probable first."""
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[c], float(p[c])) for c in row] for row, p in zip(order, self.probabilities)]



def predict(run, images, *, config: PredictConfig | None = None, progress: bool = True, model=None,
            **options) -> Predictions:
    """Class probabilities of the image files `images` (or folders of them) from the run (or exported) folder
    `run`, with the options of `config` (a PredictConfig: batch_size, weights, skip_bad_images, engine...) or
    given as its fields. An unreadable image is a one-line UnreadableImageError, or with `skip_bad_images` left
    out and listed in `Predictions.bad`. Images are decoded and resized as the extraction does; memory is one
    batch. With `engine="ray"` shards of the files run on Ray actors (each builds the model once), on the cluster
    at `ray_address` or one of featcache's own, as `extract --engine ray` does; rows come back in the same order."""
    config = given_or_built(PredictConfig, config, options)
    info = load_run(run)
    files = image_files(images if isinstance(images, (list, tuple)) else [images])
    if config.engine == "ray":
        from heads.predict_ray import predict_on_ray

        probs, kept, bad = predict_on_ray(info, files, weights=config.weights, batch_size=config.batch_size,
                                          skip=config.skip_bad_images, address=config.ray_address,
                                          workers=config.workers, progress=progress)
        return Predictions(kept, probs, info.class_names, bad)
    model = model if model is not None else end_to_end(info, weights=config.weights)
    size = info.input_size or tuple(model.input_shape[1:3])
    with system.progress_bar(len(files), unit="img", desc="predict", enabled=progress) as bar:
        probs, kept, bad = predict_files(model, files, size, config.batch_size, config.skip_bad_images, bar,
                                         resizing=info.resize)
    return Predictions(kept, probs, info.class_names, bad)
