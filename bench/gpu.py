"""The real job on a GPU machine: cuDNN LSTM, float32 vs mixed_float16, one GPU vs all, NCCL, exact resume.

    python -m bench.gpu                                   # a GPU machine: writes docs/bench-results/gpu.json
    python -m bench.gpu --data PATH --output OUT.json
    python -m bench.gpu --cpu-rehearsal --output OUT.json # the same code on this CPU (CI): no GPU figures

Every figure comes from real runs of the job, ``imdb_dist.train.run`` (the
project's loop, global data plan, checkpoints, export, report), each in a
fresh process started as ``imdb-dist train`` starts one (the archive read
while TensorFlow loads), so a run's cold start is a user's; the figures are
read from each run directory's ``metrics.jsonl`` and ``report.json``. One
JSON, printed and written to ``--output``, holds:

1. ``devices``: TensorFlow's GPUs and their details, the CUDA and cuDNN it
   was built with, ``nvidia-smi``'s name, driver and memory, the CPU.
2. ``lstm``: the LSTM kernel that ran, as the layer reports it at run time:
   an LSTM built from the trained job layer's config plus tf_keras'
   ``return_runtime=True``, holding the job layer's weights, called in a
   tf.function under the run's strategy and dtype policy on the activations
   that reach the job's LSTM on a real batch. 2: cuDNN; 1: the generic
   kernel; 0: arguments that rule cuDNN out (``lstm.meaning``).
3. ``precision``: float32 against mixed_float16 on one GPU: steady
   examples/s (median of epochs 2 and later), the cold first epoch's, the
   run's wall time, and mixed precision's speedup on each. Most IMDB jobs
   are one or two epochs, so the cold part counts as much as the steady one.
4. ``all_devices``: MirroredStrategy over every visible GPU against one, at
   the same batch per GPU (the global batch grows with the GPUs); with one
   GPU visible it says "not measured".
5. ``nccl``: that all-GPU run's process ran with ``NCCL_DEBUG=INFO``: NCCL's
   own ``NCCL INFO`` lines counted, its version line quoted, and the
   all-reduce the job logged (``distribution.collective``).
6. ``exact_resume``: with ``train.deterministic=true``, a run stopped
   mid-epoch by a stop request (what SIGTERM makes: a checkpoint, then
   ``Interrupted``) and resumed in a fresh process, against an uninterrupted
   run: the exported weights compared bitwise; or the error of the op
   TensorFlow refused to run deterministically (also an answer).

Data: ``--data`` (an aclImdb directory or .tar.gz), else ``$IMDB_DATA``,
else ../shared/data/imdb/aclImdb_train.tar.gz, else reviews generated into
a temporary directory in the aclImdb layout (``"data": "synthetic"``).
Sizes are job/configs/ray-gpu.yaml's data and network (400 tokens, 20,000
words), 2 epochs of batch 256 per GPU over 22,500 training reviews: four
runs of the job on one GPU (float32, mixed, and the deterministic pair),
five with several, sized to finish within 5 minutes on one modern GPU
(not yet measured on one).
A short warm-up run of each precision comes first: the first process on a
machine reads the CUDA libraries from disk, starts the driver and, on a
GPU the TensorFlow build holds no kernel binaries for (an H100 or H200,
sm_90, with the pip wheel's compute_90 PTX: ``devices.kernels_jit_from_ptx``),
JIT-compiles TensorFlow's kernels, which CUDA caches (the children get a
cache large enough). Those once-per-machine costs would otherwise land in
whichever measured run came first. Each part runs once (no rounds): a
noisy machine shows in the figures.

Without a GPU it prints ``error: no GPU visible to TensorFlow: <reason>``
on stderr and exits 2. ``--cpu-rehearsal`` runs every part on the CPU
instead, so that CI exercises this code though no GPU is at hand: two
logical CPU devices (``distribution.cpu_devices=2``) stand in for "all
GPUs" and one for "one GPU", nvidia-smi and NCCL are not applicable, and
the JSON says ``"status": "cpu rehearsal: code path check, not GPU
figures"``. A rehearsal writes only to an ``--output`` given.

Exit status: 0; 2 no GPU (or bad arguments); 1 when a part failed (the JSON
is still written, the part's error in ``errors``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# TensorFlow is imported inside functions, not here: a child run must start
# reading the archive before TensorFlow loads, as imdb-dist train does.

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "bench-results" / "gpu.json"
SHARED_DATA = REPO.parent / "shared" / "data" / "imdb" / "aclImdb_train.tar.gz"
GPU_CONFIG = REPO / "job" / "configs" / "ray-gpu.yaml"
REHEARSAL = "cpu rehearsal: code path check, not GPU figures"
# tf_keras/src/layers/rnn/gru_lstm_utils.py: RUNTIME_UNKNOWN, RUNTIME_CPU, RUNTIME_GPU.
RUNTIMES = {
    0: "not eligible for cuDNN (its arguments rule it out): the generic loop",
    1: "the generic (standard) kernel",
    2: "the cuDNN kernel",
}
# NCCL prints "<host>:<pid>:<tid> [<dev>] NCCL INFO <message>" with NCCL_DEBUG=INFO.
NCCL_INFO = re.compile(r"NCCL INFO")
NCCL_VERSION = re.compile(r"NCCL version \S+")
CUDA_CACHE_MAXSIZE = 4 << 30  # bytes: CUDA's largest
# What imdb_dist.distribute logs when it builds a strategy's all-reduce.
ALL_REDUCE_LOG = re.compile(r"all-reduce across \w+: .*")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The runs' shared settings, and where each run goes."""

    rehearsal: bool
    gpus: int  # visible to TensorFlow
    base: tuple[str, ...]  # overrides every run takes: data, sizes, then the user's --set
    batch: int  # per device
    workdir: Path
    timeout_s: float

    @property
    def all_devices(self) -> int:
        """Replicas of the all-devices run: every GPU, or the rehearsal's two logical CPUs."""
        return 2 if self.rehearsal else self.gpus

    def overrides(self, name: str, precision: str, *, devices: str, deterministic: bool = False) -> list[str]:
        """One run's config: the shared settings, then its devices, precision and run directory.

        ``devices``: ``one`` (one GPU; the rehearsal's CPU) or ``all``.
        """
        if devices == "all":
            placed = ["distribution.strategy=mirrored"]
            placed += ["distribution.cpu_devices=2"] if self.rehearsal else ["distribution.devices=[]"]
            # The same batch per GPU as the one-GPU run: the global batch grows with them.
            placed.append(f"train.batch_size={self.batch * self.all_devices}")
        elif self.rehearsal or self.gpus == 1:
            placed = ["distribution.strategy=default"]  # what the job picks itself on one GPU
        else:
            placed = ["distribution.strategy=mirrored", 'distribution.devices=["/gpu:0"]']
        return [
            *self.base,
            *placed,
            f"train.mixed_precision={precision}",
            f"train.deterministic={'true' if deterministic else 'false'}",
            f"run.output_dir={self.workdir / 'runs' / name}",
        ]


