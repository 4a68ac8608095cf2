"""What step checkpoints cost a Ray Train job: the upload, or the wait for Ray Train to collect them.

A worker's ``ray.train.report`` hands a checkpoint to Ray Train and waits
until its previous report was collected; the controller collects reports
when it polls the workers, every ``ray.report_poll_s`` (which sets
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's default 2 s). So a job that
checkpoints more often than that trains at one checkpoint per poll. This runs ``imdb-dist launch`` (a throw-away local
Ray cluster, 2 workers, the run on local disk) as users do, one fresh
process per run, in rounds that alternate the variants:

- ``epoch-ends``: ``run.checkpoint_steps=0``, the config's poll;
- ``every-N``: a checkpoint every N optimizer steps, the config's poll;
- ``every-N-poll-S``: the same with the controller polling every S
  seconds (``ray.report_poll_s``; 2 is Ray Train's own default).

From each run's ``report.json``: the median examples/s of its training
steps, the wall time, and its phases: ``checkpoints`` (writing them) and
``after_checkpoint`` (``ray.train.report``: the barrier, the copy into Ray's
storage, the wait for the previous report to be collected).

    python -m bench.checkpoint_pace --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --config job/configs/ray-local.yaml --every 20 --poll 2 --rounds 2 \\
        [--variants epoch-ends,every-20] [--output docs/bench-results/checkpoint-pace.json]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench import harness
from bench.machine import cpu_model


def variants(every: int, poll: float) -> dict[str, tuple[int, float | None]]:
    """Name -> (``run.checkpoint_steps``, ``ray.report_poll_s`` or None for the config's)."""
    return {"epoch-ends": (0, None), f"every-{every}": (every, None), f"every-{every}-poll-{poll:g}": (every, poll)}


def measure(config: str, data: str, checkpoint_steps: int, poll: float | None, extra: list[str]) -> dict[str, Any]:
    """One ``imdb-dist launch`` into a fresh storage directory; its speed, wall time and checkpoint phases."""
    config, data = str(Path(config).resolve()), str(Path(data).resolve())  # the run starts in a scratch directory
    with tempfile.TemporaryDirectory(prefix="imdb-dist-bench-pace-") as scratch:
        # The bench's own settings last: they win over --set.
        sets = [*extra, f"data.path={data}", f"ray.storage_path={scratch}/storage", "ray.name=pace",
                f"run.checkpoint_steps={checkpoint_steps}", *([f"ray.report_poll_s={poll:g}"] if poll else [])]
        # A local cluster of its own, however this shell is set up.
        done = harness.run_job("launch", config, sets, cwd=Path(scratch), env={"RAY_ADDRESS": None})
        report = harness.read_report(Path(scratch) / "storage" / "pace")
    phases = report["timings"]["phases_s"]
    return {
        "wall_s": done.wall_s,
        "examples_per_s_median": report["examples_per_s_median"],
        "epochs": report["epochs"],
        "optimizer_steps": report["optimizer_steps"],
        # As Ray Train's controller logged them (imdb_dist.controller_log): every one it kept.
        "checkpoints": done.log.count("Ray Train kept the checkpoint"),
        "checkpoints_s": phases.get("checkpoints", 0.0),
        "after_checkpoint_s": phases.get("after_checkpoint", 0.0),
        "steps_s": phases.get("steps", 0.0),
        "validation_accuracy": report["validation"]["accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--config", default="job/configs/ray-local.yaml")
    parser.add_argument("--every", type=int, default=20, help="run.checkpoint_steps of the step-checkpoint variants")
    parser.add_argument("--poll", type=float, default=2.0,
                        help="the other variant's ray.report_poll_s, seconds (2: Ray Train's own default)")
    harness.add_rounds(parser, default=2)
    parser.add_argument("--variants", help="comma-separated names of the variants to run (default: all three; "
                        "the others are measured against epoch-ends when it runs)")
    harness.add_sets(parser)
    harness.add_output(parser)
    args = parser.parse_args(argv)

    known = variants(args.every, args.poll)
    wanted = harness.chosen(parser, args.variants or ",".join(known), known)

    def variant(name: str) -> Any:
        checkpoint_steps, poll = known[name]
        return lambda round_: measure(args.config, args.data, checkpoint_steps, poll, args.overrides)

    runs = harness.interleave({name: variant(name) for name in wanted}, args.rounds)
    keys = ("examples_per_s_median", "wall_s", "after_checkpoint_s", "checkpoints_s", "steps_s")
    medians = {name: harness.medians(got, keys) for name, got in runs.items()}
    base = medians["epoch-ends"]["examples_per_s_median"] if "epoch-ends" in medians else None
    harness.emit({
        "bench": "checkpoint_pace",
        "cpu": cpu_model(),
        "config": args.config,
        "sets": args.overrides,
        "every": args.every,
        "poll_s": args.poll,
        "rounds": args.rounds,
        "medians": medians,
        # Speed of each variant against checkpoints at epoch ends only, measured side by side.
        "speed_vs_epoch_ends": {name: m["examples_per_s_median"] / base for name, m in medians.items()} if base is not None else None,
        "runs": runs,
    }, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
