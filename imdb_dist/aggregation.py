"""How replicas combine the embedding's gradient: gather its rows, or all-reduce the dense table.

The embedding's gradient is an ``IndexedSlices``: one row per token of the
replica's batch (batch x length rows of ``embedding_dim`` floats, plus an
index each). tf.distribute cannot sum those in place, so it gathers them:
MultiWorkerMirroredStrategy all-gathers every replica's rows,
MirroredStrategy concatenates them on one device, and every replica then
deduplicates and scatter-adds all of them. Both the bytes and that work grow
with the number of replicas. Summed into the dense ``vocab x dim`` table
first, the gradient is one all-reduce whose size does not depend on the
replica count (a ring sends ``2 (n - 1) / n`` tables per replica).

:class:`Adam` does that in ``aggregate_gradients``, the hook tf_keras gives
for custom aggregation; ``LossScaleOptimizer`` calls the same hook on the
optimizer it wraps, so non-finite gradients still reach every replica and
every replica still skips the step together. The result differs from the
sparse route only in float summation order.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras as keras

# Float32 values and an int64 index per gathered row.
_VALUE_BYTES = 4
_INDEX_BYTES = 8


def gathered_bytes(rows: int, dim: int, replicas: int) -> int:
    """Bytes each replica sends to all-gather ``rows`` embedding rows per replica (a ring)."""
    return (replicas - 1) * rows * (dim * _VALUE_BYTES + _INDEX_BYTES)


def reduced_bytes(vocab: int, dim: int, replicas: int) -> int:
    """Bytes each replica sends to ring-all-reduce the dense ``vocab x dim`` gradient."""
    return 2 * (replicas - 1) * vocab * dim * _VALUE_BYTES // replicas


def dense_embedding_gradient(method: str, *, replicas: int, rows: int, vocab: int, dim: int) -> bool:
    """Whether to all-reduce the embedding gradient densely (``distribution.embedding_gradient``).

    ``auto``: dense when there is more than one replica and the all-reduce
    sends fewer bytes than gathering ``rows`` rows per replica (the caller
    passes a full batch: per-replica batch x ``data.max_len``).
    """
    if method != "auto":
        return method == "dense"
    return replicas > 1 and reduced_bytes(vocab, dim, replicas) < gathered_bytes(rows, dim, replicas)


def densify(gradient: Any, variable: tf.Variable) -> Any:
    """``gradient`` as a dense tensor of ``variable``'s shape if it is ``IndexedSlices``; else as is."""
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    # Summing rows by index is what the sparse route's deduplication does too;
    # the row count comes from the variable, so the shape is static.
    return tf.math.unsorted_segment_sum(gradient.values, gradient.indices, num_segments=variable.shape[0])


@keras.saving.register_keras_serializable(package="imdb_dist")
class Adam(keras.optimizers.Adam):
    """tf_keras Adam that, with ``dense_sparse_gradients``, all-reduces sparse gradients as dense tensors."""

    def __init__(self, *args: Any, dense_sparse_gradients: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dense_sparse_gradients = dense_sparse_gradients

    def aggregate_gradients(self, grads_and_vars: Any) -> list[tuple[Any, tf.Variable]]:
        if self.dense_sparse_gradients:
            grads_and_vars = [(densify(grad, var), var) for grad, var in grads_and_vars]
        return super().aggregate_gradients(grads_and_vars)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dense_sparse_gradients": self.dense_sparse_gradients}
