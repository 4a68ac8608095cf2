"""The embedding gradient all-reduced densely: same step as gathering its rows, loss scaling intact.

The dense route must change nothing but float summation order: one step of
each route from the same weights and batches gives the same weights to
1e-6, under MirroredStrategy (two logical CPUs, conftest) and under
MultiWorkerMirroredStrategy with two real worker processes on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from conftest import REPO
from test_job_submit import free_port

from imdb_dist import aggregation
from imdb_dist.config import ModelConfig
from imdb_dist.distribute import precision_policy
from imdb_dist.model import build_model, compile_model

VOCAB = 60
CFG = ModelConfig(embedding_dim=8, conv_filters=4, kernel_size=3, pool_size=2, lstm_units=4, dropout=0.0)
MIRRORED_DEVICES = ["/cpu:0", "/cpu:1"]


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------- the decision


def test_byte_counts_follow_the_ring_formulas():
    # 2 replicas gathering 10 rows of 4 floats (+ an int64 index): each sends its 10 rows once.
    assert aggregation.gathered_bytes(10, 4, 2) == 10 * (4 * 4 + 8)
    # and grows with the replica count; the dense all-reduce approaches two tables per replica.
    assert aggregation.gathered_bytes(10, 4, 64) == 63 * 10 * (4 * 4 + 8)
    assert aggregation.reduced_bytes(100, 4, 2) == 100 * 4 * 4
    assert aggregation.reduced_bytes(100, 4, 64) == 2 * 63 * 100 * 4 * 4 // 64
    assert aggregation.gathered_bytes(10, 4, 1) == aggregation.reduced_bytes(100, 4, 1) == 0


def test_auto_goes_dense_only_with_several_replicas_and_fewer_bytes():
    # The scale-out benchmark's shape: 256 reviews x 400 tokens per replica, a 20,000 x 128 table.
    full = {"rows": 256 * 400, "vocab": 20_000, "dim": 128}
    assert aggregation.dense_embedding_gradient("auto", replicas=2, **full)
    assert not aggregation.dense_embedding_gradient("auto", replicas=1, **full)  # nothing to reduce
    # A huge vocabulary and short batches: gathering the few rows is cheaper.
    assert not aggregation.dense_embedding_gradient("auto", replicas=2, rows=8 * 50, vocab=1_000_000, dim=128)
    assert aggregation.dense_embedding_gradient("dense", replicas=1, **full)
    assert not aggregation.dense_embedding_gradient("sparse", replicas=64, **full)


def test_densify_sums_repeated_rows_like_tensorflows_own_conversion():
    variable = tf.Variable(tf.zeros([6, 3]))
    slices = tf.IndexedSlices(
        values=tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3)),
        indices=tf.constant([4, 1, 4, 0], tf.int64),
        dense_shape=tf.constant([6, 3], tf.int64),
    )
    dense = aggregation.densify(slices, variable)
    assert dense.shape == (6, 3)
    np.testing.assert_array_equal(dense.numpy(), tf.convert_to_tensor(slices).numpy())
    plain = tf.ones([6, 3])
    assert aggregation.densify(plain, variable) is plain
    assert aggregation.densify(None, variable) is None


# --------------------------------------------------------------------------- MirroredStrategy, in process


def _batch(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Few distinct ids: rows repeat within and across replicas, so deduplication matters.
    return rng.integers(2, 20, size=(n, length), dtype=np.int64), (np.arange(n) % 2).astype(np.float32)


def _one_step(strategy, precision: str, dense: bool, initial, x, y):
    keras.utils.set_random_seed(3)
    with strategy.scope(), precision_policy(precision):
        model = build_model(CFG, VOCAB)
        compile_model(model, 1e-3, dense_sparse_gradients=dense)
    if initial is not None:
        model.set_weights(initial)
    model.train_on_batch(x, y)
    return model


@pytest.mark.parametrize("transport", ["float32", "bfloat16"])
def test_the_dense_embedding_gradient_travels_in_its_transport_and_reaches_adam_as_float32(transport):
    strategy = tf.distribute.MirroredStrategy(MIRRORED_DEVICES)
    with strategy.scope():
        model = build_model(CFG, VOCAB)
        compile_model(model, 1e-3, dense_sparse_gradients=True, transport=transport)
    embedding = model.get_layer("embedding").embeddings
    fine = 1 + 2**-10  # a float32 that bfloat16 (8 significant bits) rounds to 1

    def aggregate() -> list[tf.Tensor]:
        grads_and_vars = [
            (tf.IndexedSlices(tf.fill([1, CFG.embedding_dim], fine), tf.constant([3], tf.int64),
                              tf.constant([VOCAB, CFG.embedding_dim], tf.int64))
             if variable is embedding else tf.fill(variable.shape, fine), variable)
            for variable in model.trainable_variables
        ]
        return [grad for grad, _ in model.optimizer.aggregate_gradients(grads_and_vars)]

    reduced = tf.function(lambda: strategy.run(aggregate))()
    for variable, grad in zip(model.trainable_variables, reduced):
        value = strategy.experimental_local_results(grad)[1]  # the second replica's copy of the sum
        assert value.dtype == tf.float32
        if variable is embedding:
            row = 2.0 if transport == "bfloat16" else 2 * fine  # two replicas' rows summed
            np.testing.assert_array_equal(value.numpy()[3], np.full(CFG.embedding_dim, row, np.float32))
            assert not np.any(np.delete(value.numpy(), 3, axis=0))
        else:  # the other gradients travel as they are
            np.testing.assert_array_equal(value.numpy(), np.full(variable.shape, 2 * fine, np.float32))


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_mirrored_one_step_dense_equals_sparse(precision):
    strategy = tf.distribute.MirroredStrategy(MIRRORED_DEVICES)
    x, y = _batch(n=8, length=30, seed=1)
    keras.utils.set_random_seed(3)
    with strategy.scope():
        initial = build_model(CFG, VOCAB).get_weights()
    sparse = _one_step(strategy, precision, False, initial, x, y)
    dense = _one_step(strategy, precision, True, initial, x, y)
    if precision == "mixed_float16":
        assert isinstance(dense.optimizer, keras.mixed_precision.LossScaleOptimizer)
        assert isinstance(dense.optimizer.inner_optimizer, aggregation.Adam)
        assert dense.optimizer.inner_optimizer.dense_sparse_gradients
    moved = False
    for before, a, b in zip(initial, sparse.get_weights(), dense.get_weights()):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
        moved |= not np.allclose(a, before)
    assert moved
    assert int(dense.optimizer.iterations.numpy()) == 1


@pytest.mark.parametrize("dense", [False, True])
def test_mirrored_mixed_float16_one_replicas_overflow_skips_the_step_on_every_replica(dense):
    """Loss scaling intact: a non-finite gradient on one replica reaches all; all skip; the scale halves."""
    strategy = tf.distribute.MirroredStrategy(MIRRORED_DEVICES)
    keras.utils.set_random_seed(3)
    with strategy.scope(), precision_policy("mixed_float16"):
        model = build_model(CFG, VOCAB)
        compile_model(model, 1e-3, dense_sparse_gradients=dense)
    optimizer = model.optimizer
    embedding = model.get_layer("embedding").embeddings
    before = embedding.numpy()
    scale = float(optimizer.loss_scale.numpy())

    def apply() -> None:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        value = tf.where(tf.equal(replica, 1), np.inf, 1.0)  # only the second replica overflows
        grads = [
            tf.IndexedSlices(tf.fill([3, CFG.embedding_dim], value), tf.constant([1, 2, 2], tf.int64),
                             tf.constant([VOCAB, CFG.embedding_dim], tf.int64))
            if variable is embedding else tf.zeros_like(variable)
            for variable in model.trainable_variables
        ]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    tf.function(lambda: strategy.run(apply))()
    for replica_value in strategy.experimental_local_results(embedding):
        np.testing.assert_array_equal(replica_value.numpy(), before)  # no replica applied the step
    assert float(optimizer.loss_scale.numpy()) == scale / 2


# --------------------------------------------------------------------------- MultiWorkerMirrored, two processes


def test_two_workers_one_step_dense_equals_sparse_and_only_dense_avoids_the_gather(tmp_path):
    ports = [free_port(), free_port()]
    workers = [f"127.0.0.1:{port}" for port in ports]
    procs = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}),
            "PYTHONPATH": str(REPO),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "mwms_step.py"), str(tmp_path / f"worker{index}.npz")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    results = [np.load(tmp_path / f"worker{index}.npz") for index in range(2)]
    n = len([key for key in results[0].files if key.startswith("initial/")])
    for result in results:
        moved = False
        for i in range(n):
            np.testing.assert_allclose(result[f"dense/{i}"], result[f"sparse/{i}"], rtol=0, atol=1e-6)
            moved |= not np.allclose(result[f"sparse/{i}"], result[f"initial/{i}"])
        assert moved
        # The sparse step gathers the embedding's rows; the dense one only all-reduces,
        # in bfloat16 (the table) and float32 (the rest) with that transport.
        assert any(op.startswith("CollectiveGatherV2:") for op in result["sparse/ops"].tolist())
        dense, narrow = set(result["dense/ops"].tolist()), set(result["dense-bfloat16/ops"].tolist())
        assert not any(op.startswith("CollectiveGatherV2:") for op in dense | narrow)
        assert "CollectiveReduceV2:float32" in dense & narrow
        assert narrow - dense == {"CollectiveReduceV2:bfloat16"} and not dense - narrow
        for i in range(n):
            # Adam's first step moves a weight by lr * g / (|g| + eps): the rounded
            # gradient changes it only where |g| is near eps (a few in a thousand).
            gap = np.abs(result[f"dense-bfloat16/{i}"] - result[f"dense/{i}"])
            assert gap.max() <= 1e-3 and np.mean(gap > 1e-6) < 0.01
    for i in range(n):  # both workers hold the same model
        np.testing.assert_array_equal(results[0][f"dense/{i}"], results[1][f"dense/{i}"])
