"""Faults during a run: SIGTERM / Ctrl-C, a full disk, leftovers of killed writes.

The promise (docs/run-directory.md, failure behaviour): a run stopped by a signal saves a
checkpoint at the end of the current step and exits 128 + signal; one that
cannot write stops with one line and exit 1; either way the last good
checkpoint is what the next run resumes from, and nothing looks complete.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tf_keras as keras
from conftest import REPO, start_imdb_dist, tiny_overrides, write_aclimdb

from imdb_dist import rundir
from imdb_dist.config import load_config
from imdb_dist.export import export_model
from imdb_dist.interrupt import Interrupted, stop_on_signals
from imdb_dist.rundir import read_metrics
from imdb_dist.train import run

# Most tests run real imdb-dist processes, some of them twice (stopped, then resumed).
pytestmark = pytest.mark.timeout(300)

STEPS = 10  # 100 generated reviews per class, 20% held out: ceil(160 / batch 16)


class SignalAt(keras.callbacks.Callback):
    """Sends this process ``signum`` (``times`` times) at the end of one training step."""

    def __init__(self, signum: int, epoch: int, step: int, times: int = 1) -> None:
        super().__init__()
        self.signum, self.epoch, self.step, self.times = signum, epoch, step, times
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if (self._epoch, batch + 1) == (self.epoch, self.step):
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class SignalInValidation(keras.callbacks.Callback):
    """Sends this process ``signum`` while one epoch's validation runs."""

    def __init__(self, signum: int, epoch: int) -> None:
        super().__init__()
        self.signum, self.epoch, self._epoch = signum, epoch, 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch + 1

    def on_test_begin(self, logs: dict | None = None) -> None:
        if self._epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


def _cfg(tmp_path: Path, *extra: str):
    data = tmp_path / "data"
    if not data.exists():
        write_aclimdb(data, {"train": 100})
    return load_config(None, [*tiny_overrides(data, tmp_path / "run"), "train.epochs=3", *extra])


def _assert_incomplete(run_dir: Path) -> None:
    assert not (run_dir / rundir.REPORT).exists()
    assert not (run_dir / rundir.MODEL).exists()


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_mid_epoch_checkpoints_that_step_and_the_rerun_resumes_from_it(tmp_path: Path, signum, code):
    cfg = _cfg(tmp_path)
    # Not necessarily the default: a background shell starts its jobs with SIGINT ignored.
    before = signal.getsignal(signum)
    with stop_on_signals() as stop, pytest.raises(Interrupted) as exc:
        run(cfg, stop=stop, extra_callbacks=[SignalAt(signum, epoch=2, step=3)])
    assert exc.value.exit_code == code
    assert f"stopped by {signal.Signals(signum).name} at epoch 2 step 3" in str(exc.value)
    assert "checkpoint saved" in str(exc.value)
    run_dir = Path(cfg.run.output_dir)
    _assert_incomplete(run_dir)
    assert [r["epoch"] for r in read_metrics(run_dir / rundir.METRICS)] == [1]  # epoch 2 never finished
    assert signal.getsignal(signum) == before  # handlers restored

    resumed = run(cfg)
    report = json.loads((resumed / rundir.REPORT).read_text())
    # The rerun did the rest of epoch 2 (steps 4-10), not the whole of it again:
    # the optimizer's step counter matches an uninterrupted run's.
    assert report["optimizer_steps"] == 3 * STEPS
    assert [r["epoch"] for r in read_metrics(run_dir / rundir.METRICS)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("epoch", "message"),
    [(1, "at the end of epoch 1; checkpoint saved"), (3, "after the last epoch; checkpoint saved")],
    ids=["mid-run", "last-epoch"],
)
def test_a_signal_during_validation_stops_at_that_epochs_checkpoint(tmp_path: Path, epoch: int, message: str):
    cfg = _cfg(tmp_path)
    with stop_on_signals() as stop, pytest.raises(Interrupted, match=message):
        run(cfg, stop=stop, extra_callbacks=[SignalInValidation(signal.SIGTERM, epoch)])
    run_dir = Path(cfg.run.output_dir)
    _assert_incomplete(run_dir)  # not even after the last epoch: the export waits for the rerun
    assert [r["epoch"] for r in read_metrics(run_dir / rundir.METRICS)] == list(range(1, epoch + 1))
    report = json.loads((run(cfg) / rundir.REPORT).read_text())
    assert report["optimizer_steps"] == 3 * STEPS


def test_a_second_signal_stops_at_once(tmp_path: Path):
    cfg = _cfg(tmp_path)
    with stop_on_signals() as stop, pytest.raises(Interrupted, match="no checkpoint written since the last one"):
        run(cfg, stop=stop, extra_callbacks=[SignalAt(signal.SIGTERM, epoch=2, step=3, times=2)])
    run_dir = Path(cfg.run.output_dir)
    _assert_incomplete(run_dir)
    # The epoch-1 checkpoint is the one a rerun resumes from.
    report = json.loads((run(cfg) / rundir.REPORT).read_text())
    assert report["optimizer_steps"] == 3 * STEPS


