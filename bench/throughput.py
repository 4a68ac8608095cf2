"""Training throughput, side by side: the seed-style script vs imdb-dist, same data, same max_len.

Each contender first trains one warm-up epoch (tracing, caches), then the two
alternate, one training epoch each, ``--rounds`` times; the medians of their
training examples/s and the ratio are reported, with the validation accuracy
each reached at the end.

    python -m bench.throughput --data ../shared/data/imdb/aclImdb_train.tar.gz --config job/configs/fast.yaml
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from bench import seed
from bench.timing import TrainTimer, emit, median
from imdb_dist.config import Config, load_config
from imdb_dist.data import pipeline
from imdb_dist.data.sources import Reviews, load_training_splits
from imdb_dist.distribute import precision_policy, resolve_precision
from imdb_dist.model import build_model, compile_model, min_length

EpochRunner = Callable[[], float]  # trains one epoch, returns its training seconds


def imdb_dist_runner(cfg: Config, train: Reviews, val: Reviews) -> tuple[EpochRunner, Callable[[], float]]:
    """One training epoch at a time of imdb-dist's own pipeline and model, as ``run`` builds them."""
    tokenizer = pipeline.fit_tokenizer(train.texts, cfg.data.vocab_size)
    bucketed = cfg.data.bucketing and cfg.data.bucket_width < cfg.data.max_len
    options = {"min_len": min_length(cfg.model), "bucket_width": cfg.data.bucket_width if bucketed else None}
    # The training path of imdb_dist.train: tokenized once, one planned epoch at a time.
    encoded = pipeline.encode_examples(
        tf.data.Dataset.from_tensor_slices((train.texts, train.labels)), tokenizer, cfg.data.max_len
    )
    pool = pipeline.pool_size(cfg.train.batch_size, cfg.data.max_len) if options["bucket_width"] else None
    val_ds = pipeline.batch_examples(
        tf.data.Dataset.from_tensor_slices((val.texts, val.labels)), tokenizer,
        max_len=cfg.data.max_len, batch_size=cfg.train.batch_size,
    )
    keras.utils.set_random_seed(cfg.train.seed)
    with precision_policy(resolve_precision(cfg.train.mixed_precision)):
        model = build_model(cfg.model, tokenizer.vocabulary_size())
        compile_model(model, cfg.train.learning_rate)
    epochs = iter(range(1_000_000))

    def epoch() -> float:
        plan = pipeline.epoch_plan(
            encoded.lengths, batch_size=cfg.train.batch_size, seed=cfg.data.seed, epoch=next(epochs), pool=pool
        )
        batches = pipeline.plan_dataset(
            encoded, plan, max_len=cfg.data.max_len, min_len=options["min_len"], bucket_width=options["bucket_width"]
        )
        timer = TrainTimer()
        model.fit(batches, epochs=1, callbacks=[timer], verbose=0)
        return timer.train_s[0]

    return epoch, lambda: float(model.evaluate(val_ds, verbose=0)[1])


def seed_runner(train: Reviews, val: Reviews, max_len: int) -> tuple[EpochRunner, Callable[[], float]]:
    x_train, x_val = seed.vectorize(train, val, max_len, vocab=20000)
    keras.utils.set_random_seed(1337)
    model = seed.seed_model(20000)

    def epoch() -> float:
        timer = TrainTimer()
        model.fit(x_train, train.labels, batch_size=seed.BATCH, epochs=1, callbacks=[timer], verbose=0)
        return timer.train_s[0]

    return epoch, lambda: float(model.evaluate(x_val, val.labels, verbose=0)[1])


def measure(train: Reviews, val: Reviews, cfg: Config, rounds: int) -> dict:
    contenders = {"seed": seed_runner(train, val, cfg.data.max_len), "imdb_dist": imdb_dist_runner(cfg, train, val)}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for epoch, _ in contenders.values():
        epoch()  # warm-up: tracing and caches, not timed
    for _ in range(rounds):
        for name, (epoch, _) in contenders.items():
            seconds[name].append(epoch())
    rates = {name: [len(train) / s for s in values] for name, values in seconds.items()}
    medians = {name: median(values) for name, values in rates.items()}
    return {
        "examples_per_s": rates,
        "median_examples_per_s": medians,
        "ratio": medians["imdb_dist"] / medians["seed"],
        "val_accuracy_after": {name: evaluate() for name, (_, evaluate) in contenders.items()},
        "epochs_each": rounds + 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="aclImdb directory or .tar.gz")
    parser.add_argument("--config", default="job/configs/fast.yaml", help="imdb-dist preset to measure")
    parser.add_argument("--max-len", type=int, default=400, help="truncation length for both contenders")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per contender, alternating")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.path={args.data}", f"data.max_len={args.max_len}", *args.overrides])
    train, val = load_training_splits(cfg.data)
    result = measure(train, val, cfg, args.rounds)
    emit({
        "benchmark": "throughput",
        "max_len": args.max_len,
        "config": args.config,
        "overrides": args.overrides,
        "n_train": len(train),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                    "tensorflow": tf.__version__, "numpy": np.__version__},
        **result,
    })


if __name__ == "__main__":
    main()
