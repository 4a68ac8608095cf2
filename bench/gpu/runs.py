"""Runs of the job in fresh child processes (``python -m bench.gpu --child``), and their figures read back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.baseline import REPO
from bench.gpu.data import write_synthetic
from bench.gpu.devices import CUDA_CACHE_MAXSIZE
from bench.gpu.plan import Plan
from bench.harness import read_records, read_report, steady

# What imdb_dist.distribute logs when it builds a strategy's all-reduce.
ALL_REDUCE_LOG = re.compile(r"all-reduce across \w+: .*")


class ChildFailed(RuntimeError):
    """A child process (one or more runs of the job) exited without its result."""


def run_child(plan: Plan, name: str, runs: list[dict[str, Any]], env: dict[str, str] | None = None
              ) -> tuple[list[dict[str, Any]], str]:
    """Run ``runs`` in one fresh ``python -m bench.gpu --child`` process; their results and the process's output."""
    spec_path, result_path, log_path = (plan.workdir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps({"runs": runs, "result": str(result_path)}, indent=2))
    child_env = {**os.environ, **(env or {})}
    # CUDA keeps kernels it JIT-compiled from PTX in a cache of 256 MiB by
    # default, too small for TensorFlow's: every process would compile them again.
    child_env.setdefault("CUDA_CACHE_MAXSIZE", str(CUDA_CACHE_MAXSIZE))
    if plan.rehearsal:
        child_env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal is on the CPU, even on a GPU machine
    with log_path.open("w") as log_file:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.gpu", "--child", str(spec_path)],
                cwd=REPO, env=child_env, stdout=log_file, stderr=subprocess.STDOUT, timeout=plan.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ChildFailed(f"{name}: no result within {plan.timeout_s:.0f} s; {_tail(log_path)}") from None
    log = log_path.read_text(errors="replace")
    if proc.returncode != 0 or not result_path.is_file():
        raise ChildFailed(f"{name}: exit status {proc.returncode}; {_tail(log_path)}")
    return json.loads(result_path.read_text())["runs"], log


def _tail(log_path: Path, lines: int = 15) -> str:
    text = log_path.read_text(errors="replace").splitlines() if log_path.is_file() else []
    return "last output: " + " | ".join(text[-lines:])


def train_and_read(plan: Plan, name: str, precision: str, *, devices: str, env: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    """One run of the job in a fresh process: its run directory's figures, its LSTM probe, the all-reduce it logged."""
    spec = {
        "name": name,
        "overrides": plan.overrides(name, precision, devices=devices),
        "probe": True,
        "fallback_precision": plan.fallback(precision),
    }
    (result,), log = run_child(plan, name, [spec], env or {})
    if result["outcome"] != "complete":
        raise ChildFailed(f"{name}: {result['outcome']}: {result.get('message')}")
    figures = read_run(Path(result["run_dir"]))
    figures["precision_asked"] = precision
    if result.get("precision_refused"):
        figures["precision_refused"] = result["precision_refused"]
    figures["lstm"] = result.get("lstm")
    figures["all_reduce_logged"] = sorted(set(ALL_REDUCE_LOG.findall(log)))
    return figures


def warm_up(plan: Plan) -> dict[str, Any]:
    """One short run per precision on a few generated reviews, in one child; what ran."""
    data = write_synthetic(plan.workdir / "warmup-data", per_class=max(plan.batch, 64))
    runs = [
        {"name": f"warm-up {precision}",
         "overrides": [*plan.overrides(f"warmup-{precision}", precision, devices="one"), f"data.path={data}",
                       "train.epochs=1"],
         "fallback_precision": plan.fallback(precision)}
        for precision in ("float32", "mixed_float16")
    ]
    began = time.perf_counter()
    results, _ = run_child(plan, "warmup", runs)
    return {"runs": [r["name"] for r in results if r["outcome"] == "complete"],
            "seconds": round(time.perf_counter() - began, 1)}


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's figures, from its ``metrics.jsonl`` and ``report.json``."""
    report = read_report(run_dir)
    speeds = [r["examples_per_s"] for r in read_records(run_dir)]
    return {
        "precision": report["precision"],
        "strategy": report["strategy"],
        "replicas": report["replicas"],
        "global_batch": report["config"]["train"]["batch_size"],
        "epochs": len(speeds),
        "optimizer_steps": report["optimizer_steps"],
        "epoch_examples_per_s": speeds,
        "first_epoch_examples_per_s": speeds[0],
        "steady_examples_per_s": steady(speeds),
        # From train.run's start to the end of training: data, tokenizing, tracing, steps, validation, checkpoints.
        "run_wall_s": report["wall_s"],
        # From the process's start (imports included) to the report: what a user waits for.
        "process_s": report["timings"]["process_s"],
        "phases_s": report["timings"]["phases_s"],
        "val_accuracy": report["validation"]["accuracy"],
    }
