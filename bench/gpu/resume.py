"""Exact resume under ``train.deterministic``: a run stopped mid-epoch and resumed in a fresh process, against one not stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.gpu.plan import Plan
from bench.gpu.runs import ChildFailed, read_run, run_child
from bench.harness import read_records


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
    metrics = [[{c: r.get(c) for c in columns} for r in read_records(d)] for d in (whole, resumed)]
    steps = [read_run(d)["optimizer_steps"] for d in (whole, resumed)]
    return {
        "exact": bool(want) and want.keys() == got.keys() and not differing,
        "tensors": len(want),
        "tensors_differing": differing,
        "max_abs_diff": max_diff,
        "same_epoch_metrics": metrics[0] == metrics[1],
        "optimizer_steps": {"uninterrupted": steps[0], "stopped_and_resumed": steps[1]},
    }
