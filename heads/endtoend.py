"""A run's model from image to probabilities: `load_run(run)` reads what a run (or export) folder records, and
`end_to_end(info)` rebuilds what stood before its head.

A head's `model.keras` takes what it was trained on: the cached layer's maps (or pooled vectors of several
layers), or raw pixels for the scratch baselines. `end_to_end` rebuilds the rest from the run's provenance: uint8
pixels at the cache's input size -> the backbone's own preprocessing (as one affine Dense layer over the channels,
read off `preprocess_input`) -> the frozen backbone up to the cached layer(s), with the weights the cache was made
from (checked by their hash) -> the storage dtype the head saw -> the head. `heads.predict` runs it on image files
and `heads.export` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import backbones, system
from featcache.errors import BadInputError, MissingInputError, first_line
from featcache.sources import RESIZE
from heads.provenance import CachedLayer, Provenance

#: The record `heads.export` writes beside an exported model (a folder holding it is an exported run).
EXPORT_FILE = "export.json"


@dataclass(frozen=True)
class RunInfo:
    """What a run folder (or an exported folder) says about the model in it and the images it takes."""

    folder: Path
    model_path: Path
    class_names: tuple[str, ...]
    input_size: tuple[int, int] | None     # pixels the model (or its backbone) takes; None: each image's own
    kind: str                              # "features" (a head on a cache), "pixels" (a baseline), "exported"
    config: dict

    @property
    def provenance(self) -> Provenance:
        """Where the run's rows came from (its config.json `data`)."""
        return Provenance.of_record(self.config.get("data", {}))

    @property
    def parts(self) -> tuple[CachedLayer, ...]:
        """The cached layers the run trained on, in the head's order (none for a baseline or an export)."""
        return self.provenance.layers

    @property
    def cache_metas(self) -> list[dict]:
        return [p.cache_meta for p in self.parts]

    @property
    def resize(self) -> str:
        """How images become the model's inputs, as its caches (or its export) recorded it."""
        metas = self.cache_metas if self.kind != "exported" else self.config.get("cache", [])
        return next((m["resize"] for m in metas if m.get("resize", RESIZE) != RESIZE), RESIZE)


def load_run(run) -> RunInfo:
    """The RunInfo of a run folder or of a folder `export` wrote; a one-line error where it holds no model."""
    folder = Path(run)
    exported = folder / EXPORT_FILE
    config_path = exported if exported.is_file() else folder / "config.json"
    model_path = folder / "model.keras"
    if not config_path.is_file() or not model_path.is_file():
        raise MissingInputError(f"{folder} holds no {'model.keras' if config_path.is_file() else 'config.json'}; "
                                "expected a run folder (featcache train-head prints it) or a folder featcache export "
                                "wrote; fix: pass one of those")
    fix = "restore it, or train (or export) the run again"
    config = system.read_json(config_path, fix=fix)
    _check_model_is_the_runs(config, model_path, config_path, fix)
    try:
        names = tuple(config["class_names"])
        if exported.is_file():
            return RunInfo(folder, model_path, names, tuple(int(v) for v in config["input_size"]), "exported", config)
        kind = "pixels" if config["model"] in ("ann", "cnn") else "features"
        parts = Provenance.of_record(config.get("data", {})).layers
        size = tuple(parts[0].cache_meta["input_shape"][:2]) if parts else None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise BadInputError(f"{config_path} lacks what a run records ({type(e).__name__}: {first_line(e)}); fix: "
                            f"{fix}") from e
    if not names or not all(isinstance(n, str) for n in names):
        raise BadInputError(f"{config_path}: class_names must be a list of names; fix: {fix}")
    return RunInfo(folder, model_path, names, size, kind, config)


