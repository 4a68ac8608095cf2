"""The sweep: check it, start (or resume) Ray Tune's search, and write what it found.

It joins the cluster in ``RAY_ADDRESS`` (as ``ray job submit`` sets it), else
starts a local one. Ray Tune runs :func:`imdb_dist.tune.trial.run_trial` once
per sampled config; an ASHA scheduler stops the trials whose per-epoch metric
trails (not with ``tune.folds``, whose trials report once per fold).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
from pathlib import Path
from typing import Any

from imdb_dist import rundir, storage, tracking
from imdb_dist.config import (
    Config,
    TuneConfig,
    dump_yaml,
    load_config,
    to_dict,
    with_values,
)
from imdb_dist.errors import ConfigError, InputError, RunError
from imdb_dist.interrupt import Interrupted
from imdb_dist.tune import mlflow_runs
from imdb_dist.tune.results import (
    BEST,
    RESULTS,
    SWEEP,
    TRIALS_PLOT,
    best_yaml,
    objective,
    plot_trials,
    trial_rows,
    write_results,
)
from imdb_dist.tune.space import check_space, param_space

log = logging.getLogger(__name__)


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
    tracking.check(cfg.tracking)
    base = _trial_base(cfg)
    # Read the data once here: a missing or malformed source is one error line
    # and exit 2 now, not the same failure in every trial.
    from imdb_dist.data.sources import load_reviews

    load_reviews(base.data, "train")
    from ray import tune as ray_tune

    from imdb_dist.ray_cluster import connect

    # Here, not at the top: the trial module loads TensorFlow, and importing
    # imdb_dist.tune (check_space, before TensorFlow loads) must not.
    from imdb_dist.tune.trial import run_trial

    connect()
    sweep = out / SWEEP
    trainable = ray_tune.with_resources(
        functools.partial(run_trial, base=to_dict(base), folds=cfg.tune.folds, metric=cfg.tune.metric, out=str(out)),
        _trial_resources(cfg),
    )
    tuner = _tuner(cfg, trainable, out)
    # After the sweep's config is saved (a directory holding anything else is no sweep); the trials read its id.
    mlflow_runs.open_sweep(cfg, out)
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
    _write_findings(grid, cfg, base, out)
    return out


def _tuner(cfg: Config, trainable: Any, out: Path) -> Any:
    """Ray Tune's tuner for the sweep in ``out``: the saved one to resume, else a new one (its config saved)."""
    from ray import tune as ray_tune

    sweep = out / SWEEP
    if ray_tune.Tuner.can_restore(str(sweep)):
        log.info("resuming the sweep in %s", sweep)
        return ray_tune.Tuner.restore(str(sweep), trainable, resume_unfinished=True, resume_errored=True)
    out.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(out / rundir.CONFIG, dump_yaml(cfg))
    return ray_tune.Tuner(
        trainable,
        param_space=param_space(cfg.tune),
        tune_config=ray_tune.TuneConfig(
            metric=objective(cfg.tune),
            mode=cfg.tune.mode,
            num_samples=cfg.tune.trials,
            max_concurrent_trials=_concurrency(cfg),
            scheduler=_scheduler(cfg),
            search_alg=_searcher(cfg.tune),
        ),
        run_config=ray_tune.RunConfig(name=SWEEP, storage_path=str(out), verbose=0),
    )


def _write_findings(grid: Any, cfg: Config, base: Config, out: Path) -> None:
    """results.csv, best.yaml and trials.png from the ended sweep's ``grid``.

    Raises:
        RunError: no trial finished.
    """
    metric = objective(cfg.tune)
    rows = trial_rows(grid, cfg, out)
    write_results(rows, cfg, out / RESULTS)
    finished = [row for row in rows if row["status"] != "error" and row[metric] is not None]
    if not finished:
        errors = [str(result.error).splitlines()[0] for result in grid if result.error]
        raise RunError(f"no trial of the sweep in {out} finished: {errors[0] if errors else 'no results'}")
    best = (max if cfg.tune.mode == "max" else min)(finished, key=lambda row: row[metric])
    best_cfg = with_values(base, {**best["values"], "run.output_dir": str(out / "best")})
    rundir.atomic_write(out / BEST, best_yaml(best_cfg, best, metric))
    plot_trials(rows, cfg, out / TRIALS_PLOT)
    mlflow_runs.close_sweep(cfg, out, best, metric, [out / RESULTS, out / BEST, out / TRIALS_PLOT])
    log.info(
        "tune: %d trials (%d finished); best %s %.4f with %s; config in %s",
        len(rows),
        len(finished),
        metric,
        best[metric],
        ", ".join(f"{k}={v!r}" for k, v in best["values"].items()),
        out / BEST,
    )


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
