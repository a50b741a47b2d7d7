"""Building a frozen backbone: the Keras application (or KerasHub preset) without its top, cut at one or several
layers, with its weights and compute precision (`build`), and the output shapes of its layers, read off its graph
(`output_shapes`, memoised). Keras (and its backend) is imported inside the functions so that importing featcache
stays instant; extraction runs on any Keras 3 backend."""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache.backbones import hub
from featcache.backbones.precision import POLICIES, resolve_precision
from featcache.backbones.registry import DEFAULT_BACKBONE, check_input_size, check_layers, get
from featcache.backbones.spec import BackboneSpec
from featcache.backbones.weights import WEIGHTS_DIR_ENV, local_imagenet_weights, weights_identity
from featcache.errors import BadInputError, DownloadError, first_line
from featcache.system import quiet_stderr


@dataclass(frozen=True)
class Backbone:
    spec: BackboneSpec
    model: Any                     # keras.Model from the image to each of `layers`, frozen
    layers: tuple[str, ...]
    weights_id: str                # what the features depend on, e.g. "sha256:5ffc..." or "random:seed=0"
    input_size: tuple[int, int]
    _storage_models: dict = field(default_factory=dict, repr=False, compare=False)   # dtype -> keras.Model
    _warmed: set = field(default_factory=set, repr=False, compare=False)   # (batch shape, dtype) traced already

    @property
    def output_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape[1:]) for t in self.model.outputs]

    def preprocess(self, images_uint8):
        """The backbone's own preprocessing of a uint8 RGB batch (float32 out); thread-safe numpy."""
        return self.spec.preprocess(images_uint8.astype("float32"))

    def forward(self, preprocessed) -> list:
        """Features of a preprocessed batch: one float32 numpy array per layer, in `layers` order
        (computed in the backbone's precision, returned as float32)."""
        out = self.model.predict_on_batch(preprocessed)
        return [np.asarray(o, np.float32) for o in (out if isinstance(out, (list, tuple)) else [out])]

    def __call__(self, images_uint8) -> list:
        return self.forward(self.preprocess(images_uint8))

    def forward_stored(self, preprocessed, dtype: str) -> tuple[list, list]:
        """Features of a preprocessed batch as they are stored: one array per layer cast to `dtype`, and
        each row's largest |feature| per layer (float32, before the cast). Cast and reduction run where
        the model runs (an accelerator, or compiled CPU code): the host copies half the bytes of float32
        and scans none of them."""
        out = [np.asarray(o) for o in self._storage_model(dtype).predict_on_batch(preprocessed)]
        return out[:len(out) // 2], out[len(out) // 2:]

    def warm_up(self, batch_shape: tuple[int, ...], dtype: str) -> None:
        """Build and trace `forward_stored` for batches of `batch_shape` before any clock starts; TensorFlow's
        one-time note that oneDNN lacks float16 on some CPUs is kept off stderr."""
        if (tuple(batch_shape), dtype) in self._warmed:   # a Ray worker warms up once for all its shards
            return
        with quiet_stderr():
            self._storage_model(dtype).predict_on_batch(np.zeros(batch_shape, np.float32))
        self._warmed.add((tuple(batch_shape), dtype))

    def _storage_model(self, dtype: str):
        if dtype not in self._storage_models:
            import keras

            outputs = self.model.outputs
            peaks = [keras.ops.cast(keras.ops.max(keras.ops.abs(o), axis=tuple(range(1, len(o.shape)))), "float32")
                     for o in outputs]
            self._storage_models[dtype] = keras.Model(self.model.input,
                                                      [keras.ops.cast(o, dtype) for o in outputs] + peaks)
        return self._storage_models[dtype]


def base_model(spec: BackboneSpec, weights, shape: tuple[int, int, int]):
    """The Keras application without its top, with `weights` (None, 'imagenet' or a file path)."""
    if isinstance(spec, hub.HubSpec):
        return hub.token_model(spec.folder, weights, shape)
    application = spec.keras_application()
    local = local_imagenet_weights(spec) if weights == "imagenet" else None
    if local is not None:
        weights = str(local)
    elif weights is None or weights == "imagenet":
        try:
            with contextlib.redirect_stdout(sys.stderr):   # Keras prints its download progress on stdout
                return application(weights=weights, include_top=False, input_shape=shape)
        except Exception as e:  # Keras' get_file raises a bare Exception on network failure
            if weights is None:
                raise
            raise DownloadError(
                f"could not download the ImageNet {spec.title} weights ({first_line(e)}); this machine seems offline; "
                f"fix: pass --weights PATH to a local {spec.weights_file}, or put it in ${WEIGHTS_DIR_ENV}") from e
    try:
        return application(weights=str(Path(weights).expanduser()), include_top=False, input_shape=shape)
    except (ValueError, OSError, KeyError) as e:
        raise BadInputError(f"weights file {weights} does not fit {spec.title} without top ({first_line(e)}); "
                            f"expected {spec.weights_file} or a file of the same layout") from e


#: A folder of Keras' ImageNet weight files, each under its Keras name: where `--weights imagenet` looks first.
def build(*, backbone: str = DEFAULT_BACKBONE, layer=None, weights: str = "imagenet",
          input_size: tuple[int, int] = (32, 32), seed: int = 0, precision: str = "float32") -> Backbone:
    """The backbone without its top, frozen, with one output per layer (several layers share one pass),
    computing in `precision` (float32, or bfloat16/float16 with float32 weights: Keras mixed precision)."""
    import keras

    spec = get(backbone)
    backbone = spec.name   # a bare preset name becomes hub:NAME
    layers = check_layers(spec, layer or spec.default_layer)
    check_input_size(min(input_size), spec)
    precision = resolve_precision(precision)
    wid = weights_identity(weights, seed=seed, backbone=backbone)
    shape = (*input_size, 3)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(POLICIES[precision])
    try:
        if weights == "random":
            keras.utils.set_random_seed(seed)
            base = base_model(spec, None, shape)
        else:
            base = base_model(spec, weights, shape)
    finally:
        keras.config.set_dtype_policy(previous)
    outputs = [spec.tensor(base, name) for name in layers]
    model = keras.Model(base.input, outputs if len(outputs) > 1 else outputs[0],
                        name=keras_name(f"{spec.name}_{'_'.join(layers)}"))
    model.trainable = False
    return Backbone(spec=spec, model=model, layers=layers, weights_id=wid, input_size=tuple(input_size))


def keras_name(text: str) -> str:
    """`text` as a Keras model name (a preset's hub:PATH has characters Keras refuses in names)."""
    return re.sub(r"\W+", "_", text, flags=re.ASCII).strip("_")   # TensorFlow's scope names are ASCII


def check_cached_shapes(path, backbone: str, input_size: tuple[int, int], shapes: dict) -> None:
    """Refuse a cache at `path` whose stored shapes ({layer: row shape}) are not what `backbone` gives at that
    layer and input size: its `layer`, `backbone` or `input_shape` attribute was edited (tampered)."""
    from featcache.errors import CacheError

    try:
        expected = output_shapes(backbone, tuple(input_size))
    except BadInputError as e:
        raise CacheError(f"{path}: its backbone or input_shape attribute is not one featcache writes ({e}); fix: "
                         "delete it and rerun `featcache extract`") from e
    for layer, shape in shapes.items():
        if layer not in expected or tuple(expected[layer]) != tuple(shape):
            got = "no such layer" if layer not in expected else f"{tuple(expected[layer])}"
            raise CacheError(f"{path}: its rows of {layer} are {tuple(shape)}, but {backbone}'s {layer} at "
                             f"{input_size[0]}x{input_size[1]} gives {got}: its layer, backbone or input_shape attribute "
                             "was edited (tampered); fix: delete it and rerun `featcache extract`")


def output_shapes(backbone: str, input_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """{layer: output shape of one image} for every layer `backbone` offers, read off its graph."""
    spec = get(backbone)
    return _output_shapes(spec.name, tuple(input_size), getattr(spec, "config_digest", ""))


@functools.lru_cache(maxsize=32)
def _output_shapes(backbone: str, input_size: tuple[int, int], config_digest: str) -> dict[str, tuple[int, ...]]:
    """Memoised by name and, for a KerasHub preset, its configuration's digest (an edited folder is another graph)."""
    spec = get(backbone)
    check_input_size(min(input_size), spec)
    base = base_model(spec, None, (*input_size, 3))
    return {name: tuple(int(d) for d in spec.tensor(base, name).shape[1:]) for name in spec.layers}
