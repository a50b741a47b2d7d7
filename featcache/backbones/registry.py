"""The backbone registry: one line per Keras application family below, and KerasHub presets by name or folder.

A `BackboneSpec` says which Keras application builds the backbone, which of its layers a cache may be cut at, its
smallest input, its own `preprocess_input`, and the file Keras downloads for its ImageNet weights. Adding a
backbone: a module with its `BackboneSpec`, and its line in `BACKBONES`.
"""

from __future__ import annotations

import numbers

from featcache.backbones import hub
from featcache.backbones.convnext import CONVNEXT_TINY
from featcache.backbones.efficientnet import EFFICIENTNET_V2B0
from featcache.backbones.mobilenet import MOBILENET_V2
from featcache.backbones.resnet import RESNET50
from featcache.backbones.spec import BackboneSpec
from featcache.backbones.vgg16 import VGG16
from featcache.errors import BadInputError

BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    VGG16, RESNET50, MOBILENET_V2, EFFICIENTNET_V2B0, CONVNEXT_TINY,
)}
DEFAULT_BACKBONE = "vgg16"


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
