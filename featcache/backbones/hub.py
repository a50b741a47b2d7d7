"""KerasHub presets as backbones: the vision transformers people cache features of today (DINOv2, DINOv3, CLIP and
SigLIP vision towers, ViT, DeiT), through `keras-hub` (`pip install 'featcache[hub]'`).

A preset is named `hub:NAME` (KerasHub downloads it once, on a machine that is online) or `hub:PATH`, a folder that
KerasHub's `save_to_preset` wrote: `config.json`, `model.weights.h5` and the `image_converter.json` that says how
the preset wants its pixels (scale and offset per channel; its centre crop and interpolation become the cache's
resize). The cut points are token outputs of the last block, after the model's final norm:

    cls             the class token                                    1x1xD
    patch_mean      the mean of the patch tokens                       1x1xD
    cls_patch_mean  both concatenated (DINOv2's linear evaluation)     1x1x2D
    patch_tokens    the patch tokens as a map                          (S/P)x(S/P)xD (input S, patch P)
    pooled          the model's own pooled output (SigLIP's attention pooling head)   1x1xD
    cls_last4       the class tokens of the last 4 blocks, each through the final norm   1x1x4D
    cls_last4_patch_mean   and the patch-token mean (DINOv2's linear evaluation, n=4)    1x1x5D

Vectors are stored as 1x1xD maps, so that pooling, every head, predict and export treat them as they treat a CNN's
maps. Which cut points a preset has is read off one forward pass: the tokens before the patches (class, registers)
are the sequence's length less the patch grid's size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import system
from featcache.errors import BadInputError, DownloadError, MissingInputError, first_line

PREFIX = "hub:"
#: The cut points of a preset, where it has them (a class token for cls_..., a pooling head for pooled, blocks it
#: shows for ..._last4: DINOv2's linear evaluation concatenates the last 4 blocks' class tokens)
LAST_BLOCKS = 4
OUTPUTS = ("cls", "patch_mean", "cls_patch_mean", "patch_tokens", "pooled", "cls_last4", "cls_last4_patch_mean")
#: Preset name prefixes of the vision towers listed by `featcache backbones`: those whose outputs are tokens.
VISION_FAMILIES = ("dinov2", "dinov3", "clip_", "siglip", "metaclip", "vit_", "deit_")
INSTALL = "pip install 'featcache[hub]'"
#: The converter interpolations featcache's decoding does (featcache.sources.images.FILTERS: Pillow's filters)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos3", "lanczos5", "area")
CONVERTER_FILE, CONFIG_FILE, WEIGHTS_FILE = "image_converter.json", "config.json", "model.weights.h5"


def is_hub(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def keras_hub():
    """The keras_hub module, or a one-line error naming the install command."""
    try:
        import keras_hub as module
    except ImportError as e:
        raise BadInputError(f"KerasHub backbones need the keras-hub package ({first_line(e)}); fix: {INSTALL}") from e
    return module


@dataclass(frozen=True)
class HubSpec:
    """What featcache knows of one preset; the same interface as BackboneSpec where extraction reads it."""

    name: str                       # "hub:/abs/folder" or "hub:preset_name", recorded in the cache
    folder: str                     # the preset's local folder (a named preset's download)
    layers: tuple[str, ...]
    default_layer: str
    native_input_size: int          # the image size the preset was trained at: the default --input-size
    min_input_size: int             # one patch
    patch_size: int
    resizable: bool                 # takes other input sizes: interpolated (DINOv2) or rotary (DINOv3) positions
    prefix_tokens: int              # tokens before the patches: a class token, registers (counted in a forward pass)
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    preprocessing: str
    config_digest: str              # sha256 of config.json and image_converter.json: part of the weights' identity
    crop: bool                      # centre-crop images to the input's aspect ratio before resizing (the converter's)
    interpolation: str              # the converter's interpolation, done by Pillow's filter of that name
    peak_bytes_per_pixel: int
    application: str = "keras_hub.models.Backbone.from_preset"
    weights_file: str = WEIGHTS_FILE
    block_ends: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        return self.name

    def preprocess(self, x):
        """The preset's image converter on float32 RGB in 0..255: x * scale + offset per channel."""
        return (np.asarray(x, np.float32) * np.float32(self.scale) + np.float32(self.offset)).astype(np.float32)

    def tensor(self, base, name: str):
        """The cut point `name` of `base` (token_model's model: the sequence of tokens, and a pooled output)."""
        import keras

        sequence = base.output["tokens"]
        width, grid = sequence.shape[2], base.inputs[0].shape[1] // self.patch_size

        def as_map(vector):
            return keras.ops.reshape(vector, (-1, 1, 1, vector.shape[-1]))

        if name == "pooled":
            return as_map(base.output["pooled"])
        patches = sequence[:, -grid * grid:]   # the last tokens (KerasHub's symbolic lengths can be off by one)
        if name == "patch_tokens":
            return keras.ops.reshape(patches, (-1, grid, grid, width))
        mean = keras.ops.mean(patches, axis=1)
        classes = ([base.output[f"block-{k}"][:, 0] for k in range(LAST_BLOCKS, 0, -1)] if "last" in name
                   else [sequence[:, 0]] if name.startswith("cls") else [])
        parts = classes + ([mean] if name.endswith("patch_mean") else [])
        return as_map(parts[0] if len(parts) == 1 else keras.ops.concatenate(parts, axis=-1))

    def position(self, base, name: str):
        return None


