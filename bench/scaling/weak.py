"""``weak``: 1 vs 2 Ray Train workers of 1 CPU each, at the same per-worker batch, as users launch them.

``imdb-dist launch`` as users run it (a fresh process and local Ray
cluster per run, the real data), 1 worker x 1 CPU against 2 workers x 1 CPU
at the same per-worker batch, the variants interleaved round by round so
machine noise hits them alike. The steady state is the chief's
``examples_per_s`` in the last epoch (epoch 1 holds the cold start);
efficiency is ``2-worker / (2 x 1-worker)``, and ``2-worker / pair`` is the
distributed job against two independent ones. Variants:

- ``1``: this tree, one worker (one replica: nothing to reduce);
- ``pair``: two such 1-worker jobs at once, each its own Ray cluster, their
  examples/s summed: what this machine gives two 1-CPU processes that never
  communicate (shared caches, memory bandwidth, the host's vCPU scheduling);
- ``2-sparse``, ``2-dense``: this tree, two workers, the embedding gradient
  gathered / all-reduced densely (``distribution.embedding_gradient``);
- ``2-bf16``: two workers, the dense all-reduce in bfloat16
  (``distribution.embedding_transport``: half the bytes);
- ``base-1``, ``base-2``: the tree at ``--baseline`` (a git revision).

    python -m bench.scaling weak --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --rounds 3 --baseline 66580ba --output docs/bench-results/scaling-weak.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.baseline import REPO, worktree
from bench.machine import cpu_model
from bench.scaling import MAX_LEN, PER_WORKER_BATCH, VOCAB

# Name -> (the tree: this one or the baseline's, workers, overrides, jobs at once).
VARIANTS: dict[str, tuple[str, int, list[str], int]] = {
    "1": ("current", 1, [], 1),
    "pair": ("current", 1, [], 2),
    "2-sparse": ("current", 2, ["distribution.embedding_gradient=sparse"], 1),
    "2-dense": ("current", 2, ["distribution.embedding_gradient=dense"], 1),
    "2-bf16": ("current", 2, ["distribution.embedding_gradient=dense", "distribution.embedding_transport=bfloat16"], 1),
    "base-1": ("baseline", 1, [], 1),
    "base-2": ("baseline", 2, [], 1),
}
NUMERIC = ("steady_examples_per_s", "first_epoch_examples_per_s", "wall_s", "val_accuracy")


def add_parser(sub: Any) -> None:
    """The ``weak`` subcommand's flags."""
    w = sub.add_parser("weak", help="1 vs 2 Ray Train workers, 1 CPU each")
    harness.add_data(w)
    w.add_argument("--epochs", type=int, default=2)
    w.add_argument("--batch", type=int, default=PER_WORKER_BATCH, help="per-worker batch")
    w.add_argument("--max-len", type=int, default=MAX_LEN)
    harness.add_rounds(w, default=3)
    w.add_argument("--baseline", default="66580ba", help="git revision for the base-* variants")
    w.add_argument("--variants", default="1,2-sparse,2-dense,base-1,base-2",
                   help=f"comma-separated, of {','.join(VARIANTS)}")
    harness.add_output(w)

    def checked(args: argparse.Namespace) -> dict[str, Any]:
        args.variants = harness.chosen(w, args.variants, VARIANTS)
        return weak(args)

    w.set_defaults(run=checked)


def _start(args: argparse.Namespace, tree: Path, out: Path, workers: int, extra: list[str]) -> subprocess.Popen[str]:
    sets = [
        f"data.path={Path(args.data).resolve()}",
        f"data.max_len={args.max_len}",
        f"data.vocab_size={VOCAB}",
        f"train.batch_size={args.batch * workers}",
        f"train.epochs={args.epochs}",
        f"ray.num_workers={workers}",
        "ray.resources_per_worker={CPU: 1}",
        "ray.max_failures=0",
        f"ray.storage_path={out}",
        *extra,
    ]
    return harness.start(harness.job_argv("launch", tree / "job/configs/ray-local.yaml", sets), tree=tree)


def _finish(proc: subprocess.Popen[str], out: Path, started: float) -> dict[str, Any]:
    done = harness.finish(proc, started)
    records = harness.read_records(out / "ray-local")
    threads = sorted({m.group(1) for m in re.finditer(r'"tf_threads": (\w+)', done.log)})
    # The route each worker logged: "sparse (gathered rows)" or "dense, in bfloat16," (imdb_dist.train).
    routes = sorted({m.group(1) for m in re.finditer(r"embedding gradient: (sparse|dense, in \w+)", done.log)})
    return {
        "steady_examples_per_s": records[-1]["examples_per_s"],
        "first_epoch_examples_per_s": records[0]["examples_per_s"],
        "wall_s": done.wall_s,
        "val_accuracy": records[-1]["val_accuracy"],
        "tf_threads": threads,
        "embedding_gradient": routes,
    }


def _launch(args: argparse.Namespace, tree: Path, out: Path, workers: int, extra: list[str], jobs: int
            ) -> dict[str, Any]:
    """``jobs`` identical ``imdb-dist launch`` runs at once (each its own local Ray cluster); their sum."""
    started = time.perf_counter()
    procs = [(_start(args, tree, out / f"job{j}", workers, extra), out / f"job{j}") for j in range(jobs)]
    runs = [_finish(proc, where, started) for proc, where in procs]
    if jobs == 1:
        return runs[0]
    total = {key: sum(r[key] for r in runs) for key in ("steady_examples_per_s", "first_epoch_examples_per_s")}
    return {**total, "wall_s": max(r["wall_s"] for r in runs), "val_accuracy": runs[0]["val_accuracy"],
            "tf_threads": runs[0]["tf_threads"], "jobs": runs}


def weak(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant once per round, interleaved; their medians and the efficiencies."""
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as scratch, contextlib.ExitStack() as stack:
        trees = {"current": REPO, "baseline": Path(scratch) / "baseline"}
        if any(VARIANTS[name][0] == "baseline" for name in args.variants):
            stack.enter_context(worktree(args.baseline, trees["baseline"]))

        def variant(name: str) -> Any:
            tree, workers, extra, jobs = VARIANTS[name]
            return lambda round_: _launch(args, trees[tree], Path(scratch) / f"{name}-{round_}", workers, extra, jobs)

        results = harness.interleave({name: variant(name) for name in args.variants}, args.rounds)
    summary: dict[str, Any] = {
        "benchmark": "scaling-weak",
        "per_worker_batch": args.batch,
        "max_len": args.max_len,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),  # absolute rates depend on it (AVX2 vs AVX-512 bf16 ran 2.5x apart)
        "median": {name: harness.medians(runs, NUMERIC) for name, runs in results.items()},
        "runs": results,
    }
    return {**summary, **_ratios({name: values["steady_examples_per_s"] for name, values in summary["median"].items()})}


def _ratios(steady: dict[str, float]) -> dict[str, float]:
    """Efficiencies (2 workers over twice 1), and the distributed job over two independent ones."""
    ratios = {}
    for two, one in (("2-sparse", "1"), ("2-dense", "1"), ("2-bf16", "1"), ("base-2", "base-1")):
        if two in steady and one in steady:
            ratios[f"efficiency_{two}"] = steady[two] / (2 * steady[one])
    if "pair" in steady and "1" in steady:
        # What this machine gives two 1-CPU processes that never communicate.
        ratios["pair_over_1"] = steady["pair"] / steady["1"]
    if "pair" in steady:
        for two in ("2-sparse", "2-dense", "2-bf16"):
            if two in steady:
                ratios[f"{two}_over_pair"] = steady[two] / steady["pair"]
    return ratios
