"""Use a trained head on new images: `predict(run, images)`, and `export(run, path)` of one model from image to
probabilities.

A head's `model.keras` takes what it was trained on: the cached layer's maps (or pooled vectors of several
layers), or raw pixels for the scratch baselines. `end_to_end(run)` rebuilds what stood before it from the
run's provenance: uint8 pixels at the cache's input size -> the backbone's own preprocessing (as one affine
Dense layer over the channels, read off `preprocess_input`) -> the frozen backbone up to the cached layer(s),
with the weights the cache was made from (checked by their hash) -> the storage dtype the head saw -> the
head. Images are decoded and resized by the extraction's own code (`featcache.sources`), on the host.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import backbones, system
from featcache.errors import BadInputError, MissingInputError, UnreadableImageError, first_line
from featcache.sources import RESIZE, Split
from featcache.sources.images import is_system_file, pillow_extensions

log = logging.getLogger(__name__)
EXPORT_FILE = "export.json"
#: What `export` writes for each format, in its folder.
EXPORT_FORMATS = {"keras": "model.keras", "saved_model": "saved_model", "onnx": "model.onnx"}


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
    def parts(self) -> list[dict]:
        """The run's data records, one per cached layer it trained on, in the head's order (none for a baseline)."""
        return _parts(self.config)

    @property
    def cache_metas(self) -> list[dict]:
        return [p["cache_meta"] for p in self.parts]

    @property
    def resize(self) -> str:
        """How images become the model's inputs, as its caches (or its export) recorded it."""
        metas = self.cache_metas if self.kind != "exported" else self.config.get("cache", [])
        return next((m["resize"] for m in metas if m.get("resize", RESIZE) != RESIZE), RESIZE)


def _parts(config: dict) -> list[dict]:
    data = config.get("data", {})
    return data.get("caches", [data] if "cache_meta" in data else [])


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
        parts = _parts(config)
        size = tuple(parts[0]["cache_meta"]["input_shape"][:2]) if parts else None
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
    data, parts = info.config["data"], info.parts   # several layers: pooled, concatenated in this order
    meta = parts[0]["cache_meta"]
    fields = ("backbone", "weights", "dtype", "precision", "input_shape")
    if len({tuple(str(p["cache_meta"].get(k)) for k in fields) for p in parts}) > 1:
        raise BadInputError(f"{info.folder} joins layers of caches that differ in backbone, weights, dtype, precision "
                            "or input size; one model cannot hold them")
    backbone = _backbone(meta, [p["layer"] for p in parts], weights)
    images = keras.Input((*info.input_size, 3), dtype="uint8", name="images")
    x = affine_preprocessing(backbone.spec, name="preprocess")(keras.layers.Identity(dtype="float32")(images))
    outputs = backbone.model(x)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    stored = [keras.layers.Identity(dtype=meta["dtype"], name=f"stored_{i}")(o) for i, o in enumerate(outputs)]
    if "caches" in data:   # pooled vectors of layers, concatenated
        pool = {"gap": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}[data["pooling"]]
        stored = [keras.layers.Concatenate(name="layers")([pool(dtype="float32")(s) for s in stored])]
    probs = head(stored[0])
    return keras.Model(images, probs, name=backbones.keras_name(f"{meta['backbone']}_{head.name}"))


def _backbone(meta: dict, layers: list[str], weights: str | None):
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


def predict(run, images, *, batch_size: int = 128, weights: str | None = None, skip_bad_images: bool = False,
            progress: bool = True, model=None, engine: str = "local", ray_address: str | None = None,
            workers: int | None = None) -> Predictions:
    """Class probabilities of the image files `images` (or folders of them) from the run (or exported) folder
    `run`. An unreadable image is a one-line UnreadableImageError, or with `skip_bad_images` left out and listed
    in `Predictions.bad`. Images are decoded and resized as the extraction does; memory is one batch. With
    `engine="ray"` shards of the files run on Ray actors (each builds the model once), on the cluster at
    `ray_address` or one of featcache's own, as `extract --engine ray` does; rows come back in the same order."""
    if engine not in ("local", "ray"):
        raise BadInputError(f"--engine must be local or ray, got {engine!r}")
    info = load_run(run)
    files = image_files(images if isinstance(images, (list, tuple)) else [images])
    if engine == "ray":
        probs, kept, bad = _on_ray(info, files, batch_size=batch_size, weights=weights, skip=skip_bad_images,
                                   progress=progress, address=ray_address, workers=workers)
        return Predictions(kept, probs, info.class_names, bad)
    model = model if model is not None else end_to_end(info, weights=weights)
    size = info.input_size or tuple(model.input_shape[1:3])
    with system.progress_bar(len(files), unit="img", desc="predict", enabled=progress) as bar:
        probs, kept, bad = predict_files(model, files, size, batch_size, skip_bad_images, bar,
                                         resizing=info.resize)
    return Predictions(kept, probs, info.class_names, bad)


