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


def mask_bits(rate: float) -> int:
    """8 when the rate is a whole number of 256ths (one byte per unit is exact), else 16."""
    return 8 if float(rate * 256).is_integer() else 16


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
    threshold = tf.constant(round(rate * 2**bits), unit_dtype)
    keep = tf.reshape(units >= threshold, tf.shape(inputs))
    return inputs * (tf.cast(keep, inputs.dtype) * tf.cast(1.0 / (1.0 - rate), inputs.dtype))


class FastDropout(keras.layers.Dropout):
    """``keras.layers.Dropout`` (same arguments, config and seeding) with the cheaper mask above.

    Masks are keyed on the training step when :meth:`key_on` has given the
    layer a step counter (the trainer hands it the optimizer's): each mask
    is then a stateless draw from ``(seed, step, replica)``, so a resumed run
    draws exactly the masks the uninterrupted run would have, and every
    replica draws its own. Without a counter it seeds a stateful op, as
    Keras' layer does.

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
        """Draw masks from ``(key, this layer's seed, step, replica)`` from now on.

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
            return dropout(inputs, self.rate, self._draw_seed())

        return tf.__internal__.smart_cond.smart_cond(training, dropped, lambda: tf.identity(inputs))

    def _draw_seed(self) -> tf.Tensor:
        if self._step is not None:
            replica = tf.distribute.get_replica_context()
            replica_id = replica.replica_id_in_sync_group if replica is not None else 0
            seed = tf.constant([self.key, self.seed or 0], tf.int64)
            seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(self._step(), tf.int64))
            return tf.random.experimental.stateless_fold_in(seed, tf.cast(replica_id, tf.int64))
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
