"""Scale-out: weak scaling under Ray Train, and what a distributed step spends and sends.

``weak``: ``imdb-dist launch`` as users run it (a fresh process and local Ray
cluster per run, the real data), 1 worker x 1 CPU against 2 workers x 1 CPU
at the same per-worker batch, the variants interleaved round by round so
machine noise hits them alike. The steady state is the chief's
``examples_per_s`` in the last epoch (epoch 1 holds the cold start);
efficiency is ``2-worker / (2 x 1-worker)``, and ``2-worker / pair`` is the
distributed job against two independent ones. Variants:

- ``1``: this tree, one worker (one replica: nothing to reduce);
- ``pair``: two such 1-worker jobs at once, each its own Ray cluster, their
  examples/s summed: what this machine gives two 1-CPU processes that never
  communicate (shared caches, memory bandwidth, the host's vCPU scheduling);
- ``2-sparse``, ``2-dense``: this tree, two workers, the embedding gradient
  gathered / all-reduced densely (``distribution.embedding_gradient``);
- ``2-bf16``: two workers, the dense all-reduce in bfloat16
  (``distribution.embedding_transport``: half the bytes);
- ``base-1``, ``base-2``: the tree at ``--baseline`` (a git revision).

    python -m bench.scaling weak --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --rounds 3 --baseline 66580ba --output docs/bench-results/scaling-weak.json

``step``: two MultiWorkerMirrored worker processes on loopback (no Ray), one
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

``transport-error``: what the bfloat16 transport of the dense embedding
gradient (``distribution.embedding_transport``) does to the gradient: each
of N replicas' real embedding gradients (the seed's network at its initial
weights, a batch of real reviews each) summed in float32, against the same
gradients rounded to bfloat16 and summed in bfloat16 one replica after
another, as a ring's partial sums are; the relative L2 error of the sum
over the rows some replica touched, and the share of its entries whose
sign flips, for N = 2, 4 and 8.

    python -m bench.scaling transport-error --data ../shared/data/imdb/aclImdb_train.tar.gz \
        --output docs/bench-results/scaling-transport-error.json

``threads``: the ceiling this machine puts on any scale-out, and the pool
sizes for a 1-CPU worker: the network's training step (no communication,
random ids, 256 x ``--length``) in one process alone, then in two processes
at once, for each (intra, inter) pool setting.

    python -m bench.scaling threads --output docs/bench-results/scaling-threads.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.baseline import REPO, worktree
from bench.timing import emit, median
from bench.topology import cpu_model

PER_WORKER_BATCH = 256
MAX_LEN = 400
VOCAB = 20_000


# --------------------------------------------------------------------------- weak scaling under Ray


def _start(
    args: argparse.Namespace, tree: Path, data: str, out: Path, workers: int, extra: list[str]
) -> subprocess.Popen[str]:
    sets = [
        f"data.path={data}",
        f"data.max_len={args.max_len}",
        f"data.vocab_size={VOCAB}",
        f"train.batch_size={args.batch * workers}",
        f"train.epochs={args.epochs}",
        f"ray.num_workers={workers}",
        "ray.resources_per_worker={CPU: 1}",
        "ray.max_failures=0",
        f"ray.storage_path={out}",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}  # this tree's imdb_dist, in the driver and the workers
    return subprocess.Popen(
        [sys.executable, "-m", "imdb_dist.cli", "launch", "--config", str(tree / "job/configs/ray-local.yaml"),
         *[arg for item in sets for arg in ("--set", item)]],
        cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen[str], out: Path, started: float) -> dict[str, Any]:
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"launch failed ({proc.returncode}):\n{stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "ray-local" / "metrics.jsonl").read_text().splitlines()]
    threads = sorted({m.group(1) for m in re.finditer(r'"tf_threads": (\w+)', stdout + stderr)})
    # The route each worker logged: "sparse (gathered rows)" or "dense, in bfloat16," (imdb_dist.train).
    routes = sorted({m.group(1) for m in re.finditer(r"embedding gradient: (sparse|dense, in \w+)", stdout + stderr)})
    return {
        "steady_examples_per_s": records[-1]["examples_per_s"],
        "first_epoch_examples_per_s": records[0]["examples_per_s"],
        "wall_s": time.perf_counter() - started,
        "val_accuracy": records[-1]["val_accuracy"],
        "tf_threads": threads,
        "embedding_gradient": routes,
    }


def _launch(
    args: argparse.Namespace, tree: Path, data: str, out: Path, workers: int, extra: list[str], *, jobs: int = 1
) -> dict[str, Any]:
    """``jobs`` identical ``imdb-dist launch`` runs at once (each its own local Ray cluster); their sum."""
    started = time.perf_counter()
    procs = [(_start(args, tree, data, out / f"job{j}", workers, extra), out / f"job{j}") for j in range(jobs)]
    runs = [_finish(proc, where, started) for proc, where in procs]
    if jobs == 1:
        return runs[0]
    total = {key: sum(r[key] for r in runs) for key in ("steady_examples_per_s", "first_epoch_examples_per_s")}
    return {**total, "wall_s": max(r["wall_s"] for r in runs), "val_accuracy": runs[0]["val_accuracy"],
            "tf_threads": runs[0]["tf_threads"], "jobs": runs}


def weak(args: argparse.Namespace) -> dict[str, Any]:
    data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch, contextlib.ExitStack() as stack:
        base = Path(scratch) / "baseline"
        wanted = args.variants.split(",")
        if any(name.startswith("base-") for name in wanted):
            stack.enter_context(worktree(args.baseline, base))
        known = {
            "1": (REPO, 1, [], 1),
            "pair": (REPO, 1, [], 2),
            "2-sparse": (REPO, 2, ["distribution.embedding_gradient=sparse"], 1),
            "2-dense": (REPO, 2, ["distribution.embedding_gradient=dense"], 1),
            "2-bf16": (
                REPO, 2, ["distribution.embedding_gradient=dense", "distribution.embedding_transport=bfloat16"], 1
            ),
            "base-1": (base, 1, [], 1),
            "base-2": (base, 2, [], 1),
        }
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in wanted}
        for round_ in range(args.rounds):
            for name in wanted:
                tree, workers, extra, jobs = known[name]
                out = Path(scratch) / f"{name}-{round_}"
                results[name].append(_launch(args, tree, data, out, workers, extra, jobs=jobs))
                print(name, round_, results[name][-1], file=sys.stderr, flush=True)
    numeric = ("steady_examples_per_s", "first_epoch_examples_per_s", "wall_s", "val_accuracy")
    summary: dict[str, Any] = {
        "benchmark": "scaling-weak",
        "per_worker_batch": args.batch,
        "max_len": args.max_len,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),  # absolute rates depend on it (AVX2 vs AVX-512 bf16 ran 2.5x apart)
        "median": {name: {key: median([r[key] for r in runs]) for key in numeric} for name, runs in results.items()},
        "runs": results,
    }
    steady = {name: values["steady_examples_per_s"] for name, values in summary["median"].items()}
    for two, one in (("2-sparse", "1"), ("2-dense", "1"), ("2-bf16", "1"), ("base-2", "base-1")):
        if two in steady and one in steady:
            summary[f"efficiency_{two}"] = steady[two] / (2 * steady[one])
    if "pair" in steady and "1" in steady:
        # What this machine gives two 1-CPU processes that never communicate.
        summary["pair_over_1"] = steady["pair"] / steady["1"]
    if "pair" in steady:
        for two in ("2-sparse", "2-dense", "2-bf16"):
            if two in steady:
                summary[f"{two}_over_pair"] = steady[two] / steady["pair"]
    return summary


# --------------------------------------------------------------------------- one step, two workers


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


def step_worker(args: argparse.Namespace) -> None:
    """One of the two workers (TF_CONFIG set by :func:`step`): timings and loopback bytes to ``--out``."""
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

    arrays = np.load(args.batches)
    vocab = int(arrays["vocab"])
    x, y = arrays[f"x{args.index}"], arrays[f"y{args.index}"].astype("float32")
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
    for _ in range(args.rounds):
        for name, call in calls.items():
            before = _loopback_tx_bytes()
            for _ in range(args.steps):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
            # Both workers' sends cross loopback once: half is this worker's share.
            sent[name].append((_loopback_tx_bytes() - before) / args.steps / 2)
    result = {
        "ms": {name: 1000 * median(values) for name, values in times.items()},
        "loopback_bytes_per_step_per_worker": {name: median(values) for name, values in sent.items()},
        "other_variables_floats": int(sum(np.prod(s) for s in shapes if s[0] != vocab)),
        "embedding_dim": int(shapes[0][1]),
    }
    Path(args.out).write_text(json.dumps(result))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step(args: argparse.Namespace) -> dict[str, Any]:
    from imdb_dist import aggregation

    with tempfile.TemporaryDirectory(prefix="bench-scaling-step-") as scratch:
        batches = Path(scratch) / "batches.npz"
        sizes = _prepare_batches(args, batches)
        print("sizes", sizes, file=sys.stderr, flush=True)
        workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
        procs = []
        for index in range(2):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONPATH": str(REPO),
                   "TF_CPP_MIN_LOG_LEVEL": "2"}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.scaling", "step-worker", "--index", str(index),
                 "--batches", str(batches), "--out", str(Path(scratch) / f"worker{index}.json"),
                 "--steps", str(args.steps), "--rounds", str(args.rounds)],
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


# --------------------------------------------------------------------------- thread pools, no communication


def transport_error(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    from imdb_dist import aggregation
    from imdb_dist.config import DataConfig, ModelConfig
    from imdb_dist.data import pipeline
    from imdb_dist.data.sources import load_reviews
    from imdb_dist.model import build_model, members_crossentropy

    counts = [int(n) for n in args.replicas.split(",")]
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


def threads_worker(args: argparse.Namespace) -> None:
    """Time the network's training step (default strategy) with the given pool sizes; print examples/s."""
    import tensorflow as tf

    if args.intra:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    import numpy as np

    from imdb_dist.config import ModelConfig
    from imdb_dist.dropout import key_on_step
    from imdb_dist.model import build_model, compile_model

    model = build_model(ModelConfig(), VOCAB)
    compile_model(model, 1e-3)
    key_on_step(model, model.optimizer.iterations, 1)
    rng = np.random.default_rng(0)
    x = rng.integers(2, VOCAB, size=(args.batch, args.length))
    y = rng.integers(0, 2, size=(args.batch,)).astype("float32")
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    step = tf.function(lambda: model.train_step(next(iterator)))
    for _ in range(3):
        step()
    times = []
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        float(step()["loss"])
        times.append(time.perf_counter() - start)
    print(json.dumps({"examples_per_s": args.batch / median(times), "steps": len(times)}))


