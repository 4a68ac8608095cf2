"""One data plan for any topology: workers x local replicas = 1x1, 1x2, 2x1 and 2x2 train the same global batches.

The promise (docs/clusters.md, "One data plan for any topology"): the global batch
of every step is a function of ``(data.seed, epoch, step)`` and the
examples alone; global replica ``k`` trains slice ``k`` of it, padded to
the global batch's width; dropout masks are keyed by the example's place in
the global batch. So one optimizer step from the same weights gives the
same weights on any topology, up to float summation order.

The plan's tests run in process (the plan, the stream and the in-graph
split are the functions the training step uses). The one-step test runs
real ``imdb-dist train`` processes: in one process with two logical CPUs
(MirroredStrategy), and as two TF_CONFIG workers with one or two logical
CPUs each (MultiWorkerMirroredStrategy, the CPU rehearsal of a multi-GPU
worker).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, tiny_overrides, write_aclimdb

from imdb_dist import rundir
from imdb_dist.data import pipeline
from imdb_dist.data.plan import GlobalPlan, Share, replica_rows, stream, worker_batches

TOPOLOGIES = [(1, 1), (1, 2), (2, 1), (2, 2)]  # (workers, local replicas)
IDS = [f"{w}x{r}" for w, r in TOPOLOGIES]


def digest(batch: np.ndarray) -> str:
    """A fingerprint of a global batch's example ids, in order."""
    return hashlib.sha256(np.ascontiguousarray(batch, dtype=np.int64).tobytes()).hexdigest()[:16]


def _plan(n: int = 1003, batch: int = 32, bucket_width: int | None = 8) -> GlobalPlan:
    lengths = np.random.default_rng(5).integers(0, 61, size=n)
    return GlobalPlan(lengths, batch_size=batch, seed=11, max_len=60, min_len=4, bucket_width=bucket_width)


def _encoded(lengths: np.ndarray) -> pipeline.Encoded:
    """Example ``i`` is ``lengths[i]`` tokens ``i+1, i+2, ...`` (distinct per example), label ``i % 2``."""
    rows = [list(range(i + 1, i + 1 + int(n))) for i, n in enumerate(lengths)]
    tokens = tf.ragged.constant(rows, dtype=tf.int64, ragged_rank=1)
    return pipeline.Encoded(tokens, tf.constant(np.arange(len(lengths)) % 2, tf.int32), np.asarray(lengths))


def _global_steps(workers: int, local: int, per_worker: list[np.ndarray]) -> list[np.ndarray]:
    """Reassemble each step's global rows from every worker's blocks, split as the training step splits them."""
    steps = []
    for s in range(len(per_worker[0])):
        parts = [
            replica_rows(tf.constant(per_worker[w][s]), j, local).numpy() for w in range(workers) for j in range(local)
        ]
        steps.append(np.concatenate(parts))
    return steps


