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

With ``transport="bfloat16"`` the dense table travels as bfloat16: half the
bytes of the step's largest all-reduce, for a gradient rounded to 8
significant bits before and as it is summed (each replica's rows, then
every partial sum in the ring). It is cast back to float32 before Adam
sees it, and the rounding is deterministic, so runs and resumes stay
exact. docs/BENCHMARKS.md measures the error and the speed.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras as keras

# Float32 values and an int64 index per gathered row.
_VALUE_BYTES = 4
_INDEX_BYTES = 8
# The dtypes a densified embedding gradient can be all-reduced in (distribution.embedding_transport).
TRANSPORTS = ("float32", "bfloat16")


def gathered_bytes(rows: int, dim: int, replicas: int) -> int:
    """Bytes each replica sends to all-gather ``rows`` embedding rows per replica (a ring)."""
    return (replicas - 1) * rows * (dim * _VALUE_BYTES + _INDEX_BYTES)


def reduced_bytes(vocab: int, dim: int, replicas: int, transport: str = "float32") -> int:
    """Bytes each replica sends to ring-all-reduce the dense ``vocab x dim`` gradient in ``transport``."""
    return 2 * (replicas - 1) * vocab * dim * tf.as_dtype(transport).size // replicas


def dense_embedding_gradient(
    method: str, *, replicas: int, rows: int, vocab: int, dim: int, transport: str = "float32"
) -> bool:
    """Whether to all-reduce the embedding gradient densely (``distribution.embedding_gradient``).

    ``auto``: dense when there is more than one replica and the all-reduce
    sends fewer bytes than gathering ``rows`` rows per replica (the caller
    passes a full batch: per-replica batch x ``data.max_len``).
    """
    if method != "auto":
        return method == "dense"
    return replicas > 1 and reduced_bytes(vocab, dim, replicas, transport) < gathered_bytes(rows, dim, replicas)


def densify(gradient: Any, variable: tf.Variable) -> Any:
    """``gradient`` as a dense tensor of ``variable``'s shape if it is ``IndexedSlices``; else as is."""
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    # Summing rows by index is what the sparse route's deduplication does too;
    # the row count comes from the variable, so the shape is static.
    return tf.math.unsorted_segment_sum(gradient.values, gradient.indices, num_segments=variable.shape[0])


@keras.saving.register_keras_serializable(package="imdb_dist")
class Adam(keras.optimizers.Adam):
    """tf_keras Adam that, with ``dense_sparse_gradients``, all-reduces sparse gradients as dense tensors.

    ``transport``: the dtype those dense tensors are all-reduced in
    (``float32``, or ``bfloat16`` for half the bytes); the other gradients
    travel as they are.
    """

    def __init__(
        self, *args: Any, dense_sparse_gradients: bool = False, transport: str = "float32", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r} is not one of {TRANSPORTS}")
        self.dense_sparse_gradients = dense_sparse_gradients
        self.transport = transport

    def aggregate_gradients(self, grads_and_vars: Any) -> list[tuple[Any, tf.Variable]]:
        if not self.dense_sparse_gradients:
            return super().aggregate_gradients(grads_and_vars)
        narrow = tf.as_dtype(self.transport)
        pairs = list(grads_and_vars)
        densified: dict[int, tuple[Any, tf.Variable]] = {}
        for i, (grad, var) in enumerate(pairs):
            if isinstance(grad, tf.IndexedSlices):
                dense = densify(grad, var)
                densified[i] = (tf.cast(dense, narrow) if dense.dtype != narrow else dense, var)
        rest = {i: pair for i, pair in enumerate(pairs) if i not in densified}
        # Two all-reduces: a strategy may pack one call's tensors into one
        # (MirroredStrategy concatenates them), which needs a single dtype.
        reduced: dict[int, tuple[Any, tf.Variable]] = {}
        for part in (densified, rest):
            if part:
                reduced.update(zip(part, super().aggregate_gradients(list(part.values())), strict=True))
        for i in densified:
            grad, var = reduced[i]
            if grad is not None and grad.dtype != var.dtype:
                reduced[i] = (tf.cast(grad, var.dtype), var)
        return [reduced[i] for i in range(len(pairs))]

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "dense_sparse_gradients": self.dense_sparse_gradients,
            "transport": self.transport,
        }
