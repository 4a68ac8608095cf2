"""One config on four topologies: epoch-end idle time, throughput, and what each trains, side by side.

Workers x local replicas = 1x1 (``imdb-dist train``), 1x2 (``imdb-dist
train`` with ``distribution.cpu_devices=2``: MirroredStrategy on two
logical CPUs), 2x1 and 2x2 (``imdb-dist launch``: a local Ray cluster, two
workers of one CPU each, with one or two logical CPUs per worker). Every
run is a fresh process on the same config (default ``smoke.yaml`` with 3
epochs) and the real reviews. From each run directory:

- **idle per epoch**: the chief's run wall time that no phase of
  ``report.json``'s ``timings`` accounts for (training steps, validation,
  checkpoints, callbacks, the plan, export, ...), divided by the epochs. An
  input pipeline torn down at each epoch's end shows up here (deleting an
  autotuned iterator waits for tf.data's tuning thread), and so does any
  other wait between phases: an upper bound on the idle time at epoch ends;
- **examples/s**: the first epoch's and the steady state's (the median of
  the later epochs), from ``metrics.jsonl``;
- **what it trained** (first round): the export's validation accuracy, and
  the largest and mean differences between its scores and the first
  topology's model's on the validation reviews. Float summation order
  differs between topologies, and a thousand steps of SGD amplify it; with
  ``--reseeded`` a 1x1 run with ``train.seed + 1`` (other initial weights
  and dropout masks, the same batches) shows how far two genuinely
  different runs of the config land apart, for scale.

With ``--baseline REV`` the 1x1 and 2x1 runs are repeated at that git
revision (checked out in a temporary worktree), alternating with this
tree's round by round, so machine noise hits both alike; medians and
ratios of medians are reported.

    python -m bench.topology --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --rounds 2 --baseline abf2fd9 --output docs/bench-results/topology.json
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.baseline import REPO, worktree
from bench.machine import cpu_model
from imdb_dist.config import load_config

TOPOLOGIES = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1), "2x2": (2, 2)}
RESEEDED = "1x1 train.seed+1"


def run_topology(tree: Path, config: Path, sets: list[str], workers: int, local: int, scratch: Path
                 ) -> tuple[Path, float]:
    """One run of the config on ``workers`` x ``local`` replicas, as a fresh process; its run directory and wall time."""
    sets = list(sets)
    if local > 1:
        sets.append(f"distribution.cpu_devices={local}")
    if workers == 1:
        command, run_dir = "train", scratch / "run"
        sets.append(f"run.output_dir={run_dir}")
    else:
        command, run_dir = "launch", scratch / "storage" / "job"
        sets += [f"ray.num_workers={workers}", f"ray.storage_path={scratch / 'storage'}", "ray.name=job"]
    home = scratch / "home"
    home.mkdir(parents=True)
    # A fresh HOME: nothing cached; launch starts its own throw-away cluster.
    done = harness.run_job(command, config, sets, tree=tree, env={"HOME": str(home), "RAY_ADDRESS": None})
    return run_dir, done.wall_s


def measure(run_dir: Path, process_wall_s: float) -> dict[str, Any]:
    report = harness.read_report(run_dir)
    records = harness.read_records(run_dir)
    phases = dict(report["timings"]["phases_s"])
    # report.json's wall_s runs from train.run's start to the end of
    # training: start-up comes before it, export, score and curves after.
    for outside in ("start-up", "export", "score", "curves"):
        phases.pop(outside, None)
    speeds = [r["examples_per_s"] for r in records]
    return {
        "process_wall_s": process_wall_s,
        "run_wall_s": report["wall_s"],
        "phases_s": phases,
        "idle_per_epoch_s": (report["wall_s"] - sum(phases.values())) / len(records),
        "first_epoch_examples_per_s": speeds[0],
        "steady_examples_per_s": harness.steady(speeds),
        "val_accuracy": report["validation"]["accuracy"],
        "replicas": report["replicas"],
        "workers": report["workers"],
    }


def scores(run_dir: Path, texts: list[str]) -> np.ndarray:
    from imdb_dist.evaluate import score_texts
    from imdb_dist.export import load_model

    return np.asarray(score_texts(load_model(run_dir / "model"), texts)).reshape(-1)


def compare_exports(config: Path, sets: list[str], runs: dict[str, Path], names: list[str]) -> dict[str, Any]:
    """How far each run's export lands from the first's: score differences on the validation reviews."""
    from imdb_dist.data.sources import load_training_splits

    _, validation = load_training_splits(load_config(config, sets).data)
    scored = {name: scores(runs[name], validation.texts) for name in names}
    reference = scored[names[0]]
    return {
        name: {
            f"max_abs_score_diff_vs_{names[0]}": float(np.max(np.abs(s - reference))),
            f"mean_abs_score_diff_vs_{names[0]}": float(np.mean(np.abs(s - reference))),
        }
        for name, s in scored.items()
    }


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        keys = [key for key in ("idle_per_epoch_s", "first_epoch_examples_per_s", "steady_examples_per_s",
                                "process_wall_s") if all(r[key] is not None for r in runs)]
        medians[name] = harness.medians(runs, keys)
    summary: dict[str, Any] = {"median": medians}
    for topology in ("1x1", "2x1"):
        before = medians.get(f"baseline {topology}")
        if before:
            after = medians[topology]
            summary[f"{topology} after/before"] = {
                key: after[key] / before[key]
                for key in ("first_epoch_examples_per_s", "steady_examples_per_s", "process_wall_s")
                if key in after and key in before
            }
    return summary


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--config", type=Path, default=Path("job/configs/smoke.yaml"))
    parser.add_argument("--epochs", type=int, default=3)
    harness.add_rounds(parser, default=2)
    parser.add_argument("--topologies", default="1x1,1x2,2x1,2x2", type=_topologies)
    parser.add_argument("--baseline", help="also run 1x1 and 2x1 at this git revision, side by side")
    parser.add_argument("--reseeded", action="store_true", help="also run 1x1 with train.seed + 1, for scale")
    harness.add_sets(parser)
    harness.add_output(parser)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (a steady state)")
    config = args.config.resolve()
    sets = [f"data.path={Path(args.data).resolve()}", *args.overrides, f"train.epochs={args.epochs}"]  # --epochs wins
    with tempfile.TemporaryDirectory(prefix="bench-topology-") as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        base = stack.enter_context(worktree(args.baseline, scratch / "baseline-tree")) if args.baseline else None
        first_rounds: dict[str, Path] = {}
        seed = load_config(config, sets).train.seed

        def variant(name: str, tree: Path, workers: int, local: int) -> Any:
            extra = [f"train.seed={seed + 1}"] if name == RESEEDED else []

            def run(round_: int) -> dict[str, Any]:
                where = scratch / f"{name.replace(' ', '-')}-{round_}"
                run_dir, wall_s = run_topology(tree, config, [*sets, *extra], workers, local, where)
                first_rounds.setdefault(name, run_dir)
                return measure(run_dir, wall_s)

            return run

        variants = _variants(args.topologies, args.reseeded, base)
        results = harness.interleave({name: variant(name, *spec) for name, spec in variants.items()}, args.rounds)
        compared = [*args.topologies, *([RESEEDED] if args.reseeded else [])]
        trained = compare_exports(config, sets, first_rounds, compared)
        trained = {name: {"val_accuracy": results[name][0]["val_accuracy"], **diffs} for name, diffs in trained.items()}
    harness.emit({
        "benchmark": "topology",
        "config": str(args.config),
        "epochs": args.epochs,
        "overrides": args.overrides,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "cpu": cpu_model(),
        **summarize(results),
        "trained": trained,
        "runs": results,
    }, args.output)


def _topologies(value: str) -> list[str]:
    topologies = [t.strip() for t in value.split(",")]
    if unknown := set(topologies) - set(TOPOLOGIES):
        raise argparse.ArgumentTypeError(f"unknown topologies {sorted(unknown)}; choose from {sorted(TOPOLOGIES)}")
    return topologies


def _variants(topologies: list[str], reseeded: bool, base: Path | None) -> dict[str, tuple[Path, int, int]]:
    """Name -> (tree, workers, local replicas): the topologies, then the reseeded 1x1 and the baseline's."""
    variants = {t: (REPO, *TOPOLOGIES[t]) for t in topologies}
    if reseeded:
        variants[RESEEDED] = (REPO, 1, 1)
    if base is not None:
        variants.update({f"baseline {t}": (base, *TOPOLOGIES[t]) for t in ("1x1", "2x1") if t in topologies})
    return variants


if __name__ == "__main__":
    main()