def _check_model_is_the_runs(config: dict, model_path: Path, config_path: Path, fix: str) -> None:
    """Refuse a model.keras that is not the one its run (or export) saved: the records bind it by its sha256 (runs
    written before they did are taken as they are)."""
    recorded = config.get("model_sha256")
    if recorded is not None and system.file_sha256(model_path) != recorded:
        raise BadInputError(f"{model_path} is not the model {config_path.name} records (its sha256 differs: replaced "
                            f"or copied from another run); fix: {fix}")


def end_to_end(info: RunInfo, *, weights: str | None = None):
    """One keras.Model from uint8 images to class probabilities (see the module's doc)."""
    import keras

    import heads.knn  # noqa: F401  (registers the kNN head's layer for loading)

    head = keras.saving.load_model(info.model_path, compile=False)
    if head.output_shape[-1] != len(info.class_names):
        raise BadInputError(f"{info.model_path} gives {head.output_shape[-1]} classes but the run records "
                            f"{len(info.class_names)} class names; fix: restore the run's own records")
    if info.kind in ("pixels", "exported"):
        return head
    source, parts = info.provenance, info.parts   # several layers: pooled, concatenated in this order
    meta = parts[0].cache_meta
    fields = ("backbone", "weights", "dtype", "precision", "input_shape")
    if len({tuple(str(p.cache_meta.get(k)) for k in fields) for p in parts}) > 1:
        raise BadInputError(f"{info.folder} joins layers of caches that differ in backbone, weights, dtype, precision "
                            "or input size; one model cannot hold them")
    backbone = frozen_backbone(meta, [p.layer for p in parts], weights)
    images = keras.Input((*info.input_size, 3), dtype="uint8", name="images")
    x = affine_preprocessing(backbone.spec, name="preprocess")(keras.layers.Identity(dtype="float32")(images))
    outputs = backbone.model(x)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    stored = [keras.layers.Identity(dtype=meta["dtype"], name=f"stored_{i}")(o) for i, o in enumerate(outputs)]
    if source.joined:   # pooled vectors of layers, concatenated
        pool = {"gap": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}[source.pooling]
        stored = [keras.layers.Concatenate(name="layers")([pool(dtype="float32")(s) for s in stored])]
    probs = head(stored[0])
    return keras.Model(images, probs, name=backbones.keras_name(f"{meta['backbone']}_{head.name}"))


def frozen_backbone(meta: dict, layers: list[str], weights: str | None = None):
    """The frozen backbone of the cache `meta` describes, cut at `layers`, with the weights it was made from
    (hash checked)."""
    from featcache.backbones.cut import weights_of_cache

    backbones.hub.recall(meta["backbone"], meta.get("backbone_config", {}))   # a preset folder that has moved
    source, seed = weights_of_cache(meta, weights)
    return backbones.build(backbone=meta["backbone"], layer=layers, weights=source, seed=seed,
                           input_size=tuple(meta["input_shape"][:2]), precision=meta.get("precision", "float32"))


def affine_preprocessing(spec, *, name: str):
    """The backbone's `preprocess_input` as one Dense layer over the channels (a plain Keras layer, so the
    exported model needs no custom code): every one of them is x -> x @ A + b per pixel (RGB->BGR and means,
    a scale to [-1, 1], or the identity). A, b are read off the function and checked on random pixels."""
    import keras

    probe = np.concatenate([np.zeros((1, 3)), np.eye(3) * 100.0]).astype(np.float32).reshape(4, 1, 1, 3)
    out = np.asarray(spec.preprocess(probe.copy()), np.float64).reshape(4, 3)
    bias, kernel = out[0], (out[1:] - out[0]) / 100.0
    check = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    if not np.allclose(np.asarray(spec.preprocess(check.copy())), check @ kernel + bias, atol=1e-3):
        raise BadInputError(f"{spec.name}'s preprocess_input is not affine per pixel; it cannot be exported as a layer")
    layer = keras.layers.Dense(3, name=name, dtype="float32", trainable=False)
    layer.build((None, 3))
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return layer
