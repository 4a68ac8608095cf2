"""The network, and nothing else: no strategies, no files, no precision policy.

Embedding → Dropout (imdb_dist.dropout.FastDropout) → Conv1D(relu) → MaxPooling1D → LSTM → Dense(1, sigmoid).
The caller builds it inside a strategy scope and a dtype policy; the output
layer is pinned to float32 so the sigmoid and the loss stay stable under
mixed precision.

With ``model.members = K > 1`` the model holds K such networks side by side
over the same tokens (a deep ensemble in one graph, so checkpoints, resume,
distribution and export treat it as one model). Its output is then the K
members' probabilities, ``[batch, K]``: binary cross-entropy against the
label averages the K members' own losses, so each member is trained
independently (as if alone, from its own initialisation and dropout masks)
rather than jointly through the average, which lets members lean on each
other. The ensemble's prediction is the mean of the members'
probabilities (:func:`ensemble_score`), which the accuracy metric and the
export use.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from imdb_dist.aggregation import Adam
from imdb_dist.config import ModelConfig
from imdb_dist.dropout import FastDropout

# The arguments tf_keras checks before it dispatches the LSTM to the fused
# cuDNN kernel on a GPU; any other value silently falls back to a loop of
# small kernels (several times slower). Masks are not used: a pre-padded
# (left-padded) mask would also disqualify cuDNN.
CUDNN_LSTM_ARGS = {
    "activation": "tanh",
    "recurrent_activation": "sigmoid",
    "recurrent_dropout": 0.0,
    "unroll": False,
    "use_bias": True,
}


def build_model(cfg: ModelConfig, vocab_size: int) -> keras.Model:
    """The sentiment model over pre-padded token ids of any length ``>= min_length(cfg)``.

    Args:
        cfg: layer sizes and the number of ensemble members.
        vocab_size: number of token ids, padding (0) and unknown (1) included.

    Returns:
        An uncompiled model mapping int ids ``[batch, length]`` to each
        member's probability of a positive review, float32
        ``[batch, cfg.members]`` (``[batch, 1]`` for one network; see
        :func:`ensemble_score`).
    """
    tokens = keras.Input(shape=(None,), dtype="int64", name="tokens")
    if cfg.members == 1:
        return keras.Model(tokens, _network(cfg, vocab_size, tokens, None), name="imdb_cnn_lstm")
    scores = [_network(cfg, vocab_size, tokens, i) for i in range(cfg.members)]
    members = keras.layers.Concatenate(dtype="float32", name="members")(scores)
    return keras.Model(tokens, members, name="imdb_cnn_lstm_ensemble")


def _network(cfg: ModelConfig, vocab_size: int, tokens: keras.KerasTensor, member: int | None) -> keras.KerasTensor:
    """One network over ``tokens``; ``member`` (ensembles only) prefixes its layer names ``m<i>_``."""
    prefix = "" if member is None else f"m{member}_"
    x = keras.layers.Embedding(vocab_size, cfg.embedding_dim, name=f"{prefix}embedding")(tokens)
    # Each member's dropout layer gets its own seed, so members draw
    # different masks at the same step (member 0 keeps the single network's).
    x = FastDropout(cfg.dropout, seed=member or None, name=f"{prefix}dropout")(x)
    x = keras.layers.Conv1D(cfg.conv_filters, cfg.kernel_size, activation="relu", name=f"{prefix}conv")(x)
    x = keras.layers.MaxPooling1D(cfg.pool_size, name=f"{prefix}pool")(x)
    x = keras.layers.LSTM(cfg.lstm_units, name=f"{prefix}lstm", **CUDNN_LSTM_ARGS)(x)
    return keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=f"{prefix}score")(x)


def ensemble_score(members: tf.Tensor) -> tf.Tensor:
    """The model's prediction from its output: the mean of the members' probabilities, ``[batch, 1]``."""
    return tf.reduce_mean(members, axis=-1, keepdims=True)


def members_crossentropy(labels: tf.Tensor, members: tf.Tensor) -> tf.Tensor:
    """Per example, the mean over members of each member's binary cross-entropy.

    Shapes are normalised here because Keras may squeeze a ``[batch, 1]``
    prediction against ``[batch]`` labels before calling a loss.
    """
    labels = tf.reshape(tf.cast(labels, members.dtype), [-1, 1])
    members = tf.reshape(members, [tf.shape(labels)[0], -1])
    return keras.losses.binary_crossentropy(labels, members)


def ensemble_accuracy(labels: tf.Tensor, members: tf.Tensor) -> tf.Tensor:
    """Binary accuracy of :func:`ensemble_score` (per example, for ``MeanMetricWrapper``)."""
    return keras.metrics.binary_accuracy(labels, ensemble_score(members))


def min_length(cfg: ModelConfig) -> int:
    """The shortest input that leaves one time step after the valid conv and the pool."""
    return cfg.kernel_size + cfg.pool_size - 1


def compile_model(
    model: keras.Model,
    learning_rate: float,
    decay_steps: int = 0,
    *,
    dense_sparse_gradients: bool = False,
    transport: str = "float32",
) -> None:
    """Adam + binary cross-entropy (each member's, averaged), tracking the ensemble's accuracy.

    ``decay_steps > 0`` decays the learning rate to 0 along a cosine over
    that many optimizer steps. The schedule reads the optimizer's step
    counter, which checkpoints carry, so a resumed run continues on it.

    Under a ``mixed_float16`` policy tf_keras wraps Adam in a
    LossScaleOptimizer here, so float16 gradients do not underflow.

    ``dense_sparse_gradients``: replicas all-reduce the embedding's gradient
    as a dense table instead of gathering its rows (:mod:`imdb_dist.aggregation`),
    in ``transport`` (float32 or bfloat16).
    """
    rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps) if decay_steps else learning_rate
    model.compile(
        optimizer=Adam(rate, dense_sparse_gradients=dense_sparse_gradients, transport=transport),
        loss=members_crossentropy,
        # The ensemble's accuracy (for one network, Keras' binary accuracy);
        # the loss stays the members' mean loss (see the module docstring).
        # Weighted: training passes no weights (every row counts), evaluation
        # gives its padding rows weight 0 (imdb_dist.data.plan.padded_blocks),
        # and Keras ignores sample weights in plain `metrics`.
        weighted_metrics=[keras.metrics.MeanMetricWrapper(ensemble_accuracy, name="accuracy")],
    )
