"""Accuracy and time to accuracy: imdb-dist presets vs the seed-style script, and the plot.

Trains each given imdb-dist preset with ``imdb-dist``'s own ``run`` (the
real job: output contract, exported model), and the seed-style script at
its own settings, all on the same data and validation split. Reports each
one's validation accuracy per epoch, the wall time (from the start of
training) at which it first reached ``--threshold``, and the accuracy of
the exported model; draws validation accuracy against wall time.

    python -m bench.accuracy --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --preset job/configs/fast.yaml --preset job/configs/best.yaml --plot docs/accuracy_vs_time.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench import seed
from bench.timing import emit
from imdb_dist import rundir
from imdb_dist.callbacks import read_metrics
from imdb_dist.config import DataConfig, load_config
from imdb_dist.data.sources import load_reviews
from imdb_dist.train import run


def first_reaching(curve: list[tuple[float, float]], threshold: float) -> float | None:
    """The first wall time at which the accuracy is at least ``threshold`` (None: never)."""
    return next((wall for wall, acc in curve if acc >= threshold), None)


def run_preset(preset: str, data: str, out: Path, overrides: list[str]) -> dict:
    cfg = load_config(preset, [f"data.path={data}", f"run.output_dir={out}", *overrides])
    run(cfg)
    records = read_metrics(out / rundir.METRICS)
    report = json.loads((out / rundir.REPORT).read_text())
    return {
        "curve": [(r["wall_s"], r["val_accuracy"]) for r in records],
        "exported_val_accuracy": report["validation"]["accuracy"],
        "examples_per_s_median": report["examples_per_s_median"],
        "train_wall_s": records[-1]["wall_s"],
    }


def plot(curves: dict[str, list[tuple[float, float]]], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([0.0] + [w for w, _ in curve], [0.5] + [a for _, a in curve], "o-", label=name)
    ax.axhline(threshold, color="grey", linestyle=":", label=f"{threshold:.2f}")
    ax.set_xlabel("wall time since the first training step (s), 2 CPU cores")
    ax.set_ylabel("validation accuracy (2,500 held-out reviews)")
    ax.set_ylim(0.45, 0.95)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", action="append", default=[], help="imdb-dist preset (repeatable)")
    parser.add_argument("--seed-max-len", type=int, action="append", default=[], help="seed-style runs (repeatable)")
    parser.add_argument("--seed-epochs", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.88)
    parser.add_argument("--plot", type=Path, help="write validation accuracy vs wall time here (PNG)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="imdb-dist-bench-") as tmp:
        for preset in args.preset:
            name = Path(preset).stem
            results[f"imdb-dist {name}"] = run_preset(preset, args.data, Path(tmp) / name, args.overrides)
    data = DataConfig(source="aclimdb", path=args.data)
    train, val = load_reviews(data, "train"), load_reviews(data, "validation")
    for max_len in args.seed_max_len or [100]:
        outcome = seed.train_seed(train, val, max_len=max_len, epochs=args.seed_epochs)
        results[f"seed-style max_len {max_len}"] = {
            "curve": list(zip(outcome["epoch_wall_s"], outcome["val_accuracy"], strict=True)),
            "examples_per_s_median": sorted(outcome["examples_per_s"])[len(outcome["examples_per_s"]) // 2],
            "train_wall_s": outcome["epoch_wall_s"][-1],
        }
    for result in results.values():
        result["seconds_to_threshold"] = first_reaching(result["curve"], args.threshold)
        result["best_val_accuracy"] = max(acc for _, acc in result["curve"])
    if args.plot:
        plot({name: r["curve"] for name, r in results.items()}, args.threshold, args.plot)
    emit({"benchmark": "accuracy", "threshold": args.threshold, "results": results})


if __name__ == "__main__":
    main()