def spec(name: str) -> HubSpec:
    """The HubSpec of `hub:NAME` or `hub:PATH` (a folder made absolute, so caches find it from any folder)."""
    target = name[len(PREFIX):]
    if not target:
        raise BadInputError("--backbone hub: needs a preset name or folder, e.g. hub:dinov2_small or hub:./my-preset")
    local = Path(target).expanduser()
    if local.is_dir():
        folder = str(local.absolute())
        return _spec(PREFIX + folder, folder, _digest(folder))
    named = "://" in target or not ("/" in target or target.startswith("."))   # kaggle:// and hf:// are handles
    try:
        if not named:
            raise MissingInputError(f"no KerasHub preset folder at {local}; fix: pass the folder save_to_preset "
                                    "wrote (config.json, model.weights.h5, image_converter.json)")
        folder = _download(target)
    except (MissingInputError, DownloadError):
        if name not in _RECALLED:
            raise
        folder = _RECALLED[name]   # a cache's preset whose folder has moved, or that cannot be downloaded here
    return _spec(name, folder, _digest(folder))


#: {preset name recorded in a cache: the folder its recorded configuration was restored to}
_RECALLED: dict[str, str] = {}


def config_files(cut: HubSpec) -> dict[str, str]:
    """The preset's configuration files, {name: text}: a cache records them, see `recall`."""
    return {name: (Path(cut.folder) / name).read_text() for name in (CONFIG_FILE, CONVERTER_FILE)}


def recall(name: str, files: dict[str, str]) -> None:
    """Let the preset `name` of a cache be found when its folder has moved or is gone (a cache copied to another
    machine; a named preset that cannot be downloaded here): the configuration the cache carries (`config_files`)
    is written to a folder of its own, enough for the model's graph and preprocessing, without weights (predict
    and export take them with --weights)."""
    target = name[len(PREFIX):]
    if not is_hub(name) or not files or Path(target).expanduser().is_dir() or name in _RECALLED:
        return
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"featcache-hub-{digest}"
    if not folder.is_dir():
        with system.staged_folder(folder, "recalling") as tmp:
            for file, text in files.items():
                (tmp / Path(file).name).write_text(text)
    _RECALLED[name] = str(folder)


def _download(preset: str) -> str:
    """The local folder of a named preset (KerasHub downloads it once); a one-line error offline."""
    hub = keras_hub()
    from keras_hub.src.utils.preset_utils import get_file

    if "://" not in preset and preset not in hub.models.Backbone.presets:
        raise BadInputError(f"unknown KerasHub preset {preset!r}; fix: one of the {len(vision_presets())} vision "
                            "presets `featcache backbones` lists, a kaggle:// or hf:// handle, or hub:PATH (a folder)")
    try:
        return str(Path(get_file(preset, CONFIG_FILE)).parent)
    except Exception as e:   # kagglehub and huggingface_hub raise their own errors for a missing network or name
        raise DownloadError(
            f"could not fetch the KerasHub preset {preset!r} ({first_line(e)}); KerasHub {hub.__version__} knows "
            f"{len(vision_presets())} vision presets (`featcache backbones` lists them); offline, fix: on a machine "
            f"online run keras_hub.models.Backbone.from_preset({preset!r}).save_to_preset(DIR) and "
            f"keras_hub.layers.ImageConverter.from_preset({preset!r}).save_to_preset(DIR), copy DIR here and pass "
            "--backbone hub:DIR") from e


