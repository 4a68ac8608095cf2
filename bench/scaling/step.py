"""``step``: what a distributed step spends and sends, two MultiWorkerMirrored workers on loopback.

Two MultiWorkerMirrored worker processes on loopback (no Ray), one
thread pool thread each as a 1-CPU Ray worker gets, running the real
network on real reviews (each worker's blocks of the global plan's first
batches) at a fixed batch shape. Per worker it times the distributed step
(fed as the training loop feeds it) with each route, the same step without
any collective (a model outside the strategy: compute), and the collectives
alone on tensors of the gradients' shapes; it counts the bytes crossing
loopback per step (``/proc/net/dev``), and from the measured sizes (the
embedding rows a replica's block really has at ``--max-len``, padded to its
bucketed global batch's width) tabulates each route's traffic per replica
and step at 8, 16 and 64 replicas.

    python -m bench.scaling step --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --output docs/bench-results/scaling-step.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.baseline import REPO
from bench.harness import median
from bench.machine import free_port
from bench.scaling import MAX_LEN, PER_WORKER_BATCH, VOCAB, add_worker


def add_parser(sub: Any) -> None:
    """The ``step`` subcommand's flags, and its hidden ``step-worker`` (one of the two processes)."""
    st = sub.add_parser("step", help="a distributed step's time and bytes, two workers on loopback")
    harness.add_data(st)
    st.add_argument("--max-len", type=int, default=MAX_LEN)
    st.add_argument("--batch", type=int, default=PER_WORKER_BATCH, help="per-worker batch")
    st.add_argument("--length", type=int, default=0, help="batch width (default: the mean bucketed width)")
    st.add_argument("--batches", type=int, default=4, help="distinct batches per worker, cycled")
    st.add_argument("--steps", type=int, default=5, help="timed steps per round and call")
    harness.add_rounds(st, default=4)
    harness.add_output(st)
    st.set_defaults(run=step)
    add_worker(sub, "step-worker", step_worker)


