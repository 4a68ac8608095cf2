"""``imdb-dist tune``: a Ray Tune search over the config's own keys.

The config's ``tune:`` section (:class:`imdb_dist.config.TuneConfig`) names
the search space. Ray Tune runs one trial function per sampled config, as
Ray 2.60 supports tuning Train V2 jobs: a trial trains the config in its own
process (``imdb_dist.train.run``, its TensorFlow thread pools sized to the
trial's CPUs), or, with ``tune.workers_per_trial > 1``, launches a Ray Train
run of it with that many workers (``imdb_dist.launch``) from inside the trial. Each trial reports its
validation metric after every epoch, which an ASHA scheduler uses to stop
trials that trail; with ``tune.folds`` a trial instead trains every fold of
a k-fold split and reports once per fold, scored by the folds' mean.

``run.output_dir`` of the sweep receives::

    results.csv   one row per trial: status, sampled values, metric, epochs run
    best.yaml     the best trial's complete config: imdb-dist train --config best.yaml
    trials.png    every trial's validation curve
    trials/<id>/  each trial's imdb-dist run directory (its fold{k}/ runs with tune.folds)
    sweep/        Ray Tune's own state: running the same command again resumes the sweep

It joins the cluster in ``RAY_ADDRESS`` (as ``ray job submit`` sets it), else
starts a local one.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import signal
import statistics
from pathlib import Path
from typing import Any

import tf_keras as keras
import yaml

from imdb_dist import rundir, storage
from imdb_dist.config import (
    Config,
    TuneConfig,
    check_space,
    config_from_dict,
    dump_yaml,
    load_config,
    to_dict,
    with_values,
)
from imdb_dist.errors import ConfigError, InputError, RunError
from imdb_dist.interrupt import Interrupted
from imdb_dist.rundir import read_metrics

log = logging.getLogger(__name__)

RESULTS = "results.csv"
BEST = "best.yaml"
TRIALS_PLOT = "trials.png"
TRIALS = "trials"
SWEEP = "sweep"


def tune(cfg: Config) -> Path:
    """Run (or resume) the sweep ``cfg.tune`` describes; returns the sweep directory.

    Raises:
        InputError: a bad search space or output directory (before any trial runs).
        RunError: no trial finished.
    """
    check_space(cfg)
    if storage.is_uri(cfg.run.output_dir):
        raise ConfigError("run.output_dir", "imdb-dist tune writes to a local or shared directory, not a storage URI")
    out = Path(cfg.run.output_dir).resolve()
    rundir.check_writable(out)
    _check_same_sweep(cfg, out)
    base = _trial_base(cfg)
    # Read the data once here: a missing or malformed source is one error line
    # and exit 2 now, not the same failure in every trial.
    from imdb_dist.data.sources import load_reviews

    load_reviews(base.data, "train")
    from ray import tune as ray_tune

    from imdb_dist.launch import connect

    connect()
    metric = _objective(cfg.tune)
    sweep = out / SWEEP
    trainable = ray_tune.with_resources(
        functools.partial(_trial, base=to_dict(base), folds=cfg.tune.folds, metric=cfg.tune.metric, out=str(out)),
        _trial_resources(cfg),
    )
    if ray_tune.Tuner.can_restore(str(sweep)):
        log.info("resuming the sweep in %s", sweep)
        tuner = ray_tune.Tuner.restore(str(sweep), trainable, resume_unfinished=True, resume_errored=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write(out / rundir.CONFIG, dump_yaml(cfg))
        tuner = ray_tune.Tuner(
            trainable,
            param_space=_param_space(cfg.tune),
            tune_config=ray_tune.TuneConfig(
                metric=metric,
                mode=cfg.tune.mode,
                num_samples=cfg.tune.trials,
                max_concurrent_trials=_concurrency(cfg),
                scheduler=_scheduler(cfg),
                search_alg=_searcher(cfg.tune),
            ),
            run_config=ray_tune.RunConfig(name=SWEEP, storage_path=str(out), verbose=0),
        )
    grid = tuner.fit()
    # The saved experiment state, not the returned grid, says whether the
    # sweep ended: after Ctrl-C Tune returns, and the trials it cut short are
    # saved as pending (to resume), while the grid counts them as terminated.
    statuses = [trial.status for trial in ray_tune.ExperimentAnalysis(str(sweep)).trials]
    unfinished = sum(status not in ("TERMINATED", "ERROR") for status in statuses)
    if unfinished:
        # Tune stops gracefully on Ctrl-C and returns what it has: no results
        # for a sweep that has not ended, and the exit status of the signal.
        raise Interrupted(
            signal.SIGINT,
            f"the sweep was interrupted with {unfinished} of {len(grid)} trials unfinished; its state is in "
            f"{sweep}: run the same command again to resume",
        )
    rows = _rows(grid, cfg, out)
    _write_results(rows, cfg, out / RESULTS)
    finished = [row for row in rows if row["status"] != "error" and row[metric] is not None]
    if not finished:
        errors = [str(result.error).splitlines()[0] for result in grid if result.error]
        raise RunError(f"no trial of the sweep in {out} finished: {errors[0] if errors else 'no results'}")
    best = (max if cfg.tune.mode == "max" else min)(finished, key=lambda row: row[metric])
    best_cfg = with_values(base, {**best["values"], "run.output_dir": str(out / "best")})
    rundir.atomic_write(out / BEST, _best_yaml(best_cfg, best, metric))
    _plot_trials(rows, cfg, out / TRIALS_PLOT)
    log.info(
        "tune: %d trials (%d finished); best %s %.4f with %s; config in %s",
        len(rows),
        len(finished),
        metric,
        best[metric],
        ", ".join(f"{k}={v!r}" for k, v in best["values"].items()),
        out / BEST,
    )
    return out


def _check_same_sweep(cfg: Config, out: Path) -> None:
    """Resume only the same sweep: refuse a directory holding another config, or anything else."""
    saved = out / rundir.CONFIG
    if not saved.exists():
        if out.is_dir() and any(out.iterdir()):
            raise InputError(f"run.output_dir {out} is not empty and holds no sweep ({rundir.CONFIG})")
        return
    previous = load_config(saved)
    if previous != cfg:
        old, new = to_dict(previous), to_dict(cfg)
        changed = [section for section in new if old.get(section) != new[section]]
        raise InputError(
            f"run.output_dir {out} holds a sweep of a different config (sections {', '.join(changed)} differ); "
            "choose another run.output_dir or remove it"
        )


def _trial_base(cfg: Config) -> Config:
    """The config every trial starts from: no tune section, its worker count, a data path valid anywhere."""
    base = with_values(dataclasses.replace(cfg, tune=TuneConfig()), {"ray.num_workers": cfg.tune.workers_per_trial})
    if base.data.path and not storage.is_uri(base.data.path):
        base = with_values(base, {"data.path": str(Path(base.data.path).resolve())})
    return base


def _objective(settings: TuneConfig) -> str:
    return f"cv_{settings.metric}" if settings.folds else settings.metric


def _param_space(settings: TuneConfig) -> dict[str, Any]:
    from ray import tune as ray_tune

    kinds = {
        "choice": ray_tune.choice,
        "grid": ray_tune.grid_search,
        "uniform": lambda values: ray_tune.uniform(*values),
        "loguniform": lambda values: ray_tune.loguniform(*values),
        "randint": lambda values: ray_tune.randint(*values),
    }
    space = {}
    for key, spec in settings.space.items():
        ((kind, values),) = spec.items()
        space[key] = kinds[kind](values)
    return space


def _searcher(settings: TuneConfig) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Seeded random / grid sampling: the same tune section samples the same trials.
    return BasicVariantGenerator(random_state=settings.seed)


def _scheduler(cfg: Config) -> Any:
    if not cfg.tune.early_stop or cfg.tune.folds:
        return None  # FIFO: every trial runs to its end
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",  # one report per epoch
        max_t=cfg.train.epochs,
        grace_period=min(cfg.tune.grace_epochs, cfg.train.epochs),
        reduction_factor=2,
    )


def _concurrency(cfg: Config) -> int | None:
    if cfg.tune.concurrency:
        return cfg.tune.concurrency
    if cfg.tune.workers_per_trial == 1:
        return None  # Tune packs trials onto the CPUs by their resources
    import ray

    # A multi-worker trial's own actor is tiny; its Train workers wait for
    # CPUs. Start only as many trials as can have all their workers at once.
    per_trial = cfg.tune.workers_per_trial * cfg.ray.resources_per_worker.get("CPU", 1.0)
    return max(1, int(ray.cluster_resources().get("CPU", 1.0) // per_trial))


def _trial_resources(cfg: Config) -> dict[str, float]:
    if cfg.tune.workers_per_trial > 1:
        return {"cpu": 0.1}  # the trial only drives a Ray Train run, whose workers request their own
    return {"cpu": cfg.tune.cpus_per_trial}


# --------------------------------------------------------------------------- inside a trial


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


def _trial(values: dict[str, Any], *, base: dict[str, Any], folds: int, metric: str, out: str) -> None:
    """One trial: train the base config with ``values`` in ``out/trials/<trial id>``."""
    import ray
    from ray import tune as ray_tune

    from imdb_dist.logs import import_tensorflow_quietly, setup_logging

    setup_logging()
    import_tensorflow_quietly()
    from imdb_dist.distribute import size_thread_pools

    cfg = with_values(config_from_dict(base), values)
    trial_dir = Path(out) / TRIALS / ray_tune.get_context().get_trial_id()
    if cfg.ray.num_workers == 1:
        size_thread_pools(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    if not folds:
        _train_once(_located(cfg, trial_dir), _ReportEpochs())
        return
    scores = []
    for fold in range(folds):
        fold_cfg = _located(with_values(cfg, {"data.folds": folds, "data.fold": fold}), trial_dir / f"fold{fold}")
        report = _train_once(fold_cfg, None)
        scores.append(report["validation"]["accuracy" if metric == "val_accuracy" else "loss"])
        ray_tune.report(
            {"fold": fold, "epoch": report["epochs"], metric: scores[-1], f"cv_{metric}": statistics.fmean(scores)}
        )


def _located(cfg: Config, directory: Path) -> Config:
    """``cfg`` writing its run directory at ``directory`` (``train``'s and ``launch``'s keys for it)."""
    return with_values(
        cfg, {"run.output_dir": str(directory), "ray.storage_path": str(directory.parent), "ray.name": directory.name}
    )


def _train_once(cfg: Config, callback: keras.callbacks.Callback | None) -> dict[str, Any]:
    """Train ``cfg``, resuming its run directory if a restored sweep left one; returns its report.

    Epochs an earlier attempt finished are handed to ``callback`` first, so a
    resumed trial reports every epoch once, in order.
    """
    import json

    metrics = Path(cfg.run.output_dir) / rundir.METRICS
    done = len(read_metrics(metrics))
    if callback is not None:
        for record in read_metrics(metrics):
            callback.on_epoch_end(record["epoch"] - 1, record)
    if cfg.ray.num_workers > 1:
        from imdb_dist.launch import launch

        launch(cfg)
        if callback is not None:  # the Train run's epochs, handed on once it ends
            for record in read_metrics(metrics)[done:]:
                callback.on_epoch_end(record["epoch"] - 1, record)
    else:
        from imdb_dist.train import run

        run(cfg, extra_callbacks=[callback] if callback is not None else [])
    return json.loads((Path(cfg.run.output_dir) / rundir.REPORT).read_text())


# --------------------------------------------------------------------------- results


def _rows(grid: Any, cfg: Config, out: Path) -> list[dict[str, Any]]:
    metric = _objective(cfg.tune)
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        records = history.to_dict("records") if history is not None else []
        # A trial resumed by a restored sweep reports its earlier epochs (folds) again: keep each once.
        unit = "fold" if cfg.tune.folds else "epoch"
        points = {int(r[unit]): r for r in records if r.get(unit) is not None and r[unit] == r[unit]}
        order = sorted(points)
        if cfg.tune.folds:
            epochs = sum(int(points[k]["epoch"]) for k in order)
            complete = len(order) == cfg.tune.folds
        else:
            epochs = max(order, default=0)
            complete = epochs >= cfg.train.epochs
        last = result.metrics or {}
        value = last.get(metric)
        status = "error" if result.error else "completed" if complete else "stopped early"
        trial_id = last.get("trial_id") or Path(result.path).name
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "values": {key: result.config.get(key) for key in cfg.tune.space},
                metric: None if value is None or not math.isfinite(float(value)) else float(value),
                "epochs": epochs,
                "curve": [points[k].get(cfg.tune.metric) for k in order],
                "run_dir": str(out / TRIALS / trial_id),
            }
        )
    return sorted(rows, key=lambda row: row["trial_id"])


def _write_results(rows: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    metric = _objective(cfg.tune)
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial_id", "status", *cfg.tune.space, metric, "epochs", "run_dir"])
        for row in rows:
            writer.writerow(
                [
                    row["trial_id"],
                    row["status"],
                    *(row["values"][key] for key in cfg.tune.space),
                    "" if row[metric] is None else row[metric],
                    row["epochs"],
                    row["run_dir"],
                ]
            )
    staging.replace(path)


def _best_yaml(best_cfg: Config, best: dict[str, Any], metric: str) -> str:
    raw = to_dict(best_cfg)
    del raw["tune"]  # a trained config, not another sweep
    header = (
        f"# The best trial of an imdb-dist tune sweep ({best['trial_id']}): {metric} {best[metric]:.4f}\n"
        f"# sampled: {', '.join(f'{k}={v!r}' for k, v in best['values'].items())}\n"
        "# imdb-dist train --config best.yaml\n"
    )
    return header + yaml.safe_dump(raw, sort_keys=False)


def _plot_trials(rows: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metric = _objective(cfg.tune)
    finished = [row for row in rows if row[metric] is not None]
    best = (max if cfg.tune.mode == "max" else min)(finished, key=lambda row: row[metric]) if finished else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        curve = [(i + 1, v) for i, v in enumerate(row["curve"]) if v is not None]
        if not curve:
            continue
        label = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in row["values"].items())
        ax.plot(
            [x for x, _ in curve],
            [y for _, y in curve],
            "o-",
            linewidth=2.5 if row is best else 1.0,
            alpha=1.0 if row is best else 0.6,
            label=f"{label} ({row['status']})",
        )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("fold" if cfg.tune.folds else "epoch")
    ax.set_ylabel(cfg.tune.metric + (" (each fold's model)" if cfg.tune.folds else ""))
    ax.set_title(f"imdb-dist tune: {len(rows)} trials, best bold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(staging, dpi=100)
    plt.close(fig)
    staging.replace(path)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)

