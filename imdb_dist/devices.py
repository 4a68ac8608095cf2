"""Which devices a job gets: the GPUs TensorFlow sees, why it sees none, and no silent CPU fallback.

A config that asks for a GPU (:func:`gpu_requests`) and gets none stops with
TensorFlow's reason; one that leaves the devices to ``auto`` trains where it
can and says so in one ``devices:`` line, with one warning more when the
host has an NVIDIA driver that this TensorFlow cannot use (the ``gpu`` extra
is missing). What TensorFlow said about CUDA while it loaded
(:func:`imdb_dist.logs.accelerator_notes`) goes into those lines' reason,
and is relayed line by line only where a GPU was asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import tensorflow as tf

from imdb_dist.config import Config
from imdb_dist.errors import ConfigError
from imdb_dist.logs import accelerator_notes, relay_accelerator_notes

log = logging.getLogger(__name__)

# The kernel module's version file: present wherever the NVIDIA driver is loaded (also in containers
# that mount the driver without its tools).
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


def gpu_extra_command(package: Path | None = None) -> str:
    """The command that adds the ``gpu`` extra to this installation of ``package`` (imdb_dist's directory).

    A checkout (editable install, or run from the source tree) is reinstalled
    from its own directory, wherever the user's shell is; an installed
    package by name.
    """
    checkout = (package or Path(__file__).resolve().parent).parent
    if (checkout / "pyproject.toml").is_file():
        return f'pip install -e "{checkout}[gpu]"'
    return 'pip install "imdb-dist[gpu]"'


def is_gpu(device: str) -> bool:
    """Whether a device string names a GPU: ``/gpu:0``, ``GPU:1``, ``/job:worker/device:GPU:0``."""
    return "gpu:" in device.lower()


def gpu_requests(cfg: Config, *, ray_worker: bool = False) -> list[str]:
    """The config keys that ask this process for a GPU (empty: it may run on CPUs).

    ``ray_worker``: the process is a Ray Train worker, which ``ray.use_gpu``
    promised GPUs (``imdb-dist train`` ignores the ``ray`` section).
    """
    keys = []
    if cfg.train.mixed_precision == "mixed_float16" and not cfg.distribution.cpu_devices:
        keys.append("train.mixed_precision")
    if any(is_gpu(device) for device in cfg.distribution.devices):
        keys.append("distribution.devices")
    if cfg.distribution.collective == "nccl":
        keys.append("distribution.collective")
    if ray_worker and cfg.ray.use_gpu:
        keys.append("ray.use_gpu")
    return keys


def nvidia_driver(version_file: Path = DRIVER_VERSION_FILE, path: str | None = None) -> str | None:
    """The NVIDIA driver this host has, in a few words, or None: its kernel module's version file, else ``nvidia-smi``.

    Nothing is run: ``nvidia-smi`` is only looked up on ``path`` (``$PATH``
    when None), since a wedged driver can hang it for minutes.
    """
    try:
        first = version_file.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        first = None
    if first is not None:
        # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar 5 ...", or with the open
        # modules "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build ..."
        version = re.search(r"Kernel Module\b.*?\s(\d+(?:\.\d+)+)\b", first)
        return f"NVIDIA driver {version[1]}" if version else f"NVIDIA driver ({version_file})"
    smi = shutil.which("nvidia-smi", path=path)
    return f"NVIDIA driver tools ({smi})" if smi else None


def cuda_libraries() -> bool:
    """Whether this TensorFlow can use CUDA: built with it, and the CUDA wheels of the ``gpu`` extra installed.

    The extra (``tensorflow[and-cuda]``) brings cuDNN and the CUDA runtime
    as ``nvidia-*`` wheels; the plain ``tensorflow`` wheel, built with CUDA,
    finds no libraries to load without them.
    """
    if not tf.test.is_built_with_cuda():
        return False
    try:
        return importlib.util.find_spec("nvidia.cudnn") is not None
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return False


def check_devices(cfg: Config, *, ray_worker: bool = False) -> bool:
    """Log the devices TensorFlow found, in one line; return whether it found a GPU.

    Call it before the strategy exists (it reads physical devices only, so
    it leaves the runtime uninitialised). Where the config asks for a GPU
    and TensorFlow found none, what it said about CUDA while it loaded is
    relayed line by line before the error (elsewhere those lines are debug
    output: a CPU machine's "failed call to cuInit" is no error of the run's).

    Raises:
        ConfigError: the config asks for a GPU (:func:`gpu_requests`) and
            TensorFlow sees none; the message says why, in TensorFlow's
            words where it gave them. Training on the CPU instead would be
            many times slower, and unnoticed.
    """
    requests = gpu_requests(cfg, ray_worker=ray_worker)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        log.info("devices: %d GPU(s): %s", len(gpus), ", ".join(describe(gpu) for gpu in gpus))
        return True
    reason = no_gpu_reason()
    if requests:
        # Only here: a healthy GPU host's import-time lines are no story of its devices.
        relay_accelerator_notes()
        asked = {
            "train.mixed_precision": "mixed_float16",
            "distribution.devices": ", ".join(cfg.distribution.devices),
            "distribution.collective": "nccl",
            "ray.use_gpu": "true",
        }[requests[0]]
        raise ConfigError(requests[0], f"{asked} needs a GPU and TensorFlow sees none: {reason}")
    split = f" split into {cfg.distribution.cpu_devices} logical devices" if cfg.distribution.cpu_devices else ""
    hint = None if cfg.distribution.cpu_devices else unused_driver_hint()  # a CPU rehearsal chose the CPU
    if hint:
        log.warning("devices: the CPU, no GPU: %s", hint)  # the reason, with what to do about it
    else:
        log.info("devices: the CPU%s, no GPU: %s", split, reason)
    return False


def describe(gpu: tf.config.PhysicalDevice) -> str:
    """``GPU:0 (NVIDIA H100 80GB HBM3, compute capability 9.0)``."""
    details = tf.config.experimental.get_device_details(gpu)
    capability = details.get("compute_capability")
    return (
        gpu.name.removeprefix("/physical_device:")
        + f" ({details.get('device_name', 'unknown')}"
        + (f", compute capability {capability[0]}.{capability[1]})" if capability else ")")
    )


def _hidden_by_cuda_visible_devices() -> str | None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible if visible is not None and visible.strip() in ("", "-1") else None


def unused_driver_hint() -> str | None:
    """One sentence when the host has an NVIDIA driver that TensorFlow cannot use for want of CUDA, else None.

    Called only once TensorFlow has listed no GPU. None as well when
    ``CUDA_VISIBLE_DEVICES`` hides the GPUs on purpose.
    """
    if _hidden_by_cuda_visible_devices() is not None:
        return None
    driver = nvidia_driver()
    if driver is None or cuda_libraries():
        return None
    return (
        f"this host has an {driver} but this TensorFlow has no CUDA libraries, so it trains on the CPU: "
        f"install the gpu extra ({gpu_extra_command()}) to train on the GPUs"
    )


def no_gpu_reason() -> str:
    """Why TensorFlow lists no GPU: its build or missing CUDA, ``CUDA_VISIBLE_DEVICES``, or what it said loading."""
    if not tf.test.is_built_with_cuda():
        return f"this TensorFlow is built without CUDA (for NVIDIA GPUs on Linux: {gpu_extra_command()})"
    hidden = _hidden_by_cuda_visible_devices()
    if hidden is not None:
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    notes = accelerator_notes()
    said = "TensorFlow said: " + "; ".join(dict.fromkeys(notes)) if notes else ""  # each message once
    if nvidia_driver() is not None and not cuda_libraries():
        missing = f"the CUDA libraries of the gpu extra are not installed ({gpu_extra_command()})"
        return f"{missing}; {said}" if said else missing
    return said or "TensorFlow lists no GPU device and said nothing about why"
