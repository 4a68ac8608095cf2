"""Steady-state training speed of this tree against a git revision, and the cost of ``train.deterministic``.

Runs ``imdb-dist train`` as users do (a fresh process per run, real data),
interleaving the variants round by round so machine noise hits them alike,
and reads each run's ``metrics.jsonl``: the steady state is the median
``examples_per_s`` of epochs 2 and later; the cold start is epoch 1 and the
whole process's wall time, and the CPU seconds it used (user + system, all
threads): on a shared machine whose share of the cores varies, CPU time
says more about the work a run does than wall time. Variants:

- ``baseline``: the tree at ``--baseline`` (a git revision, checked out in a
  temporary worktree), float32, default settings;
- ``current``: this tree, same config;
- ``deterministic``: this tree with ``train.deterministic=true``;
- ``grouped``: this tree with ``train.steps_per_execution`` = ``--steps-per-execution``
  (the host reads the device only at step points either way).

    python -m bench.loop --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --config job/configs/smoke.yaml --epochs 3 --rounds 3 --baseline 44d04b4 \\
        [--variants baseline,current]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.baseline import REPO, worktree
from bench.timing import emit, median


def _run(tree: Path, config: str, data: str, epochs: int, out: Path, extra: list[str]) -> dict[str, float]:
    sets = [f"data.path={data}", f"train.epochs={epochs}", f"run.output_dir={out}", *extra]
    env = {**os.environ, "PYTHONPATH": str(tree)}  # this tree's imdb_dist, ahead of the installed one
    started, cpu = time.perf_counter(), _children_cpu_s()
    subprocess.run(
        [sys.executable, "-m", "imdb_dist.cli", "train", "--config", str(tree / config),
         *[arg for item in sets for arg in ("--set", item)]],
        cwd=tree, env=env, check=True, capture_output=True, text=True,
    )
    wall, cpu = time.perf_counter() - started, _children_cpu_s() - cpu
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "steady_examples_per_s": median([r["examples_per_s"] for r in records[1:]]),
        "first_epoch_examples_per_s": records[0]["examples_per_s"],
        "wall_s": wall,
        "cpu_s": cpu,
        "val_accuracy": records[-1]["val_accuracy"],
        "val_loss": records[-1]["val_loss"],
    }


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="job/configs/smoke.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--variants", default="baseline,current,deterministic",
                        help="comma-separated subset of baseline,current,deterministic,grouped")
    parser.add_argument("--steps-per-execution", type=int, default=8, help="the grouped variant's")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the steady state is the epochs after the first)")
    data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as scratch, worktree(
        args.baseline, Path(scratch) / "baseline"
    ) as base:
        known = {"baseline": (base, []), "current": (REPO, []),
                 "deterministic": (REPO, ["train.deterministic=true"]),
                 "grouped": (REPO, [f"train.steps_per_execution={args.steps_per_execution}"])}
        variants = {name: known[name] for name in args.variants.split(",")}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, (tree, extra) in variants.items():
                out = Path(scratch) / f"{name}-{round_}"
                results[name].append(_run(tree, args.config, data, args.epochs, out, extra))
                print(name, round_, results[name][-1], file=sys.stderr)
    summary = {
        "config": args.config,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "cpus": os.cpu_count(),
        "median": {
            name: {key: median([r[key] for r in runs]) for key in runs[0]} for name, runs in results.items()
        },
        "runs": results,
    }
    for new, old in (("current", "baseline"), ("deterministic", "current"), ("grouped", "current")):
        if new in results and old in results:
            for key, label in (("steady_examples_per_s", ""), ("cpu_s", "cpu_"), ("wall_s", "wall_")):
                summary[f"{label}{new}_over_{old}"] = summary["median"][new][key] / summary["median"][old][key]
    emit(summary, args.output)


if __name__ == "__main__":
    main()
