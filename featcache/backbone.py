"""The frozen VGG16 backbone, truncated at a named layer, and the identity of its weights.

`weights` is ``imagenet`` (Keras downloads the file once), a path to a VGG16 no-top weights file
(such as vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5), or ``random`` (seeded Glorot
initialisation, for tests; recorded as such wherever its features are used).
TensorFlow is imported inside the functions so that importing featcache stays instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featcache.errors import BadInputError, DownloadError, MissingInputError

BACKBONE = "vgg16"
DEFAULT_LAYER = "block3_pool"
PREPROCESSING = "keras.applications.vgg16.preprocess_input (caffe: RGB->BGR, minus ImageNet channel means)"
RESIZE = "PIL bilinear, uint8"
#: Estimated peak bytes per input pixel of one forward pass: the float32 image and the two
#: 64-channel block1 convolutions alive at full resolution (a lower bound; TensorFlow adds workspace).
PEAK_BYTES_PER_PIXEL = 4 * (3 + 2 * 64)
VGG16_LAYERS = (
    "block1_conv1", "block1_conv2", "block1_pool",
    "block2_conv1", "block2_conv2", "block2_pool",
    "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
    "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
    "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool",
)


@dataclass(frozen=True)
class Backbone:
    model: Any                     # keras.Model from the image to each of `layers`, frozen
    layers: tuple[str, ...]
    weights_id: str                # what the features depend on, e.g. "sha256:5ffc..." or "random:seed=0"
    input_size: tuple[int, int]

    @property
    def output_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape[1:]) for t in self.model.outputs]

    def __call__(self, images_uint8) -> list:
        """Features of a uint8 RGB batch: one float32 numpy array per layer, in `layers` order."""
        from keras.applications.vgg16 import preprocess_input

        out = self.model.predict_on_batch(preprocess_input(images_uint8.astype("float32")))
        return list(out) if isinstance(out, (list, tuple)) else [out]


def check_layer(layer: str) -> str:
    if layer not in VGG16_LAYERS:
        raise BadInputError(f"unknown layer {layer!r}; expected one of: {', '.join(VGG16_LAYERS)}")
    return layer


def check_input_size(size: int | None) -> int | None:
    if size is not None and (not isinstance(size, numbers.Integral) or isinstance(size, bool)):
        raise BadInputError(f"--input-size must be a whole number of pixels, got {size!r}")
    if size is not None and size < 32:
        raise BadInputError(f"--input-size must be at least 32 (VGG16 halves the image five times), got {size}")
    return size


def weights_identity(weights: str, *, seed: int = 0) -> str:
    """A string that changes whenever the weights' numbers can change (cheap: no model built)."""
    if weights == "imagenet":
        import keras

        return f"imagenet:keras-{keras.__version__}"
    if weights == "random":
        return f"random:seed={seed}"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingInputError(f"weights file {path} does not exist; expected 'imagenet', 'random' or the "
                                "path of a VGG16 no-top weights file (.h5)")
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


def build(*, layer: str | tuple[str, ...] = DEFAULT_LAYER, weights: str = "imagenet",
          input_size: tuple[int, int] = (32, 32), seed: int = 0) -> Backbone:
    """VGG16 without its top, frozen, with one output per layer (several layers share one forward pass)."""
    import keras

    layers = (layer,) if isinstance(layer, str) else tuple(layer)
    for name in layers:
        check_layer(name)
    check_input_size(min(input_size))
    wid = weights_identity(weights, seed=seed)
    shape = (*input_size, 3)
    if weights == "random":
        keras.utils.set_random_seed(seed)
        base = keras.applications.VGG16(weights=None, include_top=False, input_shape=shape)
    elif weights == "imagenet":
        try:
            with contextlib.redirect_stdout(sys.stderr):   # Keras prints its download progress on stdout
                base = keras.applications.VGG16(weights="imagenet", include_top=False, input_shape=shape)
        except Exception as e:  # Keras' get_file raises a bare Exception on network failure
            raise DownloadError(
                f"could not download the ImageNet VGG16 weights ({e}); this machine seems offline; fix: pass "
                "--weights PATH to a local vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5") from e
    else:
        try:
            base = keras.applications.VGG16(weights=str(Path(weights).expanduser()), include_top=False,
                                            input_shape=shape)
        except (ValueError, OSError, KeyError) as e:
            raise BadInputError(f"weights file {weights} does not fit VGG16 without top ({e}); expected "
                                "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 or a file of the same "
                                "layout") from e
    outputs = [base.get_layer(name).output for name in layers]
    model = keras.Model(base.input, outputs if len(outputs) > 1 else outputs[0], name=f"vgg16_{'_'.join(layers)}")
    model.trainable = False
    return Backbone(model=model, layers=layers, weights_id=wid, input_size=tuple(input_size))