@functools.lru_cache(maxsize=16)
def _spec(name: str, folder: str, config_digest: str) -> HubSpec:
    """Memoised by the configuration's digest: an edited image_converter.json is another spec."""
    config, converter = _read_json(folder, CONFIG_FILE), _read_json(folder, CONVERTER_FILE)
    inner = _section(folder, CONFIG_FILE, config)
    if "vision_encoder" in inner:   # a CLIP or SigLIP image-text preset: its vision tower
        inner = _section(folder, CONFIG_FILE, inner["vision_encoder"])
    converter = {**converter, "config": _section(folder, CONVERTER_FILE, converter)}
    patch = inner.get("patch_size")
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    size = converter["config"].get("image_size") or inner.get("image_shape")
    native = size[0] if isinstance(size, (list, tuple)) and size else None
    if not isinstance(patch, int) or not isinstance(native, int):
        raise BadInputError(f"{folder}/{CONFIG_FILE} is not a vision transformer featcache can cut (no patch_size "
                            "or image size); fix: use a ViT-family preset (DINOv2, DINOv3, CLIP, SigLIP, ViT, DeiT)")
    _check_native(folder, inner, patch, native)
    scale, offset = _affine(folder, converter["config"])
    crop, interpolation = _resizing(folder, converter["config"])
    base = token_model(folder, None, (native, native, 3))
    n_tokens = np.asarray(base.predict_on_batch(np.zeros((1, native, native, 3), np.float32))["tokens"]).shape[1]
    cut = HubSpec(name=name, folder=folder, layers=(), default_layer="", native_input_size=native,
                  min_input_size=patch, patch_size=patch, resizable=_resizable(inner),
                  prefix_tokens=n_tokens - (native // patch) ** 2,
                  scale=scale, offset=offset, preprocessing=_describe(converter),
                  config_digest=config_digest, crop=crop, interpolation=interpolation,
                  peak_bytes_per_pixel=_peak_bytes_per_pixel(inner, n_tokens, patch))
    layers = _layers_of(base, cut, n_tokens)
    return HubSpec(**{**cut.__dict__, "layers": layers, "default_layer": "cls_patch_mean" if "cls" in layers
                      else "patch_mean"})


def _section(folder: str, name: str, parent) -> dict:
    """The "config" object of a KerasHub JSON file's object `parent`; a one-line error when it is not one."""
    inner = parent.get("config", {}) if isinstance(parent, dict) else None
    if not isinstance(inner, dict):
        raise BadInputError(f"{folder}/{name} is not a KerasHub configuration (its \"config\" is not an object); "
                            "fix: save the preset again")
    return inner


def _resizable(inner: dict) -> bool:
    """Takes other input sizes: its position embeddings interpolate (DINOv2) or are rotary (DINOv3)."""
    return bool({"position_embedding_shape", "rope_theta"} & set(inner))


def _check_native(folder: str, inner: dict, patch: int, native: int) -> None:
    """The converter's image size must be one the model takes: a whole number of patches, its own size unless
    its positions interpolate or rotate (found here, not when the weights fail to load)."""
    own = (inner.get("image_shape") or [native])[0]
    if native % patch or (native != own and not _resizable(inner)):
        raise BadInputError(f"{folder}/{CONVERTER_FILE} resizes images to {native}x{native}, which its model (patch "
                            f"{patch}, {own}x{own} images in {CONFIG_FILE}) cannot take; fix: save the preset's own "
                            "image converter again")


def _layers_of(base, cut: HubSpec, n_tokens: int) -> tuple[str, ...]:
    if cut.prefix_tokens < 0:
        grid = cut.native_input_size // cut.patch_size
        raise BadInputError(f"{cut.name}: its {n_tokens} tokens are fewer than its {grid}x{grid} patches; fix: use a "
                            "ViT-family preset (DINOv2, DINOv3, CLIP, SigLIP, ViT, DeiT)")
    missing = ({name for name in OUTPUTS if name.startswith("cls")} if not cut.prefix_tokens else set()) | (
        {"pooled"} if "pooled" not in base.output else set()) | (
        {name for name in OUTPUTS if "last" in name} if "block-1" not in base.output else set())
    return tuple(name for name in OUTPUTS if name not in missing)


def _read_json(folder: str, name: str) -> dict:
    """The JSON object in the folder's file `name`; a one-line error when it is missing, not JSON or not an object."""
    path = Path(folder) / name
    if not path.is_file():
        why = ("says how the preset wants its pixels; fix: save the preset's image converter into the folder too "
               "(keras_hub.layers.ImageConverter.from_preset(PRESET).save_to_preset(DIR))") if name == CONVERTER_FILE \
            else "fix: pass the folder save_to_preset wrote"
        raise MissingInputError(f"KerasHub preset folder {folder} has no {name}; it {why}" if name == CONVERTER_FILE
                                else f"KerasHub preset folder {folder} has no {name}; {why}")
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} is not JSON ({first_line(e)}); fix: save the preset again") from e
    if not isinstance(value, dict):
        raise BadInputError(f"{path} is not a KerasHub configuration (not a JSON object); fix: save the preset again")
    return value


