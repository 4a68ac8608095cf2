"""Exact resume: a run stopped at any moment and rerun ends with the model of a run that never stopped.

The promise (docs/run-directory.md, failure behaviour): with ``train.deterministic``,
rerunning the same command after SIGTERM, SIGKILL or a stop during
validation gives bit-identical final weights and the same ``metrics.jsonl``
loss columns as the uninterrupted run, whatever ``steps_per_execution`` is,
on one replica or two (``distribution.cpu_devices``: the multi-GPU shape).
Each run is a real ``imdb-dist train`` process (op determinism is
process-wide, so it never runs inside the test process).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, start_imdb_dist, tiny_overrides, write_aclimdb
from exactness import assert_same_epoch_metrics, model_weights

from imdb_dist import rundir
from imdb_dist.checkpoint import saved_position
from imdb_dist.rundir import read_metrics

# Each test trains two or three real processes (and the first of a setting its reference run).
pytestmark = pytest.mark.timeout(300)

# 1,000 generated reviews per class, 20% held out, global batch 16: 100 steps an epoch (the stop is
# placed by a step point, not by time, so a fast CPU's short epoch cannot outrun it).
STEPS = 100
CHECKPOINT_STEPS = 17
# Every run here: three epochs, deterministic ops, a step point every 5 steps.
RUN = ("train.epochs=3", "train.deterministic=true", "run.log_every_steps=5")


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    """Bitwise-equal weights, equal loss columns (tests/exactness.py), equal optimizer step counts."""
    got, want = model_weights(resumed), model_weights(uninterrupted)
    assert got.keys() == want.keys() and len(want) >= 5
    for key in want:
        assert np.array_equal(got[key], want[key]), f"{key} differs by {np.max(np.abs(got[key] - want[key]))}"
    report = json.loads((uninterrupted / rundir.REPORT).read_text())
    epochs = read_metrics(uninterrupted / rundir.METRICS)
    # Every stop here lands inside epoch 2 (or at an epoch's end, which splits nothing).
    assert_same_epoch_metrics(read_metrics(resumed / rundir.METRICS), epochs, split_epochs=[2],
                              steps_per_epoch=report["optimizer_steps"] // len(epochs), replicas=report["replicas"])
    # The lost attempt's step points past the checkpoint are dropped: each step is logged once, in order.
    got_steps, want_steps = ([r["step"] for r in read_metrics(d / rundir.STEPS)] for d in (resumed, uninterrupted))
    assert got_steps == want_steps
    # Every step trained the same global batch, once (imdb_dist.digest): a lost attempt's
    # steps after its checkpoint are not in the resumed run's digest.
    got_digests, want_digests = (
        [r["batches_digest"] for r in read_metrics(d / rundir.STEPS)] for d in (resumed, uninterrupted)
    )
    assert got_digests == want_digests and len(set(want_digests)) == len(want_digests)
    reports = [json.loads((d / rundir.REPORT).read_text()) for d in (resumed, uninterrupted)]
    assert reports[0]["batches_digest"] == reports[1]["batches_digest"] == want_digests[-1]
    assert reports[0]["optimizer_steps"] == reports[1]["optimizer_steps"]
    assert reports[0]["validation"] == reports[1]["validation"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_aclimdb(tmp_path_factory.mktemp("resume") / "data", {"train": 1000})


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    sets = [*tiny_overrides(data, out), *RUN, *extra]
    return [arg for item in sets for arg in ("--set", item)]


def _train(*args: str) -> subprocess.Popen:
    return start_imdb_dist("train", *args)


def _finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return err


_uninterrupted: dict[tuple[Path, tuple[str, ...]], Path] = {}


def uninterrupted(data: Path, root: Path, *extra: str) -> Path:
    """The reference run for these settings (one per module and settings).

    With one step per execution, ``run.checkpoint_steps`` is left out of the
    reference: saving must not change the model, so a resumed run is held to
    the run that never saved mid-epoch at all (and the SIGKILL and SIGTERM
    tests share a reference). With several, checkpoint steps also end
    executions early (they land on them), which moves the step points.
    """
    if "train.steps_per_execution=1" in extra:
        extra = tuple(item for item in extra if not item.startswith("run.checkpoint_steps="))
    if (data, extra) not in _uninterrupted:
        out = root / f"uninterrupted-{len(_uninterrupted)}"
        _finish(_train(*_args(data, out, *extra)))
        _uninterrupted[data, extra] = out
    return _uninterrupted[data, extra]


def _saved_position(out: Path) -> tuple[int, int]:
    """(epoch, step) of the run's latest checkpoint, 0-based epoch."""
    return saved_position(out / rundir.CHECKPOINTS)


