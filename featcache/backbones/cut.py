"""The backbone above a cache: the layers between a cached layer and a higher one, as a Keras model that takes
the cached maps, with the weights of the backbone the cache was made from (for fine-tuning from the cache).

Keras 3 builds a model between any two tensors of a graph, sharing the layers; a cut is refused where the
layers above it also read tensors from below it (a skip connection across the cut)."""

from __future__ import annotations

import logging
from pathlib import Path

from featcache.backbones.frozen import base_model
from featcache.backbones.hub import HubSpec
from featcache.backbones.precision import POLICIES, resolve_precision
from featcache.backbones.registry import get
from featcache.backbones.weights import weights_identity
from featcache.errors import BadInputError, MissingInputError

log = logging.getLogger(__name__)


def weights_of_cache(meta: dict, weights: str | None = None) -> tuple[str, int]:
    """(weights, seed) to rebuild the backbone a cache's `meta` records: the file it was made from (or `weights`,
    whose hash must match), Keras' ImageNet weights, or the seeded random ones (said in a warning)."""
    recorded = meta["weights"]
    if recorded.startswith("random:"):
        log.warning("WARNING: these features come from RANDOM backbone weights, not ImageNet")
        return "random", int(recorded.split("=", 1)[1].split(":")[0])   # random:seed=N[:backend]
    if recorded.startswith("imagenet:"):   # Keras' own file, known by the Keras version that fetched it
        source = weights or "imagenet"
        if weights_identity(source, backbone=meta["backbone"]) != recorded:
            log.warning("the cache was made with the ImageNet weights of %s; using %s, which cannot be checked "
                        "against it by hash", recorded.removeprefix("imagenet:"), source)
        return source, 0
    source = weights or meta["weights_source"]
    if source not in ("imagenet", "random") and not Path(source).expanduser().is_file():
        raise MissingInputError(f"the weights file the cache was made from, {source}, is not there; fix: pass "
                                "--weights FILE (the same file: its hash is checked)")
    given = weights_identity(source, backbone=meta["backbone"])
    if given != recorded:
        raise BadInputError(f"weights {source} are not the ones the cache was made from (hash {given[:23]}..., "
                            f"the cache recorded {recorded[:23]}...); fix: pass --weights with the file the cache "
                            "was extracted with")
    return source, 0


def default_tune_to(backbone: str, cached: str) -> str:
    """The end of the block above `cached`: the next of the backbone's block ends (VGG16: its pools)."""
    spec = get(backbone)
    _refuse_hub(spec)
    ends = spec.block_ends or spec.layers
    if cached not in spec.layers:
        raise BadInputError(f"{cached} is not one of {spec.name}'s cut points ({', '.join(spec.layers)})")
    above = [name for name in spec.layers[spec.layers.index(cached) + 1:] if name in ends]
    if not above:
        raise BadInputError(f"{cached} is the top of {spec.name}: there is nothing above it to fine-tune; fix: "
                            f"extract a lower layer (e.g. {spec.layers[max(0, len(spec.layers) - 3)]})")
    return above[0]


def _refuse_hub(spec) -> None:
    if isinstance(spec, HubSpec):   # its cut points are all outputs of the last block: nothing lies above them
        raise BadInputError(f"--head finetune needs a Keras application backbone; {spec.name}'s cut points are all at "
                            "the top of the model, with nothing above them to fine-tune; fix: another --head")


def upper(backbone: str, cached: str, tune_to: str, *, weights: str, seed: int = 0,
          input_size: tuple[int, int] = (32, 32), precision: str = "float32"):
    """The backbone's layers from above `cached` up to and including `tune_to`, as a keras.Model taking the
    cached layer's maps; trainable, except its BatchNormalization layers, which stay in inference mode (their
    moving statistics are the backbone's)."""
    import keras

    spec = get(backbone)
    _refuse_hub(spec)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(POLICIES[resolve_precision(precision)])
    try:
        if weights == "random":
            keras.utils.set_random_seed(seed)
        base = base_model(spec, None if weights == "random" else weights, (*input_size, 3))
    finally:
        keras.config.set_dtype_policy(previous)
    where = {name: spec.position(base, name) for name in (cached, tune_to)}
    for name, position in where.items():
        if position is None:
            raise BadInputError(f"--tune-to {tune_to}: {name} is not a layer of {spec.name}; fix: a layer above "
                                f"the cached {cached}, e.g. {default_tune_to(backbone, cached)}")
    if where[tune_to] <= where[cached]:
        raise BadInputError(f"--tune-to {tune_to} is not above the cached layer {cached} of {spec.name}; fix: a "
                            f"layer above it, e.g. {default_tune_to(backbone, cached)}")
    try:
        model = keras.Model(spec.tensor(base, cached), spec.tensor(base, tune_to), name=f"tuned_{cached}_to_{tune_to}")
    except ValueError as e:   # the layers above read tensors from below the cut too
        raise BadInputError(f"{spec.name} cannot be cut between {cached} and {tune_to} ({str(e)[:120]}); fix: "
                            "cache a block's output (a cut point of the backbone)") from e
    for layer in model.layers:
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    return model
