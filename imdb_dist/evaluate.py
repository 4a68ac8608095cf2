"""Scoring raw texts with an exported model, and the metrics of a labeled split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from imdb_dist.export import ServedModel

THRESHOLD = 0.5
# Reviews per call of the served model: large enough that the LSTM's
# step-by-step loop runs over few batches on a CPU.
SCORE_BATCH = 256


def score_texts(model: ServedModel, texts: Sequence[str], batch_size: int = SCORE_BATCH) -> np.ndarray:
    """Probability of a positive review for each text, float32 ``[n]``."""
    scores = [
        model.score(tf.constant(list(texts[i : i + batch_size]), dtype=tf.string)).numpy()[:, 0]
        for i in range(0, len(texts), batch_size)
    ]
    return np.concatenate(scores) if scores else np.zeros([0], np.float32)


def label_of(score: float) -> str:
    return "positive" if score >= THRESHOLD else "negative"


def metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """accuracy, auc, loss (binary cross-entropy), n and confusion ``[[tn, fp], [fn, tp]]``."""
    y = labels.astype(np.float32).reshape(-1, 1)
    p = scores.astype(np.float32).reshape(-1, 1)
    auc = keras.metrics.AUC(num_thresholds=1000)
    auc.update_state(y, p)
    predicted = (scores >= THRESHOLD).astype(np.int32)
    confusion = tf.math.confusion_matrix(labels, predicted, num_classes=2).numpy()
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "auc": float(auc.result()),
        "loss": float(keras.losses.BinaryCrossentropy()(y, p)),
        "n": len(labels),
        "confusion": confusion.tolist(),
    }
