"""Look at a head's mistakes (fastai's `most_confused` and `plot_top_losses`): the class pairs it confuses most,
and the test images it got most confidently wrong, from the run's cache and the images the cache records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import system
from featcache.errors import BadInputError
from featcache.options import given_or_built, option, validate


@dataclass(frozen=True)
class InspectConfig:
    """What `inspect` shows, every option declared once (the command line's options are built from it)."""

    images: int = option(16, "Test images shown, highest loss first.", kind="int", low=1)
    pairs: int = option(10, "Most confused class pairs listed.", kind="int", low=1)

    def __post_init__(self):
        validate(self)


def most_confused(matrix, class_names, n: int = 10) -> list[tuple[str, str, int]]:
    """(true class, predicted class, count) of the `n` largest off-diagonal cells of a confusion matrix."""
    m = np.asarray(matrix)
    cells = [(int(m[i, j]), i, j) for i in range(len(m)) for j in range(len(m)) if i != j and m[i, j] > 0]
    return [(class_names[i], class_names[j], c) for c, i, j in sorted(cells, key=lambda x: (-x[0], x[1], x[2]))[:n]]


def confused_table(pairs: list[tuple[str, str, int]]) -> str:
    from heads.reports import markdown_table

    return markdown_table(["true class", "predicted as", "test images"], pairs) + "\n"


def top_losses(probs: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Rows of the `n` highest losses (-log p of the true class) among the wrongly predicted, highest first."""
    loss = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))
    wrong = np.flatnonzero(probs.argmax(1) != y)
    return wrong[np.argsort(-loss[wrong], kind="stable")][:n]


def inspect(run, *, config: InspectConfig | None = None, **fields) -> dict:
    """Write mistakes.md (the most confused pairs) and top_losses.png (the test images with the highest loss,
    with their true and predicted class and its probability) into the run folder; returns what was written.
    Options: an InspectConfig, or its fields as keywords (`images=16, pairs=10`)."""
    import keras

    from heads.data import data_from_cache
    from heads.endtoend import load_run
    from heads.metrics import predict
    from heads.provenance import Provenance

    config = given_or_built(InspectConfig, config, fields)
    info = load_run(run)   # records read in one line each, the model checked to be the run's own
    folder, record = info.folder, info.config
    source = Provenance.of_record(record.get("data", {}))
    if source.joined or len(source.layers) != 1:
        raise BadInputError(f"{folder} is not a run of one cached layer (a baseline, or several layers); inspect "
                            "needs the cache's test features and images")
    metrics = system.read_json(folder / "metrics.json", fix="restore it, or train the run again")
    pairs = most_confused(metrics["confusion_matrix"], record["class_names"], config.pairs)
    (folder / "mistakes.md").write_text(f"Most confused class pairs on the held-out test split ({folder.name})\n\n"
                                        + confused_table(pairs))
    part = source.layers[0]
    cached = data_from_cache(part.cache, part.layer)
    import heads.knn  # noqa: F401  (registers the kNN head's layer for loading)

    model = keras.saving.load_model(folder / "model.keras", compile=False)
    probs = predict(model, cached.x_test, 256)
    rows = top_losses(probs, cached.y_test, config.images)
    _plot(folder / "top_losses.png", _images(part.cache, rows), [
        (record["class_names"][cached.y_test[r]], record["class_names"][probs[r].argmax()], float(probs[r].max()))
        for r in rows])
    return {"pairs": pairs, "rows": rows.tolist(), "files": ["mistakes.md", "top_losses.png"]}


def _images(cache_path: str, rows: np.ndarray) -> list[np.ndarray]:
    """The test images of `rows`: files of an image folder, pixels of an in-memory source."""
    from featcache.cache import open_cache
    from featcache.sources import load_dataset, read_image

    cache = open_cache(cache_path)
    paths = cache.paths("test")
    if paths is not None:
        root = Path(cache.meta.dataset_source.removeprefix("folder:"))
        return [read_image(root / paths[r]) for r in rows]
    ds = load_dataset(cache.meta.dataset_source, limit=cache.meta.limit or None)
    return [ds.test.pixels[r] for r in rows]


def _plot(path: Path, images: list, labels: list) -> None:
    from heads.reports import pyplot

    plt = pyplot()
    cols = 4
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, (true, pred, p) in zip(axes.flat, images, labels):
        ax.imshow(img)
        ax.set_title(f"true {true}\npredicted {pred} ({p:.2f})", fontsize=8)
    fig.suptitle("test images predicted most confidently wrong (highest loss first)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
