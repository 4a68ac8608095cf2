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

import os
import resource
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench import harness
from bench.baseline import REPO, worktree
from bench.machine import cpu_model


def _run(tree: Path, config: str, data: str, epochs: int, out: Path, extra: list[str]) -> dict[str, float]:
    sets = [f"data.path={data}", f"train.epochs={epochs}", f"run.output_dir={out}", *extra]
    cpu = _children_cpu_s()
    done = harness.run_job("train", tree / config, sets, tree=tree)  # the config as that tree has it
    records = harness.read_records(out)
    return {
        "steady_examples_per_s": harness.steady([r["examples_per_s"] for r in records]),
        "first_epoch_examples_per_s": records[0]["examples_per_s"],
        "wall_s": done.wall_s,
        "cpu_s": _children_cpu_s() - cpu,
        "val_accuracy": records[-1]["val_accuracy"],
        "val_loss": records[-1]["val_loss"],
    }


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


VARIANTS = ("baseline", "current", "deterministic", "grouped")


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--config", default="job/configs/smoke.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    harness.add_rounds(parser, default=3)
    parser.add_argument("--baseline", required=True, help="git revision to compare with")
    parser.add_argument("--variants", default="baseline,current,deterministic",
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--steps-per-execution", type=int, default=8, help="the grouped variant's")
    harness.add_output(parser)
    args = parser.parse_args()
    args.variants = harness.chosen(parser, args.variants, VARIANTS)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the steady state is the epochs after the first)")
    data = str(Path(args.data).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as scratch, worktree(
        args.baseline, Path(scratch) / "baseline"
    ) as base:
        known = {"baseline": (base, []), "current": (REPO, []),
                 "deterministic": (REPO, ["train.deterministic=true"]),
                 "grouped": (REPO, [f"train.steps_per_execution={args.steps_per_execution}"])}

        def variant(name: str) -> Callable[[int], dict[str, float]]:
            tree, extra = known[name]
            return lambda round_: _run(tree, args.config, data, args.epochs, Path(scratch) / f"{name}-{round_}", extra)

        results = harness.interleave({name: variant(name) for name in args.variants}, args.rounds)
    summary = {
        "config": args.config,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "median": {name: harness.medians(runs, list(runs[0])) for name, runs in results.items()},
        "runs": results,
    }
    for new, old in (("current", "baseline"), ("deterministic", "current"), ("grouped", "current")):
        if new in results and old in results:
            for key, label in (("steady_examples_per_s", ""), ("cpu_s", "cpu_"), ("wall_s", "wall_")):
                summary[f"{label}{new}_over_{old}"] = summary["median"][new][key] / summary["median"][old][key]
    harness.emit(summary, args.output)


if __name__ == "__main__":
    main()