#: Batches decoded ahead of the model, each in a thread of its own (as extraction's decoding threads do).
DECODE_AHEAD = 2


def predict_files(model, files: list[Path], size, batch_size: int, skip_bad_images: bool, bar=None, *,
                  resizing: str = RESIZE):
    """(probabilities, the files they are of, [(file, why)] left out): `files` a batch at a time, the next
    DECODE_AHEAD batches decoding in threads while the model runs (memory: those few batches). `scale_jpegs`:
    decode as a cache with that `resize` was."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [files[s:s + batch_size] for s in range(0, len(files), batch_size)]
    probs, kept, bad = [], [], []
    with ThreadPoolExecutor(DECODE_AHEAD) as pool:
        ahead = [pool.submit(_decode, c, size, skip_bad_images, resizing) for c in chunks[:DECODE_AHEAD]]
        for k, chunk in enumerate(chunks):
            pixels, ok, failed = ahead.pop(0).result()
            if k + DECODE_AHEAD < len(chunks):
                ahead.append(pool.submit(_decode, chunks[k + DECODE_AHEAD], size, skip_bad_images, resizing))
            bad += failed
            if ok:
                probs.append(np.asarray(model.predict_on_batch(pixels), np.float32))
                kept += ok
            if bar is not None:
                bar.update(len(chunk))
    out = np.concatenate(probs) if probs else np.zeros((0, model.output_shape[-1]), np.float32)
    return out, kept, bad


class PredictWorker:
    """One Ray actor of `predict(engine="ray")`: the end-to-end model, built once, predicting shard after shard."""

    def __init__(self, run: str, weights, batch_size: int, skip_bad_images: bool):
        self.error, self.batch_size, self.skip = None, batch_size, skip_bad_images
        try:
            self.info = load_run(run)
            self.model = end_to_end(self.info, weights=weights)
            self.size = self.info.input_size or tuple(self.model.input_shape[1:3])
        except Exception as e:  # noqa: BLE001  (handed to the driver by ready(), which raises it there, once)
            self.error = e

    def ready(self):
        return self.error

    def run(self, files: list[str]):
        probs, kept, bad = predict_files(self.model, [Path(f) for f in files], self.size, self.batch_size, self.skip,
                                         resizing=self.info.resize)
        return probs, [str(f) for f in kept], [(str(f), why) for f, why in bad]


def _on_ray(info: RunInfo, files: list[Path], *, batch_size: int, weights, skip: bool, progress: bool, address,
            workers) -> tuple:
    """predict_files over shards of `files` on Ray actors (ordered results); the cluster handled as extraction's."""
    import contextlib
    import sys
    import tempfile

    from featcache import cluster

    ray = cluster.import_ray()
    shard = max(batch_size, 8 * batch_size)
    shards = [[str(f.absolute()) for f in files[s:s + shard]] for s in range(0, len(files), shard)]
    probs, kept, bad = [], [], []
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr), \
            cluster.owned_cluster(ray, address, Path(tmp) / cluster.PROCESSES_FILE) as owned, \
            system.progress_bar(len(files), unit="img", desc="predict (ray)", enabled=progress) as bar:
        n, threads, gpus = cluster.plan_workers(ray, workers, len(shards))
        remote = ray.remote(PredictWorker).options(num_cpus=threads, num_gpus=gpus, max_restarts=cluster.MAX_RESTARTS,
                                                    max_task_retries=cluster.MAX_RESTARTS,
                                                    runtime_env={"env_vars": cluster.worker_env(threads)})
        owned.actors = [remote.remote(str(info.folder.absolute()), weights, batch_size, skip) for _ in range(n)]
        tasks = [(files,) for files in shards]
        for p, k, b in cluster.results(ray, cluster.placed(ray, owned.actors), tasks, ordered=True,
                                       after_death="nothing was written: rerun the same command"):
            probs.append(p)
            kept += [Path(f) for f in k]
            bad += [(Path(f), why) for f, why in b]
            bar.update(len(k) + len(b))
            owned.record()
    out = np.concatenate(probs) if probs else np.zeros((0, len(info.class_names)), np.float32)
    return out, kept, bad


