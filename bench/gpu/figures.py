"""The summary's sections computed from runs' figures: precision, all devices, NCCL and the LSTM kernel."""

from __future__ import annotations

import re
from typing import Any

from bench.gpu.lstm import RUNTIMES
from bench.gpu.plan import Plan

# NCCL prints "<host>:<pid>:<tid> [<dev>] NCCL INFO <message>" with NCCL_DEBUG=INFO.
NCCL_INFO = re.compile(r"NCCL INFO")
NCCL_VERSION = re.compile(r"NCCL version \S+")


def speedups(fast: dict[str, Any], slow: dict[str, Any]) -> dict[str, float | None]:
    """How many times ``fast`` beats ``slow``: examples/s over examples/s, seconds over seconds."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {
        "steady_examples_per_s": ratio(fast["steady_examples_per_s"], slow["steady_examples_per_s"]),
        "first_epoch_examples_per_s": ratio(fast["first_epoch_examples_per_s"], slow["first_epoch_examples_per_s"]),
        "run_wall_s": ratio(slow["run_wall_s"], fast["run_wall_s"]),
        "process_s": ratio(slow["process_s"], fast["process_s"]),
    }


def precision(devices: str, f32: dict[str, Any] | None, mixed: dict[str, Any] | None) -> dict[str, Any]:
    """float32 against mixed_float16 on one device."""
    return {
        "devices": devices,
        "float32": f32,
        "mixed": mixed,
        # > 1: mixed precision is faster (examples/s up, seconds down).
        "mixed_speedup": speedups(mixed, f32) if f32 and mixed else None,
    }


def all_devices(plan: Plan, one: dict[str, Any] | None, everything: dict[str, Any] | None) -> dict[str, Any]:
    """Every device against one, at the same batch per device."""
    section: dict[str, Any] = {
        "devices": "2 logical CPU devices" if plan.rehearsal else f"{plan.gpus} GPUs",
        "batch_per_device": plan.batch,
        "one": _headline(one),
        "all": everything,
    }
    if one and everything:
        speedup = speedups(everything, one)
        section["speedup_over_one"] = speedup
        steady = speedup["steady_examples_per_s"]
        # Weak scaling: 1.0 when N devices train N times the examples per second.
        section["scaling_efficiency"] = steady / plan.all_devices if steady else None
        if one["precision"] != everything["precision"]:
            section["note"] = f"unlike precisions: {one['precision']} on one device, {everything['precision']} on all"
    return section


def nccl(plan: Plan, everything: dict[str, Any] | None) -> dict[str, Any]:
    """NCCL's own log lines in the all-devices run's output, and the all-reduce the job configured."""
    log_path = plan.workdir / "all.log"  # run_child's record of that process's stdout and stderr
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    lines = [line.strip() for line in log.splitlines() if NCCL_INFO.search(line)]
    version = next((m.group(0) for line in lines if (m := NCCL_VERSION.search(line))), None)
    section: dict[str, Any] = {
        "nccl_info_lines": len(lines),
        "version_line": next((line for line in lines if NCCL_VERSION.search(line)), None),
        "version": version,
        "first_lines": lines[:5],
        "configured": {
            "distribution.collective": plan.collective(),
            "all_reduce_logged": (everything or {}).get("all_reduce_logged"),
        },
    }
    if plan.rehearsal:
        section["status"] = "not applicable: CPU rehearsal (NCCL all-reduces between GPUs)"
        section["in_use"] = None
    elif everything is None:
        section["status"] = "not measured: the all-GPU run failed"
        section["in_use"] = None
    else:
        section["status"] = "measured"
        section["in_use"] = bool(lines)
    return section


def one_gpu_only(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The all-devices and NCCL sections with one GPU visible: nothing to compare, no all-reduce."""
    return {"status": "not measured: 1 GPU visible"}, {
        "status": "not applicable: 1 GPU visible, so one replica and no all-reduce across devices",
        "configured": {"distribution.collective": plan.collective()},
    }


def lstm(runs: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The LSTM kernel each run's trained job layer ran with; the answer is the mixed run's (else float32's)."""
    probes = {name: (run or {}).get("lstm") for name, run in runs.items()}
    answer = probes["mixed"] or probes["float32"]
    return {
        "runtime": answer["runtime"] if answer else None,
        "cudnn": answer["cudnn"] if answer else None,
        "meaning": {str(k): v for k, v in RUNTIMES.items()},
        "by_run": probes,
    }


def _headline(figures: dict[str, Any] | None) -> dict[str, Any] | None:
    keys = ("precision", "replicas", "global_batch", "first_epoch_examples_per_s", "steady_examples_per_s",
            "run_wall_s", "process_s")
    return {key: figures[key] for key in keys} if figures else None
