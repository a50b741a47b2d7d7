"""Use a trained head on new images, in one import: `predict(run, images)` (heads.predict) and `export(run, path)`
(heads.export) of one model from image to probabilities, rebuilt from the run's records by heads.endtoend."""

from heads.endtoend import EXPORT_FILE, RunInfo, affine_preprocessing, end_to_end, frozen_backbone, load_run
from heads.export import EXPORT_FORMATS, ExportConfig, compute_dtypes, export
from heads.imagebatch import decode_batch, predict_files
from heads.predict import PredictConfig, Predictions, image_files, predict

__all__ = ["EXPORT_FILE", "EXPORT_FORMATS", "ExportConfig", "PredictConfig", "Predictions", "RunInfo",
           "affine_preprocessing", "compute_dtypes", "decode_batch", "end_to_end", "export", "frozen_backbone",
           "image_files", "load_run", "predict", "predict_files"]