def test_outside_training_a_signal_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as exc, stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # not reached: the handler raises as soon as the signal lands
    assert exc.value.exit_code == 143 and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def _imdb_dist(*args: str, limit_file_size: int | None = None) -> subprocess.Popen:
    def limits() -> None:
        # RLIMIT_FSIZE makes the kernel refuse writes past the size (EFBIG),
        # as a full disk refuses them (ENOSPC), without needing a mount.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, resource.RLIM_INFINITY))

    return start_imdb_dist("train", *args, preexec_fn=limits if limit_file_size else None)


def _sets(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        write_aclimdb(data, {"train": 100})
    overrides = [*tiny_overrides(data, tmp_path / "run"), *extra]
    return [arg for item in overrides for arg in ("--set", item)]


def test_sigterm_to_the_command_exits_143_with_one_line_and_the_same_command_resumes(tmp_path: Path):
    args = _sets(tmp_path, "train.epochs=40")
    metrics = tmp_path / "run" / rundir.METRICS
    proc = _imdb_dist(*args)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training never finished an epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    # "at epoch E step S", or "at the end of epoch E" when it landed between steps.
    assert re.match(r"error: stopped by SIGTERM at (epoch \d+ step \d+|the end of epoch \d+); checkpoint saved", last)
    assert "run the same command again to resume" in last
    assert "Traceback" not in err
    _assert_incomplete(tmp_path / "run")
    done = len(read_metrics(metrics))
    assert 1 <= done < 40

    rerun = _imdb_dist(*args)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    report = json.loads((tmp_path / "run" / rundir.REPORT).read_text())
    assert report["optimizer_steps"] == 40 * STEPS
    assert [r["epoch"] for r in read_metrics(metrics)] == list(range(1, 41))


def test_a_disk_that_fills_up_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path: Path):
    # Wide embeddings make the checkpoint (weights + Adam slots, ~400 KB) the
    # largest file the run writes; the limit lets everything else through.
    wide = ("model.embedding_dim=512", "run.checkpoint_steps=2")
    first = _imdb_dist(*_sets(tmp_path, "train.epochs=1", *wide))
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    checkpoints = tmp_path / "run" / rundir.CHECKPOINTS
    before = sorted(p.name for p in checkpoints.rglob("*"))

    full = _imdb_dist(*_sets(tmp_path, "train.epochs=2", *wide), limit_file_size=100_000)
    _, err = full.communicate(timeout=600)
    assert full.returncode == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"error: cannot write a checkpoint in {checkpoints}") and "File too large" in lines[-1]
    assert "function_node" not in lines[-1]  # TensorFlow's op noise is trimmed
    assert "Traceback" not in err
    assert sorted(p.name for p in checkpoints.rglob("*")) == before  # nothing partial left, the old one intact
    assert not (tmp_path / "run" / rundir.REPORT).exists()  # the epoch-1 report was retired on resume

    resumed = _imdb_dist(*_sets(tmp_path, "train.epochs=2", *wide))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    report = json.loads((tmp_path / "run" / rundir.REPORT).read_text())
    assert report["optimizer_steps"] == 2 * STEPS  # resumed after epoch 1, from the intact checkpoint


def test_a_full_disk_for_the_small_run_files_is_one_line_and_leaves_no_temporary(tmp_path: Path):
    # 512 bytes: too small for config.yaml, the first file a run writes.
    proc = _imdb_dist(*_sets(tmp_path), limit_file_size=512)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last == f"error: cannot write {tmp_path / 'run' / rundir.CONFIG}: File too large"
    assert "Traceback" not in err
    assert list((tmp_path / "run").iterdir()) == []  # no half-written config, no temporary file


def _toy_export_parts(embedding_rows: int = 10):
    from imdb_dist.data.pipeline import Tokenizer

    model = keras.Sequential([keras.Input((None,), dtype="int64"), keras.layers.Embedding(embedding_rows, 4)])
    return Tokenizer(["good", "bad"], 10), model


def test_export_removes_the_leftovers_of_a_killed_export(tmp_path: Path):
    root = tmp_path / "model"
    for leftover in (".1.tmp-4242", ".1.old-4242"):
        (root / leftover / "variables").mkdir(parents=True)
    tokenizer, model = _toy_export_parts()
    export_model(root, tokenizer, model, 8, {"seed": 1})
    assert sorted(p.name for p in root.iterdir()) == ["1"]


def test_an_export_interrupted_by_any_exception_leaves_no_staging_directory(tmp_path: Path):
    root = tmp_path / "model"
    tokenizer, model = _toy_export_parts()
    with pytest.raises(TypeError):
        export_model(root, tokenizer, model, 8, {"not json": {1, 2}})  # fails after the SavedModel is written
    assert list(root.iterdir()) == []


def test_an_export_onto_a_full_disk_is_one_error_and_leaves_nothing(tmp_path: Path):
    # In a child process, so the file-size limit cannot touch pytest's own files.
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from pathlib import Path
from test_faults import _toy_export_parts
from imdb_dist.errors import RunError
from imdb_dist.export import export_model
tokenizer, model = _toy_export_parts(embedding_rows=20_000)  # 320 KB of variables
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    export_model(Path({str(tmp_path / "model")!r}), tokenizer, model, 8, {{"seed": 1}})
except RunError as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"cannot write the model export in {tmp_path / 'model'}: ")
    assert "File too large" in result.stdout
    assert list((tmp_path / "model").iterdir()) == []
