"""Dropout that draws one random byte (or 16 bits) per unit instead of one float.

On the embedding output (batch x length x 128 units) Keras' ``Dropout`` is
about a quarter of a training step on a CPU: it draws one float32 uniform per
unit. The mask only needs a comparison against the keep probability, so this
layer draws full-range 32-bit integers, splits each into four bytes (or two
16-bit halves) and compares those against an integer threshold: four (two)
times fewer random draws, same Bernoulli mask, same ``1 / (1 - rate)``
scaling, and the gradient is the mask, as with Keras' layer. Measured in
docs/BENCHMARKS.md ("Levers").

The drop probability is ``round(rate * 2**bits) / 2**bits``: exact with bytes
when ``rate * 256`` is a whole number (0.25, 0.5, ...), otherwise 16 bits are
used and it is within 2**-17 of ``rate``.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tf_keras as keras

# tf.random.Algorithm.PHILOX, and the 32-bit draws it makes per counter step.
_PHILOX = 1
_PHILOX_GROUP = 4


def mask_bits(rate: float) -> int:
    """8 when the rate is a whole number of 256ths (one byte per unit is exact), else 16."""
    return 8 if float(rate * 256).is_integer() else 16


def _keep(units: tf.Tensor, rate: float, bits: int) -> tf.Tensor:
    threshold = tf.constant(round(rate * 2**bits), units.dtype)
    return units >= threshold


def _scaled(inputs: tf.Tensor, keep: tf.Tensor, rate: float) -> tf.Tensor:
    return inputs * (tf.cast(keep, inputs.dtype) * tf.cast(1.0 / (1.0 - rate), inputs.dtype))


def dropout(inputs: tf.Tensor, rate: float, seed: tf.Tensor) -> tf.Tensor:
    """Zero each unit of ``inputs`` with probability ``rate`` (see module), scale the rest by ``1 / (1 - rate)``.

    Args:
        inputs: any shape, any float dtype.
        rate: drop probability, in [0, 1).
        seed: int32/int64 ``[2]`` seed of the stateless draw; a new seed per call gives a new mask.
    """
    bits = mask_bits(rate)
    per_draw = 32 // bits
    size = tf.size(inputs)
    # Round up to whole 32-bit draws; the surplus bytes are discarded.
    draws = tf.random.stateless_uniform(
        [(size + per_draw - 1) // per_draw], seed, minval=None, maxval=None, dtype=tf.int32
    )
    unit_dtype = tf.uint8 if bits == 8 else tf.uint16
    units = tf.reshape(tf.bitcast(draws, unit_dtype), [-1])[:size]
    return _scaled(inputs, tf.reshape(_keep(units, rate, bits), tf.shape(inputs)), rate)


def dropout_by_row(inputs: tf.Tensor, rate: float, seed: tf.Tensor, first_row: tf.Tensor) -> tf.Tensor:
    """:func:`dropout` where row ``r``'s mask depends only on ``seed``, ``first_row + r`` and the row's size.

    One Philox stream keyed by ``seed``, read at a fixed place per row:
    row ``p`` of a global batch takes the stream's draws from counter
    ``p * D / 4`` on (``D`` draws per row, rounded up to Philox's 4 per
    counter step). Philox is counter-based, so a replica that holds rows
    ``[first_row, first_row + rows)`` draws exactly their part of the stream:
    the masks of a global batch are the same however its rows are split
    among replicas (tested), on CPUs and GPUs alike (the algorithm is named,
    not left to the device).

    Args:
        inputs: ``[rows, ...]``, any float dtype.
        rate: drop probability, in [0, 1).
        seed: int64 ``[2]``.
        first_row: the global position of ``inputs``' first row.
    """
    bits = mask_bits(rate)
    per_draw = 32 // bits
    shape = tf.shape(inputs)
    rows, units = shape[0], tf.reduce_prod(shape[1:])
    draws = (units + per_draw - 1) // per_draw
    draws = (draws + _PHILOX_GROUP - 1) // _PHILOX_GROUP * _PHILOX_GROUP
    key, _ = tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)
    offset = tf.cast(first_row, tf.int64) * tf.cast(draws // _PHILOX_GROUP, tf.int64)
    counter = tf.stack([tf.bitcast(offset, tf.uint64), tf.constant(0, tf.uint64)])
    random = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=tf.stack([rows, draws]), key=key, counter=counter, alg=_PHILOX, dtype=tf.int32
    )
    unit_dtype = tf.uint8 if bits == 8 else tf.uint16
    per_row = tf.reshape(tf.bitcast(random, unit_dtype), [rows, draws * per_draw])[:, :units]
    return _scaled(inputs, tf.reshape(_keep(per_row, rate, bits), shape), rate)


class FastDropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` (same arguments, config and seeding) with the cheaper mask above.

    Masks are keyed on the training step when :meth:`key_on` has given the
    layer a step counter (the trainer hands it the optimizer's): an
    example's mask is then a stateless draw from ``(seed, step, the
    example's position in the global batch)`` (:func:`dropout_by_row`), so a
    resumed run draws exactly the masks the uninterrupted run would have,
    on any number of workers and replicas. A replica's rows are its slice of
    the global batch (:mod:`imdb_dist.data.plan`): global replica ``k`` with
    ``b`` rows holds positions ``[k*b, (k+1)*b)``. Without a counter it seeds
    a stateful op, as Keras' layer does.

    ``noise_shape`` is not supported: it exists for broadcast masks, which
    are already cheap.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs) -> None:
        if kwargs.get("noise_shape") is not None:
            raise ValueError("FastDropout does not support noise_shape; use keras.layers.Dropout")
        super().__init__(rate, seed=seed, **kwargs)
        # A reader, not the variable: Keras would track a variable attribute
        # as one of this layer's weights.
        self._step: Callable[[], tf.Tensor] | None = None
        self.key = 0

    def key_on(self, step: tf.Variable, key: int) -> None:
        """Draw masks from ``(key, this layer's seed, step, row position)`` from now on.

        Args:
            step: an integer counter that advances once per training step
                (the optimizer's ``iterations``); read, never written.
            key: the run's seed (``train.seed``).
        """
        self._step, self.key = (lambda: step), key

    def call(self, inputs: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if isinstance(self.rate, (int, float)) and self.rate == 0:
            return tf.identity(inputs)
        if training is None:
            training = keras.backend.learning_phase()

        def dropped() -> tf.Tensor:
            if self._step is not None:
                return dropout_by_row(inputs, self.rate, self._step_seed(), self._first_row(inputs))
            return dropout(inputs, self.rate, self._draw_seed())

        return tf.__internal__.smart_cond.smart_cond(training, dropped, lambda: tf.identity(inputs))

    def _step_seed(self) -> tf.Tensor:
        assert self._step is not None
        seed = tf.constant([self.key, self.seed or 0], tf.int64)
        return tf.random.experimental.stateless_fold_in(seed, tf.cast(self._step(), tf.int64))

    @staticmethod
    def _first_row(inputs: tf.Tensor) -> tf.Tensor:
        """Where this replica's rows start in the global batch: every replica holds the same number."""
        replica = tf.distribute.get_replica_context()
        replica_id = replica.replica_id_in_sync_group if replica is not None else 0
        return tf.cast(replica_id, tf.int64) * tf.cast(tf.shape(inputs)[0], tf.int64)

    def _draw_seed(self) -> tf.Tensor:
        # Keras' generator hands out a fresh stateless seed in its "stateful"
        # and "stateless" modes; in the default legacy mode it does not, so one
        # is drawn from a seeded stateful op, which tf.random.set_seed (and
        # keras.utils.set_random_seed) make reproducible.
        seed = self._random_generator.make_seed_for_stateless_op()
        if seed is not None:
            return seed
        return tf.random.uniform(
            [2], maxval=tf.int64.max, dtype=tf.int64, seed=self._random_generator.make_legacy_seed()
        )


def key_on_step(model: keras.Model, step: tf.Variable, key: int) -> None:
    """Key every :class:`FastDropout` in ``model`` on ``step`` (see :meth:`FastDropout.key_on`)."""
    for layer in model.submodules:
        if isinstance(layer, FastDropout):
            layer.key_on(step, key)
