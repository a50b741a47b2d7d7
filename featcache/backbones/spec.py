"""What the registry knows about one backbone (see featcache.backbones)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    name: str                      # registry name, recorded in every cache's metadata and key
    application: str               # the Keras application, e.g. "keras.applications.vgg16.VGG16"
    layers: tuple[str, ...]        # the layers a cache may be cut at, input to output
    default_layer: str
    weights_file: str              # the no-top ImageNet weights file Keras downloads
    preprocessing: str             # what its preprocess_input does, recorded in the cache
    min_input_size: int = 32
    #: The input size it is made for, the default where images have another (None: the images' own size).
    native_input_size: int | None = None
    #: How images are brought to the input size: a centre crop to its aspect ratio first, and the interpolation.
    crop: bool = False
    interpolation: str = "bilinear"
    #: A rough estimate of the peak bytes per input pixel of one forward pass (the float32 image and
    #: the largest activations alive at once), to refuse batches that clearly cannot fit in memory.
    peak_bytes_per_pixel: int = 4 * (3 + 2 * 64)
    #: The cut points that end a block (fine-tuning's default top: the next of them above the cached layer);
    #: empty: every cut point ends one.
    block_ends: tuple[str, ...] = ()
    #: Cut points that are not a layer's output: (name, the layer whose input the cut is; "": the model's output).
    inputs_of: tuple[tuple[str, str], ...] = ()

    def tensor(self, base, name: str):
        """The tensor of the cut point (or layer) `name` in the Keras application `base`."""
        consumer = dict(self.inputs_of).get(name)
        if consumer is None:
            return base.get_layer(name).output
        return base.output if consumer == "" else base.get_layer(consumer).input

    def position(self, base, name: str) -> float | None:
        """Where `name` sits in `base`'s layers (input to output; a cut before a layer just before it), or None."""
        names = [layer.name for layer in base.layers]
        consumer = dict(self.inputs_of).get(name)
        if consumer is not None:
            return len(names) if consumer == "" else names.index(consumer) - 0.5
        return names.index(name) if name in names else None

    @property
    def title(self) -> str:
        """The Keras application's name, e.g. "VGG16"."""
        return self.application.rsplit(".", 1)[1]

    @property
    def preprocess_module(self) -> str:
        return self.application.rsplit(".", 1)[0]

    def keras_application(self):
        module, name = self.application.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    def preprocess(self, x):
        """The backbone's own `preprocess_input` (float32 RGB in 0..255 in)."""
        return importlib.import_module(self.preprocess_module).preprocess_input(x)