@pytest.mark.parametrize("bucket_width", [8, None], ids=["bucketed", "full-length"])
def test_every_topology_trains_the_same_global_batch_at_every_step(bucket_width):
    plan = _plan(bucket_width=bucket_width)
    want = [digest(batch) for batch in plan.run_batches(epochs=3)]
    assert len(want) == 3 * (1003 // 32) and len(set(want)) == len(want)
    for workers, local in TOPOLOGIES:
        shares = [Share(workers * local, workers, w) for w in range(workers)]
        blocks = [worker_batches(plan, share, epochs=3) for share in shares]
        got = [digest(rows) for rows in _global_steps(workers, local, [index for index, _ in blocks])]
        assert got == want, f"{workers}x{local}"
        for _, widths in blocks:  # every worker pads to the global batch's width
            np.testing.assert_array_equal(widths, plan.widths(plan.run_batches(epochs=3)))


def test_an_epoch_trains_full_global_batches_of_distinct_examples_and_leaves_out_different_ones():
    plan = _plan()
    trained = [set(plan.batches(epoch).ravel().tolist()) for epoch in range(3)]
    assert all(len(t) == (1003 // 32) * 32 for t in trained)  # 31 full batches, no example twice
    left_out = [set(range(1003)) - t for t in trained]
    assert all(len(x) == 1003 % 32 for x in left_out) and left_out[0] != left_out[1]
    # Bucketing groups similar lengths: far less padding than random batches.
    bucketed, plain = plan.batches(0), _plan(bucket_width=None).batches(0)
    spread = [np.mean(plan.lengths[b].max(axis=1) - plan.lengths[b].min(axis=1)) for b in (bucketed, plain)]
    assert spread[0] < spread[1] / 4


def test_the_plan_depends_on_seed_and_epoch_and_a_resume_enters_it_at_its_step():
    plan = _plan()
    np.testing.assert_array_equal(plan.batches(1), _plan().batches(1))
    assert not np.array_equal(plan.batches(1), plan.batches(2))
    whole = plan.run_batches(epochs=3)
    np.testing.assert_array_equal(plan.run_batches(epochs=3, start=(1, 7)), whole[31 + 7 :])
    assert plan.run_batches(epochs=3, start=(3, 0)).shape == (0, 32)


@pytest.mark.parametrize(("workers", "local"), TOPOLOGIES[1:], ids=IDS[1:])
def test_a_replicas_input_is_the_rows_it_would_get_on_one_replica(workers, local):
    # Tokens, not ids: each slice is padded to the global batch's width, so a
    # review's input never depends on which replica trains it.
    plan = _plan(n=203, batch=16)
    encoded = _encoded(plan.lengths)
    alone = list(stream(encoded, plan, Share(1), epochs=2, start=(0, 3)).as_numpy_iterator())
    streams = [
        list(stream(encoded, plan, Share(workers * local, workers, w), epochs=2, start=(0, 3)).as_numpy_iterator())
        for w in range(workers)
    ]
    assert len(alone) == 2 * 12 - 3 and all(len(s) == len(alone) for s in streams)
    for step, (tokens, labels) in enumerate(alone):
        replicas = [
            (replica_rows(tf.constant(streams[w][step][0]), j, local).numpy(),
             replica_rows(tf.constant(streams[w][step][1]), j, local).numpy())
            for w in range(workers)
            for j in range(local)
        ]
        assert all(len(x) == 16 // (workers * local) for x, _ in replicas)  # every replica, every step: full
        np.testing.assert_array_equal(np.concatenate([x for x, _ in replicas]), tokens)
        np.testing.assert_array_equal(np.concatenate([y for _, y in replicas]), labels)
        assert tokens.shape[1] == plan.widths(plan.run_batches(2, (0, 3))[step : step + 1])[0]
        assert (tokens[:, -1] != 0).sum() == (plan.lengths[plan.run_batches(2, (0, 3))[step]] > 0).sum()  # pre-padded


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _train(sets: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    # Output to a file, not a pipe: a pipe read only after another worker
    # ends can fill and stall this one (its collective peers then time out).
    args = [arg for item in sets for arg in ("--set", item)]
    with log.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "imdb_dist.cli", "train", *args],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


def _one_step(data: Path, out: Path, workers: int, local: int, *extra: str) -> dict:
    """One optimizer step on ``workers`` x ``local`` replicas; the chief's report."""
    sets = [
        *tiny_overrides(data, out),
        "train.epochs=1",
        "train.batch_size=160",  # all 160 training reviews: the epoch is one step
        "train.deterministic=true",
        "model.dropout=0.25",
        *extra,
    ]
    if local > 1:
        sets.append(f"distribution.cpu_devices={local}")
    logs = [out.parent / f"{out.name}-worker{w}.log" for w in range(workers)]
    if workers == 1:
        procs = [_train(sets, logs[0])]
    else:
        cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(workers)]}
        procs = [
            _train(
                [*sets, "distribution.strategy=multi_worker"],
                logs[w],
                {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": w}})},
            )
            for w in range(workers)
        ]
    codes = [proc.wait(timeout=300) for proc in procs]
    assert codes == [0] * workers, "\n".join(f"worker {w}: ...{log.read_text()[-2500:]}" for w, log in enumerate(logs))
    return json.loads((out / rundir.REPORT).read_text())


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / rundir.MODEL / "1" / "variables" / "variables"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k.startswith("network_variables/")}


@pytest.mark.timeout(400)
def test_one_step_from_the_same_weights_gives_the_same_weights_on_every_topology(tmp_path: Path):
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    runs, digests = {}, set()
    for workers, local in TOPOLOGIES:
        out = tmp_path / f"{workers}x{local}"
        report = _one_step(data, out, workers, local)
        assert (report["workers"], report["replicas"], report["optimizer_steps"]) == (workers, workers * local, 1)
        runs[workers, local] = _weights(out)
        digests.add(report["batches_digest"])
    reference = runs[1, 1]
    for (workers, local), weights in runs.items():
        assert weights.keys() == reference.keys() and len(reference) >= 5
        for key in reference:
            np.testing.assert_allclose(
                weights[key], reference[key], rtol=0, atol=1e-6, err_msg=f"{workers}x{local} {key}"
            )
    # The tolerance tells batches apart: another data.seed (which also draws
    # the validation split, so the step trains other reviews, in another order
    # and under other dropout masks) moves the weights far more than 1e-6.
    reordered_report = _one_step(data, tmp_path / "reordered", 1, 1, "data.seed=12")
    reordered = _weights(tmp_path / "reordered")
    assert max(float(np.max(np.abs(reordered[k] - reference[k]))) for k in reference) > 1e-4
    # Every topology's replicas together trained the same rows at the step
    # (imdb_dist.digest), and the digest tells the other seed's batch apart.
    assert len(digests) == 1 and reordered_report["batches_digest"] not in digests