class ChildFailed(RuntimeError):
    """A child process (one or more runs of the job) exited without its result."""


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.gpu``: see the module docstring."""
    args = _parser().parse_args(argv)
    if args.child is not None:
        return _child(args.child)
    from imdb_dist.logs import import_tensorflow_quietly

    # This process keeps no log (its progress lines are printed): TensorFlow's
    # start-up lines about CUDA are kept as accelerator notes, which end up in
    # the JSON or in the reason of the one error line, not on stderr as well.
    logging.basicConfig(level=logging.INFO, handlers=[logging.NullHandler()])
    import_tensorflow_quietly()
    import tensorflow as tf

    from imdb_dist.distribute import no_gpu_reason

    gpus = len(tf.config.list_physical_devices("GPU"))
    if not gpus and not args.cpu_rehearsal:
        print(f"error: no GPU visible to TensorFlow: {no_gpu_reason()}", file=sys.stderr)
        return 2
    output = args.output if args.output is not None else (None if args.cpu_rehearsal else DEFAULT_OUTPUT)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        workdir = args.workdir.resolve() if args.workdir else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = measure(args, gpus, workdir)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    from bench.timing import emit

    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
    emit(summary, output)
    return 1 if summary.get("errors") else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="aclImdb directory or .tar.gz (default: $IMDB_DATA, ../shared's, else generated)")
    parser.add_argument(
        "--reviews", type=int,
        help="reviews per class: the first N of each class of --data, or N generated "
        "(default: all of the data; 12,500 generated; a rehearsal: 256)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2: a cold and a steady one)")
    parser.add_argument("--batch", type=int, help="batch per device (default 256; a rehearsal: 32)")
    parser.add_argument("--max-len", type=int, help="tokens per review (default ray-gpu.yaml's; a rehearsal: 128)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a config override for every run, after the bench's own sizes (repeatable)",
    )
    parser.add_argument("--output", type=Path, help=f"also write the JSON here (default {DEFAULT_OUTPUT.relative_to(REPO)}; "
                        "a rehearsal: only when given)")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="run every part on the CPU (2 logical devices stand in for the GPUs): a code path check")
    parser.add_argument("--workdir", type=Path, help="keep the run directories and child logs here (default: temporary)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child process (default 300)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: one child's spec
    return parser


# --------------------------------------------------------------------------- the parent: plan, run, read


def measure(args: argparse.Namespace, gpus: int, workdir: Path) -> dict[str, Any]:
    """Every part of the benchmark, in order; a part that fails leaves its error in ``errors``."""
    rehearsal = args.cpu_rehearsal
    errors: dict[str, str] = {}

    def attempt(part: str, work: Callable[[], Any]) -> Any:
        _progress(f"{part} ...")
        began = time.perf_counter()
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
            errors[part] = f"{type(exc).__name__}: {exc}"
            _progress(f"{part} failed: {errors[part]}")
            return None
        _progress(f"{part}: {time.perf_counter() - began:.1f} s")
        return result

    data, data_info = resolve_data(args, workdir)
    plan = make_plan(args, gpus, workdir, data)
    summary: dict[str, Any] = {
        "benchmark": "gpu",
        "status": REHEARSAL if rehearsal else "measured",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tree": _git_revision(),
        **data_info,
        "sizes": _sizes(plan),
        "devices": describe_devices(rehearsal),
    }
    one = "the CPU (one device)" if rehearsal else ("the GPU" if gpus == 1 else f"/gpu:0 of {gpus}")
    # The first process on a machine reads the CUDA libraries (gigabytes)
    # from disk, starts the driver and, on a GPU the build has no binaries
    # for, JIT-compiles TensorFlow's kernels (CUDA caches them): a short run
    # of each precision takes those once-per-machine costs, so that they do
    # not land in whichever measured run comes first.
    summary["warm_up"] = attempt("warm-up", lambda: warm_up(plan))

    # 3. float32 against mixed_float16 on one device, each run a fresh process.
    f32 = attempt("float32 on one device", lambda: train_and_read(plan, "float32", "float32", devices="one"))
    mixed = attempt("mixed_float16 on one device", lambda: train_and_read(plan, "mixed", "mixed_float16", devices="one"))
    summary["precision"] = {
        "devices": one,
        "float32": f32,
        "mixed": mixed,
        # > 1: mixed precision is faster (examples/s up, seconds down).
        "mixed_speedup": _speedups(mixed, f32) if f32 and mixed else None,
    }
    # The multi-device and determinism runs use what the one-device mixed run ran.
    precision = (mixed or {}).get("precision", "mixed_float16")

    # 4 and 5. Every device against one, in a process with NCCL's logging on.
    if plan.all_devices > 1:
        everything = attempt("all devices", lambda: train_and_read(
            plan, "all", precision, devices="all", env={"NCCL_DEBUG": "INFO"}))
        summary["all_devices"] = _all_devices(plan, mixed, everything)
        summary["nccl"] = _nccl(plan, everything)
    else:
        summary["all_devices"] = {"status": "not measured: 1 GPU visible"}
        summary["nccl"] = {
            "status": "not applicable: 1 GPU visible, so one replica and no all-reduce across devices",
            "configured": {"distribution.collective": _collective_setting(plan)},
        }

    # 2. The LSTM kernel each run's trained job layer ran with.
    probes = {name: (run or {}).get("lstm") for name, run in
              (("float32", f32), ("mixed", mixed), ("all_devices", summary["all_devices"].get("all")))}
    answer = probes["mixed"] or probes["float32"]
    summary["lstm"] = {
        "runtime": answer["runtime"] if answer else None,
        "cudnn": answer["cudnn"] if answer else None,
        "meaning": {str(k): v for k, v in RUNTIMES.items()},
        "by_run": probes,
    }

    # 6. Exact resume under train.deterministic.
    summary["exact_resume"] = attempt("exact resume", lambda: exact_resume(plan, precision))
    if errors:
        summary["errors"] = errors
    return summary


def make_plan(args: argparse.Namespace, gpus: int, workdir: Path, data: Path) -> Plan:
    """The settings every run shares: ray-gpu.yaml's data and network sizes, these epochs and batch, the user's --set."""
    from imdb_dist.config import load_config, to_dict

    job = load_config(GPU_CONFIG)
    rehearsal = args.cpu_rehearsal
    batch = args.batch or (32 if rehearsal else 256)
    max_len = args.max_len or (128 if rehearsal else job.data.max_len)
    base = [
        "data.source=aclimdb",
        f"data.path={data}",
        f"data.max_len={max_len}",
        f"data.vocab_size={job.data.vocab_size}",
        *(f"model.{key}={json.dumps(value)}" for key, value in to_dict(job)["model"].items()),
        f"train.epochs={args.epochs}",
        f"train.batch_size={batch}",
        # The square-root rule from the default 0.001 at batch 64, as ray-gpu.yaml scales its 1024.
        f"train.learning_rate={0.001 * (batch / 64) ** 0.5:.6g}",
        # Every epoch runs (the figures need them all), and checkpoints only
        # at epoch ends and the stop: mid-epoch saves would time the disk.
        "train.early_stopping_patience=0",
        "run.checkpoint_steps=0",
        *args.overrides,
    ]
    # The user's --set may change the batch: the per-device batch is what the runs get.
    batch = load_config(None, base).train.batch_size
    return Plan(rehearsal, gpus, tuple(base), batch, workdir, args.timeout)


def train_and_read(plan: Plan, name: str, precision: str, *, devices: str, env: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    """One run of the job in a fresh process: its run directory's figures, its LSTM probe, the all-reduce it logged."""
    spec = {
        "name": name,
        "overrides": plan.overrides(name, precision, devices=devices),
        "probe": True,
        "fallback_precision": _fallback(plan, precision),
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


def _fallback(plan: Plan, precision: str) -> str | None:
    """The precision a rehearsal's run takes if the job refuses ``precision`` on one CPU device."""
    # TODO(mixed_float16): imdb-dist refuses mixed_float16 on a single CPU
    # device (it is legal only with distribution.cpu_devices >= 2), so the
    # rehearsal's one-device "mixed" runs fall back to mixed_bfloat16; drop
    # this when mixed_float16 is accepted there.
    return "mixed_bfloat16" if plan.rehearsal and precision == "mixed_float16" else None


def warm_up(plan: Plan) -> dict[str, Any]:
    """One short run per precision on a few generated reviews, in one child; what ran."""
    data = write_synthetic(plan.workdir / "warmup-data", per_class=max(plan.batch, 64))
    runs = [
        {"name": f"warm-up {precision}",
         "overrides": [*plan.overrides(f"warmup-{precision}", precision, devices="one"), f"data.path={data}",
                       "train.epochs=1"],
         "fallback_precision": _fallback(plan, precision)}
        for precision in ("float32", "mixed_float16")
    ]
    began = time.perf_counter()
    results, _ = run_child(plan, "warmup", runs)
    return {"runs": [r["name"] for r in results if r["outcome"] == "complete"],
            "seconds": round(time.perf_counter() - began, 1)}


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's figures, from its ``metrics.jsonl`` and ``report.json``."""
    records = read_run_records(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    speeds = [r["examples_per_s"] for r in records]
    return {
        "precision": report["precision"],
        "strategy": report["strategy"],
        "replicas": report["replicas"],
        "global_batch": report["config"]["train"]["batch_size"],
        "epochs": len(records),
        "optimizer_steps": report["optimizer_steps"],
        "epoch_examples_per_s": speeds,
        "first_epoch_examples_per_s": speeds[0],
        # The steady state: the median of the epochs after the first (none in a 1-epoch run).
        "steady_examples_per_s": statistics.median(speeds[1:]) if len(speeds) > 1 else None,
        # From train.run's start to the end of training: data, tokenizing, tracing, steps, validation, checkpoints.
        "run_wall_s": report["wall_s"],
        # From the process's start (imports included) to the report: what a user waits for.
        "process_s": report["timings"]["process_s"],
        "phases_s": report["timings"]["phases_s"],
        "val_accuracy": report["validation"]["accuracy"],
    }


def _speedups(fast: dict[str, Any], slow: dict[str, Any]) -> dict[str, float | None]:
    """How many times ``fast`` beats ``slow``: examples/s over examples/s, seconds over seconds."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {
        "steady_examples_per_s": ratio(fast["steady_examples_per_s"], slow["steady_examples_per_s"]),
        "first_epoch_examples_per_s": ratio(fast["first_epoch_examples_per_s"], slow["first_epoch_examples_per_s"]),
        "run_wall_s": ratio(slow["run_wall_s"], fast["run_wall_s"]),
        "process_s": ratio(slow["process_s"], fast["process_s"]),
    }


def _all_devices(plan: Plan, one: dict[str, Any] | None, everything: dict[str, Any] | None) -> dict[str, Any]:
    section: dict[str, Any] = {
        "devices": "2 logical CPU devices" if plan.rehearsal else f"{plan.gpus} GPUs",
        "batch_per_device": plan.batch,
        "one": _headline(one),
        "all": everything,
    }
    if one and everything:
        speedup = _speedups(everything, one)
        section["speedup_over_one"] = speedup
        steady = speedup["steady_examples_per_s"]
        # Weak scaling: 1.0 when N devices train N times the examples per second.
        section["scaling_efficiency"] = steady / plan.all_devices if steady else None
        if one["precision"] != everything["precision"]:
            section["note"] = f"unlike precisions: {one['precision']} on one device, {everything['precision']} on all"
    return section


def _nccl(plan: Plan, everything: dict[str, Any] | None) -> dict[str, Any]:
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
            "distribution.collective": _collective_setting(plan),
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


def _collective_setting(plan: Plan) -> str:
    from imdb_dist.config import load_config

    return load_config(None, list(plan.base)).distribution.collective


def _headline(figures: dict[str, Any] | None) -> dict[str, Any] | None:
    keys = ("precision", "replicas", "global_batch", "first_epoch_examples_per_s", "steady_examples_per_s",
            "run_wall_s", "process_s")
    return {key: figures[key] for key in keys} if figures else None


def exact_resume(plan: Plan, precision: str) -> dict[str, Any]:
    """An uninterrupted deterministic run against one stopped mid-epoch and resumed in a fresh process."""
    whole = plan.overrides("resume-whole", precision, devices="one", deterministic=True)
    parted = plan.overrides("resume-parted", precision, devices="one", deterministic=True)
    from imdb_dist.config import load_config

    epochs = load_config(None, whole).train.epochs
    (first, stopped), _ = run_child(plan, "resume-1", [
        {"name": "uninterrupted", "overrides": whole},
        # Stopped half-way through the last epoch: the resume restores a mid-epoch position.
        {"name": "stopped", "overrides": parted, "stop_in_epoch": epochs},
    ])
    section: dict[str, Any] = {"deterministic": True, "precision": precision, "stop": stopped.get("stopped_at")}
    refused = [r for r in (first, stopped) if r["outcome"] == "refused"]
    if refused:
        return {**section, "exact": None, "refused_op": {k: refused[0].get(k) for k in ("name", "error", "message")}}
    if stopped["outcome"] != "interrupted":
        raise ChildFailed(f"the stop request did not stop the run: {stopped['outcome']} {stopped.get('message')}")
    (resumed,), _ = run_child(plan, "resume-2", [{"name": "resumed", "overrides": parted}])
    if resumed["outcome"] == "refused":
        return {**section, "exact": None, "refused_op": {k: resumed.get(k) for k in ("name", "error", "message")}}
    return {**section, "interrupted": stopped["message"], **compare_runs(Path(first["run_dir"]),
                                                                        Path(resumed["run_dir"]))}


def compare_runs(whole: Path, resumed: Path) -> dict[str, Any]:
    """Bitwise comparison of two runs' exported network weights, and of their loss columns and step counts."""
    import numpy as np
    import tensorflow as tf

    from imdb_dist.export import find_export

    def weights(run_dir: Path) -> dict[str, np.ndarray]:
        reader = tf.train.load_checkpoint(str(find_export(run_dir / "model") / "variables" / "variables"))
        return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
                if key.startswith("network_variables/")}

    want, got = weights(whole), weights(resumed)
    differing = sorted(k for k in want if k not in got or not np.array_equal(want[k], got[k]))
    common = [k for k in want if k in got and want[k].shape == got[k].shape]
    max_diff = max((float(np.max(np.abs(want[k].astype(np.float64) - got[k].astype(np.float64))))
                    for k in common if want[k].size), default=0.0)
    columns = ("loss", "accuracy", "val_loss", "val_accuracy")
    metrics = [[{c: r.get(c) for c in columns} for r in read_run_records(d)] for d in (whole, resumed)]
    steps = [read_run(d)["optimizer_steps"] for d in (whole, resumed)]
    return {
        "exact": bool(want) and want.keys() == got.keys() and not differing,
        "tensors": len(want),
        "tensors_differing": differing,
        "max_abs_diff": max_diff,
        "same_epoch_metrics": metrics[0] == metrics[1],
        "optimizer_steps": {"uninterrupted": steps[0], "stopped_and_resumed": steps[1]},
    }


def read_run_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl``: one record per epoch."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


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


def _progress(message: str) -> None:
    print(f"bench.gpu: {message}", file=sys.stderr, flush=True)


def _sizes(plan: Plan) -> dict[str, Any]:
    from imdb_dist.config import load_config, to_dict

    cfg = to_dict(load_config(None, list(plan.base)))
    return {
        "epochs": cfg["train"]["epochs"],
        "batch_per_device": plan.batch,
        "max_len": cfg["data"]["max_len"],
        "vocab_size": cfg["data"]["vocab_size"],
        "learning_rate": cfg["train"]["learning_rate"],
        "model": cfg["model"],
        "overrides": list(plan.base),
    }


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}{' with uncommitted changes' if dirty else ''}"


