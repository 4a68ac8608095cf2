"""Time to accuracy from a cold start: the whole ``imdb-dist train`` process, phase by phase, against the seed.

Most IMDB jobs are one or two epochs, so what a user waits for is the
process: importing TensorFlow, reading the archive, the vocabulary, tracing
the step, the first epoch, exporting and scoring. Each round runs, as fresh
processes that each get a fresh, empty HOME (no cache from an earlier run):

- ``current``: ``imdb-dist train --config CONFIG`` (this tree): wall time
  from before the process starts to its exit, the exported model's
  validation accuracy, ``report.json``'s seconds per phase, and the first
  epoch's training examples/s;
- ``steady`` (unless ``--no-steady``): the same config with one more epoch:
  its first epoch against its last, the first epoch's speed against the
  steady state;
- ``seed``: ``python -m bench.seed --epochs 1`` at the config's ``max_len``:
  the seed-style script's first epoch (plain Keras, as users write it);
- ``seed-settings`` (with ``--seed-settings``): ``python -m bench.seed`` at
  the seed's own settings (max_len 100, batch 30, 2 epochs): its process
  time to its own accuracy, which ``current_over_seed_settings`` divides
  ``current``'s process time by;
- ``baseline`` (with ``--baseline REV``): ``current`` at a git revision,
  checked out in a temporary worktree.

The variants alternate round by round so machine noise hits them alike;
medians and the ratios of medians are reported.

    python -m bench.coldstart --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --config job/configs/fast.yaml --rounds 3 [--baseline 01eda5e] [--output FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import harness, seed
from bench.baseline import REPO, worktree
from bench.harness import median
from bench.machine import cpu_model
from imdb_dist.config import load_config


def _fresh_env(tree: Path, home: Path) -> dict[str, str | None]:
    # This tree's imdb_dist and bench, ahead of any installed copy; nothing cached under HOME.
    return {"MPLCONFIGDIR": None, "XDG_CACHE_HOME": None, "HOME": str(home), "PYTHONPATH": str(tree)}


def run_imdb_dist(tree: Path, config: Path, sets: list[str], out: Path, home: Path) -> dict[str, Any]:
    """One ``imdb-dist train`` process, timed from outside; what its run directory says."""
    done = harness.run_job("train", config, [*sets, f"run.output_dir={out}"], tree=tree, env=_fresh_env(tree, home))
    report = harness.read_report(out)
    return {
        "process_wall_s": done.wall_s,
        "val_accuracy": report["validation"]["accuracy"],
        "epoch_examples_per_s": [r["examples_per_s"] for r in harness.read_records(out)],
        # Absent from revisions before the report had them.
        "phases_s": report.get("timings", {}).get("phases_s", {}),
    }


def run_seed(data: str, max_len: int, home: Path, epochs: int = 1) -> dict[str, Any]:
    """The seed-style script in its own process (``val_accuracy``: its last epoch's)."""
    argv = [sys.executable, "-m", "bench.seed", "--data", data, "--max-len", str(max_len), "--epochs", str(epochs)]
    done = harness.run(argv, env=_fresh_env(REPO, home))
    result = harness.summary_of(done)
    return {
        "process_wall_s": done.wall_s,
        "val_accuracy": result["val_accuracy"][-1],
        "epoch_examples_per_s": result["examples_per_s"],
    }


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per variant, and the ratios docs/training.md quotes."""
    medians: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        medians[name] = {
            "process_wall_s": median([r["process_wall_s"] for r in runs]),
            "val_accuracy": median([r["val_accuracy"] for r in runs]),
            "first_epoch_examples_per_s": median([r["epoch_examples_per_s"][0] for r in runs]),
        }
        phases = [r.get("phases_s", {}) for r in runs]
        if all(phases):
            medians[name]["phases_s"] = {key: median([p[key] for p in phases]) for key in phases[0]}
        if name == "steady":
            medians[name]["last_epoch_examples_per_s"] = median([r["epoch_examples_per_s"][-1] for r in runs])
    summary: dict[str, Any] = {"median": medians}
    current = medians["current"]
    if "seed" in medians:
        summary["first_epoch_over_seed_first_epoch"] = (
            current["first_epoch_examples_per_s"] / medians["seed"]["first_epoch_examples_per_s"]
        )
    if "steady" in medians:
        steady = medians["steady"]
        summary["first_epoch_over_steady_state"] = (
            steady["first_epoch_examples_per_s"] / steady["last_epoch_examples_per_s"]
        )
    if "seed-settings" in medians:
        summary["current_over_seed_settings"] = current["process_wall_s"] / medians["seed-settings"]["process_wall_s"]
    if "baseline" in medians:
        summary["process_wall_baseline_over_current"] = (
            medians["baseline"]["process_wall_s"] / current["process_wall_s"]
        )
    return summary


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--config", type=Path, default=Path("job/configs/fast.yaml"))
    harness.add_rounds(parser, default=3)
    parser.add_argument("--baseline", help="also time this git revision's imdb-dist, side by side")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed-style script")
    parser.add_argument("--no-steady", action="store_true", help="skip the run with one more epoch")
    parser.add_argument(
        "--seed-settings", action="store_true", help="also time the seed-style script at the seed's own settings"
    )
    harness.add_sets(parser)
    harness.add_output(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-coldstart-") as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        base = stack.enter_context(worktree(args.baseline, scratch / "baseline-tree")) if args.baseline else None
        variants = _variants(args, base)

        def fresh(name: str) -> Any:
            def run(round_: int) -> dict[str, Any]:
                home = scratch / f"home-{name}-{round_}"
                home.mkdir()
                return variants[name](scratch / f"{name}-{round_}", home)

            return run

        results = harness.interleave({name: fresh(name) for name in variants}, args.rounds)
    harness.emit({
        "benchmark": "coldstart",
        "config": str(args.config),
        "overrides": args.overrides,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        **summarize(results),
        "runs": results,
    }, args.output)


def _variants(args: argparse.Namespace, base: Path | None) -> dict[str, Callable[[Path, Path], dict[str, Any]]]:
    """Name -> a run of it into (run directory, fresh HOME): the variants the flags ask for."""
    data = str(Path(args.data).resolve())
    config = args.config.resolve()
    cfg = load_config(config, [f"data.path={data}", *args.overrides])
    sets = [f"data.path={data}", *args.overrides]
    more = [*sets, f"train.epochs={cfg.train.epochs + 1}"]
    variants: dict[str, Callable[[Path, Path], dict[str, Any]]] = {
        "current": lambda out, home: run_imdb_dist(REPO, config, sets, out, home),
    }
    if not args.no_steady:
        variants["steady"] = lambda out, home: run_imdb_dist(REPO, config, more, out, home)
    if not args.no_seed:
        variants["seed"] = lambda out, home: run_seed(data, cfg.data.max_len, home)
    if args.seed_settings:
        variants["seed-settings"] = lambda out, home: run_seed(data, seed.MAX_LEN, home, seed.EPOCHS)
    if base is not None:
        variants["baseline"] = lambda out, home: run_imdb_dist(base, config, sets, out, home)
    return variants


if __name__ == "__main__":
    main()
