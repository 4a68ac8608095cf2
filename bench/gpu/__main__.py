"""``python -m bench.gpu``: every part of the GPU benchmark, in order (see the package's docstring)."""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench.gpu
from bench import harness
from bench.baseline import REPO, describe_tree
from bench.gpu import figures
from bench.gpu.child import child
from bench.gpu.data import resolve_data
from bench.gpu.devices import describe_devices
from bench.gpu.plan import make_plan
from bench.gpu.resume import exact_resume
from bench.gpu.runs import train_and_read, warm_up

# TensorFlow is imported inside functions, not here: a child run must start
# reading the archive before TensorFlow loads, as imdb-dist train does.

DEFAULT_OUTPUT = REPO / "docs" / "bench-results" / "gpu.json"
REHEARSAL = "cpu rehearsal: code path check, not GPU figures"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.gpu``: see the package docstring."""
    args = _parser().parse_args(argv)
    if args.child is not None:
        return child(args.child)
    from imdb_dist.logs import import_tensorflow_quietly

    # This process keeps no log (its progress lines are printed): TensorFlow's
    # start-up lines about CUDA are kept as accelerator notes, which end up in
    # the JSON or in the reason of the one error line, not on stderr as well.
    logging.basicConfig(level=logging.INFO, handlers=[logging.NullHandler()])
    import_tensorflow_quietly()
    import tensorflow as tf

    from imdb_dist.devices import no_gpu_reason

    gpus = len(tf.config.list_physical_devices("GPU"))
    if not gpus and not args.cpu_rehearsal:
        harness.refuse(f"no GPU visible to TensorFlow: {no_gpu_reason()}")
    output = args.output if args.output is not None else (None if args.cpu_rehearsal else DEFAULT_OUTPUT)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        workdir = args.workdir.resolve() if args.workdir else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = measure(args, gpus, workdir)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
    harness.emit(summary, output)
    return 1 if summary.get("errors") else 0


def _parser() -> argparse.ArgumentParser:
    parser = harness.parser(bench.gpu.__doc__)
    harness.add_data(parser, required=False,
                     help="aclImdb directory or .tar.gz (default: $IMDB_DATA, ../shared's, else generated)")
    parser.add_argument(
        "--reviews", type=int,
        help="reviews per class: the first N of each class of --data, or N generated "
        "(default: all of the data; 12,500 generated; a rehearsal: 256)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2: a cold and a steady one)")
    parser.add_argument("--batch", type=int, help="batch per device (default 256; a rehearsal: 32)")
    parser.add_argument("--max-len", type=int, help="tokens per review (default ray-gpu.yaml's; a rehearsal: 128)")
    harness.add_sets(parser, help="a config override for every run, after the bench's own sizes (repeatable)")
    harness.add_output(parser, help=f"also write the JSON here (default {DEFAULT_OUTPUT.relative_to(REPO)}; "
                       "a rehearsal: only when given)")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="run every part on the CPU (2 logical devices stand in for the GPUs): a code path check")
    parser.add_argument("--workdir", type=Path, help="keep the run directories and child logs here (default: temporary)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child process (default 300)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: one child's spec
    return parser


def measure(args: argparse.Namespace, gpus: int, workdir: Path) -> dict[str, Any]:
    """Every part of the benchmark, in order; a part that fails leaves its error in ``errors``."""
    rehearsal = args.cpu_rehearsal
    errors: dict[str, str] = {}

    def attempt(part: str, work: Callable[[], Any]) -> Any:
        harness.progress(f"bench.gpu: {part} ...")
        began = time.perf_counter()
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
            errors[part] = f"{type(exc).__name__}: {exc}"
            harness.progress(f"bench.gpu: {part} failed: {errors[part]}")
            return None
        harness.progress(f"bench.gpu: {part}: {time.perf_counter() - began:.1f} s")
        return result

    data, data_info = resolve_data(args, workdir)
    plan = make_plan(args, gpus, workdir, data)
    summary: dict[str, Any] = {
        "benchmark": "gpu",
        "status": REHEARSAL if rehearsal else "measured",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tree": describe_tree(),
        **data_info,
        "sizes": plan.sizes(),
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
    summary["precision"] = figures.precision(one, f32, mixed)
    # The multi-device and determinism runs use what the one-device mixed run ran.
    precision = (mixed or {}).get("precision", "mixed_float16")

    # 4 and 5. Every device against one, in a process with NCCL's logging on.
    if plan.all_devices > 1:
        everything = attempt("all devices", lambda: train_and_read(
            plan, "all", precision, devices="all", env={"NCCL_DEBUG": "INFO"}))
        summary["all_devices"] = figures.all_devices(plan, mixed, everything)
        summary["nccl"] = figures.nccl(plan, everything)
    else:
        summary["all_devices"], summary["nccl"] = figures.one_gpu_only(plan)

    # 2. The LSTM kernel each run's trained job layer ran with.
    summary["lstm"] = figures.lstm({"float32": f32, "mixed": mixed, "all_devices": summary["all_devices"].get("all")})

    # 6. Exact resume under train.deterministic.
    summary["exact_resume"] = attempt("exact resume", lambda: exact_resume(plan, precision))
    if errors:
        summary["errors"] = errors
    return summary


if __name__ == "__main__":
    sys.exit(main())
