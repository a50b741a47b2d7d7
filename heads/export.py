"""`export(run, path)`: a run's head with its backbone as one model (`heads.endtoend`), written as Keras,
SavedModel or ONNX beside export.json (what it takes, returns and came from)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from featcache import system
from featcache.errors import BadInputError
from featcache.options import declared, given_or_built, option, validate
from heads.endtoend import EXPORT_FILE, RunInfo, end_to_end, load_run

log = logging.getLogger(__name__)

#: What `export` writes for each format, in its folder.
EXPORT_FORMATS = {"keras": "model.keras", "saved_model": "saved_model", "onnx": "model.onnx"}


@dataclass(frozen=True)
class ExportConfig:
    """How `export` writes, every option declared once (the command line's options are built from it)."""

    format: str = option("keras", "keras: DIR/model.keras (loads with plain keras.saving.load_model; a kNN head's "
                         "after `import heads.knn`); saved_model: DIR/saved_model/ (Keras' model.export); onnx: "
                         "DIR/model.onnx (through tf2onnx: pip install 'featcache[onnx]').", kind="str",
                         choices=tuple(EXPORT_FORMATS))
    weights: str | None = option(None, "The backbone weights file, if it moved since the cache was made.",
                                 kind="path")
    force: bool = option(False, "Replace an earlier export in the folder (never a run folder).", kind="bool",
                         flag=True)

    def __post_init__(self):
        validate(self)


def export_options() -> list:
    """The declared fields of ExportConfig (what `featcache export` turns into options)."""
    return declared(ExportConfig)


def _onnx(model, target: Path) -> None:
    """ONNX through tf2onnx, from the SavedModel Keras exports (the `onnx` extra: tf2onnx, onnxruntime)."""
    import importlib.util
    import subprocess
    import sys
    import tempfile

    if importlib.util.find_spec("tf2onnx") is None:
        raise BadInputError("--format onnx needs tf2onnx; fix: pip install 'featcache[onnx]' (or use --format keras)")
    with tempfile.TemporaryDirectory() as tmp:
        _saved_model(model, f"{tmp}/saved_model")
        done = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", f"{tmp}/saved_model",
                               "--output", str(target), "--opset", "17"], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        import keras

        fix = "export --format saved_model"
        if keras.backend.backend() != "tensorflow":   # its SavedModel of JAX's functions is what tf2onnx fails on
            fix = f"run it with KERAS_BACKEND=tensorflow (tf2onnx reads TensorFlow's own SavedModel), or {fix}"
        raise BadInputError(f"tf2onnx could not convert the model ({last[:200]}); fix: {fix}")


def _saved_model(model, path: str) -> None:
    """Keras' model.export, whose report (a temporary path, every signature's TensorSpec) goes to the debug log:
    printed, it came before the folder on stdout, where a script reads the result alone."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as said:
        model.export(path)
    log.debug("Keras' export said: %s", said.getvalue().strip())


def export(run, path, *, config: ExportConfig | None = None, **options) -> Path:
    """Write the run's end-to-end model into the folder `path`, with the options of `config` (an ExportConfig:
    format, weights, force) or given as its fields: model.keras (or saved_model/, model.onnx) and export.json
    (class names, input size, the provenance of cache and weights, the model's sha256); returns the folder. It is
    written whole in a temporary folder beside `path`, then renamed into place: `path` must be new or empty, or
    (with `force`) hold an earlier export, which is replaced; a run folder never is."""
    config = given_or_built(ExportConfig, config, options)
    info = load_run(run)
    out = _export_folder(Path(path), config.force)
    model = end_to_end(info, weights=config.weights)
    with system.staged_folder(out, "exporting", force=config.force) as tmp:
        target = tmp / EXPORT_FORMATS[config.format]
        if config.format == "keras":
            model.save(target)
        elif config.format == "saved_model":
            _saved_model(model, str(target))
        else:
            _onnx(model, target)
        (tmp / EXPORT_FILE).write_text(json.dumps(_export_record(info, model, config.format, target), indent=2)
                                       + "\n")
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
              "cache": [{"key": part.cache_key, **{k: part.cache_meta.get(k) for k in (
                  "backbone", "layer", "weights", "weights_source", "input_shape", "resize", "preprocessing", "dtype",
                  "precision")}} for part in info.parts],
              "random_weights": any(m["weights"].startswith("random") for m in metas),
              "computes_in": compute_dtypes(model)}
    if target.is_file():
        record["model_sha256"] = system.file_sha256(target)
    return record
