"""The training run end to end on generated data: output contract, resume, refusals."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras
from conftest import tiny_overrides, write_aclimdb

from imdb_dist import rundir
from imdb_dist.callbacks import FiniteLoss, log_every
from imdb_dist.config import dump_yaml, load_config
from imdb_dist.data.plan import PLAN_VERSION
from imdb_dist.errors import ConfigError, DataError, InputError, RunError
from imdb_dist.rundir import read_metrics
from imdb_dist.train import run


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_aclimdb(tmp_path / "data", {"train": 100})


def config(data: Path, out: Path, *extra: str):
    return load_config(None, [*tiny_overrides(data, out), *extra])


def test_run_writes_the_output_contract(trained_run: Path) -> None:
    saved = load_config(trained_run / rundir.CONFIG)
    assert saved.run.output_dir == str(trained_run)
    records = read_metrics(trained_run / rundir.METRICS)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "examples_per_s", "wall_s"} <= record.keys()
        assert record["examples_per_s"] > 0
    assert records[1]["wall_s"] > records[0]["wall_s"]
    assert list((trained_run / rundir.TENSORBOARD).rglob("events.out.tfevents.*"))
    assert (trained_run / rundir.CHECKPOINTS / "checkpoint").is_file()
    assert (trained_run / rundir.MODEL / "1" / "saved_model.pb").is_file()
    assert (trained_run / rundir.CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vocab = rundir.read_vocab(trained_run)
    assert vocab and "superb" in vocab and "" not in vocab
    report = json.loads((trained_run / rundir.REPORT).read_text())
    assert {"accuracy", "auc", "loss", "n", "confusion"} <= report["validation"].keys()
    assert report["validation"]["n"] == 40  # 20% of 200 generated reviews
    assert report["epochs"] == 2 and report["replicas"] == 1
    assert report["embedding_gradient"] is None  # one replica: nothing reduced
    assert report["versions"]["data_plan"] == PLAN_VERSION  # which plan chose the batches


def test_the_logged_validation_is_the_exported_models_validation(trained_run: Path) -> None:
    # Validation runs on the inputs the export serves (every review padded to
    # max_len), so the last logged epoch and the report describe one model.
    last = read_metrics(trained_run / rundir.METRICS)[-1]
    report = json.loads((trained_run / rundir.REPORT).read_text())
    assert report["validation"]["accuracy"] == pytest.approx(last["val_accuracy"], abs=1e-6)
    assert report["validation"]["loss"] == pytest.approx(last["val_loss"], rel=1e-5)


def test_the_report_says_where_the_time_went(trained_run: Path) -> None:
    timings = json.loads((trained_run / rundir.REPORT).read_text())["timings"]
    phases = timings["phases_s"]
    # Called in process, as benches and tune trials call it: no start-up phase of its own
    # (the CLI reports one: tests/test_bench.py's coldstart test).
    assert set(phases) == {
        "strategy", "data", "tokenize", "build", "callbacks", "plan", "meet",
        "first_step", "steps", "epoch_metrics", "validation", "checkpoints", "after_checkpoint", "export",
        "score", "curves",
    }  # fmt: skip
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["steps"] > 0 and phases["export"] > 0
    # The test process started before this run: its whole life covers the phases.
    assert timings["process_s"] >= sum(phases.values())


def test_run_learns_the_generated_sentiment(trained_run: Path) -> None:
    report = json.loads((trained_run / rundir.REPORT).read_text())
    assert report["validation"]["accuracy"] >= 0.8


def test_more_epochs_resume_from_the_checkpoint(data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    run(config(data, out, "train.epochs=1"))
    first = read_metrics(out / rundir.METRICS)
    caplog.set_level(logging.INFO)
    run(config(data, out, "train.epochs=2"))
    epochs_logged = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert epochs_logged == ["epoch 2"], "the resumed run must not train epoch 1 again"
    records = read_metrics(out / rundir.METRICS)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0] == first[0]
    assert load_config(out / rundir.CONFIG).train.epochs == 2
    # The step points go on from where the first run's ended: every step once.
    assert [r["step"] for r in read_metrics(out / rundir.STEPS)] == list(range(1, 21))


def test_interrupted_run_finishes_without_retraining(data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    run(config(data, out))
    # As if the process died after the last checkpoint, before the export.
    (out / rundir.REPORT).unlink()
    caplog.set_level(logging.INFO)
    run(config(data, out))
    assert not [r for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert (out / rundir.REPORT).is_file()
    assert [r["epoch"] for r in read_metrics(out / rundir.METRICS)] == [1, 2]


def test_a_complete_run_is_not_repeated(trained_run: Path) -> None:
    before = (trained_run / rundir.REPORT).stat().st_mtime_ns
    run(load_config(trained_run / rundir.CONFIG))
    assert (trained_run / rundir.REPORT).stat().st_mtime_ns == before


def test_a_different_config_is_refused_in_the_same_dir(trained_run: Path) -> None:
    saved = (trained_run / rundir.CONFIG).read_text()
    with pytest.raises(InputError, match=r"data\.max_len is 32, not 48"):
        run(load_config(trained_run / rundir.CONFIG, ["data.max_len=48"]))
    assert (trained_run / rundir.CONFIG).read_text() == saved


def test_a_foreign_non_empty_dir_is_refused(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an imdb-dist run"):
        run(config(data, out))


def test_bad_data_leaves_no_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(DataError):
        run(config(tmp_path / "missing", out))
    assert not out.exists()


def test_fewer_reviews_than_one_batch_is_refused(tmp_path: Path) -> None:
    data = write_aclimdb(tmp_path / "data", {"train": 4})
    out = tmp_path / "run"
    with pytest.raises(DataError, match="fewer than one global batch"):
        run(config(data, out))
    assert not out.exists()


def test_batch_not_divisible_by_replicas_is_refused(data: Path, tmp_path: Path) -> None:
    cfg = config(data, tmp_path / "run", "train.batch_size=15", "distribution.strategy=mirrored",
                 "distribution.devices=[/cpu:0, /cpu:1]")
    with pytest.raises(ConfigError, match=r"train\.batch_size.*15.*2 replicas"):
        run(cfg)


def test_mirrored_run_on_two_logical_cpus(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(config(data, out, "train.epochs=1", "distribution.strategy=mirrored", "distribution.devices=[/cpu:0, /cpu:1]"))
    report = json.loads((out / rundir.REPORT).read_text())
    assert report["replicas"] == 2 and report["strategy"] == "MirroredStrategy"
    assert report["embedding_gradient"] in ("sparse", "dense, in float32")  # as distribution.embedding_gradient: auto chose
    assert math.isfinite(report["validation"]["loss"])


def test_resolved_config_is_saved_as_run(trained_run: Path) -> None:
    saved = load_config(trained_run / rundir.CONFIG)
    assert dump_yaml(saved) == (trained_run / rundir.CONFIG).read_text()
    assert saved.data.max_len == 32 and saved.train.batch_size == 16


def test_non_finite_loss_stops_naming_epoch_and_step() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    x = np.ones((8, 2), np.float32)
    y = np.array([0, 1, 0, 1, np.nan, 1, 0, 1], np.float32)  # the 3rd batch of 2 carries a NaN
    with pytest.raises(RunError, match="loss became nan by epoch 1 step 3"):
        model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[FiniteLoss()])


def test_reopening_a_run_drops_its_stale_report_before_saving_the_config(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    (run_dir / rundir.REPORT).write_text((trained_run / rundir.REPORT).read_text())
    cfg = load_config(trained_run / rundir.CONFIG, ["train.epochs=3"])
    rundir.RunDir.open(str(run_dir)).begin(cfg)
    assert not (run_dir / rundir.REPORT).exists(), "a run training more epochs must not look complete"
    assert load_config(run_dir / rundir.CONFIG) == cfg


@pytest.mark.parametrize("replicas", [1, 2])
def test_several_steps_per_execution_train_the_same_steps(data: Path, tmp_path: Path, replicas: int) -> None:
    # 10 steps an epoch in executions of 4: 4 + 4 + 2, and checkpoints every 3
    # optimizer steps cut them further; the optimizer still takes 10 steps.
    # Two replicas (conftest's two logical CPUs) slice each block inside the executions' loop.
    out = tmp_path / "run"
    devices = [f"distribution.cpu_devices={replicas}"] if replicas > 1 else []
    run(config(data, out, "train.epochs=1", "train.steps_per_execution=4", "run.checkpoint_steps=3", *devices))
    (record,) = read_metrics(out / rundir.METRICS)
    assert math.isfinite(record["val_loss"]) and record["examples_per_s"] > 0
    report = json.loads((out / rundir.REPORT).read_text())
    assert (report["optimizer_steps"], report["replicas"]) == (10, replicas)


def test_a_torn_last_metrics_line_is_dropped_but_earlier_damage_is_not_hidden(tmp_path: Path) -> None:
    path = tmp_path / rundir.METRICS
    path.write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "lo')
    assert read_metrics(path) == [{"epoch": 1, "loss": 0.5}]
    path.write_text('{"epoch": 1, "lo\n{"epoch": 2, "loss": 0.4}\n')
    with pytest.raises(InputError, match=rf"^{path} line 1 is not valid JSON"):
        read_metrics(path)


class _LastLearningRate(keras.callbacks.Callback):
    def on_train_end(self, logs: dict | None = None) -> None:
        self.rate = float(self.model.optimizer.learning_rate)
        self.steps = int(self.model.optimizer.iterations)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_cosine_decays_to_zero_over_the_run(data: Path, tmp_path: Path, schedule: str) -> None:
    last = _LastLearningRate()
    run(config(data, tmp_path / "run", f"train.lr_schedule={schedule}"), extra_callbacks=[last])
    if schedule == "constant":
        assert last.rate == pytest.approx(0.01)
    else:
        # The last step of the run sits at the end of the cosine: (1 + cos(pi (N-1) / N)) / 2 of the peak.
        expected = 0.01 * (1 + math.cos(math.pi * (last.steps - 1) / last.steps)) / 2
        assert last.rate == pytest.approx(expected, rel=1e-3) and last.rate < 0.001


@pytest.mark.parametrize(("configured", "steps_per_epoch", "expected"), [(0, 351, 9), (0, 10, 1), (0, 1, 1), (5, 351, 5)])
def test_step_logging_period_defaults_to_about_forty_points_an_epoch(configured, steps_per_epoch, expected) -> None:
    assert log_every(configured, steps_per_epoch) == expected


def _tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    import tensorflow as tf

    steps = []
    for path in sorted((run_dir / rundir.TENSORBOARD / "train").glob("events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


@pytest.mark.parametrize(
    ("execution", "points"),
    [(1, [3, 6, 9, 10, 12, 15, 18, 20]), (4, [4, 8, 10, 14, 18, 20])],
)
def test_step_points_every_n_steps_and_at_each_epoch_end(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, execution: int, points: list[int]
) -> None:
    # 160 training reviews at batch 16: 10 full steps an epoch. A point falls
    # on the execution that crosses a multiple of 3 optimizer steps, and on every epoch's end.
    out = tmp_path / "run"
    caplog.set_level(logging.INFO)
    run(config(data, out, "run.log_every_steps=3", f"train.steps_per_execution={execution}"))
    records = read_metrics(out / rundir.STEPS)
    assert [r["step"] for r in records] == points
    for record in records:
        assert {"epoch", "epoch_step", "loss", "accuracy", "learning_rate", "examples_per_s", "wall_s"} <= record.keys()
        assert record["step"] == (record["epoch"] - 1) * 10 + record["epoch_step"]
        assert record["learning_rate"] == pytest.approx(0.01) and record["examples_per_s"] > 0
        assert 0.0 <= record["accuracy"] <= 1.0
    walls = [r["wall_s"] for r in records]
    assert walls == sorted(walls)
    # Each point is the mean over its own steps: weighted by their number, the
    # points of an epoch give back the epoch's training loss and accuracy.
    for epoch in read_metrics(out / rundir.METRICS):
        mine = [r for r in records if r["epoch"] == epoch["epoch"]]
        lengths = np.diff([0, *[r["epoch_step"] for r in mine]])
        for metric in ("loss", "accuracy"):
            weighted = sum(n * r[metric] for n, r in zip(lengths, mine)) / lengths.sum()
            assert weighted == pytest.approx(epoch[metric], rel=1e-4)
    assert _tensorboard_steps(out, "step_loss") == points
    assert _tensorboard_steps(out, "step_examples_per_s") == points
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == len(points) and lines[0].startswith(f"step {points[0]} (epoch 1, {points[0]}/10): loss=")
