"""A sweep in MLflow (``tracking.uri``): the sweep's own run, each trial a run nested under it, the best one tagged.

A trial without ``tune.folds`` trains one run: its MLflow run (its config
as params, its curves, its model) nests directly under the sweep's. With
folds, the trial's run holds its sampled values and its fold-averaged
score, and each fold's training run nests under it. The ids live beside
the runs they name (``tracking.json`` in the sweep's and each trial's
directory), so a restored sweep logs into the same runs.

The trial side is best effort: a tracker that fails here costs a warning,
never a trial (the training runs' own logging retries in the background,
:mod:`imdb_dist.tracking`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from imdb_dist import rundir, storage, tracking
from imdb_dist.config import Config

log = logging.getLogger(__name__)


def _kept(directory: Path, cfg: Config) -> str | None:
    path = directory / rundir.TRACKING
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    return str(kept["run_id"]) if kept.get("uri") == storage.redact(cfg.tracking.uri) else None


def _open(cfg: Config, directory: Path, name: str, tags: dict[str, str], params: dict[str, str]) -> str:
    if (run_id := _kept(directory, cfg)) is not None:
        return run_id
    mlflow = tracking.client(cfg.tracking)
    run = mlflow.create_run(tracking.experiment_id(mlflow, cfg.tracking.experiment), run_name=name,
                            tags={**cfg.tracking.tags, **tags})
    tracking.log_params(mlflow, run.info.run_id, params)
    directory.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(directory / rundir.TRACKING, json.dumps(
        {"uri": storage.redact(cfg.tracking.uri), "run_id": run.info.run_id, "experiment": cfg.tracking.experiment}))
    return run.info.run_id


def open_sweep(cfg: Config, out: Path) -> str | None:
    """The sweep's MLflow run (its whole config as params), kept in ``out``; None with tracking off."""
    if not cfg.tracking.enabled:
        return None
    run_id = _open(cfg, out, f"sweep {out.name}", {"imdb_dist.sweep": str(out)}, tracking.config_params(cfg))
    log.info("tracking: the sweep is MLflow run %s in experiment %r", run_id, cfg.tracking.experiment)
    return run_id


def sweep_run(cfg: Config, out: Path) -> str | None:
    """The sweep's MLflow run, as :func:`open_sweep` kept it in ``out`` (read by each trial); None with tracking off."""
    return _kept(out, cfg) if cfg.tracking.enabled else None


def open_trial(cfg: Config, trial_dir: Path, sweep_run: str, trial_id: str, values: dict[str, Any]) -> str | None:
    """A cross-validated trial's run under the sweep's: its sampled values as params; its folds nest under it."""
    try:
        return _open(cfg, trial_dir, trial_id, {"mlflow.parentRunId": sweep_run, "imdb_dist.trial_id": trial_id},
                     {key: json.dumps(value) for key, value in values.items()})
    except Exception as exc:  # noqa: BLE001 - the client raises many types; none may cost a trial
        log.warning("tracking: no MLflow run for trial %s (%s); its folds are logged under the sweep",
                    trial_id, tracking.reason(exc))
        return sweep_run


def log_fold(cfg: Config, run_id: str, fold: int, metric: str, score: float, mean: float) -> None:
    """A fold's score and the running fold mean (the trial's score so far) at step ``fold``."""
    from mlflow.entities import Metric

    try:
        now = int(time.time() * 1000)
        tracking.client(cfg.tracking).log_batch(
            run_id, metrics=[Metric(metric, score, now, fold), Metric(f"cv_{metric}", mean, now, fold)])
    except Exception as exc:  # noqa: BLE001 - the client raises many types; none may cost a trial
        log.warning("tracking: fold %d's score not logged (%s)", fold, tracking.reason(exc))


def close_sweep(cfg: Config, out: Path, best: dict[str, Any], metric: str, artifacts: list[Path]) -> None:
    """Tag the best trial's run, give the sweep's run the best score and the sweep's findings, and end it."""
    sweep_run = _kept(out, cfg)
    if sweep_run is None:
        return
    from mlflow.entities import Metric, RunTag

    mlflow = tracking.client(cfg.tracking)
    try:
        best_run = _kept(Path(best["run_dir"]), cfg)
        if best_run is not None:
            mlflow.set_tag(best_run, "imdb_dist.best_trial", "true")
        mlflow.log_batch(sweep_run, metrics=[Metric(f"best_{metric}", float(best[metric]), 0, 0)],
                         tags=[RunTag("imdb_dist.best_trial", best["trial_id"])])
        for path in artifacts:
            if path.exists():
                mlflow.log_artifact(sweep_run, str(path))
        mlflow.set_terminated(sweep_run, "FINISHED")
    except Exception as exc:  # noqa: BLE001 - the client raises many types; none may cost a trial
        log.warning("tracking: the sweep's MLflow run %s was not closed (%s)", sweep_run, tracking.reason(exc))