def _in_epoch_two(points: Path) -> bool:
    """Whether ``steps.jsonl`` holds a step point of epoch 2 (a torn last line is still being written)."""
    if not points.exists():
        return False
    for line in points.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] == 2:
                return True
        except json.JSONDecodeError:
            pass
    return False


def stop_inside_epoch_two(args: list[str], out: Path, signum: int) -> str:
    """Run ``imdb-dist train`` and send ``signum`` during epoch 2's training steps; return its stderr.

    The signal goes as soon as ``steps.jsonl`` shows a step point of epoch 2
    (every 5 steps here): a position in the run, not a delay, so that a fast
    CPU's short epochs (0.3 s each on an AVX-512 machine at 100 steps) cannot outrun it.
    On a machine loaded enough to let the rest of the epoch pass before the
    signal lands, the run is started again.
    """
    for _attempt in range(3):
        shutil.rmtree(out, ignore_errors=True)
        proc = _train(*args)
        deadline = time.monotonic() + 300
        while not _in_epoch_two(out / rundir.STEPS):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never reached epoch 2"
            time.sleep(0.01)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        # SIGTERM: our exit status; SIGKILL: the kernel's (Popen says -9).
        assert proc.returncode == (128 + signum if signum == signal.SIGTERM else -signum), err[-3000:]
        epoch, step = _saved_position(out)
        if epoch == 1 and 0 < step < STEPS:
            return err
    pytest.fail(f"{signal.Signals(signum).name} never landed inside epoch 2")


# Two replicas in one process (MirroredStrategy on two logical CPUs): the multi-GPU shape.
TWO_REPLICAS = "distribution.cpu_devices=2"


def _loss_scale(run_dir: Path) -> dict[str, float]:
    """The loss scale and its count of finite steps towards growth, in the run's last checkpoint."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run_dir / rundir.CHECKPOINTS)))
    keys = [key for key in reader.get_variable_to_shape_map() if "/loss_scale/" in key]
    assert len(keys) == 2, keys
    return {key.split("/")[2]: float(reader.get_tensor(key)) for key in keys}


# Each feature a resume must carry is in one SIGTERM or SIGKILL case (one process each stopped and
# resumed, against a reference run): steps_per_execution, an ensemble, two replicas, mixed precision's
# loss scale and the bfloat16 transport, mid-epoch step checkpoints.
@pytest.mark.parametrize(
    ("execution", "members", "replicas", "precision"),
    [(1, 1, 1, "float32"), (4, 2, 1, "float32"), (1, 1, 2, "mixed_float16")],
    # The mixed_float16 case also all-reduces the embedding gradient in bfloat16
    # (distribution.embedding_transport): rounded, and still exact on resume.
    ids=["steps_per_execution=1", "steps_per_execution=4-ensemble-of-2",
         "two-replicas-mixed_float16-bfloat16-transport"],
)
def test_sigterm_mid_epoch_then_the_same_command_gives_the_uninterrupted_model(
    data, tmp_path_factory, execution, members, replicas, precision
):
    # An ensemble (model.members) checkpoints and resumes as one model: every member's weights exact.
    extra = (f"train.steps_per_execution={execution}",) + (("model.members=2",) if members > 1 else ())
    extra += (TWO_REPLICAS,) if replicas > 1 else ()
    # mixed_float16 on CPUs: a CPU rehearsal (cpu_devices) runs it emulated, loss scale and all.
    extra += (f"train.mixed_precision={precision}",) if precision != "float32" else ()
    if precision != "float32":
        extra += ("distribution.embedding_gradient=dense", "distribution.embedding_transport=bfloat16")
    reference = uninterrupted(data, tmp_path_factory.getbasetemp(), *extra)
    out = tmp_path_factory.mktemp("sigterm") / "run"
    args = _args(data, out, *extra)
    err = stop_inside_epoch_two(args, out, signal.SIGTERM)
    stopped = re.search(r"stopped by SIGTERM at epoch 2 step (\d+); checkpoint saved", err)
    assert stopped and _saved_position(out) == (1, int(stopped[1])), err[-2000:]  # the step it stopped at
    assert int(stopped[1]) % execution == 0  # stops land where an execution ends
    _finish(_train(*args))
    report = json.loads((out / rundir.REPORT).read_text())
    assert (report["config"]["model"]["members"], report["replicas"]) == (members, replicas)
    assert report["precision"] == precision
    assert report["config"]["distribution"]["embedding_transport"] == ("float32" if precision == "float32" else "bfloat16")
    assert_same_run(out, reference)
    if precision == "mixed_float16":
        # The loss scale and its count of finite steps are the uninterrupted run's: restored, not
        # restarted (a fresh one starts again at 2**15 and counts from 0 at the resume). Whether
        # a step overflows is the CPU's float16 arithmetic (an Intel kind that computes float16
        # natively overflowed once, in both runs), so both are held to the reference's, not to
        # a count of steps. The restore under a schedule that halves and grows the scale on
        # every CPU: tests/test_loop.py.
        assert _loss_scale(out) == _loss_scale(reference)


@pytest.mark.parametrize(
    ("execution", "replicas"),
    [(1, 1), (4, 2)],
    ids=["steps_per_execution=1", "steps_per_execution=4-two-replicas"],
)
def test_sigkill_mid_epoch_resumes_from_the_last_step_checkpoint_to_the_uninterrupted_model(
    data, tmp_path_factory, execution, replicas
):
    # 17 divides neither the epoch (100) nor the execution (4): checkpoints land on every 17th
    # optimizer step all the same. Epoch 2's first (step 102) comes before its first step point
    # (step 105), which is where the kill goes: the run always has a checkpoint inside epoch 2.
    extra = (f"train.steps_per_execution={execution}", f"run.checkpoint_steps={CHECKPOINT_STEPS}")
    extra += (TWO_REPLICAS,) if replicas > 1 else ()
    reference = uninterrupted(data, tmp_path_factory.getbasetemp(), *extra)
    out = tmp_path_factory.mktemp("sigkill") / "run"
    args = _args(data, out, *extra)
    stop_inside_epoch_two(args, out, signal.SIGKILL)
    assert [r["epoch"] for r in read_metrics(out / rundir.METRICS)] == [1]
    err = _finish(_train(*args))
    resumed = re.search(r"resuming at epoch 2 step (\d+) \(optimizer step (\d+)\)", err)
    assert resumed, err[-2000:]
    assert 0 < int(resumed[1]) < STEPS and int(resumed[2]) % CHECKPOINT_STEPS == 0  # from a mid-epoch step checkpoint
    assert json.loads((out / rundir.REPORT).read_text())["replicas"] == replicas
    assert_same_run(out, reference)


_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from imdb_dist.config import load_config
from imdb_dist.interrupt import Interrupted, stop_on_signals
from imdb_dist.train import run
import tf_keras as keras

class SignalInValidation(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.current = epoch, 0
    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch + 1
    def on_test_begin(self, logs=None):
        if self.current == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)

cfg = load_config(None, {sets!r})
try:
    with stop_on_signals() as stop:
        run(cfg, stop=stop, extra_callbacks=[SignalInValidation({epoch})])
except Interrupted as exc:
    print(exc)
"""


