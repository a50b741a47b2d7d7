"""What a backbone's weights are known by (`weights_identity`: part of every cache key) and where ImageNet weights
are found on disk before Keras downloads them."""

from __future__ import annotations

import os
from pathlib import Path

from featcache import system
from featcache.backbones import hub
from featcache.backbones.registry import BACKBONES, DEFAULT_BACKBONE, get
from featcache.backbones.spec import BackboneSpec
from featcache.errors import MissingInputError

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


def weights_identity(weights: str, *, seed: int = 0, backbone: str = DEFAULT_BACKBONE) -> str:
    """A string that changes whenever the weights' numbers can change (cheap: no model built). ImageNet weights
    found on disk ($FEATCACHE_WEIGHTS_DIR, ~/.keras/models) are known by the hash of that file, as a path is, so a
    replaced file is another cache; only weights still to be downloaded are known by the Keras version."""
    if backbone not in BACKBONES:   # a KerasHub preset: its configuration is part of what its weights compute
        spec = get(backbone)
        own = random_identity(seed) if weights == "random" else hub.weights_identity(spec, weights)
        return f"{own}:config={spec.config_digest}"
    if weights == "imagenet":
        import keras

        local = local_imagenet_weights(get(backbone))
        return f"sha256:{system.file_sha256(local)}" if local is not None else f"imagenet:keras-{keras.__version__}"
    if weights == "random":
        return random_identity(seed)
    path = Path(weights).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist" if not path.exists() else "is not a regular file"
        raise MissingInputError(f"weights file {path} {what}; expected 'imagenet', 'random' or the path of a "
                                "no-top weights file of the backbone (.h5)")
    return f"sha256:{system.file_sha256(path)}"


def random_identity(seed: int) -> str:
    """Seeded random weights, drawn by each backend's own generator: other numbers on JAX or PyTorch."""
    import keras

    backend = keras.backend.backend()
    return f"random:seed={seed}" + ("" if backend == "tensorflow" else f":{backend}")
