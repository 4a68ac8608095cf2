"""Input pipeline alone vs the training step: can tf.data keep the trainer fed?

Reports examples/s of imdb-dist's training dataset iterated on its own
(first pass: tokenization, done once per run; later passes: planned
epochs over the tokenized reviews, the steady state training sees) against the examples/s of training on it, and the
ratio of the two.

    python -m bench.pipeline --data ../shared/data/imdb/aclImdb_train.tar.gz --config job/configs/fast.yaml
"""

from __future__ import annotations

import time

import tensorflow as tf

from bench import harness
from bench.harness import median
from bench.throughput import imdb_dist_runner
from imdb_dist.config import load_config
from imdb_dist.data import pipeline, plan
from imdb_dist.data.sources import load_training_splits
from imdb_dist.train import data_plan


def pipeline_rates(cfg, train, passes: int) -> list[float]:
    """Examples/s of each full pass over the training input, nothing else running.

    The first pass includes tokenizing every review (done once per run); the
    later ones are the epochs of the run's global plan (one worker, one
    replica) that training sees from then on. A pass's examples are the ones
    its epoch trains (``steps_per_epoch * batch_size``), as in the training
    rate it is compared with.
    """
    tokenizer = pipeline.fit_tokenizer(train.texts, cfg.data.vocab_size)
    rates = []
    encoded = global_plan = None
    for epoch in range(passes):
        start = time.perf_counter()
        if encoded is None:
            encoded = pipeline.encode_examples(
                tf.data.Dataset.from_tensor_slices((train.texts, train.labels)), tokenizer, cfg.data.max_len
            )
            global_plan = data_plan(cfg, encoded.lengths)
        dataset = plan.stream(encoded, global_plan, plan.Share(1), epochs=epoch + 1, start=(epoch, 0))
        # Consume in-graph, as the trainer's iterator does: a Python loop over
        # next() would add a per-batch cost the trainer never pays.
        dataset.reduce(0, lambda count, _: count + 1).numpy()
        trained = global_plan.steps_per_epoch * global_plan.batch_size
        rates.append(trained / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--config", default="job/configs/fast.yaml")
    parser.add_argument("--passes", type=int, default=4, help="pipeline passes (the first fills the cache)")
    harness.add_sets(parser)
    args = parser.parse_args()
    cfg = load_config(args.config, [f"data.path={args.data}", *args.overrides])
    train, val = load_training_splits(cfg.data)
    rates = pipeline_rates(cfg, train, args.passes)
    epoch, _, trained = imdb_dist_runner(cfg, train, val)
    epoch()  # warm-up
    training = trained / epoch()
    steady = median(rates[1:]) if len(rates) > 1 else rates[0]
    harness.emit({
        "benchmark": "pipeline",
        "config": args.config,
        "pipeline_examples_per_s_first_pass": rates[0],
        "pipeline_examples_per_s_cached": steady,
        "training_examples_per_s": training,
        "ratio_cached": steady / training,
        "ratio_first_pass": rates[0] / training,
    })


if __name__ == "__main__":
    main()
