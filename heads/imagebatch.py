"""Image files through a model a batch at a time: each batch decoded and resized as the extraction does
(`featcache.sources`), the next ones decoding in threads while the model runs. Used by `heads.predict` locally and
by each Ray actor of `heads.predict_ray`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featcache.errors import UnreadableImageError
from featcache.sources import RESIZE, Split

log = logging.getLogger(__name__)


#: Batches decoded ahead of the model, each in a thread of its own (as extraction's decoding threads do).
DECODE_AHEAD = 2


def predict_files(model, files: list[Path], size, batch_size: int, skip_bad_images: bool, bar=None, *,
                  resizing: str = RESIZE):
    """(probabilities, the files they are of, [(file, why)] left out): `files` a batch at a time, the next
    DECODE_AHEAD batches decoding in threads while the model runs (memory: those few batches). `scale_jpegs`:
    decode as a cache with that `resize` was."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [files[s:s + batch_size] for s in range(0, len(files), batch_size)]
    probs, kept, bad = [], [], []
    with ThreadPoolExecutor(DECODE_AHEAD) as pool:
        ahead = [pool.submit(decode_batch, c, size, skip_bad_images, resizing) for c in chunks[:DECODE_AHEAD]]
        for k, chunk in enumerate(chunks):
            pixels, ok, failed = ahead.pop(0).result()
            if k + DECODE_AHEAD < len(chunks):
                ahead.append(pool.submit(decode_batch, chunks[k + DECODE_AHEAD], size, skip_bad_images, resizing))
            bad += failed
            if ok:
                probs.append(np.asarray(model.predict_on_batch(pixels), np.float32))
                kept += ok
            if bar is not None:
                bar.update(len(chunk))
    out = np.concatenate(probs) if probs else np.zeros((0, model.output_shape[-1]), np.float32)
    return out, kept, bad


def decode_batch(files: list[Path], size: tuple[int, int], skip_bad_images: bool, resizing: str = RESIZE):
    """(uint8 batch, the files in it, [(file, why)] left out): the batch decoded as a split of the extraction is."""
    split = Split(labels=np.zeros(len(files), np.int64), files=tuple(files))
    try:
        return split.load(0, len(files), size, resizing=resizing), list(files), []
    except UnreadableImageError:
        pass   # find which, image by image
    ok, pixels, bad = [], [], []
    for f in files:
        try:
            pixels.append(Split(labels=np.zeros(1, np.int64), files=(f,)).load(0, 1, size, resizing=resizing)[0])
            ok.append(f)
        except UnreadableImageError as e:
            if not skip_bad_images:
                raise
            bad.append((f, str(e)))
            log.warning("skipping %s", e)
    return (np.stack(pixels) if pixels else None), ok, bad
