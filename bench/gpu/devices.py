"""What the GPU benchmark ran on: TensorFlow's GPUs and build, nvidia-smi's driver and memory, the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from bench.machine import cpu_model

CUDA_CACHE_MAXSIZE = 4 << 30  # bytes: CUDA's largest


def describe_devices(rehearsal: bool) -> dict[str, Any]:
    """TensorFlow's GPUs and build, nvidia-smi's view of the driver, and the CPU."""
    import tensorflow as tf
    import tf_keras

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
