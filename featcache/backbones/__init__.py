"""Frozen Keras backbones as a registry: one module per family, one line per backbone below.

A `BackboneSpec` says which Keras application builds the backbone, which of its layers a cache may
be cut at, its smallest input, its own `preprocess_input`, and the file Keras downloads for its
ImageNet weights. Output shapes come from the model graph (built once without weights, memoised).
`weights` is ``imagenet`` (Keras downloads the file once), a path to a no-top weights file of that
backbone, or ``random`` (seeded initialisation, for tests; recorded as such wherever its features
are used). Keras (and its backend) is imported inside the functions so that importing featcache stays
instant. Extraction runs on any Keras 3 backend (`KERAS_BACKEND=tensorflow`, the default, `jax` or `torch`).

Adding a backbone: a module with its `BackboneSpec`, and its line in `BACKBONES`.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache import system
from featcache.backbones import hub
from featcache.backbones.convnext import CONVNEXT_TINY
from featcache.backbones.efficientnet import EFFICIENTNET_V2B0
from featcache.backbones.mobilenet import MOBILENET_V2
from featcache.backbones.resnet import RESNET50
from featcache.backbones.spec import BackboneSpec
from featcache.backbones.vgg16 import VGG16
from featcache.errors import BadInputError, DownloadError, MissingInputError, first_line
from featcache.system import quiet_stderr

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    VGG16, RESNET50, MOBILENET_V2, EFFICIENTNET_V2B0, CONVNEXT_TINY,
)}
DEFAULT_BACKBONE = "vgg16"

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "PRECISIONS", "BackboneSpec", "Backbone", "get", "build",
           "output_shapes", "check_layers", "check_input_size", "weights_identity", "resolve_precision"]


def get(name: str) -> BackboneSpec | hub.HubSpec:
    """The spec of a registry name, or of a KerasHub preset: `hub:NAME`, `hub:PATH` or a bare preset name."""
    if name in BACKBONES:
        return BACKBONES[name]
    if hub.is_hub(name):
        return hub.spec(name)
    if isinstance(name, str) and name.startswith(hub.VISION_FAMILIES):
        return hub.spec(hub.PREFIX + name)
    raise BadInputError(f"unknown backbone {name!r}; expected one of: {', '.join(BACKBONES)}, or a KerasHub preset "
                        "as hub:NAME or hub:PATH (`featcache backbones` lists them)")


def check_layers(spec: BackboneSpec, layers) -> tuple[str, ...]:
    """'a,b' or a sequence -> a tuple of distinct layer names of `spec`."""
    names = tuple(x.strip() for x in layers.split(",")) if isinstance(layers, str) else tuple(layers)
    if not names or len(set(names)) != len(names):
        raise BadInputError(f"--layer must name distinct {spec.name} layers separated by commas, got {layers!r}")
    for name in names:
        if name not in spec.layers:
            raise BadInputError(f"unknown layer {name!r}; expected one of {spec.name}'s layers: {', '.join(spec.layers)}")
    return names


def check_input_size(size, spec: BackboneSpec = VGG16):
    if size is not None and (not isinstance(size, numbers.Integral) or isinstance(size, bool)):
        raise BadInputError(f"--input-size must be a whole number of pixels, got {size!r}")
    if size is not None and size < spec.min_input_size:
        raise BadInputError(f"--input-size must be at least {spec.min_input_size} for {spec.name}, got {size}")
    if isinstance(spec, hub.HubSpec):
        hub.check_input_size(spec, size)
    return size


def weights_identity(weights: str, *, seed: int = 0, backbone: str = DEFAULT_BACKBONE) -> str:
    """A string that changes whenever the weights' numbers can change (cheap: no model built). ImageNet weights
    found on disk ($FEATCACHE_WEIGHTS_DIR, ~/.keras/models) are known by the hash of that file, as a path is, so a
    replaced file is another cache; only weights still to be downloaded are known by the Keras version."""
    if backbone not in BACKBONES:   # a KerasHub preset: its configuration is part of what its weights compute
        spec = get(backbone)
        own = _random_identity(seed) if weights == "random" else hub.weights_identity(spec, weights)
        return f"{own}:config={spec.config_digest}"
    if weights == "imagenet":
        import keras

        local = local_imagenet_weights(get(backbone))
        return f"sha256:{system.file_sha256(local)}" if local is not None else f"imagenet:keras-{keras.__version__}"
    if weights == "random":
        return _random_identity(seed)
    path = Path(weights).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist" if not path.exists() else "is not a regular file"
        raise MissingInputError(f"weights file {path} {what}; expected 'imagenet', 'random' or the path of a "
                                "no-top weights file of the backbone (.h5)")
    return f"sha256:{system.file_sha256(path)}"


def _random_identity(seed: int) -> str:
    """Seeded random weights, drawn by each backend's own generator: other numbers on JAX or PyTorch."""
    import keras

    backend = keras.backend.backend()
    return f"random:seed={seed}" + ("" if backend == "tensorflow" else f":{backend}")


PRECISIONS = ("float32", "bfloat16", "float16", "auto")
#: Keras dtype policy of each compute precision: weights stay float32, layers compute in the named type.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """(major, minor) compute capability of each GPU that Keras' backend (TensorFlow, JAX or PyTorch) sees."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [tuple(int(p) for p in str(d.compute_capability).split(".")[:2])
                for d in jax.devices() if getattr(d, "compute_capability", None)]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    import tensorflow as tf

    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        cap = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if cap:
            caps.append(tuple(cap))
    return caps


def resolve_precision(precision: str) -> str:
    """The compute precision to use: `precision` itself, or for "auto" what this machine runs fastest.

    auto: bfloat16 on GPUs that have bfloat16 tensor cores (compute capability 8.0 and up) and on
    CPUs with native bfloat16 instructions (AVX512_BF16 or AMX); float16 on older GPUs with float16
    tensor cores (7.x); float32 otherwise.
    """
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    caps = gpu_compute_capabilities()
    if caps:
        best = min(caps)
        return "bfloat16" if best >= (8, 0) else "float16" if best >= (7, 0) else "float32"
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


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


def _base(spec: BackboneSpec, weights, shape: tuple[int, int, int]):
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
WEIGHTS_DIR_ENV = "FEATCACHE_WEIGHTS_DIR"


def local_imagenet_weights(spec: BackboneSpec) -> Path | None:
    """The backbone's ImageNet weights file, if it lies in $FEATCACHE_WEIGHTS_DIR or Keras' own ~/.keras/models
    under its Keras name (what Keras would download): `--weights imagenet` then works offline."""
    folders = [os.environ.get(WEIGHTS_DIR_ENV), os.path.join(os.environ.get("KERAS_HOME", "~/.keras"), "models")]
    for folder in filter(None, folders):
        path = Path(folder).expanduser() / spec.weights_file
        if path.is_file():
            return path
    return None


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
            base = _base(spec, None, shape)
        else:
            base = _base(spec, weights, shape)
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
    base = _base(spec, None, (*input_size, 3))
    return {name: tuple(int(d) for d in spec.tensor(base, name).shape[1:]) for name in spec.layers}
