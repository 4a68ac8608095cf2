"""The run's learning curves, ``curves.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(records: list[dict[str, Any]], steps: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy against optimizer steps, with epoch boundaries marked.

    Training values are the step points of ``steps.jsonl`` (lines); validation
    is scored once per epoch and drawn at the epoch's last step (markers).
    Without step points (a run from before they were logged) the x axis is
    the epoch.
    """
    # A bare Figure, not pyplot: no global figure registry to leak into and
    # no GUI backend to pick, so it draws in any batch job or thread.
    from matplotlib.figure import Figure

    # Each epoch ends at its last logged step; validation is drawn there.
    ends = {r["epoch"]: r["step"] for r in steps}
    by_step = bool(steps) and all(r["epoch"] in ends for r in records)
    x_val = [ends[r["epoch"]] for r in records] if by_step else [r["epoch"] for r in records]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        if by_step:
            points = [(r["step"], r[metric]) for r in steps if metric in r]
            ax.plot([x for x, _ in points], [y for _, y in points], "-", linewidth=1.2, label=metric)
            for end in ends.values():
                ax.axvline(end, color="grey", linestyle=":", linewidth=0.8)
        else:
            ax.plot(x_val, [r.get(metric) for r in records], "o-", label=metric)
        values = [r.get(f"val_{metric}") for r in records]
        if any(v is not None for v in values):
            ax.plot(x_val, values, "s--", markersize=7, label=f"val_{metric}")
        ax.set_xlabel("optimizer step (dotted: epoch ends)" if by_step else "epoch")
        if not by_step:
            ax.set_xticks(x_val)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(staging, dpi=100)
    staging.replace(path)
