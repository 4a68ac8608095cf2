"""FastDropout: the same Bernoulli mask and scaling as Keras' Dropout, drawn from bytes."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from imdb_dist.dropout import FastDropout, dropout, dropout_by_row, mask_bits

SEED = tf.constant([7, 11], tf.int64)


@pytest.mark.parametrize(("rate", "bits"), [(0.25, 8), (0.5, 8), (0.0, 8), (0.4, 16), (0.1, 16)])
def test_mask_bits_uses_bytes_only_when_the_rate_is_exact_in_256ths(rate, bits):
    assert mask_bits(rate) == bits


@pytest.mark.parametrize("rate", [0.25, 0.4])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_dropout_drops_the_rate_and_scales_the_kept_units(rate, dtype):
    # An odd size, so the last 32-bit draw is only partly used.
    x = tf.ones([1001, 999], dtype)
    y = dropout(x, rate, SEED).numpy().astype(np.float64)
    dropped = float(np.mean(y == 0))
    # 1M units: the standard error of the fraction is ~0.0005.
    assert dropped == pytest.approx(rate, abs=0.003)
    kept = y[y != 0]
    assert np.allclose(kept, 1 / (1 - rate), rtol=1e-2)  # bfloat16 rounds 1/0.6 to 1.664
    assert y.shape == (1001, 999)


def test_dropout_masks_are_independent_per_unit_not_per_byte_group():
    # Neighbouring units come from the same 32-bit draw: their masks must still be uncorrelated.
    y = dropout(tf.ones([400_000]), 0.5, SEED).numpy() != 0
    pairs = y.reshape(-1, 4)
    both = float(np.mean(pairs[:, 0] & pairs[:, 1]))
    assert both == pytest.approx(0.25, abs=0.005)


def test_dropout_is_a_function_of_its_seed():
    x = tf.ones([64, 32])
    np.testing.assert_array_equal(dropout(x, 0.25, SEED), dropout(x, 0.25, SEED))
    assert not np.array_equal(dropout(x, 0.25, SEED), dropout(x, 0.25, SEED + 1))


def test_dropout_gradient_is_the_scaled_mask():
    x = tf.random.normal([50, 40])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = dropout(x, 0.25, SEED)
    grad = tape.gradient(y, x).numpy()
    mask = (y.numpy() != 0).astype(np.float32) / 0.75
    np.testing.assert_allclose(grad, mask, rtol=1e-6)


def test_layer_draws_a_new_mask_per_training_call_and_is_identity_at_inference():
    layer = FastDropout(0.25)
    x = tf.ones([32, 64])
    first, second = layer(x, training=True), layer(x, training=True)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(layer(x, training=False), x)
    np.testing.assert_array_equal(FastDropout(0.0)(x, training=True), x)


def test_layer_masks_are_reproducible_under_keras_set_random_seed():
    def masks() -> np.ndarray:
        keras.utils.set_random_seed(3)
        inputs = keras.Input((16,))
        model = keras.Model(inputs, FastDropout(0.5)(inputs))
        step = tf.function(lambda x: model(x, training=True))
        return np.stack([step(tf.ones([4, 16])).numpy() for _ in range(3)])

    first, second = masks(), masks()
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first[0], first[1])  # and the steps differ from each other


def test_layer_keeps_keras_dropout_config_and_refuses_noise_shape():
    layer = FastDropout(0.3, seed=5, name="d")
    config = layer.get_config()
    assert (config["rate"], config["seed"], config["name"]) == (0.3, 5, "d")
    assert FastDropout.from_config(config).rate == 0.3
    with pytest.raises(ValueError, match="noise_shape"):
        FastDropout(0.3, noise_shape=(None, 1))


def test_keyed_masks_are_a_function_of_seed_and_step_only():
    step = tf.Variable(0, dtype=tf.int64)

    def mask(key: int = 1337, at: int = 0) -> np.ndarray:
        layer = FastDropout(0.5)
        layer.key_on(step, key)
        step.assign(at)
        return layer(tf.ones([8, 32]), training=True).numpy()

    # No hidden state: a new layer (as after a restart) draws the same mask at the same step.
    np.testing.assert_array_equal(mask(at=5), mask(at=5))
    assert not np.array_equal(mask(at=5), mask(at=6))
    assert not np.array_equal(mask(key=1), mask(key=2))


@pytest.mark.parametrize("rate", [0.25, 0.3], ids=["bytes", "16-bit"])
def test_a_rows_mask_depends_on_its_place_in_the_global_batch_not_on_the_split(rate):
    inputs = tf.ones([12, 7, 5])  # 35 units a row: rows do not fill whole Philox counter steps
    seed = tf.constant([3, 4], tf.int64)
    whole = dropout_by_row(inputs, rate, seed, 0).numpy()
    for parts in (2, 3, 4, 6):
        rows = 12 // parts
        split = [dropout_by_row(inputs[i : i + rows], rate, seed, i).numpy() for i in range(0, 12, rows)]
        np.testing.assert_array_equal(np.concatenate(split), whole)
    # Rows are not copies of each other, and the place matters.
    assert not np.array_equal(whole[0], whole[1])
    assert not np.array_equal(dropout_by_row(inputs[:6], rate, seed, 1).numpy(), whole[:6])
    assert abs((whole == 0).mean() - rate) < 0.06


def test_replicas_draw_the_masks_of_their_rows_of_the_global_batch_and_the_step_restores_them():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        step = tf.Variable(3, dtype=tf.int64)
    layer = FastDropout(0.5)
    layer.key_on(step, 1337)

    @tf.function
    def masks() -> list[np.ndarray]:
        return strategy.run(lambda: layer(tf.ones([4, 32]), training=True))

    first = [m.numpy() for m in strategy.experimental_local_results(masks())]
    assert not np.array_equal(first[0], first[1])  # replica 1 holds rows 4-7, not rows 0-3 again
    # One replica holding the whole global batch of 8 draws the same masks for the same rows.
    np.testing.assert_array_equal(np.concatenate(first), layer(tf.ones([8, 32]), training=True).numpy())
    again = [m.numpy() for m in strategy.experimental_local_results(masks())]
    np.testing.assert_array_equal(first, again)  # same step: same masks
    step.assign(4)
    assert not np.array_equal(first[0], strategy.experimental_local_results(masks())[0].numpy())


def test_keyed_masks_leave_the_layer_without_extra_weights():
    layer = FastDropout(0.5)
    layer.key_on(tf.Variable(0, dtype=tf.int64), 1)
    assert layer.weights == []  # the step counter is read, not tracked: exports stay unchanged
