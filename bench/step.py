"""What a training step of the seed network costs, layer by layer: ablations side by side.

Times the compiled train function on one fixed batch of random token ids
(no input pipeline), for the seed network and for variants without its
Dropout, without its LSTM, and with ``FastDropout``; each variant is timed
``--rounds`` times, alternating, and the medians reported.

    python -m bench.step --batch 1024 --length 232 --precision mixed_bfloat16
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from bench import harness
from bench.harness import median
from imdb_dist.dropout import FastDropout

VOCAB = 20002


def seed_variant(dropout: Callable[[float], keras.layers.Layer] | None, lstm: bool) -> keras.Model:
    """The seed network (sizes as bench.seed), with the dropout layer swapped or removed, or no LSTM."""
    tokens = keras.Input((None,), dtype="int64")
    x = keras.layers.Embedding(VOCAB, 128)(tokens)
    if dropout is not None:
        x = dropout(0.25)(x)
    x = keras.layers.Conv1D(64, 5, activation="relu")(x)
    x = keras.layers.MaxPooling1D(4)(x)
    x = keras.layers.LSTM(70)(x) if lstm else keras.layers.GlobalMaxPooling1D()(x)
    score = keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x)
    model = keras.Model(tokens, score)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    return model


VARIANTS = {
    "seed": (keras.layers.Dropout, True),
    "no_dropout": (None, True),
    "no_lstm": (keras.layers.Dropout, False),
    "fast_dropout": (FastDropout, True),
}


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--length", type=int, default=232, help="tokens per review (232: the mean at max_len 400)")
    parser.add_argument("--precision", default="mixed_bfloat16", choices=["float32", "mixed_bfloat16"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    harness.add_rounds(parser, default=2)
    args = parser.parse_args()
    keras.mixed_precision.set_global_policy(args.precision)
    rng = np.random.default_rng(0)
    x = rng.integers(2, VOCAB, size=(args.batch, args.length))
    y = rng.integers(0, 2, size=(args.batch, 1)).astype("float32")
    batches = tf.data.Dataset.from_tensors((x, y)).repeat()
    steps: dict[str, tuple[Callable, object]] = {}
    for name, (dropout, lstm) in VARIANTS.items():
        train_step, data = seed_variant(dropout, lstm).make_train_function(), iter(batches)
        for _ in range(3):  # tracing and warm-up
            train_step(data)
        steps[name] = (train_step, data)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (train_step, data) in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                float(train_step(data)["loss"])
                times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * median(values) for name, values in times.items()}
    harness.emit({
        "benchmark": "step",
        "batch": args.batch,
        "length": args.length,
        "precision": args.precision,
        "ms_per_step": ms,
        "share_of_step": {"dropout": 1 - ms["no_dropout"] / ms["seed"], "lstm": 1 - ms["no_lstm"] / ms["seed"]},
        "fast_dropout_speedup": ms["seed"] / ms["fast_dropout"],
    })


if __name__ == "__main__":
    main()
