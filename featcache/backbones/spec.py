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
    #: A rough estimate of the peak bytes per input pixel of one forward pass (the float32 image and
    #: the largest activations alive at once), to refuse batches that clearly cannot fit in memory.
    peak_bytes_per_pixel: int = 4 * (3 + 2 * 64)

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
