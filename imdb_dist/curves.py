"""The run's learning curves, ``curves.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, training and validation, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # batch jobs have no display
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "o-"), (f"val_{metric}", "s--")):
            values = [r.get(key) for r in records]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(staging, dpi=100)
    plt.close(fig)
    staging.replace(path)