def _affine(folder: str, converter: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The converter's scale and offset as three numbers each (a single number applies to every channel)."""
    def three(value, default):
        value = default if value is None else value
        value = [value] * 3 if isinstance(value, (int, float)) else list(value)
        if len(value) != 3 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in value):
            raise BadInputError(f"{folder}/{CONVERTER_FILE}: scale and offset must be finite numbers, one or three; "
                                "fix: save the preset's image converter again")
        return tuple(float(v) for v in value)

    return three(converter.get("scale"), 1.0), three(converter.get("offset"), 0.0)


def _resizing(folder: str, converter: dict) -> tuple[bool, str]:
    """The converter's crop_to_aspect_ratio and interpolation, as featcache's decoding does them."""
    interpolation = converter.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS or converter.get("pad_to_aspect_ratio"):
        raise BadInputError(f"{folder}/{CONVERTER_FILE}: interpolation {interpolation!r}"
                            f"{' with pad_to_aspect_ratio' if converter.get('pad_to_aspect_ratio') else ''} is not one "
                            f"featcache decodes ({', '.join(INTERPOLATIONS)}; crop or stretch); fix: another converter")
    return bool(converter.get("crop_to_aspect_ratio", True)), interpolation


def _describe(converter: dict) -> str:
    c = converter.get("config", {})
    shown = {k: c.get(k) for k in ("image_size", "scale", "offset", "crop_to_aspect_ratio", "interpolation",
                                    "antialias")}
    return (f"{converter.get('registered_name', 'ImageConverter')} {json.dumps(shown)}: x * scale + offset per "
            "channel (the crop and interpolation are the cache's resize)")


def _digest(folder: str) -> str:
    """sha256 of the preset's configuration: the model's and the image converter's (both read, so both must exist)."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, CONVERTER_FILE):
        _read_json(folder, name)
        h.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes())
    return h.hexdigest()[:16]


def _peak_bytes_per_pixel(config: dict, n_tokens: int, patch: int) -> int:
    """A rough float32 peak of one image per pixel: each token's hidden, MLP and attention rows over a patch."""
    hidden, mlp = config.get("hidden_dim", 768), config.get("intermediate_dim", config.get("mlp_dim", 3072))
    return int(4 * (3 + (4 * hidden + mlp + config.get("num_heads", 12) * n_tokens) / patch ** 2))


def token_model(folder: str, weights, shape: tuple[int, int, int]):
    """The preset's vision tower as a model from one image batch to [tokens of the last block (after its final
    norm)] (+ [its pooled output] where the model pools), with `weights`: None (initialised, seeded by the
    caller), 'imagenet' (the preset's own, for a KerasHub preset) or a .weights.h5 file of the same model."""
    import keras

    hub = keras_hub()
    config = _read_json(folder, CONFIG_FILE).get("config", {})
    own = (config.get("vision_encoder", {}).get("config", config).get("image_shape") or [None])[0]
    kwargs = {} if own == shape[0] else {"image_shape": shape}
    single = Path(folder) / WEIGHTS_FILE
    from_file = weights if weights not in (None, "imagenet") else str(single) if weights and single.is_file() else None
    sharded = weights == "imagenet" and from_file is None   # model.weights.json and its shards: KerasHub reads them
    try:
        with system.quiet_stderr():
            model = hub.models.Backbone.from_preset(folder, load_weights=sharded,
                                                     dtype=keras.config.dtype_policy().name, **kwargs)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise BadInputError(f"KerasHub cannot load the preset in {folder} at {shape[0]}x{shape[1]} ({first_line(e)}); "
                            "fix: check the folder (save_to_preset writes it) or pass its own --input-size") from e
    if sharded:
        _check_fit(model, sorted(Path(folder).glob("*.weights.h5")), f"{folder}/model.weights.json")
    if from_file:   # the whole preset's file (a CLIP preset's holds its text tower too)
        _load_weights(model, from_file)
    tower = getattr(model, "vision_encoder", model)   # an image-text preset's vision tower: its own graph and input
    return keras.Model(tower.inputs[0], _token_outputs(tower, folder), name="tokens")