# --------------------------------------------------------------------------- devices and driver


def describe_devices(rehearsal: bool) -> dict[str, Any]:
    """TensorFlow's GPUs and build, nvidia-smi's view of the driver, and the CPU."""
    import tensorflow as tf
    import tf_keras

    from bench.topology import cpu_model
    from imdb_dist.logs import accelerator_notes

    gpus = tf.config.list_physical_devices("GPU")
    described = [{"name": gpu.name, **tf.config.experimental.get_device_details(gpu)} for gpu in gpus]
    build = dict(tf.sysconfig.get_build_info())
    # A GPU whose compute capability the build holds no binaries (sm_XY) for
    # runs TensorFlow's kernels JIT-compiled from its PTX (compute_XY).
    built = set(build.get("cuda_compute_capabilities") or ())
    capabilities = [d["compute_capability"] for d in described if d.get("compute_capability")]
    return _plain({
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "gpus": described,
        "build": build,
        "kernels_jit_from_ptx": any(f"sm_{major}{minor}" not in built for major, minor in capabilities),
        "cuda_cache_maxsize": os.environ.get("CUDA_CACHE_MAXSIZE", str(CUDA_CACHE_MAXSIZE)),
        # What TensorFlow said about CUDA, cuDNN and the GPUs while it loaded.
        "tensorflow_notes": list(dict.fromkeys(accelerator_notes())),
        "nvidia_smi": "not applicable: CPU rehearsal" if rehearsal else nvidia_smi(),
        "cpu": cpu_model(),
    })


