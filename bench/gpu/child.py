"""The child's side: a spec's runs of the job in one fresh process, started as ``imdb-dist train`` starts one.

The parent (:mod:`bench.gpu.runs`) writes the spec and starts ``python -m
bench.gpu --child SPEC``; this runs each run of the spec with
``imdb_dist.train.run`` and writes their outcomes where the spec says.
TensorFlow is imported inside functions, not at the top: a child must start
reading the archive before TensorFlow loads, as ``imdb-dist train`` does.
"""

from __future__ import annotations

import json
import signal
import traceback
from pathlib import Path
from typing import Any

from bench.gpu.lstm import lstm_runtime


def child(spec_path: Path) -> int:
    """Run a spec's runs of the job in this process, as ``imdb-dist train`` would; write their results."""
    spec = json.loads(spec_path.read_text())
    from imdb_dist.config import load_config
    from imdb_dist.data.sources import read_ahead
    from imdb_dist.logs import import_tensorflow_quietly, setup_logging
    from imdb_dist.timings import since_process_start

    setup_logging()
    first = load_config(None, spec["runs"][0]["overrides"])
    # As imdb-dist train: the archive is read on another core while TensorFlow loads.
    reading = _Kept(read_ahead(first.data))
    import_tensorflow_quietly()
    results = []
    for i, run_spec in enumerate(spec["runs"]):
        # Only the first run's start-up is this process's (a report's "start-up" phase).
        results.append(_child_run(run_spec, reading, since_process_start() if i == 0 else None))
    Path(spec["result"]).write_text(json.dumps({"runs": results}, indent=2))
    return 0


class _Kept:
    """The training splits being read ahead, kept once read: the later runs and the LSTM probe reuse them."""

    def __init__(self, reading: Any) -> None:
        self._reading, self._splits = reading, None

    def result(self) -> Any:
        if self._splits is None:
            self._splits = self._reading.result()
        return self._splits


def _child_run(spec: dict[str, Any], reading: _Kept, startup_s: float | None) -> dict[str, Any]:
    """One run of the job; with ``probe``, then the LSTM kernel its trained model runs."""
    import tensorflow as tf
    import tf_keras as keras

    from imdb_dist.config import load_config
    from imdb_dist.errors import ConfigError
    from imdb_dist.interrupt import Interrupted, StopRequest
    from imdb_dist.train import run

    cfg = load_config(None, spec["overrides"])
    result: dict[str, Any] = {"name": spec["name"], "run_dir": cfg.run.output_dir}
    stop = StopRequest()
    # A bare callback: the callback list hands it the run's model, which it keeps after train.run returns.
    kept = keras.callbacks.Callback()
    callbacks: list[Any] = [kept]
    stopper = _stop_mid_epoch(stop, spec["stop_in_epoch"]) if spec.get("stop_in_epoch") else None
    if stopper is not None:
        callbacks.append(stopper)

    def train(cfg: Any) -> None:
        run(cfg, stop=stop, extra_callbacks=callbacks, startup_s=startup_s, reading=reading)

    try:
        try:
            train(cfg)
        except ConfigError as exc:
            # Refused before anything is written (see the TODO in bench.gpu.plan.Plan.fallback).
            if exc.key != "train.mixed_precision" or not spec.get("fallback_precision"):
                raise
            result["precision_refused"] = {"asked": cfg.train.mixed_precision, "error": str(exc),
                                           "ran": spec["fallback_precision"]}
            cfg = load_config(None, [*spec["overrides"], f"train.mixed_precision={spec['fallback_precision']}"])
            train(cfg)
        result["outcome"] = "complete"
    except Interrupted as exc:
        result.update(outcome="interrupted", message=str(exc), stopped_at=stopper.stopped_at if stopper else None)
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError) as exc:
        if not cfg.train.deterministic:
            raise
        # Op determinism refuses ops that have no deterministic kernel: which one is the answer.
        result.update(outcome="refused", error=type(exc).__name__, message=exc.message[:3000])
        return result
    if result["outcome"] == "complete" and spec.get("probe"):
        try:
            result["lstm"] = lstm_runtime(kept.model, cfg, reading.result()[1].texts)
        except Exception as exc:  # noqa: BLE001 - the run's figures stand without the probe
            traceback.print_exc()
            result["lstm"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def _stop_mid_epoch(stop: Any, epoch: int) -> Any:
    """A Keras callback requesting a stop half-way through epoch ``epoch`` (1-based), as a SIGTERM handler would.

    It sets the request before the step runs (batch-begin hooks run before
    every execution; batch-end ones only at step points): the loop finishes
    that step, checkpoints and raises ``Interrupted``. Built here, not at
    import: tf_keras loads only after the child started reading the archive.
    """
    import tf_keras as keras

    class StopMidEpoch(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.stopped_at: dict[str, int] | None = None
            self._epoch = 0

        def on_epoch_begin(self, index: int, logs: dict | None = None) -> None:
            self._epoch = index + 1

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            steps = int(self.params.get("steps") or 1)
            at = max(1, steps // 2)  # the step after which the run stops, 1-based
            if self._epoch == epoch and batch + 1 >= at and self.stopped_at is None:
                stop.signum = signal.SIGTERM  # what imdb_dist.interrupt's handler sets
                self.stopped_at = {"epoch": self._epoch, "step": batch + 1, "steps_per_epoch": steps}

    return StopMidEpoch()