def _decode(files: list[Path], size: tuple[int, int], skip_bad_images: bool, resizing: str = RESIZE):
    """(uint8 batch, the files in it, [(file, why)] left out): the batch decoded as a split of the extraction is."""
    split = Split(labels=np.zeros(len(files), np.int64), files=tuple(files))
    try:
        return split.load(0, len(files), size, resizing=resizing), list(files), []
    except UnreadableImageError:
        pass   # find which, image by image
    ok, pixels, bad = [], [], []
    for f in files:
        try:
            pixels.append(Split(labels=np.zeros(1, np.int64), files=(f,)).load(0, 1, size, resizing=resizing)[0])
            ok.append(f)
        except UnreadableImageError as e:
            if not skip_bad_images:
                raise
            bad.append((f, str(e)))
            log.warning("skipping %s", e)
    return (np.stack(pixels) if pixels else None), ok, bad


def _onnx(model, target: Path) -> None:
    """ONNX through tf2onnx, from the SavedModel Keras exports (the `onnx` extra: tf2onnx, onnxruntime)."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    if importlib.util.find_spec("tf2onnx") is None:
        raise BadInputError("--format onnx needs tf2onnx; fix: pip install 'featcache[onnx]' (or use --format keras)")
    with tempfile.TemporaryDirectory() as tmp:
        model.export(f"{tmp}/saved_model")
        done = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", f"{tmp}/saved_model",
                               "--output", str(target), "--opset", "17"], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise BadInputError(f"tf2onnx could not convert the model ({last[:200]}); fix: export --format saved_model")


def export(run, path, *, format: str = "keras", weights: str | None = None, force: bool = False) -> Path:
    """Write the run's end-to-end model into the folder `path`: model.keras (or saved_model/) and export.json
    (class names, input size, the provenance of cache and weights, the model's sha256); returns the folder. It is
    written whole in a temporary folder beside `path`, then renamed into place: `path` must be new or empty, or
    (with `force`) hold an earlier export, which is replaced; a run folder never is."""
    if format not in EXPORT_FORMATS:
        raise BadInputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    info = load_run(run)
    out = _export_folder(Path(path), force)
    model = end_to_end(info, weights=weights)
    with system.staged_folder(out, "exporting", force=force) as tmp:
        target = tmp / EXPORT_FORMATS[format]
        if format == "keras":
            model.save(target)
        elif format == "saved_model":
            model.export(str(target))
        else:
            _onnx(model, target)
        (tmp / EXPORT_FILE).write_text(json.dumps(_export_record(info, model, format, target), indent=2) + "\n")
    return out


def compute_dtypes(model) -> list[str]:
    """The dtypes the model's layers compute in ('bfloat16' where a head was trained in mixed precision): what it
    predicts in wherever it is loaded, also on a CPU without bfloat16 instructions (emulated there: slower, the
    same numbers)."""
    return sorted({str(layer.dtype_policy.compute_dtype) for layer in _all_layers(model)})


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _export_folder(out: Path, force: bool) -> Path:
    """Where an export goes: a new folder, an empty one, or (with `force`) one holding an earlier export; never a
    run folder or any other folder with files in it."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"-o {out} is a file; fix: pass a folder for the export")
    if (out / "config.json").exists() or (out / "metrics.json").exists():
        raise BadInputError(f"-o {out} is a run folder; an export never writes into one; fix: pass another folder")
    if out.is_dir() and any(out.iterdir()) and not (force and (out / EXPORT_FILE).exists()):
        raise BadInputError(f"-o {out} exists and is not empty; fix: pass a new folder, or --force to replace an "
                            "earlier export there")
    return out


def _export_record(info: RunInfo, model, format: str, target: Path) -> dict:
    """export.json: what the model takes and returns, where it came from, and (for model.keras) its sha256."""
    metas = info.cache_metas
    record = {"class_names": list(info.class_names), "input_size": list(info.input_size or model.input_shape[1:3]),
              "takes": f"uint8 RGB images (n, height, width, 3) already at input_size (resize: {info.resize})",
              "returns": "class probabilities (n, n_classes)", "format": format, "run": str(info.folder),
              "model": info.config.get("model"),
              **({"loading": "import heads.knn before keras.saving.load_model (the kNN vote is featcache's own "
                             "layer); the saved_model and onnx formats need nothing"}
                 if format == "keras" and info.config.get("model") == "knn" else {}),
              "cache": [{"key": part.get("cache_key"), **{k: part["cache_meta"].get(k) for k in (
                  "backbone", "layer", "weights", "weights_source", "input_shape", "resize", "preprocessing", "dtype",
                  "precision")}} for part in info.parts],
              "random_weights": any(m["weights"].startswith("random") for m in metas),
              "computes_in": compute_dtypes(model)}
    if target.is_file():
        record["model_sha256"] = system.file_sha256(target)
    return record