def _loopback_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def _prepare_batches(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Tokenize the real reviews; save each worker's blocks at the typical bucketed width; measure the widths."""
    import numpy as np

    from imdb_dist.config import DataConfig, ModelConfig
    from imdb_dist.data import pipeline, plan
    from imdb_dist.data.sources import load_reviews
    from imdb_dist.model import min_length

    cfg = DataConfig(source="aclimdb", path=args.data, max_len=args.max_len, vocab_size=VOCAB)
    train = load_reviews(cfg, "train")
    tokenizer = pipeline.fit_tokenizer(train.texts, VOCAB)
    import tensorflow as tf

    encoded = pipeline.encode_examples(
        tf.data.Dataset.from_tensor_slices((train.texts, train.labels)), tokenizer, args.max_len
    )

    bucket_width = cfg.bucket_width if cfg.bucketing and cfg.bucket_width < args.max_len else None  # as trained

    def global_plan(workers: int) -> plan.GlobalPlan:
        # The run's plan (bucketed, as imdb-dist trains) for `workers` workers of one replica each.
        return plan.GlobalPlan(encoded.lengths, batch_size=args.batch * workers, seed=cfg.seed, max_len=args.max_len,
                               min_len=min_length(ModelConfig()), bucket_width=bucket_width)

    # The widths the two workers' replicas really pad to: every block of a step is as wide as its global batch.
    two, one = global_plan(2), global_plan(1)
    batches = two.batches(0)
    widths = two.widths(batches)
    rows = args.batch * widths  # embedding rows per replica and step
    # A synchronous step waits for its widest block. The global plan pads every block of a step to its global
    # batch's width, so the blocks no longer differ in width (the old per-worker plans' shared vs independent
    # order is gone); what is left to measure: the 2-worker step's width over a lone worker's batch of the same
    # per-worker size (a global batch twice as large spans more of a length-sorted pool), and each worker's
    # block's own width (its longest review, rounded) over the step's, the padding the common width adds.
    shares = [plan.Share(2, 2, worker) for worker in range(2)]
    own = np.stack([two.widths(batches[:, share.rows(two.batch_size)]) for share in shares])
    mean_width = float(np.mean(widths))
    length = args.length or round(mean_width)  # the mean step's width
    if two.steps_per_epoch < args.batches:
        raise ValueError(f"{len(encoded)} reviews make {two.steps_per_epoch} global batches of {two.batch_size}, "
                         f"fewer than --batches {args.batches}")
    arrays: dict[str, Any] = {}
    for worker, share in enumerate(shares):
        # This worker's blocks of the plan's first global batches, at the fixed width the step is timed at.
        index, _ = plan.worker_batches(two, share, epochs=1)
        tokens, labels = encoded.gather(index[: args.batches].reshape(-1))
        dense = tokens.to_tensor(default_value=0, shape=[None, length])
        arrays[f"x{worker}"] = pipeline.pre_pad(dense).numpy().reshape(args.batches, args.batch, length)
        arrays[f"y{worker}"] = labels.numpy().reshape(args.batches, args.batch)
    np.savez(path, vocab=tokenizer.vocabulary_size(), **arrays)
    return {
        "length": length,
        "vocab": tokenizer.vocabulary_size(),
        "bucketed_width_mean": mean_width,
        "bucketed_width_median": float(np.median(widths)),
        "embedding_rows_per_step_mean": float(np.mean(rows)),
        "embedding_rows_per_step_max": int(np.max(rows)),
        "widest_over_mean_width": {
            "two_workers_over_one": mean_width / float(np.mean(one.widths(one.batches(0)))),
            "step_over_own_block": mean_width / float(np.mean(own)),
        },
    }


def step_worker(index: int, batches_path: str, out: str, steps: int, rounds: int) -> None:
    """One of the two workers (TF_CONFIG set by :func:`step`): timings and loopback bytes to ``out``."""
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    from imdb_dist.distribute import size_thread_pools

    size_thread_pools(1)  # as a Ray worker given {CPU: 1}
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from imdb_dist.config import ModelConfig
    from imdb_dist.dropout import key_on_step
    from imdb_dist.loop import build_optimizer, make_train_function
    from imdb_dist.model import build_model, compile_model

    arrays = np.load(batches_path)
    vocab = int(arrays["vocab"])
    x, y = arrays[f"x{index}"], arrays[f"y{index}"].astype("float32")
    cfg = ModelConfig()

    def model(dense: bool, distributed: bool) -> keras.Model:
        keras.utils.set_random_seed(1)
        scope = strategy.scope() if distributed else tf.distribute.get_strategy().scope()
        with scope:
            built = build_model(cfg, vocab)
            compile_model(built, 1e-3, dense_sparse_gradients=dense)
        key_on_step(built, built.optimizer.iterations, 1)
        return built

    def batches() -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((x, y)).repeat()

    def distributed_step(dense: bool):
        # As the training loop feeds it: a plain iterator over this worker's blocks, split per replica in the step.
        m = model(dense, True)
        build_optimizer(m)
        iterator = iter(batches())
        train = make_train_function(m)
        return lambda: float(train(iterator, 1)["loss"])

    def local_step():
        m = model(False, False)
        iterator = iter(batches())
        step = tf.function(lambda: m.train_step(next(iterator)))
        return lambda: float(step()["loss"])

    shapes = [v.shape for v in model(False, False).trainable_variables]
    rows = x.shape[1] * x.shape[2]

    def collectives(dense: bool):
        def exchange() -> tf.Tensor:
            grads: list[Any] = []
            for shape in shapes:
                if shape[0] == vocab and not dense:  # the embedding, as its gradient arrives: one row per token
                    indices = tf.range(rows, dtype=tf.int64) % vocab
                    dense_shape = tf.constant(shape.as_list(), tf.int64)
                    grads.append(tf.IndexedSlices(tf.ones([rows, shape[1]]), indices, dense_shape))
                else:
                    grads.append(tf.ones(shape))
            reduced = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
            first = [g.values if isinstance(g, tf.IndexedSlices) else g for g in reduced]
            return tf.add_n([tf.reshape(g, [-1])[0] for g in first])

        run = tf.function(lambda: strategy.run(exchange))
        return lambda: float(strategy.experimental_local_results(run())[0])

    calls = {
        "step_sparse": distributed_step(False),
        "step_dense": distributed_step(True),
        "compute": local_step(),
        "collective_sparse": collectives(False),
        "collective_dense": collectives(True),
    }
    for call in calls.values():  # trace and warm up
        for _ in range(3):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    sent: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            before = _loopback_tx_bytes()
            for _ in range(steps):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
            # Both workers' sends cross loopback once: half is this worker's share.
            sent[name].append((_loopback_tx_bytes() - before) / steps / 2)
    result = {
        "ms": {name: 1000 * median(values) for name, values in times.items()},
        "loopback_bytes_per_step_per_worker": {name: median(values) for name, values in sent.items()},
        "other_variables_floats": int(sum(np.prod(s) for s in shapes if s[0] != vocab)),
        "embedding_dim": int(shapes[0][1]),
    }
    Path(out).write_text(json.dumps(result))


def step(args: argparse.Namespace) -> dict[str, Any]:
    from imdb_dist import aggregation

    with tempfile.TemporaryDirectory(prefix="bench-scaling-step-") as scratch:
        batches = Path(scratch) / "batches.npz"
        sizes = _prepare_batches(args, batches)
        print("sizes", sizes, file=sys.stderr, flush=True)
        workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        procs = []
        for index in range(2):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONPATH": str(REPO),
                   "TF_CPP_MIN_LOG_LEVEL": "2"}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.scaling", "step-worker", json.dumps({
                    "index": index, "batches_path": str(batches), "out": str(Path(scratch) / f"worker{index}.json"),
                    "steps": args.steps, "rounds": args.rounds})],
                cwd=REPO, env=env,
            ))
        for proc in procs:
            if proc.wait():
                raise RuntimeError(f"a step worker failed ({proc.returncode})")
        results = [json.loads((Path(scratch) / f"worker{i}.json").read_text()) for i in range(2)]
    dim, other = results[0]["embedding_dim"], results[0]["other_variables_floats"]
    # From the measured sizes: the embedding rows of a mean bucketed batch per replica, the other
    # variables all-reduced densely by both routes.
    rows = sizes["embedding_rows_per_step_mean"]
    table = []
    for replicas in (2, 8, 16, 64):
        others = 2 * (replicas - 1) * other * 4 / replicas
        table.append({
            "replicas": replicas,
            "sparse_sent_mb": (aggregation.gathered_bytes(int(rows), dim, replicas) + others) / 1e6,
            "sparse_rows_to_update": int(rows * replicas),
            "dense_sent_mb": (aggregation.reduced_bytes(sizes["vocab"], dim, replicas) + others) / 1e6,
        })
    ms = {name: median([r["ms"][name] for r in results]) for name in results[0]["ms"]}
    sent = {name: median([r["loopback_bytes_per_step_per_worker"][name] for r in results])
            for name in results[0]["ms"]}
    return {
        "benchmark": "scaling-step",
        "per_worker_batch": args.batch,
        "max_len": args.max_len,
        "sizes": sizes,
        "ms_per_step": ms,
        "collective_share": {
            route: ms[f"collective_{route}"] / ms[f"step_{route}"] for route in ("sparse", "dense")
        },
        "step_over_compute": {route: ms[f"step_{route}"] / ms["compute"] for route in ("sparse", "dense")},
        "loopback_mb_per_step_per_worker": {name: value / 1e6 for name, value in sent.items()},
        "traffic_per_replica_and_step": table,
        "workers": results,
    }