def nvidia_smi() -> list[dict[str, str]] | str:
    """Each GPU's name, driver version and memory as nvidia-smi reports them."""
    if shutil.which("nvidia-smi") is None:
        return "not available: no nvidia-smi on PATH"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed: {exc}"
    rows = [[field.strip() for field in line.split(",")] for line in out.splitlines() if line.strip()]
    return [dict(zip(("name", "driver_version", "memory_total"), row, strict=False)) for row in rows]


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types (tuples to lists, anything else to its string)."""
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------- data


def resolve_data(args: argparse.Namespace, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The reviews the runs read, and how the JSON names them."""
    source = args.data or os.environ.get("IMDB_DATA") or (str(SHARED_DATA) if SHARED_DATA.is_file() else None)
    per_class = args.reviews or (256 if args.cpu_rehearsal else None)
    if source is None:
        per_class = per_class or 12_500  # the size of IMDB's training split
        path = write_synthetic(workdir / "synthetic", per_class)
        return path, {"data": "synthetic", "reviews_per_class": per_class}
    if per_class is None:
        return Path(source).resolve(), {"data": str(source)}
    path, taken = subset(Path(source), per_class, workdir / "subset")
    return path, {"data": str(source), "reviews_per_class": taken}


def subset(source: Path, per_class: int, where: Path) -> tuple[Path, int]:
    """The first ``per_class`` training reviews of each class of ``source`` (or all, if fewer), in the aclImdb layout.

    Returns the new aclImdb directory and the reviews it holds of its smaller class.
    """
    from imdb_dist.data.sources import read_aclimdb

    reviews = read_aclimdb(source, "train")
    base = where / "aclImdb"
    taken = []
    for label, name in ((1, "pos"), (0, "neg")):
        folder = base / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        chosen = [t for t, y in zip(reviews.texts, reviews.labels, strict=True) if int(y) == label][:per_class]
        for i, text in enumerate(chosen):
            (folder / f"{i}_{8 if label else 2}.txt").write_text(text, encoding="utf-8")
        taken.append(len(chosen))
    return base, min(taken)


SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "da", "gu", "zo", "fi", "be", "no",
             "ra", "te", "wu", "xi", "ya", "so", "me", "ti", "ha", "ko", "lu", "pa", "ve", "di", "nu")


def write_synthetic(root: Path, per_class: int, seed: int = 0) -> Path:
    """``per_class`` made-up reviews per class in the aclImdb layout (``aclImdb/train/{pos,neg}/ID_RATING.txt``).

    Shaped like IMDB where it matters to the job's speed: a vocabulary of
    ~28,000 made-up words drawn with Zipf-like frequencies (so the 20,000-word
    vocabulary fills), and lengths drawn log-normally around IMDB's (median
    near 180 words, a long tail past 400, so bucketing and truncation both
    work). A few words per review carry its class, so the model can learn.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array([a + b for a in SYLLABLES for b in SYLLABLES]
                     + [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES], dtype=object)
    rng.shuffle(words)
    cues = {1: words[:40], 0: words[40:80]}  # each class's telling words
    common = words[80:]
    frequency = 1.0 / (np.arange(len(common)) + 3.0)
    labels = np.repeat([1, 0], per_class)
    lengths = np.clip(rng.lognormal(5.2, 0.75, size=len(labels)), 10, 2000).astype(int)
    drawn = common[rng.choice(len(common), size=int(lengths.sum()), p=frequency / frequency.sum())]
    owner = np.repeat(labels, lengths)
    telling = rng.random(len(drawn)) < 0.04
    for label, cue in cues.items():
        here = telling & (owner == label)
        drawn[here] = cue[rng.integers(0, len(cue), size=int(here.sum()))]
    base = root / "aclImdb"
    ends = np.cumsum(lengths)
    counters = {1: 0, 0: 0}
    for label in (1, 0):
        (base / "train" / ("pos" if label else "neg")).mkdir(parents=True, exist_ok=True)
    for label, end, length in zip(labels, ends, lengths, strict=True):
        review = drawn[end - length:end]
        half = len(review) // 2  # IMDB's reviews hold HTML line breaks
        text = " ".join(review[:half]) + " <br /><br /> " + " ".join(review[half:]) + "."
        rating = int(rng.integers(7, 11)) if label else int(rng.integers(1, 5))
        name = "pos" if label else "neg"
        (base / "train" / name / f"{counters[label]}_{rating}.txt").write_text(text, encoding="utf-8")
        counters[label] += 1
    return base


# --------------------------------------------------------------------------- the child: runs of the job


def _child(spec_path: Path) -> int:
    """Run a spec's runs of the job in this process, as ``imdb-dist train`` would; write their results."""
    spec = json.loads(spec_path.read_text())
    from imdb_dist.config import load_config
    from imdb_dist.data.sources import read_ahead
    from imdb_dist.logs import import_tensorflow_quietly, setup_logging
    from imdb_dist.timings import since_process_start

    setup_logging()
    first = load_config(None, spec["runs"][0]["overrides"])
    # As imdb-dist train: the archive is read on another core while TensorFlow loads.
    reading = _Kept(read_ahead(first.data))
    import_tensorflow_quietly()
    results = []
    for i, run_spec in enumerate(spec["runs"]):
        # Only the first run's start-up is this process's (a report's "start-up" phase).
        results.append(_child_run(run_spec, reading, since_process_start() if i == 0 else None))
    Path(spec["result"]).write_text(json.dumps({"runs": results}, indent=2))
    return 0


