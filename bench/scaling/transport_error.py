"""``transport-error``: the error a bfloat16 all-reduce adds to the embedding gradient.

What the bfloat16 transport of the dense embedding gradient
(``distribution.embedding_transport``) does to the gradient: each of N
replicas' real embedding gradients (the seed's network at its initial
weights, a batch of real reviews each) summed in float32, against the same
gradients rounded to bfloat16 and summed in bfloat16 one replica after
another, as a ring's partial sums are; the relative L2 error of the sum
over the rows some replica touched, and the share of its entries whose
sign flips, for N = 2, 4 and 8.

    python -m bench.scaling transport-error --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --output docs/bench-results/scaling-transport-error.json
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import harness
from bench.machine import cpu_model
from bench.scaling import MAX_LEN, PER_WORKER_BATCH, VOCAB


def add_parser(sub: Any) -> None:
    """The ``transport-error`` subcommand's flags."""
    te = sub.add_parser("transport-error", help="the error a bfloat16 all-reduce adds to the embedding gradient")
    harness.add_data(te)
    te.add_argument("--max-len", type=int, default=MAX_LEN)
    te.add_argument("--batch", type=int, default=PER_WORKER_BATCH, help="per-replica batch")
    te.add_argument("--replicas", default="2,4,8", type=_counts, help="comma-separated replica counts")
    harness.add_output(te)
    te.set_defaults(run=transport_error)


def _counts(value: str) -> list[int]:
    try:
        counts = [int(n) for n in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated whole numbers, not {value!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"replica counts must be at least 1: {value}")
    return counts


def transport_error(args: argparse.Namespace) -> dict[str, Any]:
    """Each count's bfloat16 sum of real per-replica embedding gradients against the float32 one."""
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    from imdb_dist import aggregation
    from imdb_dist.config import DataConfig, ModelConfig
    from imdb_dist.data import pipeline
    from imdb_dist.data.sources import load_reviews
    from imdb_dist.model import build_model, members_crossentropy

    counts = args.replicas
    cfg = DataConfig(source="aclimdb", path=args.data, max_len=args.max_len, vocab_size=VOCAB)
    train = load_reviews(cfg, "train")
    tokenizer = pipeline.fit_tokenizer(train.texts, VOCAB)
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(dropout=0.0), tokenizer.vocabulary_size())
    table = model.get_layer("embedding").embeddings
    order = np.random.default_rng(0).permutation(len(train))
    gradients = []
    for replica in range(max(counts)):
        rows = order[replica * args.batch : (replica + 1) * args.batch]
        tokens = pipeline.encode_padded(tokenizer, tf.constant([train.texts[i] for i in rows]), args.max_len)
        labels = tf.constant(train.labels[rows])
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(members_crossentropy(labels, model(tokens, training=True)))
        gradients.append(aggregation.densify(tape.gradient(loss, table), table))
    results = {}
    for n in counts:
        exact = tf.add_n(gradients[:n])
        narrow = tf.cast(gradients[0], tf.bfloat16)
        for grad in gradients[1:n]:
            narrow = narrow + tf.cast(grad, tf.bfloat16)  # each partial sum rounded, as in the ring
        rounded = tf.cast(narrow, tf.float32).numpy()
        exact = exact.numpy()
        touched = np.any(exact != 0, axis=1)
        e, r = exact[touched], rounded[touched]
        results[str(n)] = {
            "rows_touched": int(touched.sum()),
            "relative_l2_error": float(np.linalg.norm(r - e) / np.linalg.norm(e)),
            "sign_flips_share": float(np.mean(np.sign(r) != np.sign(e))),
        }
    return {
        "benchmark": "scaling-transport-error",
        "cpu": cpu_model(),
        "per_replica_batch": args.batch,
        "max_len": args.max_len,
        "vocab": tokenizer.vocabulary_size(),
        "replicas": results,
    }
