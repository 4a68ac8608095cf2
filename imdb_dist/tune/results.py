"""What a sweep writes: results.csv (one row per trial), best.yaml and trials.png, from Ray Tune's results."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import yaml

from imdb_dist.config import Config, TuneConfig, to_dict

RESULTS = "results.csv"
BEST = "best.yaml"
TRIALS_PLOT = "trials.png"
TRIALS = "trials"
SWEEP = "sweep"


def objective(settings: TuneConfig) -> str:
    """The metric trials report and the sweep ranks them by: with ``tune.folds``, the folds' mean (``cv_...``)."""
    return f"cv_{settings.metric}" if settings.folds else settings.metric


def trial_rows(grid: Any, cfg: Config, out: Path) -> list[dict[str, Any]]:
    """One row per trial of Ray Tune's result ``grid``: its status, sampled values, metric, epochs and curve."""
    metric = objective(cfg.tune)
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


def write_results(rows: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    """``rows`` as results.csv at ``path``, replaced whole (a reader never sees half a table)."""
    metric = objective(cfg.tune)
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


def best_yaml(best_cfg: Config, best: dict[str, Any], metric: str) -> str:
    """best.yaml: the best trial's config, with no tune section, under a header saying how it scored."""
    raw = to_dict(best_cfg)
    del raw["tune"]  # a trained config, not another sweep
    header = (
        f"# The best trial of an imdb-dist tune sweep ({best['trial_id']}): {metric} {best[metric]:.4f}\n"
        f"# sampled: {', '.join(f'{k}={v!r}' for k, v in best['values'].items())}\n"
        "# imdb-dist train --config best.yaml\n"
    )
    return header + yaml.safe_dump(raw, sort_keys=False)


def plot_trials(rows: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    """trials.png at ``path``: every trial's validation curve, the best one bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metric = objective(cfg.tune)
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

