"""`predict(engine="ray")`: shards of the image files on Ray actors, each building the end-to-end model once; the
cluster is handled as extraction's (`featcache.cluster`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache import system
from heads.endtoend import RunInfo, end_to_end, load_run
from heads.imagebatch import predict_files


class PredictWorker:
    """One Ray actor of `predict(engine="ray")`: the end-to-end model, built once, predicting shard after shard."""

    def __init__(self, run: str, weights, batch_size: int, skip_bad_images: bool):
        self.error, self.batch_size, self.skip = None, batch_size, skip_bad_images
        try:
            self.info = load_run(run)
            self.model = end_to_end(self.info, weights=weights)
            self.size = self.info.input_size or tuple(self.model.input_shape[1:3])
        except Exception as e:  # noqa: BLE001  (handed to the driver by ready(), which raises it there, once)
            self.error = e

    def ready(self):
        return self.error

    def run(self, files: list[str]):
        probs, kept, bad = predict_files(self.model, [Path(f) for f in files], self.size, self.batch_size, self.skip,
                                         resizing=self.info.resize)
        return probs, [str(f) for f in kept], [(str(f), why) for f, why in bad]


def predict_on_ray(info: RunInfo, files: list[Path], *, weights, batch_size: int, skip: bool, address, workers,
                   progress: bool) -> tuple:
    """predict_files over shards of `files` on Ray actors (ordered results), distributed as extraction's shards."""
    import contextlib
    import sys

    from featcache import cluster

    shard = 8 * batch_size
    shards = [([str(f.absolute()) for f in files[s:s + shard]],) for s in range(0, len(files), shard)]
    probs, kept, bad = [], [], []
    with contextlib.redirect_stdout(sys.stderr), \
            system.progress_bar(len(files), unit="img", desc="predict (ray)", enabled=progress) as bar, \
            cluster.distribute(PredictWorker, lambda threads: (str(info.folder.absolute()), weights, batch_size, skip),
                               shards, engine="ray", address=address, workers=workers,
                               after_death="nothing was written: rerun the same command") as done:
        for p, k, b in done:
            probs.append(p)
            kept += [Path(f) for f in k]
            bad += [(Path(f), why) for f, why in b]
            bar.update(len(k) + len(b))
    out = np.concatenate(probs) if probs else np.zeros((0, len(info.class_names)), np.float32)
    return out, kept, bad