def test_a_stop_during_validation_resumes_to_the_uninterrupted_model(data, tmp_path_factory):
    # steps_per_execution=1 is the default: the SIGTERM test's reference serves.
    reference = uninterrupted(data, tmp_path_factory.getbasetemp(), "train.steps_per_execution=1")
    out = tmp_path_factory.mktemp("validation") / "run"
    sets = [*tiny_overrides(data, out), *RUN]
    child = _CHILD.format(tests=str(REPO / "tests"), sets=sets, epoch=2)
    stopped = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600, cwd=REPO,
                             check=False)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at the end of epoch 2; checkpoint saved" in stopped.stdout
    _finish(_train(*_args(data, out)))
    assert_same_run(out, reference)


def test_early_stopping_interrupted_after_its_best_epoch_exports_the_best_epoch(tmp_path_factory):
    # 40% of the reviews carry the other class's words: the model can only
    # memorise them, so validation loss turns up after a few epochs, and
    # patience 4 lets the run go on past its best epoch.
    noisy = write_aclimdb(tmp_path_factory.mktemp("noisy") / "data", {"train": 500}, label_noise=0.4)
    extra = ("train.epochs=6", "train.learning_rate=0.02", "train.early_stopping_patience=4")
    reference = uninterrupted(noisy, tmp_path_factory.getbasetemp(), *extra)
    losses = [r["val_loss"] for r in read_metrics(reference / rundir.METRICS)]
    best = int(np.argmin(losses))
    assert best < len(losses) - 1, f"no epoch after the best one to interrupt: {losses}"
    report = json.loads((reference / rundir.REPORT).read_text())
    # The export is the best epoch's model: its validation loss is that epoch's.
    assert report["validation"]["loss"] == pytest.approx(losses[best], rel=1e-4)
    assert report["validation"]["loss"] != pytest.approx(losses[-1], rel=1e-4)

    out = tmp_path_factory.mktemp("early") / "run"
    args = _args(noisy, out, *extra)
    proc = _train(*args)
    metrics = out / rundir.METRICS
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= best + 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # after the best epoch and the one after it were scored
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    _finish(_train(*args))
    assert_same_run(out, reference)
