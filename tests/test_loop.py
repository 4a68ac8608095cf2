"""The training loop in process: when the host reads the device, padded validation, loss scaling and its resume.

Tiny models on generated token ids under MirroredStrategy over the two
logical CPUs conftest splits this process into: the multi-GPU shape.
"""

from __future__ import annotations

import itertools
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from imdb_dist.checkpoint import Checkpointer, ResumeState
from imdb_dist.config import DistributionConfig, ModelConfig
from imdb_dist.data import plan
from imdb_dist.data.pipeline import Encoded
from imdb_dist.distribute import make_strategy, precision_policy
from imdb_dist.dropout import key_on_step
from imdb_dist.errors import RunError
from imdb_dist.interrupt import Interrupted, StopRequest
from imdb_dist.loop import (
    Schedule,
    TrainingLoop,
    build_metrics,
    build_optimizer,
    make_evaluate_function,
)
from imdb_dist.model import (
    Adam,
    build_model,
    compile_model,
    ensemble_accuracy,
    min_length,
)

pytestmark = pytest.mark.timeout(300)

VOCAB = 40
CFG = ModelConfig(embedding_dim=8, conv_filters=4, kernel_size=3, pool_size=2, lstm_units=4, dropout=0.2)
MAX_LEN = 16
BATCH = 8


def _examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-padded token ids whose label a few words decide, so the model can learn something."""
    rng = np.random.default_rng(seed)
    x = rng.integers(4, VOCAB, size=(n, MAX_LEN), dtype=np.int64)
    y = rng.integers(0, 2, size=n).astype(np.int32)
    x[:, -1] = np.where(y == 1, 2, 3)
    return x, y


def _encoded(x: np.ndarray, y: np.ndarray) -> Encoded:
    return Encoded(tf.RaggedTensor.from_tensor(tf.constant(x)), tf.constant(y), np.full(len(x), MAX_LEN))


def _strategy() -> tf.distribute.Strategy:
    return make_strategy(DistributionConfig(cpu_devices=2))


def _model(strategy: tf.distribute.Strategy, precision: str = "float32", loss_scale: dict | None = None) -> keras.Model:
    keras.utils.set_random_seed(7)
    with strategy.scope(), precision_policy(precision):
        model = build_model(CFG, VOCAB)
        compile_model(model, 1e-2)
        if loss_scale is not None:
            # compile_model's own LossScaleOptimizer uses TensorFlow's defaults (2**15, growth every
            # 2000 steps); a test needs the scale to move within a few dozen steps.
            model.compile(
                optimizer=keras.mixed_precision.LossScaleOptimizer(Adam(1e-2), **loss_scale),
                loss=model.loss,
                weighted_metrics=[keras.metrics.MeanMetricWrapper(ensemble_accuracy, name="accuracy")],
            )
    build_metrics(model, tf.zeros([1, 1], tf.int32))
    build_optimizer(model)
    key_on_step(model, model.optimizer.iterations, 1337)
    return model


def _validation(x: np.ndarray, y: np.ndarray, size: int, share: plan.Share) -> tuple[tf.data.Dataset, int]:
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(size)
    return plan.padded_blocks(batches, size, share), -(-len(x) // size)


class Points(keras.callbacks.Callback):
    """Records, at each step point, the step, the loss scale and the weights; can request a stop there."""

    def __init__(self, stop: StopRequest | None = None, stop_at: int | None = None) -> None:
        super().__init__()
        self.stop, self.stop_at = stop, stop_at
        self.steps: list[int] = []
        self.scales: list[float] = []
        self.weights: list[list[np.ndarray]] = []
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        self.steps.append(step)
        if isinstance(self.model.optimizer, keras.mixed_precision.LossScaleOptimizer):
            self.scales.append(float(self.model.optimizer.loss_scale.numpy()))
        self.weights.append([w.copy() for w in self.model.get_weights()])
        if self.stop is not None and step == self.stop_at:
            self.stop.signum = signal.SIGTERM


def _train(
    checkpoints: Path,
    schedule: Schedule,
    *,
    precision: str = "float32",
    loss_scale: dict | None = None,
    stop_at: int | None = None,
    extra: list[keras.callbacks.Callback] = (),
    checkpoint_now: Callable[[], bool] | None = None,
    after_save: Callable[[dict], None] | None = None,
) -> tuple[keras.Model, Points, bool]:
    """Train from ``checkpoints``' last checkpoint (if any) to the end of ``schedule`` or the stop at ``stop_at``.

    Returns the model, what was seen at each step point, and whether it was interrupted.
    """
    strategy = _strategy()
    share = plan.Share(strategy.num_replicas_in_sync)
    x, y = _examples(schedule.steps_per_epoch * BATCH, seed=0)
    examples = _encoded(x, y)
    global_plan = plan.GlobalPlan(examples.lengths, BATCH, seed=3, max_len=MAX_LEN, min_len=min_length(CFG))
    model = _model(strategy, precision, loss_scale)
    state = ResumeState(model, early_stopping=False)
    checkpointer = Checkpointer(checkpoints, model, state, chief=True)
    checkpointer.restore()
    stop = StopRequest()
    points = Points(stop, stop_at)
    validation, batches = _validation(*_examples(21, seed=1), size=BATCH, share=share)
    loop = TrainingLoop(
        model,
        schedule=schedule,
        batches=lambda e, s: plan.stream(examples, global_plan, share, epochs=schedule.epochs, start=(e, s)),
        validation=validation,
        validation_batches=batches,
        state=state,
        checkpointer=checkpointer,
        callbacks=keras.callbacks.CallbackList([points, *extra], model=model),
        stop=stop,
        checkpoint_now=checkpoint_now,
        after_save=after_save,
    )
    try:
        loop.run()
    except Interrupted:
        return model, points, True
    return model, points, False


# --------------------------------------------------------------------------- step points


@pytest.mark.parametrize("execution", [1, 3])
def test_the_host_reads_the_metrics_only_at_step_points(tmp_path, execution):
    # 20 steps an epoch, a point every 5th global step: with executions of 3
    # steps, a point after each execution that crosses a multiple of 5, and at the epoch's end.
    schedule = Schedule(epochs=2, steps_per_epoch=20, steps_per_execution=execution, log_every=5)
    _, points, _ = _train(tmp_path / "ckpt", schedule)
    if execution == 1:
        assert points.steps == [5, 10, 15, 20, 25, 30, 35, 40]
    else:
        # Executions end at global steps 3, 6, ..., 18, 20 (cut at the epoch's end), 23, ..., 38, 40.
        assert points.steps == [6, 12, 15, 20, 26, 32, 35, 40]


def test_the_loss_guard_stops_at_the_next_point_before_any_checkpoint(tmp_path):
    class PoisonAt(keras.callbacks.Callback):
        """Makes the weights nan during step 7's execution (begin hooks run before every execution)."""

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            if batch == 6:
                weights = self.model.get_weights()
                self.model.set_weights([np.full_like(w, np.nan) for w in weights])

    from imdb_dist.callbacks import FiniteLoss

    # Points at steps 5 and 10 (log_every), and 9: the periodic checkpoint is a point too.
    schedule = Schedule(epochs=1, steps_per_epoch=20, log_every=5, checkpoint_steps=9)
    with pytest.raises(RunError, match=r"training loss became nan by epoch 1 step 9"):
        _train(tmp_path / "ckpt", schedule, extra=[FiniteLoss(), PoisonAt()])
    # The guard ran at step 9 before the checkpoint there: no nan weights were saved.
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")) is None