def threads(args: argparse.Namespace) -> dict[str, Any]:
    """Each pool setting: one process alone, then two at once (no communication: the machine's ceiling)."""

    def start(intra: int, inter: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.scaling", "threads-worker", "--intra", str(intra), "--inter", str(inter),
             "--length", str(args.length), "--seconds", str(args.seconds), "--batch", str(args.batch)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"},
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )

    def rate(proc: subprocess.Popen) -> float:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"threads-worker failed ({proc.returncode})")
        return json.loads(out.strip().splitlines()[-1])["examples_per_s"]

    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for setting in args.settings.split():
            intra, inter = (int(v) for v in setting.split(","))
            alone = rate(start(intra, inter))
            pair = [start(intra, inter), start(intra, inter)]
            together = sum(rate(proc) for proc in pair)
            entry = runs.setdefault(setting, {"alone": [], "two_processes_total": []})
            entry["alone"].append(alone)
            entry["two_processes_total"].append(together)
            print(setting, alone, together, file=sys.stderr, flush=True)
    medians = {setting: {key: median(values) for key, values in entry.items()} for setting, entry in runs.items()}
    for entry in medians.values():
        entry["two_over_one"] = entry["two_processes_total"] / entry["alone"]
    return {
        "benchmark": "scaling-threads",
        "per_worker_batch": args.batch,
        "length": args.length,
        "note": "settings are intra,inter; 0 = TensorFlow's default (one thread per core)",
        "median": medians,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("weak", help="1 vs 2 Ray Train workers, 1 CPU each")
    w.add_argument("--data", required=True)
    w.add_argument("--epochs", type=int, default=2)
    w.add_argument("--batch", type=int, default=PER_WORKER_BATCH, help="per-worker batch")
    w.add_argument("--max-len", type=int, default=MAX_LEN)
    w.add_argument("--rounds", type=int, default=3)
    w.add_argument("--baseline", default="66580ba", help="git revision for the base-* variants")
    w.add_argument("--variants", default="1,2-sparse,2-dense,base-1,base-2")
    w.add_argument("--output", type=Path)
    st = sub.add_parser("step", help="a distributed step's time and bytes, two workers on loopback")
    st.add_argument("--data", required=True)
    st.add_argument("--max-len", type=int, default=MAX_LEN)
    st.add_argument("--batch", type=int, default=PER_WORKER_BATCH, help="per-worker batch")
    st.add_argument("--length", type=int, default=0, help="batch width (default: the mean bucketed width)")
    st.add_argument("--batches", type=int, default=4, help="distinct batches per worker, cycled")
    st.add_argument("--steps", type=int, default=5, help="timed steps per round and call")
    st.add_argument("--rounds", type=int, default=4)
    st.add_argument("--output", type=Path)
    sw = sub.add_parser("step-worker")
    sw.add_argument("--index", type=int, required=True)
    sw.add_argument("--batches", required=True)
    sw.add_argument("--out", required=True)
    sw.add_argument("--steps", type=int, required=True)
    sw.add_argument("--rounds", type=int, required=True)
    te = sub.add_parser("transport-error", help="the error a bfloat16 all-reduce adds to the embedding gradient")
    te.add_argument("--data", required=True)
    te.add_argument("--max-len", type=int, default=MAX_LEN)
    te.add_argument("--batch", type=int, default=PER_WORKER_BATCH, help="per-replica batch")
    te.add_argument("--replicas", default="2,4,8")
    te.add_argument("--output", type=Path)
    th = sub.add_parser("threads", help="thread pool sizes: one process alone vs two at once")
    th.add_argument("--settings", default="1,1 1,2 0,0", help="space-separated intra,inter pairs (0: default)")
    th.add_argument("--length", type=int, default=250)
    th.add_argument("--batch", type=int, default=PER_WORKER_BATCH)
    th.add_argument("--seconds", type=float, default=20.0, help="timed seconds per process")
    th.add_argument("--rounds", type=int, default=3)
    th.add_argument("--output", type=Path)
    tw = sub.add_parser("threads-worker")
    tw.add_argument("--intra", type=int, required=True)
    tw.add_argument("--inter", type=int, required=True)
    tw.add_argument("--length", type=int, required=True)
    tw.add_argument("--seconds", type=float, required=True)
    tw.add_argument("--batch", type=int, required=True)
    args = parser.parse_args()
    if args.mode in ("step-worker", "threads-worker"):
        (step_worker if args.mode == "step-worker" else threads_worker)(args)
        return
    summary = {"weak": weak, "step": step, "threads": threads, "transport-error": transport_error}[args.mode](args)
    emit(summary, args.output)


if __name__ == "__main__":
    main()
