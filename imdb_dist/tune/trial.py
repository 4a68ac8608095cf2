"""Inside one trial: train the base config with the trial's sampled values, reporting to Ray Tune.

A trial trains in its own process (:func:`imdb_dist.train.run`, its
TensorFlow thread pools sized to the trial's CPUs) or, with
``tune.workers_per_trial > 1``, launches a Ray Train run of that many workers
(:func:`imdb_dist.launch.launch`) from inside the trial. It reports its
validation metrics after every epoch, or with ``tune.folds`` once per fold.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import tf_keras as keras

from imdb_dist import rundir
from imdb_dist.config import Config, config_from_dict, with_values
from imdb_dist.rundir import read_metrics
from imdb_dist.tune import mlflow_runs
from imdb_dist.tune.results import TRIALS


class _ReportEpochs(keras.callbacks.Callback):
    """Hands each epoch's validation metrics to Ray Tune (which may stop the trial there)."""

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.extra = extra or {}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from ray import tune as ray_tune

        logs = logs or {}
        ray_tune.report(
            {
                "epoch": epoch + 1,
                **{k: float(logs[k]) for k in ("val_accuracy", "val_loss", "loss", "accuracy") if k in logs},
                **self.extra,
            }
        )


def run_trial(values: dict[str, Any], *, base: dict[str, Any], folds: int, metric: str, out: str) -> None:
    """One trial: train the base config with ``values`` in ``out/trials/<trial id>``."""
    import ray
    from ray import tune as ray_tune

    from imdb_dist.logs import import_tensorflow_quietly, setup_logging

    setup_logging()
    import_tensorflow_quietly()
    from imdb_dist.distribute import size_thread_pools

    cfg = with_values(config_from_dict(base), values)
    trial_id = ray_tune.get_context().get_trial_id()
    trial_dir = Path(out) / TRIALS / trial_id
    if cfg.ray.num_workers == 1:
        size_thread_pools(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    # The trial's MLflow run nests under the sweep's (imdb_dist.tune.mlflow_runs); None with tracking off.
    parent = mlflow_runs.sweep_run(cfg, Path(out))
    if not folds:
        _train_once(_located(cfg, trial_dir), _ReportEpochs(), parent)
        return
    trial_run = mlflow_runs.open_trial(cfg, trial_dir, parent, trial_id, values) if parent is not None else None
    scores = []
    for fold in range(folds):
        fold_cfg = _located(with_values(cfg, {"data.folds": folds, "data.fold": fold}), trial_dir / f"fold{fold}")
        report = _train_once(fold_cfg, None, trial_run)
        scores.append(report["validation"]["accuracy" if metric == "val_accuracy" else "loss"])
        if trial_run is not None:
            mlflow_runs.log_fold(cfg, trial_run, fold, metric, scores[-1], statistics.fmean(scores))
        ray_tune.report(
            {"fold": fold, "epoch": report["epochs"], metric: scores[-1], f"cv_{metric}": statistics.fmean(scores)}
        )


def _located(cfg: Config, directory: Path) -> Config:
    """``cfg`` writing its run directory at ``directory`` (``train``'s and ``launch``'s keys for it)."""
    return with_values(
        cfg, {"run.output_dir": str(directory), "ray.storage_path": str(directory.parent), "ray.name": directory.name}
    )


def _train_once(cfg: Config, callback: keras.callbacks.Callback | None, parent: str | None) -> dict[str, Any]:
    """Train ``cfg``, resuming its run directory if a restored sweep left one; returns its report.

    Epochs an earlier attempt finished are handed to ``callback`` first, so a
    resumed trial reports every epoch once, in order.
    """
    metrics = Path(cfg.run.output_dir) / rundir.METRICS
    done = len(read_metrics(metrics))
    if callback is not None:
        for record in read_metrics(metrics):
            callback.on_epoch_end(record["epoch"] - 1, record)
    if cfg.ray.num_workers > 1:
        from imdb_dist.launch import launch

        launch(cfg, tracked_under=parent)
        if callback is not None:  # the Train run's epochs, handed on once it ends
            for record in read_metrics(metrics)[done:]:
                callback.on_epoch_end(record["epoch"] - 1, record)
    else:
        from imdb_dist.train import run

        run(cfg, extra_callbacks=[callback] if callback is not None else [], tracked_under=parent)
    return json.loads((Path(cfg.run.output_dir) / rundir.REPORT).read_text())