def test_a_notice_checkpoints_at_that_point_and_training_goes_on(tmp_path):
    # What the Ray launcher does with a preemption notice: True from the second
    # question on. Asked at the points inside the epoch (5, 10, 15; not 20,
    # whose checkpoint follows the validation), never between them.
    asked: list[int] = []
    saved: list[tuple[int, int]] = []

    def notice() -> bool:
        asked.append(len(asked) + 1)
        return len(asked) >= 2

    schedule = Schedule(epochs=1, steps_per_epoch=20, log_every=5)
    model, _points, interrupted = _train(
        tmp_path / "ckpt", schedule, checkpoint_now=notice,
        after_save=lambda logs: saved.append((logs["epoch"], logs.get("step", 0))),
    )
    assert not interrupted and int(model.optimizer.iterations.numpy()) == 20  # trained to the end
    assert asked == [1, 2, 3]
    assert saved == [(1, 10), (1, 15), (1, 0)]  # the notice's points, then the epoch's end


# --------------------------------------------------------------------------- padded validation


@pytest.mark.parametrize("replicas", [1, 2, 4])
@pytest.mark.parametrize("n", [16, 17, 31])
def test_every_replica_gets_a_non_empty_slice_of_the_same_shape_at_every_validation_step(replicas, n):
    x, y = _examples(n, seed=2)
    size = 16
    for worker, workers in [(0, 1)] if replicas < 2 else [(0, 1), (0, 2), (1, 2)]:
        share = plan.Share(replicas, workers, worker)
        blocks, count = _validation(x, y, size, share)
        blocks = list(blocks.as_numpy_iterator())
        assert len(blocks) == count == -(-n // size)
        for tokens, labels, weights in blocks:
            assert tokens.shape == (size // workers, MAX_LEN) and labels.shape == weights.shape == (size // workers,)
            for local in range(share.local_replicas):
                part = plan.replica_rows(tf.constant(weights), local, share.local_replicas)
                assert part.shape[0] == size // replicas > 0
        # Every real review once, with weight 1; the rest are padding rows of weight 0.
        mine = [i for i in range(n) if (i % size) // (size // workers) == worker]
        assert sum(float(w.sum()) for _, _, w in blocks) == len(mine)


def test_padding_rows_change_neither_the_validation_loss_nor_its_metrics():
    strategy = _strategy()
    share = plan.Share(strategy.num_replicas_in_sync)
    model = _model(strategy)
    x, y = _examples(21, seed=4)  # 21 rows: batches of 8 leave 3 real rows in the last, 5 padding rows
    padded = make_evaluate_function(model, 3)(iter(_validation(x, y, 8, share)[0]))
    exact = make_evaluate_function(model, 1)(iter(_validation(x[:16], y[:16], 16, share)[0]))  # no padding
    exact_rest = make_evaluate_function(model, 1)(iter(_validation(x[16:], y[16:], 6, share)[0]))  # 5 + 1 pad
    predictions = model.predict(x, batch_size=21, verbose=0)[:, 0].astype(np.float64)
    eps = keras.backend.epsilon()
    clipped = np.clip(predictions, eps, 1 - eps)
    loss = -np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
    accuracy = np.mean((predictions > 0.5) == (y == 1))
    assert float(padded["loss"]) == pytest.approx(loss, abs=1e-6)
    assert float(padded["accuracy"]) == pytest.approx(accuracy, abs=1e-7)
    # The same rows split into other batches and paddings: the same means.
    combined = (float(exact["loss"]) * 16 + float(exact_rest["loss"]) * 5) / 21
    assert combined == pytest.approx(float(padded["loss"]), abs=1e-6)


# --------------------------------------------------------------------------- loss scaling


SCALE = {"initial_scale": 2.0**40, "dynamic_growth_steps": 3}


def test_the_loss_scale_halves_on_overflow_grows_after_finite_steps_and_skipped_steps_change_nothing(tmp_path):
    schedule = Schedule(epochs=2, steps_per_epoch=15, log_every=1)
    model, points, _ = _train(tmp_path / "ckpt", schedule, precision="mixed_float16", loss_scale=SCALE)
    assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
    scales = [SCALE["initial_scale"], *points.scales]
    ratios = [after / before for before, after in itertools.pairwise(scales)]
    assert set(ratios) <= {0.5, 1.0, 2.0}, ratios
    first_finite = ratios.index(1.0)
    assert first_finite >= 1 and set(ratios[:first_finite]) == {0.5}  # 2**40 overflows float16 at once
    assert 2.0 in ratios  # grown after dynamic_growth_steps finite steps ...
    grown = ratios.index(2.0)
    assert 0.5 in ratios[grown + 1 :]  # ... and halved again once it overflowed
    # A halving step skipped its update on every replica: the weights did not move.
    for step, ratio in enumerate(ratios[1:], start=1):
        if ratio == 0.5:
            for before, after in zip(points.weights[step - 1], points.weights[step]):
                np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(a, b) for a, b in zip(points.weights[0], points.weights[-1]))


def test_a_mixed_precision_run_stopped_mid_epoch_resumes_exactly_with_its_loss_scale(tmp_path):
    schedule = Schedule(epochs=2, steps_per_epoch=15, log_every=1)
    reference, seen, _ = _train(tmp_path / "reference", schedule, precision="mixed_float16", loss_scale=SCALE)
    stopped_at = 20  # mid-epoch 2, after the scale has both halved and grown
    _, before, interrupted = _train(
        tmp_path / "ckpt", schedule, precision="mixed_float16", loss_scale=SCALE, stop_at=stopped_at
    )
    assert interrupted and before.steps[-1] == stopped_at
    saved = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "ckpt")))
    scale_keys = [k for k in saved.get_variable_to_shape_map() if "current_loss_scale" in k]
    assert len(scale_keys) == 1
    assert float(saved.get_tensor(scale_keys[0])) == seen.scales[stopped_at - 1] != SCALE["initial_scale"]
    resumed, after, _ = _train(tmp_path / "ckpt", schedule, precision="mixed_float16", loss_scale=SCALE)
    assert after.steps == seen.steps[stopped_at:]
    assert after.scales == seen.scales[stopped_at:]
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert float(resumed.optimizer.loss_scale.numpy()) == float(reference.optimizer.loss_scale.numpy())


def test_runs_after_runs_in_one_process_trace_without_retracing_warnings(tmp_path, caplog):
    # A sweep or a benchmark trains many runs in one process; each builds its functions under its own
    # strategy. TensorFlow counts traces per code object and warns of "retracing" from the sixth on: none here.
    caplog.set_level(logging.WARNING, logger="tensorflow")
    schedule = Schedule(epochs=1, steps_per_epoch=2, steps_per_execution=1, log_every=2)
    for run in range(6):
        _train(tmp_path / f"ckpt-{run}", schedule)
    retracing = [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()]
    assert not retracing, retracing[0]
