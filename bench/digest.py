"""The batch digest's share of a training step: the job's step with and without it, alternating.

The model is built and compiled as training builds it, and
``imdb_dist.loop.make_train_function`` is fed one fixed block from a
repeated ``tf.data`` iterator, one replica (the default strategy), with no
digest and with the digest (hashed on the host from its copy of the block,
``imdb_dist.digest.host_rows_sums``). Each variant is warmed up, then timed
in ``--rounds`` alternating rounds of ``--steps`` single-step calls; the
medians of wall and process CPU time per step are reported, and the
hashing alone (``rows_sum`` in a ``tf.function``).

    python -m bench.digest --config job/configs/fast.yaml --width 400 --rounds 7
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tensorflow as tf

from bench import harness
from bench.harness import median
from bench.machine import cpu_model
from imdb_dist.config import load_config
from imdb_dist.digest import BatchDigest, rows_sum
from imdb_dist.errors import ConfigError
from imdb_dist.loop import build_metrics, make_train_function
from imdb_dist.model import build_model, compile_model


def _block(cfg: Any, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.data.vocab_size, size=(cfg.train.batch_size, width)).astype(np.int32)
    return tokens, rng.integers(0, 2, size=cfg.train.batch_size).astype(np.int32)


def variant(cfg: Any, width: int, with_digest: bool) -> tuple[Any, Any, BatchDigest | None]:
    """A warmed-up train function on a repeated fixed block, with or without the digest."""
    strategy = tf.distribute.get_strategy()
    model = build_model(cfg.model, vocab_size=cfg.data.vocab_size)
    compile_model(model, cfg.train.learning_rate)
    build_metrics(model, tf.zeros([1, 1], tf.int32))
    digest = BatchDigest(strategy, tf.Variable(0.0, dtype=tf.float64)) if with_digest else None
    iterator = iter(tf.data.Dataset.from_tensors(_block(cfg, width)).repeat())
    train = make_train_function(model, digest)
    for _ in range(3):  # trace and warm up
        float(train(iterator, 1)["loss"])
    return train, iterator, digest


def one_round(train: Any, iterator: Any, steps: int) -> tuple[float, float]:
    """Wall and process CPU milliseconds per step over ``steps`` calls."""
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        logs = train(iterator, 1)
    float(logs["loss"])  # waits for the last step
    return (time.perf_counter() - started) / steps * 1000, (time.process_time() - cpu) / steps * 1000


def hash_only(cfg: Any, width: int, rounds: int, calls: int = 200) -> float:
    """Milliseconds per ``rows_sum`` of one block in a ``tf.function``, median of ``rounds``."""
    tokens, labels = (tf.constant(part) for part in _block(cfg, width))
    fn = tf.function(rows_sum)
    float(fn(tokens, labels))
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            value = fn(tokens, labels)
        float(value)
        times.append((time.perf_counter() - started) / calls * 1000)
    return median(times)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--config", help="a preset whose model and batch to time (default: the dataclass defaults)")
    harness.add_sets(parser)
    parser.add_argument("--width", type=harness.at_least_one, default=400, help="tokens per review in the timed block")
    parser.add_argument("--steps", type=harness.at_least_one, default=20, help="single-step calls per round")
    harness.add_rounds(parser, 7)
    harness.add_output(parser)
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        harness.refuse(str(exc))
    variants = {"no_digest": variant(cfg, args.width, False), "digest": variant(cfg, args.width, True)}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # alternating rounds
        for name, (train, iterator, _) in variants.items():
            wall, cpu = one_round(train, iterator, args.steps)
            walls[name].append(wall)
            cpus[name].append(cpu)
    cpu_ms = {name: median(values) for name, values in cpus.items()}
    harness.emit({
        "cpu": cpu_model(),
        "batch": cfg.train.batch_size, "width": args.width, "steps_per_round": args.steps, "rounds": args.rounds,
        "median_step_ms": {name: median(values) for name, values in walls.items()},
        "median_step_cpu_ms": cpu_ms,
        "digest_cpu_share": cpu_ms["digest"] / cpu_ms["no_digest"] - 1,
        "rows_sum_alone_ms": hash_only(cfg, args.width, args.rounds),
    }, args.output)


if __name__ == "__main__":
    main()