def _token_outputs(model, folder: str) -> dict:
    """{"tokens": the last block's tokens after the final norm, "pooled": the model's pooled output (where it
    pools), "block-4".."block-1": the last LAST_BLOCKS blocks' tokens, each through the final norm (where the
    model shows its blocks: DINOv2's and DINOv3's feature pyramid, CLIP's and SigLIP's encoder layers)}."""
    import keras

    ranked = [layer for layer in model.layers[1:] if len(getattr(layer.output, "shape", ())) == 3]   # not tuples
    if not ranked:
        raise BadInputError(f"the preset in {folder} has no token outputs; fix: use a ViT-family preset")
    out = {"tokens": ranked[-1].output}
    if len(model.outputs[0].shape) == 2:
        out["pooled"] = model.outputs[0]
    pyramid = getattr(model, "pyramid_outputs", None)
    blocks = ([t for k, t in pyramid.items() if k != "stem"] if pyramid
              else [layer.output for layer in getattr(model, "encoder_layers", [])])
    norm = ranked[-1] if isinstance(ranked[-1], keras.layers.LayerNormalization) else None
    if len(blocks) >= LAST_BLOCKS and norm is not None:
        normed = not (pyramid and getattr(model, "apply_layernorm", False))   # DINOv2 may norm its pyramid itself
        out.update({f"block-{LAST_BLOCKS - i}": norm(b) if normed else b for i, b in enumerate(blocks[-LAST_BLOCKS:])})
    return out


def _check_fit(model, files, shown: str) -> None:
    """Refuse weights files that hold another number of arrays than `model` has: Keras loads a deeper model's file
    into a shallower one without a word, leaving the surplus unread."""
    import h5py

    arrays = []
    for file in files:
        try:
            with h5py.File(file, "r") as f:
                f.visititems(lambda name, item: arrays.append(name) if isinstance(item, h5py.Dataset) else None)
        except OSError as e:   # truncated, empty, not HDF5: rerunning cannot help
            raise BadInputError(f"weights file {file} cannot be read ({first_line(e)}); fix: save the preset's "
                                f"{WEIGHTS_FILE} again") from e
    if len(arrays) != len(model.weights):
        raise BadInputError(f"weights {shown} hold {len(arrays)} arrays but the preset's model has "
                            f"{len(model.weights)}: they are another model's; fix: the preset's own {WEIGHTS_FILE}")


def _load_weights(model, path: str) -> None:
    _check_fit(model, [Path(path).expanduser()], path)
    try:
        model.load_weights(str(Path(path).expanduser()))
    except (ValueError, OSError, KeyError) as e:
        raise BadInputError(f"weights file {path} does not fit this KerasHub preset ({first_line(e)}); expected "
                            f"the preset's own {WEIGHTS_FILE} or a file of the same model") from e


def weights_identity(cut: HubSpec, weights: str) -> str:
    """The preset's own weights ('imagenet') or a weights file, known by the hash of their files."""
    if weights == "imagenet":
        files = sorted(Path(cut.folder).glob("*.weights.*"))
        if not files and _RECALLED.get(cut.name) == cut.folder:
            raise MissingInputError(f"the preset folder {cut.name[len(PREFIX):]} is not there (the cache carries its "
                                    "configuration, not its weights); fix: pass --weights with its model.weights.h5 "
                                    "where it is now (the same file: its hash is checked)")
        if not files:
            raise MissingInputError(f"KerasHub preset folder {cut.folder} has no weights ({WEIGHTS_FILE}); fix: save "
                                    "the preset with its weights, or pass --weights random for a test")
        return "sha256:" + "+".join(system.file_sha256(f)[:32] for f in files)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise MissingInputError(f"weights file {path} does not exist; expected 'imagenet' (the preset's own "
                                "weights), 'random' or a .weights.h5 file of the same model")
    return f"sha256:{system.file_sha256(path)[:32]}"   # as the preset's own: the same file, the same key


@functools.lru_cache(maxsize=1)
def vision_presets() -> tuple[str, ...]:
    """The names of the vision presets this KerasHub knows (downloaded on use)."""
    return tuple(sorted(n for n in keras_hub().models.Backbone.presets if n.startswith(VISION_FAMILIES)))


def check_input_size(cut: HubSpec, size) -> None:
    if size is None:
        return
    if size % cut.patch_size:
        raise BadInputError(f"--input-size must be a multiple of {cut.name}'s patch size {cut.patch_size}, got {size}")
    if size != cut.native_input_size and not cut.resizable:
        raise BadInputError(f"--input-size {size}: {cut.name} takes only its own {cut.native_input_size}x"
                            f"{cut.native_input_size} images (its position embeddings are learnt per patch); fix: "
                            "leave out --input-size")
