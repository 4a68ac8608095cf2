"""The network, and nothing else: no strategies, no files, no precision policy.

Embedding → Dropout (imdb_dist.dropout.FastDropout) → Conv1D(relu) → MaxPooling1D → LSTM → Dense(1, sigmoid).
The caller builds it inside a strategy scope and a dtype policy; the output
layer is pinned to float32 so the sigmoid and the loss stay stable under
mixed precision.
"""

from __future__ import annotations

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
        cfg: layer sizes.
        vocab_size: number of token ids, padding (0) and unknown (1) included.

    Returns:
        An uncompiled model mapping int ids ``[batch, length]`` to the
        probability of a positive review, float32 ``[batch, 1]``.
    """
    tokens = keras.Input(shape=(None,), dtype="int64", name="tokens")
    x = keras.layers.Embedding(vocab_size, cfg.embedding_dim, name="embedding")(tokens)
    x = FastDropout(cfg.dropout, name="dropout")(x)
    x = keras.layers.Conv1D(cfg.conv_filters, cfg.kernel_size, activation="relu", name="conv")(x)
    x = keras.layers.MaxPooling1D(cfg.pool_size, name="pool")(x)
    x = keras.layers.LSTM(cfg.lstm_units, name="lstm", **CUDNN_LSTM_ARGS)(x)
    score = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="score")(x)
    return keras.Model(tokens, score, name="imdb_cnn_lstm")


def min_length(cfg: ModelConfig) -> int:
    """The shortest input that leaves one time step after the valid conv and the pool."""
    return cfg.kernel_size + cfg.pool_size - 1


def compile_model(
    model: keras.Model, learning_rate: float, decay_steps: int = 0, *, dense_sparse_gradients: bool = False
) -> None:
    """Adam + binary cross-entropy, tracking accuracy.

    ``decay_steps > 0`` decays the learning rate to 0 along a cosine over
    that many optimizer steps. The schedule reads the optimizer's step
    counter, which checkpoints carry, so a resumed run continues on it.

    Under a ``mixed_float16`` policy tf_keras wraps Adam in a
    LossScaleOptimizer here, so float16 gradients do not underflow.

    ``dense_sparse_gradients``: replicas all-reduce the embedding's gradient
    as a dense table instead of gathering its rows (:mod:`imdb_dist.aggregation`).
    """
    rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps) if decay_steps else learning_rate
    model.compile(
        optimizer=Adam(rate, dense_sparse_gradients=dense_sparse_gradients),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")],
    )
