"""What a trained model is judged by: its class probabilities on a split, and the metrics computed from them
(argmax accuracy, balanced accuracy, loss, macro-F1, per-class figures, the confusion matrix)."""

from __future__ import annotations

import numpy as np


def predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities, cast to float32 batch by batch (x may be float16 or uint8)."""
    out = [model.predict_on_batch(x[i:i + batch_size].astype(np.float32)) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def row_losses(p: np.ndarray, y: np.ndarray, class_weights: np.ndarray | None = None) -> np.ndarray:
    """Each row's cross-entropy, times its class weight when given (the weights of a split's rows average 1, so
    the mean of these is the split's weighted loss)."""
    out = -np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1.0)).astype(np.float64)
    return out if class_weights is None else out * class_weights[y]


def evaluate(probs: np.ndarray, y: np.ndarray, class_names) -> dict:
    from sklearn.metrics import classification_report, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = np.arange(len(class_names))
    pred = probs.argmax(axis=1)
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    recall_of_present = r[support > 0]
    return {
        "test_accuracy": float(np.mean(pred == y)),
        # the mean recall of the classes in the test split: accuracy as if every class were as large
        "test_balanced_accuracy": float(recall_of_present.mean()) if len(recall_of_present) else 0.0,
        "test_loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)))),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "classification_report": classification_report(y, pred, labels=labels, target_names=list(class_names),
                                                       digits=4, zero_division=0),
    }
