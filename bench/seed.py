"""The seed-style baseline: what users ran before imdb-dist, rewritten to mirror it.

Plain Keras (tf_keras), TextVectorization with its defaults (post-padding and
post-truncation to ``max_len``), the whole split vectorized into NumPy arrays,
``model.fit`` with batch 30 — the classic Keras CNN-LSTM IMDB example.

    python -m bench.seed --data ../shared/data/imdb/aclImdb_train.tar.gz --max-len 100 --epochs 2
"""

from __future__ import annotations

import time

import numpy as np
import tf_keras as keras

from bench import harness
from bench.timing import TrainTimer
from imdb_dist.config import DataConfig
from imdb_dist.data.sources import Reviews, load_training_splits

# The seed's own settings.
BATCH = 30
MAX_LEN = 100
EPOCHS = 2


def vectorize(train: Reviews, val: Reviews, max_len: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed's preprocessing: default standardization, post-padded ids, as NumPy arrays."""
    layer = keras.layers.TextVectorization(max_tokens=vocab, output_sequence_length=max_len)
    layer.adapt(train.texts, batch_size=1024)
    return layer(np.array(train.texts)).numpy(), layer(np.array(val.texts)).numpy()


def seed_model(vocab: int) -> keras.Model:
    """The seed network, with the seed's sizes."""
    model = keras.Sequential(
        [
            keras.layers.Embedding(vocab, 128),
            keras.layers.Dropout(0.25),
            keras.layers.Conv1D(64, 5, padding="valid", activation="relu", strides=1),
            keras.layers.MaxPooling1D(pool_size=4),
            keras.layers.LSTM(70),
            keras.layers.Dense(1),
            keras.layers.Activation("sigmoid"),
        ]
    )
    model.compile(loss="binary_crossentropy", optimizer="adam", metrics=["accuracy"])
    return model


def train_seed(train: Reviews, val: Reviews, *, max_len: int, epochs: int, vocab: int = 20000) -> dict:
    """Train the seed way; return per-epoch training time, examples/s and validation accuracy."""
    started = time.perf_counter()
    x_train, x_val = vectorize(train, val, max_len, vocab)
    keras.utils.set_random_seed(1337)
    model = seed_model(vocab)
    timer = TrainTimer()
    model.fit(
        x_train, train.labels, batch_size=BATCH, epochs=epochs,
        validation_data=(x_val, val.labels), callbacks=[timer], verbose=0,
    )
    return {
        "train_s": timer.train_s,
        "examples_per_s": [len(train) / s for s in timer.train_s],
        "val_accuracy": timer.val_accuracy,
        "epoch_wall_s": timer.wall_s,
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--max-len", type=int, default=MAX_LEN)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    cfg = DataConfig(source="aclimdb", path=args.data)
    train, val = load_training_splits(cfg)
    result = train_seed(train, val, max_len=args.max_len, epochs=args.epochs)
    harness.emit({"benchmark": "seed", "max_len": args.max_len, **result})


if __name__ == "__main__":
    main()