class _Kept:
    """The training splits being read ahead, kept once read: the later runs and the LSTM probe reuse them."""

    def __init__(self, reading: Any) -> None:
        self._reading, self._splits = reading, None

    def result(self) -> Any:
        if self._splits is None:
            self._splits = self._reading.result()
        return self._splits


def _child_run(spec: dict[str, Any], reading: _Kept, startup_s: float | None) -> dict[str, Any]:
    """One run of the job; with ``probe``, then the LSTM kernel its trained model runs."""
    import tensorflow as tf
    import tf_keras as keras

    from imdb_dist.config import load_config
    from imdb_dist.errors import ConfigError
    from imdb_dist.interrupt import Interrupted, StopRequest
    from imdb_dist.train import run

    cfg = load_config(None, spec["overrides"])
    result: dict[str, Any] = {"name": spec["name"], "run_dir": cfg.run.output_dir}
    stop = StopRequest()
    # A bare callback: the callback list hands it the run's model, which it keeps after train.run returns.
    kept = keras.callbacks.Callback()
    callbacks: list[Any] = [kept]
    stopper = _stop_mid_epoch(stop, spec["stop_in_epoch"]) if spec.get("stop_in_epoch") else None
    if stopper is not None:
        callbacks.append(stopper)

    def train(cfg: Any) -> None:
        run(cfg, stop=stop, extra_callbacks=callbacks, startup_s=startup_s, reading=reading)

    try:
        try:
            train(cfg)
        except ConfigError as exc:
            # Refused before anything is written (see the TODO in _fallback).
            if exc.key != "train.mixed_precision" or not spec.get("fallback_precision"):
                raise
            result["precision_refused"] = {"asked": cfg.train.mixed_precision, "error": str(exc),
                                           "ran": spec["fallback_precision"]}
            cfg = load_config(None, [*spec["overrides"], f"train.mixed_precision={spec['fallback_precision']}"])
            train(cfg)
        result["outcome"] = "complete"
    except Interrupted as exc:
        result.update(outcome="interrupted", message=str(exc), stopped_at=stopper.stopped_at if stopper else None)
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError) as exc:
        if not cfg.train.deterministic:
            raise
        # Op determinism refuses ops that have no deterministic kernel: which one is the answer.
        result.update(outcome="refused", error=type(exc).__name__, message=exc.message[:3000])
        return result
    if result["outcome"] == "complete" and spec.get("probe"):
        try:
            result["lstm"] = lstm_runtime(kept.model, cfg, reading.result()[1].texts)
        except Exception as exc:  # noqa: BLE001 - the run's figures stand without the probe
            traceback.print_exc()
            result["lstm"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def _stop_mid_epoch(stop: Any, epoch: int) -> Any:
    """A Keras callback requesting a stop half-way through epoch ``epoch`` (1-based), as a SIGTERM handler would.

    It sets the request before the step runs (batch-begin hooks run before
    every execution; batch-end ones only at step points): the loop finishes
    that step, checkpoints and raises ``Interrupted``. Built here, not at
    import: tf_keras loads only after the child started reading the archive.
    """
    import tf_keras as keras

    class StopMidEpoch(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.stopped_at: dict[str, int] | None = None
            self._epoch = 0

        def on_epoch_begin(self, index: int, logs: dict | None = None) -> None:
            self._epoch = index + 1

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            steps = int(self.params.get("steps") or 1)
            at = max(1, steps // 2)  # the step after which the run stops, 1-based
            if self._epoch == epoch and batch + 1 >= at and self.stopped_at is None:
                stop.signum = signal.SIGTERM  # what imdb_dist.interrupt's handler sets
                self.stopped_at = {"epoch": self._epoch, "step": batch + 1, "steps_per_epoch": steps}

    return StopMidEpoch()


def lstm_runtime(model: Any, cfg: Any, texts: list[str]) -> dict[str, Any]:
    """The kernel the trained job LSTM runs, as tf_keras reports it at run time (2: cuDNN, 1: generic, 0: ineligible).

    An LSTM built from the job layer's own config plus ``return_runtime=True``
    (tf_keras' switch that makes the layer also return which implementation
    ran), holding the job layer's weights, is called in a tf.function under
    the run's strategy and dtype policy, on the activations that reach the
    job's LSTM (the model's output of the layer before it) for a batch of
    real reviews. The kernel is chosen when the function runs (tf_keras'
    implementation selector swaps cuDNN in on a GPU), so the returned
    runtime is what ran, not what the arguments allow.
    """
    import tensorflow as tf
    import tf_keras as keras

    from imdb_dist import rundir
    from imdb_dist.data.pipeline import Tokenizer, encode_padded
    from imdb_dist.distribute import local_devices, precision_policy

    job = next(layer for layer in model.layers if isinstance(layer, keras.layers.LSTM))  # member 0 of an ensemble
    run_dir = Path(cfg.run.output_dir)
    precision = json.loads((run_dir / "report.json").read_text())["precision"]
    strategy = model.distribute_strategy
    feeding = keras.Model(model.inputs, job.input)  # the job network up to its LSTM's input
    with strategy.scope(), precision_policy(precision):
        probe = keras.layers.LSTM.from_config({**job.get_config(), "return_runtime": True})
        probe.build(job.input_shape)
    probe.set_weights(job.get_weights())
    vocabulary = rundir.read_vocab(run_dir)
    assert vocabulary is not None, f"{run_dir} holds no vocabulary"
    per_replica = max(1, cfg.train.batch_size // strategy.num_replicas_in_sync)
    tokens = encode_padded(Tokenizer(vocabulary, cfg.data.vocab_size), tf.constant(texts[:per_replica]),
                           cfg.data.max_len)

    @tf.function
    def call(tokens: tf.Tensor) -> Any:
        def replica(tokens: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            activations = feeding(tokens, training=False)
            output, runtime = probe(activations)
            # The probe is the job's layer in all but the flag: the same outputs.
            differs = tf.reduce_max(tf.abs(tf.cast(output, tf.float32) - tf.cast(job(activations), tf.float32)))
            return runtime, differs, tf.shape(activations)

        return strategy.run(replica, args=(tokens,))

    runtime, differs, shape = call(tokens)
    runtimes = [int(value.numpy()) for value in strategy.experimental_local_results(runtime)]
    return {
        "runtime": runtimes[0],
        "per_replica": runtimes,
        "cudnn": all(r == 2 for r in runtimes),
        "layer": job.name,
        "precision": precision,
        "compute_dtype": probe.compute_dtype,
        "activations": {"dtype": feeding.output.dtype.name, "shape": [int(d) for d in
                                                                     strategy.experimental_local_results(shape)[0]]},
        "devices": list(local_devices(strategy)) or ["the default device"],
        "max_abs_diff_vs_job_layer": max(float(d.numpy()) for d in strategy.experimental_local_results(differs)),
        # Secondary: what the arguments allow (tf_keras' own flag, read, never acted on); the runtime is the answer.
        "eligible_by_arguments": getattr(job, "_could_use_gpu_kernel", None),
    }


if __name__ == "__main__":
    sys.exit(main())
