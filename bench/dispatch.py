"""The host's cost per execution of the training loop: what a GPU waits for between executions.

A GPU step of this model is short (a few milliseconds at 64 rows per
replica), so the host's work around each execution — the Python loop,
calling the compiled function, queueing the next batch, and at a step point
reading the metrics and running the callbacks — can be a large share of
it. This measures that work where the device time is negligible: the real
:class:`imdb_dist.loop.TrainingLoop` on a 1-unit model (so a step costs
almost nothing) under MirroredStrategy over two logical CPUs, with
``steps_per_execution`` 1 and N, and step points every ``--log-every``
steps. Seconds per execution (``1``) minus seconds per step (``N``) is the
host's overhead per execution; ``train.steps_per_execution`` divides it.

    python -m bench.dispatch --steps 400 --rounds 5 --output docs/bench-results/dispatch.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from bench import harness
from bench.harness import median
from imdb_dist.checkpoint import Checkpointer, ResumeState
from imdb_dist.config import DistributionConfig, ModelConfig
from imdb_dist.data import plan
from imdb_dist.data.pipeline import Encoded
from imdb_dist.distribute import make_strategy
from imdb_dist.dropout import key_on_step
from imdb_dist.loop import Schedule, TrainingLoop, build_metrics, build_optimizer
from imdb_dist.model import build_model, compile_model, min_length

TINY = ModelConfig(embedding_dim=1, conv_filters=1, kernel_size=2, pool_size=2, lstm_units=1, dropout=0.0)
ROWS, LENGTH = 8, 8  # per global batch: 4 rows per replica, 8 tokens


def seconds_per_step(strategy: tf.distribute.Strategy, steps: int, execution: int, log_every: int) -> float:
    """Training seconds per optimizer step of one epoch of ``steps`` (tracing excluded: a first epoch runs first)."""
    rng = np.random.default_rng(0)
    x = rng.integers(2, 10, size=(steps * ROWS, LENGTH))
    examples = Encoded(tf.RaggedTensor.from_tensor(tf.constant(x)), tf.zeros(len(x), tf.int32),
                       np.full(len(x), LENGTH))
    share = plan.Share(strategy.num_replicas_in_sync)
    global_plan = plan.GlobalPlan(examples.lengths, ROWS, seed=0, max_len=LENGTH, min_len=min_length(TINY))
    with strategy.scope():
        model = build_model(TINY, 10)
        compile_model(model, 1e-3)
    build_metrics(model, tf.zeros([1, 1], tf.int32))
    build_optimizer(model)
    key_on_step(model, model.optimizer.iterations, 0)
    epoch_s: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_test_begin(self, logs: dict | None = None) -> None:
            epoch_s.append(time.perf_counter() - self.start)

    scored = tf.data.Dataset.from_tensor_slices((x[:ROWS], np.zeros(ROWS, np.int32))).batch(ROWS)
    validation = plan.padded_blocks(scored, ROWS, share)
    with tempfile.TemporaryDirectory() as scratch:
        state = ResumeState(model, early_stopping=False)
        TrainingLoop(
            model,
            schedule=Schedule(epochs=2, steps_per_epoch=steps, steps_per_execution=execution, log_every=log_every),
            batches=lambda e, s: plan.stream(examples, global_plan, share, epochs=2, start=(e, s)),
            validation=validation,
            validation_batches=1,
            state=state,
            checkpointer=Checkpointer(Path(scratch), model, state, chief=True),
            callbacks=keras.callbacks.CallbackList([EpochTimer()], model=model),
        ).run()
    return epoch_s[1] / steps


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--steps", type=int, default=400, help="steps per timed epoch")
    parser.add_argument("--execution", type=int, default=8, help="the grouped steps_per_execution")
    parser.add_argument("--log-every", type=int, default=8, help="a step point every N steps")
    harness.add_rounds(parser, default=5)
    harness.add_output(parser)
    args = parser.parse_args()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = make_strategy(DistributionConfig(cpu_devices=2))
    runs = harness.interleave({
        str(execution): lambda round_, execution=execution: seconds_per_step(
            strategy, args.steps, execution, args.log_every)
        for execution in (1, args.execution)
    }, args.rounds)
    one, grouped = median(runs["1"]), median(runs[str(args.execution)])
    harness.emit({
        "benchmark": "dispatch",
        "steps": args.steps,
        "log_every": args.log_every,
        "rounds": args.rounds,
        "ms_per_step": {key: median(values) * 1e3 for key, values in runs.items()},
        "host_ms_per_execution": (one - grouped) * args.execution / (args.execution - 1) * 1e3,
        "runs_ms_per_step": {key: [v * 1e3 for v in values] for key, values in runs.items()},
    }, args.output)


if __name__ == "__main__":
    main()
