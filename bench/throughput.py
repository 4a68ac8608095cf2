"""Training throughput, side by side: the seed-style script vs imdb-dist, same data, same max_len.

Each contender first trains one warm-up epoch (tracing, caches), then the two
alternate, one training epoch each, ``--rounds`` times; the medians of their
training examples/s and the ratio are reported, with the validation accuracy
each reached at the end. An epoch's examples are the ones it trains: all of them
for the seed, ``steps_per_epoch * batch_size`` for imdb-dist (its global plan
trains full batches only).

    python -m bench.throughput --data ../shared/data/imdb/aclImdb_train.tar.gz --config job/configs/fast.yaml
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from bench import harness, seed
from bench.harness import median
from bench.machine import cpu_model
from bench.timing import TrainTimer
from imdb_dist.config import Config, load_config
from imdb_dist.data import pipeline, plan
from imdb_dist.data.sources import Reviews, load_training_splits
from imdb_dist.distribute import precision_policy, resolve_precision
from imdb_dist.model import build_model, compile_model
from imdb_dist.train import data_plan

EpochRunner = Callable[[], float]  # trains one epoch, returns its training seconds
# An epoch at a time, the score on the validation split, and how many examples one epoch trains.
Contender = tuple[EpochRunner, Callable[[], float], int]


def imdb_dist_runner(cfg: Config, train: Reviews, val: Reviews) -> Contender:
    """One training epoch at a time of imdb-dist's own pipeline and model, as ``run`` builds them."""
    tokenizer = pipeline.fit_tokenizer(train.texts, cfg.data.vocab_size)
    # The training path of imdb_dist.train: tokenized once, then the run's global plan, one epoch's
    # stream at a time (one worker, one replica: its block is the whole global batch).
    encoded = pipeline.encode_examples(
        tf.data.Dataset.from_tensor_slices((train.texts, train.labels)), tokenizer, cfg.data.max_len
    )
    global_plan = data_plan(cfg, encoded.lengths)
    val_ds = pipeline.batch_examples(
        tf.data.Dataset.from_tensor_slices((val.texts, val.labels)), tokenizer,
        max_len=cfg.data.max_len, batch_size=cfg.train.batch_size,
    )
    keras.utils.set_random_seed(cfg.train.seed)
    gpu = bool(tf.config.list_physical_devices("GPU"))
    with precision_policy(resolve_precision(cfg.train.mixed_precision, gpu=gpu)):
        model = build_model(cfg.model, tokenizer.vocabulary_size())
        compile_model(model, cfg.train.learning_rate)
    epochs = iter(range(1_000_000))

    def epoch() -> float:
        e = next(epochs)
        batches = plan.stream(encoded, global_plan, plan.Share(1), epochs=e + 1, start=(e, 0))
        timer = TrainTimer()
        model.fit(batches, epochs=1, callbacks=[timer], verbose=0)
        return timer.train_s[0]

    trained = global_plan.steps_per_epoch * global_plan.batch_size
    return epoch, lambda: float(model.evaluate(val_ds, verbose=0)[1]), trained


def seed_runner(train: Reviews, val: Reviews, max_len: int) -> Contender:
    x_train, x_val = seed.vectorize(train, val, max_len, vocab=20000)
    keras.utils.set_random_seed(1337)
    model = seed.seed_model(20000)

    def epoch() -> float:
        timer = TrainTimer()
        model.fit(x_train, train.labels, batch_size=seed.BATCH, epochs=1, callbacks=[timer], verbose=0)
        return timer.train_s[0]

    return epoch, lambda: float(model.evaluate(x_val, val.labels, verbose=0)[1]), len(train)


def measure(train: Reviews, val: Reviews, cfg: Config, rounds: int) -> dict:
    contenders = {"seed": seed_runner(train, val, cfg.data.max_len), "imdb_dist": imdb_dist_runner(cfg, train, val)}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for epoch, _, _ in contenders.values():
        epoch()  # warm-up: tracing and caches, not timed
    for _ in range(rounds):
        for name, (epoch, _, _) in contenders.items():
            seconds[name].append(epoch())
    trained = {name: examples for name, (_, _, examples) in contenders.items()}
    rates = {name: [trained[name] / s for s in values] for name, values in seconds.items()}
    medians = {name: median(values) for name, values in rates.items()}
    return {
        "examples_per_s": rates,
        "median_examples_per_s": medians,
        "ratio": medians["imdb_dist"] / medians["seed"],
        "val_accuracy_after": {name: evaluate() for name, (_, evaluate, _) in contenders.items()},
        "epochs_each": rounds + 1,
        "examples_per_epoch": trained,
    }


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--config", default="job/configs/fast.yaml", help="imdb-dist preset to measure")
    parser.add_argument("--max-len", type=int, default=400, help="truncation length for both contenders")
    harness.add_rounds(parser, default=3, help="timed epochs per contender, alternating")
    harness.add_sets(parser)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.path={args.data}", f"data.max_len={args.max_len}", *args.overrides])
    train, val = load_training_splits(cfg.data)
    result = measure(train, val, cfg, args.rounds)
    harness.emit({
        "benchmark": "throughput",
        "max_len": args.max_len,
        "config": args.config,
        "overrides": args.overrides,
        "n_train": len(train),
        "machine": {**cpu_model(), "processor": platform.processor(),
                    "tensorflow": tf.__version__, "numpy": np.__version__},
        **result,
    })


if __name__ == "__main__":
    main()
