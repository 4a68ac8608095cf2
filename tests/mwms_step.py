"""One MultiWorkerMirroredStrategy worker for tests/test_aggregation.py (run with TF_CONFIG set).

Builds the network three times from one seed, takes one training step with
the embedding gradient gathered (sparse), one with it all-reduced densely
and one with it all-reduced densely in bfloat16, and writes both models' weights and the collective ops each step's graph
holds to ``OUT`` (an .npz).

    TF_CONFIG=... python tests/mwms_step.py OUT
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tensorflow as tf
import tf_keras as keras

from imdb_dist.config import ModelConfig
from imdb_dist.model import build_model, compile_model

VOCAB = 300
CFG = ModelConfig(embedding_dim=16, conv_filters=4, kernel_size=3, pool_size=2, lstm_units=4, dropout=0.0)
PER_WORKER = 8
LENGTH = 40


def _collective_ops(graph: tf.Graph) -> list[str]:
    """Op types starting with ``Collective`` in ``graph`` and every function it calls, ``OP:DTYPE``."""
    graph_def = graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    return sorted({f"{node.op}:{tf.as_dtype(node.attr['T'].type).name}"
                   for node in nodes if node.op.startswith("Collective") and "T" in node.attr})


def main(out: str) -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    rng = np.random.default_rng(100 + index)  # each worker its own batch; tokens repeat within and across workers
    x = rng.integers(2, 60, size=(PER_WORKER, LENGTH), dtype=np.int64)
    y = (np.arange(PER_WORKER) % 2).astype(np.float32)
    results: dict[str, np.ndarray] = {}
    initial = None
    for method in ("sparse", "dense", "dense-bfloat16"):
        keras.utils.set_random_seed(7)
        with strategy.scope():
            model = build_model(CFG, VOCAB)
            compile_model(model, 1e-3, dense_sparse_gradients=method != "sparse",
                          transport="bfloat16" if method == "dense-bfloat16" else "float32")
        if initial is None:
            initial = model.get_weights()
        model.set_weights(initial)
        data = strategy.distribute_datasets_from_function(lambda _: tf.data.Dataset.from_tensors((x, y)))
        step = tf.function(lambda iterator, m=model: strategy.run(m.train_step, args=(next(iterator),)))
        iterator = iter(data)
        ops = _collective_ops(step.get_concrete_function(iterator).graph)
        step(iterator)
        for i, weight in enumerate(model.get_weights()):
            results[f"{method}/{i}"] = weight
        results[f"{method}/ops"] = np.array(ops)
    for i, weight in enumerate(initial):
        results[f"initial/{i}"] = weight
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
