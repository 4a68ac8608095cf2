"""The batch digest (imdb_dist.digest): what changes it and what does not.

It must be the same whichever replicas trained which rows of a step, and
change when any step trained other rows, a row twice, another label, or the
same batches at other steps. The run-level promises (equal across
topologies, across a stop and resume, and for a run that lost steps after its
last checkpoint) are tested with real runs in test_topology, test_resume and
test_multinode.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from imdb_dist.data.plan import replica_rows
from imdb_dist.digest import PRIME, BatchDigest, host_rows_sums, slice_sum


def _batch(seed: int, rows: int = 48, width: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 5000, size=(rows, width)), rng.integers(0, 2, size=rows).astype(np.int32)


def _digest(steps: list[tuple[np.ndarray, np.ndarray]], replicas: int = 1, first_step: int = 0) -> int:
    """The digest of ``steps`` global batches, each split into ``replicas`` equal slices, summed as the reads do."""
    total = 0.0
    for offset, (tokens, labels) in enumerate(steps):
        for part in range(replicas):
            rows = slice(part * len(labels) // replicas, (part + 1) * len(labels) // replicas)
            total += float(slice_sum(tf.constant(tokens[rows]), tf.constant(labels[rows]), first_step + offset))
    return int(total % PRIME)


def test_the_digest_does_not_depend_on_how_the_rows_are_split_or_ordered():
    steps = [_batch(seed) for seed in range(3)]
    one = _digest(steps)
    assert 0 < one < PRIME
    assert _digest(steps, replicas=2) == _digest(steps, replicas=4) == _digest(steps, replicas=3) == one
    order = np.random.default_rng(9).permutation(48)
    shuffled = [(tokens[order], labels[order]) for tokens, labels in steps]
    assert _digest(shuffled, replicas=2) == one


@pytest.mark.parametrize("change", ["token", "label", "row twice", "other row", "steps swapped", "later steps"])
def test_the_digest_changes_when_the_steps_trained_other_data(change):
    steps = [_batch(seed) for seed in range(3)]
    changed = [(tokens.copy(), labels.copy()) for tokens, labels in steps]
    first_step = 0
    if change == "token":
        changed[1][0][5, -1] += 1
    elif change == "label":
        changed[2][1][7] = 1 - changed[2][1][7]
    elif change == "row twice":
        changed[0][0][3], changed[0][1][3] = changed[0][0][4], changed[0][1][4]
    elif change == "other row":
        other_tokens, other_labels = _batch(99, rows=1)
        changed[1][0][0], changed[1][1][0] = other_tokens[0], other_labels[0]
    elif change == "steps swapped":
        changed[0], changed[1] = changed[1], changed[0]
    else:
        first_step = 1  # the same batches, one step later: a skipped step
    assert _digest(changed, replicas=2, first_step=first_step) != _digest(steps, replicas=2)


def test_fold_keeps_the_digest_and_a_fresh_digest_resumes_from_the_folded_value():
    strategy = tf.distribute.get_strategy()
    steps = [_batch(seed) for seed in range(4)]
    folded = tf.Variable(0.0, dtype=tf.float64)
    digest = BatchDigest(strategy, folded)
    for step, (tokens, labels) in enumerate(steps[:2]):
        digest.add(tf.constant(tokens), tf.constant(labels), tf.constant(step, tf.int64))
    before = digest.read()
    digest.fold()
    assert int(folded.numpy()) == before == digest.read()  # folded: nothing left since the checkpoint
    # A resumed run: the checkpoint's folded value, nothing added yet, then the rest of the steps.
    resumed = BatchDigest(strategy, tf.Variable(folded.numpy(), dtype=tf.float64))
    for step, (tokens, labels) in enumerate(steps[2:], start=2):
        resumed.add(tf.constant(tokens), tf.constant(labels), tf.constant(step, tf.int64))
    assert resumed.read() == _digest(steps) != before


def test_a_mirrored_step_hashes_each_slice_on_the_host_and_adds_the_same_digest():
    """The training step's route (imdb_dist.loop): rows hashed from the host's copy, one float64 to each replica.

    Two logical CPUs stand in for two GPUs (tests/conftest.py): every
    fingerprint must run on the worker's CPU:0, none on the replica device
    that holds the slice (on a GPU that would copy the slice back every step),
    and the digest must equal the one each replica hashing its own slice gives.
    """
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    steps = [_batch(seed) for seed in range(3)]
    digest = BatchDigest(strategy, tf.Variable(0.0, dtype=tf.float64))

    @tf.function
    def train_step(tokens: tf.Tensor, labels: tf.Tensor, step: tf.Tensor) -> None:
        def replica_slice(context):
            return tuple(replica_rows(part, context.replica_id_in_sync_group, 2) for part in (tokens, labels))

        sums = host_rows_sums(strategy, replica_slice)
        strategy.run(lambda total: digest.add_rows_sum(total, step), args=(sums,))

    for step, (tokens, labels) in enumerate(steps):
        train_step(tf.constant(tokens), tf.constant(labels), tf.constant(step, tf.int64))
    assert digest.read() == _digest(steps) == _digest(steps, replicas=2)
    graph = train_step.get_concrete_function(
        tf.TensorSpec([None, None], tf.int64), tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int64)
    ).graph
    hashed_on = [op.device for op in graph.get_operations() if op.type == "Fingerprint"]
    assert len(hashed_on) == 2 and all(device.endswith("device:CPU:0") for device in hashed_on), hashed_on
    added_on = {op.device for op in graph.get_operations() if op.type == "AssignVariableOp"}
    assert any(device.endswith("device:CPU:1") for device in added_on), added_on  # on the replica's own device
