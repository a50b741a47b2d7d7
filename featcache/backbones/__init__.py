"""Frozen Keras backbones: the registry (`registry`: VGG16, ResNet50, MobileNetV2, EfficientNetV2B0, ConvNeXtTiny,
and KerasHub presets through `hub`), building one cut at some layers (`frozen.build`), the weights a cache is keyed by
(`weights`) and the compute precision (`precision`). Everything a caller needs is importable from here.

`weights` is ``imagenet`` (Keras downloads the file once, unless it lies in $FEATCACHE_WEIGHTS_DIR or
~/.keras/models), a path to a no-top weights file of that backbone, or ``random`` (seeded initialisation, for
tests; recorded as such wherever its features are used).
"""

from featcache.backbones import hub
from featcache.backbones.frozen import Backbone, build, check_cached_shapes, keras_name, output_shapes
from featcache.backbones.precision import POLICIES, PRECISIONS, cpu_flags, gpu_compute_capabilities, resolve_precision
from featcache.backbones.registry import BACKBONES, DEFAULT_BACKBONE, check_input_size, check_layers, get
from featcache.backbones.spec import BackboneSpec
from featcache.backbones.weights import WEIGHTS_DIR_ENV, local_imagenet_weights, random_identity, weights_identity

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "POLICIES", "PRECISIONS", "WEIGHTS_DIR_ENV", "Backbone", "BackboneSpec",
           "build", "check_cached_shapes", "check_input_size", "check_layers", "cpu_flags", "get",
           "gpu_compute_capabilities", "hub", "keras_name", "local_imagenet_weights", "output_shapes",
           "random_identity", "resolve_precision", "weights_identity"]
