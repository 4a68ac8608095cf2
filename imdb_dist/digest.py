"""A digest of every batch a run has trained on, in order: proof that a resized or resumed run trained the plan.

The global plan (:mod:`imdb_dist.data.plan`) says which examples each step
trains on whatever the topology; this digest checks that it happened. Each
replica hashes the rows of its slice as the model receives them (tokens and
label, ``tf.fingerprint``), weighs the sum by a function of the global
optimizer step, and adds it to its own running sum, modulo a prime. The sum
over all replicas and steps is the same whichever replicas trained which
rows, and differs (but with chance ~2**-31) when any step trained other
examples, the same ones twice, or in another order: two runs that end with
the same digest trained the same global batches at the same steps.

No step waits for it on an accelerator: ``tf.fingerprint`` has a CPU
kernel only, so the rows are hashed on the host, from the host's copy of
the worker's block (:func:`host_rows_sums`), before the replicas' slices
travel to their devices; a replica receives its slice's sum, one float64,
and weighs it by the step on its device. Hashing the slice a GPU replica
holds would copy it back to the host every step (docs/BENCHMARKS.md, "The
batch digest's share of a step").

No step pays a collective for it: each replica adds locally (a
``SyncOnRead`` variable), and the replicas' sums are read together only at
the loop's step points and checkpoints, where every worker already meets.
A checkpoint folds them into :class:`imdb_dist.checkpoint.ResumeState`'s
``batches_digest`` and starts the replicas' sums again from zero, so the
digest survives a resume onto any number of replicas, and the steps a lost
attempt trained after its last checkpoint are not in it: it describes the
run's final lineage, the steps that made the model.

The arithmetic is float64 on integers below 2**53, exact on every device
and in every all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

# The modulus: a prime below 2**31, so a running sum times a step weight
# (below 2**16) plus a slice's sum stays below 2**53, exact in float64.
PRIME = 2147483647.0
_WEIGHTS = 65521.0  # a prime: step weights 1..65521


def slice_sum(tokens: tf.Tensor, labels: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """One replica's contribution at global optimizer step ``step``: its rows' hashes, weighted by the step.

    A row's hash is 24 bits of ``tf.fingerprint`` of its token ids and label;
    rows are summed (the slice is a multiset: which replica holds a row does
    not matter), the step weight ``1 + (step * 7919 mod 65521)`` makes the
    digest depend on which step trained which batch.
    """
    return weighted(rows_sum(tokens, labels), step)


def rows_sum(tokens: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The step-free part of :func:`slice_sum`: the rows' 24-bit hashes summed, modulo :data:`PRIME` (float64).

    ``tf.fingerprint`` runs on CPUs only: call it on the host's tensors.
    """
    rows = tf.concat([tf.cast(tokens, tf.int64), tf.cast(tf.reshape(labels, [-1, 1]), tf.int64)], axis=1)
    hashed = tf.cast(tf.fingerprint(rows)[:, :3], tf.float64)  # [rows, 3] bytes
    row_hash = hashed[:, 0] + 256.0 * hashed[:, 1] + 65536.0 * hashed[:, 2]
    return tf.math.floormod(tf.reduce_sum(row_hash), PRIME)


def weighted(total: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """A :func:`rows_sum` weighed by global step ``step``: integer float64 arithmetic, exact on any device."""
    weight = 1.0 + tf.math.floormod(tf.cast(step, tf.float64) * 7919.0, _WEIGHTS)
    return tf.math.floormod(total * weight, PRIME)


def host_rows_sums(strategy: tf.distribute.Strategy, replica_slice: Callable[[Any], Any]) -> Any:
    """Each local replica's :func:`rows_sum`, hashed on this worker's CPU: a per-replica value for ``strategy.run``.

    Args:
        strategy: the run's strategy.
        replica_slice: given a replica's ``tf.distribute.experimental.ValueContext``,
            its ``(tokens, labels)`` cut from the host's copy of the block
            (the function that cuts the replicas' batches).

    Each replica then receives one float64 (a host-to-device copy of 8
    bytes), not the slice back from its device.
    """

    def one(context: tf.distribute.experimental.ValueContext) -> tf.Tensor:
        # The strategy calls this under no device scope: pinned to this worker's CPU, or the placer
        # would cut the slice on a GPU and copy it back for the hash.
        with tf.device("/device:CPU:0"):
            tokens, labels = replica_slice(context)
            return rows_sum(tokens, labels)

    return strategy.experimental_distribute_values_from_function(one)


class BatchDigest:
    """The run's batch digest: a checkpointed part (``folded``) plus each replica's sum since the last checkpoint.

    Args:
        strategy: the run's strategy; the replicas' sums are created under it.
        folded: the checkpointed digest (``ResumeState.batches_digest``), a
            plain float64 variable every worker holds alike.
    """

    def __init__(self, strategy: tf.distribute.Strategy, folded: tf.Variable) -> None:
        self.folded = folded
        with strategy.scope():
            # Summed over replicas (and workers) when read across them, as Keras' metric totals are.
            self._since_checkpoint = tf.Variable(
                0.0,
                dtype=tf.float64,
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )
        # The digest at the last read, for the chief's step records.
        self.value: int | None = None

    def add(self, tokens: tf.Tensor, labels: tf.Tensor, step: tf.Tensor) -> None:
        """In a replica's step: add its slice at global step ``step`` (no collective).

        Hashes the slice where it is: on a GPU replica that copies it to the
        host first; a training step adds :func:`host_rows_sums`' values with
        :meth:`add_rows_sum` instead.
        """
        self.add_rows_sum(rows_sum(tokens, labels), step)

    def add_rows_sum(self, total: tf.Tensor, step: tf.Tensor) -> None:
        """In a replica's step: add its slice's :func:`rows_sum` (from :func:`host_rows_sums`) at global step ``step``."""
        self._since_checkpoint.assign(tf.math.floormod(self._since_checkpoint + weighted(total, step), PRIME))

    def read(self) -> int:
        """The digest of every step so far; every worker must call it at the same points (a collective)."""
        total = float(self._since_checkpoint.read_value()) + float(self.folded.numpy())
        self.value = int(total % PRIME)
        return self.value

    def fold(self) -> None:
        """Before a checkpoint, on every worker: move the replicas' sums into ``folded``, which it saves."""
        self.folded.assign(float(self.read()))
        self._since_checkpoint.assign(0.0)
