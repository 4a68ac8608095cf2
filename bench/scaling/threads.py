"""``threads``: the ceiling this machine puts on any scale-out, and the pool sizes for a 1-CPU worker.

The network's training step (no communication, random ids, 256 x
``--length``) in one process alone, then in two processes at once, for each
(intra, inter) pool setting.

    python -m bench.scaling threads --output docs/bench-results/scaling-threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench import harness
from bench.baseline import REPO
from bench.harness import median
from bench.scaling import PER_WORKER_BATCH, VOCAB, add_worker


def add_parser(sub: Any) -> None:
    """The ``threads`` subcommand's flags, and its hidden ``threads-worker`` (one timed process)."""
    th = sub.add_parser("threads", help="thread pool sizes: one process alone vs two at once")
    th.add_argument("--settings", default="1,1 1,2 0,0", type=_settings,
                    help="space-separated intra,inter pairs (0: default)")
    th.add_argument("--length", type=int, default=250)
    th.add_argument("--batch", type=int, default=PER_WORKER_BATCH)
    th.add_argument("--seconds", type=float, default=20.0, help="timed seconds per process")
    harness.add_rounds(th, default=3)
    harness.add_output(th)
    th.set_defaults(run=threads)
    add_worker(sub, "threads-worker", threads_worker)


def _settings(value: str) -> list[str]:
    settings = value.split()
    for setting in settings:
        pair = setting.split(",")
        if len(pair) != 2 or not all(v.isdigit() for v in pair):
            raise argparse.ArgumentTypeError(f"each setting is intra,inter (whole numbers, 0: default), not {setting!r}")
    return settings


def threads_worker(intra: int, inter: int, length: int, seconds: float, batch: int) -> None:
    """Time the network's training step (default strategy) with the given pool sizes; print examples/s."""
    import tensorflow as tf

    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    import numpy as np

    from imdb_dist.config import ModelConfig
    from imdb_dist.dropout import key_on_step
    from imdb_dist.model import build_model, compile_model

    model = build_model(ModelConfig(), VOCAB)
    compile_model(model, 1e-3)
    key_on_step(model, model.optimizer.iterations, 1)
    rng = np.random.default_rng(0)
    x = rng.integers(2, VOCAB, size=(batch, length))
    y = rng.integers(0, 2, size=(batch,)).astype("float32")
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    step = tf.function(lambda: model.train_step(next(iterator)))
    for _ in range(3):
        step()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        float(step()["loss"])
        times.append(time.perf_counter() - start)
    print(json.dumps({"examples_per_s": batch / median(times), "steps": len(times)}))


def threads(args: argparse.Namespace) -> dict[str, Any]:
    """Each pool setting: one process alone, then two at once (no communication: the machine's ceiling)."""

    def start(intra: int, inter: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.scaling", "threads-worker", json.dumps({
                "intra": intra, "inter": inter, "length": args.length, "seconds": args.seconds, "batch": args.batch})],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"},
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )

    def rate(proc: subprocess.Popen) -> float:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"threads-worker failed ({proc.returncode})")
        return json.loads(out.strip().splitlines()[-1])["examples_per_s"]

    def measure(setting: str) -> Any:
        intra, inter = (int(v) for v in setting.split(","))

        def once(round_: int) -> dict[str, float]:
            alone = rate(start(intra, inter))
            pair = [start(intra, inter), start(intra, inter)]
            return {"alone": alone, "two_processes_total": sum(rate(proc) for proc in pair)}

        return once

    results = harness.interleave({setting: measure(setting) for setting in args.settings}, args.rounds)
    keys = ("alone", "two_processes_total")
    runs = {setting: {key: [r[key] for r in rounds] for key in keys} for setting, rounds in results.items()}
    medians = {setting: harness.medians(rounds, keys) for setting, rounds in results.items()}
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
