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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.baseline import REPO, worktree
from bench.timing import emit, median
from imdb_dist.config import load_config

TOPOLOGIES = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1), "2x2": (2, 2)}
RESEEDED = "1x1 train.seed+1"


def cpu_model() -> dict[str, Any]:
    """``lscpu``'s model name and the vector flags that change CPU step times."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {
        "model": fields.get("Model name", "").strip(),
        "cpus": os.cpu_count(),
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
    }


def run_topology(tree: Path, config: Path, sets: list[str], workers: int, local: int, scratch: Path) -> Path:
    """One run of the config on ``workers`` x ``local`` replicas, as a fresh process; its run directory."""
    sets = list(sets)
    if local > 1:
        sets.append(f"distribution.cpu_devices={local}")
    if workers == 1:
        command, run_dir = "train", scratch / "run"
        sets.append(f"run.output_dir={run_dir}")
    else:
        command, run_dir = "launch", scratch / "storage" / "job"
        sets += [f"ray.num_workers={workers}", f"ray.storage_path={scratch / 'storage'}", "ray.name=job"]
    argv = [sys.executable, "-m", "imdb_dist.cli", command, "--config", str(config)]
    argv += [arg for item in sets for arg in ("--set", item)]
    home = scratch / "home"
    home.mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(tree)}
    env.pop("RAY_ADDRESS", None)  # launch starts its own throw-away cluster
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} {workers}x{local} at {tree} failed:\n{proc.stderr[-3000:]}")
    return run_dir


def measure(run_dir: Path, process_wall_s: float) -> dict[str, Any]:
    report = json.loads((run_dir / "report.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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
        "steady_examples_per_s": median(speeds[1:]) if len(speeds) > 1 else None,
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
        medians[name] = {
            key: median([r[key] for r in runs])
            for key in ("idle_per_epoch_s", "first_epoch_examples_per_s", "steady_examples_per_s", "process_wall_s")
            if all(r[key] is not None for r in runs)
        }
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="aclImdb directory or .tar.gz")
    parser.add_argument("--config", type=Path, default=Path("job/configs/smoke.yaml"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--topologies", default="1x1,1x2,2x1,2x2")
    parser.add_argument("--baseline", help="also run 1x1 and 2x1 at this git revision, side by side")
    parser.add_argument("--reseeded", action="store_true", help="also run 1x1 with train.seed + 1, for scale")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, help="also write the JSON result here")
    args = parser.parse_args()
    if args.rounds < 1 or args.epochs < 2:
        parser.error("--rounds must be at least 1 and --epochs at least 2 (a steady state)")
    topologies = [t.strip() for t in args.topologies.split(",")]
    if unknown := set(topologies) - set(TOPOLOGIES):
        parser.error(f"unknown topologies {sorted(unknown)}; choose from {sorted(TOPOLOGIES)}")
    data = str(Path(args.data).resolve())
    config = args.config.resolve()
    sets = [f"data.path={data}", *args.overrides, f"train.epochs={args.epochs}"]  # --epochs wins
    with tempfile.TemporaryDirectory(prefix="bench-topology-") as scratch_dir, contextlib.ExitStack() as stack:
        scratch = Path(scratch_dir)
        variants: dict[str, tuple[Path, int, int]] = {t: (REPO, *TOPOLOGIES[t]) for t in topologies}
        seed = load_config(config, sets).train.seed
        if args.reseeded:
            variants[RESEEDED] = (REPO, 1, 1)
        if args.baseline:
            base = stack.enter_context(worktree(args.baseline, scratch / "baseline-tree"))
            variants.update({f"baseline {t}": (base, *TOPOLOGIES[t]) for t in ("1x1", "2x1") if t in topologies})
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        first_rounds: dict[str, Path] = {}
        for round_ in range(args.rounds):
            for name, (tree, workers, local) in variants.items():
                where = scratch / f"{name.replace(' ', '-')}-{round_}"
                started = time.perf_counter()
                extra = [f"train.seed={seed + 1}"] if name == RESEEDED else []
                run_dir = run_topology(tree, config, [*sets, *extra], workers, local, where)
                results[name].append(measure(run_dir, time.perf_counter() - started))
                first_rounds.setdefault(name, run_dir)
                print(name, round_, json.dumps(results[name][-1]), file=sys.stderr, flush=True)
        trained = compare_exports(config, sets, first_rounds, [*topologies, *([RESEEDED] if args.reseeded else [])])
        trained = {name: {"val_accuracy": results[name][0]["val_accuracy"], **diffs} for name, diffs in trained.items()}
    summary = {
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
    }
    emit(summary, args.output)


if __name__ == "__main__":
    main()
