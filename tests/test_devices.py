"""The GPU path on a machine without a GPU: what the strategies are built with, and no silent CPU fallback.

This machine has no GPU, which is exactly the case to test: a job that asks
for one must stop with TensorFlow's reason, and one that does not must say
which devices it runs on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from conftest import REPO, tiny_overrides, write_aclimdb

from imdb_dist.config import DistributionConfig, load_config
from imdb_dist.devices import (
    check_devices,
    gpu_extra_command,
    gpu_requests,
    nvidia_driver,
)
from imdb_dist.distribute import (
    collective_for,
    communication_options,
    cross_device_ops,
    make_strategy,
)
from imdb_dist.errors import ConfigError

pytestmark = pytest.mark.no_gpu


@pytest.fixture(autouse=True)
def _no_gpu() -> None:
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present: these tests are about a machine without one")


# --------------------------------------------------------------------------- collectives


@pytest.mark.parametrize(
    ("name", "gpus", "expected"),
    [("auto", True, "nccl"), ("auto", False, "ring"), ("ring", True, "ring"), ("nccl", True, "nccl")],
)
def test_auto_collective_is_nccl_on_gpus_and_ring_elsewhere(name, gpus, expected):
    assert collective_for(name, gpus=gpus) == expected


def test_nccl_between_replicas_that_are_not_gpus_is_refused():
    with pytest.raises(ConfigError, match="distribution.collective: nccl all-reduces between GPUs"):
        collective_for("nccl", gpus=False)
    with pytest.raises(ConfigError, match="distribution.collective: nccl needs GPU replicas"):
        DistributionConfig(collective="nccl", cpu_devices=2)


def test_the_collective_names_tensorflows_implementation_and_cross_device_ops():
    implementation = tf.distribute.experimental.CommunicationImplementation
    assert communication_options("nccl").implementation == implementation.NCCL
    assert communication_options("ring").implementation == implementation.RING
    assert isinstance(cross_device_ops("nccl"), tf.distribute.NcclAllReduce)
    assert isinstance(cross_device_ops("ring"), tf.distribute.ReductionToOneDevice)


def test_a_mirrored_strategy_is_built_with_the_resolved_cross_device_ops():
    strategy = make_strategy(DistributionConfig(cpu_devices=2))
    # The strategy keeps what it was built with only privately; read here to
    # check TensorFlow honours it, never to drive behaviour.
    assert type(strategy.extended._cross_device_ops) is tf.distribute.ReductionToOneDevice


_MWMS_SCRIPT = """
import json, sys
from imdb_dist.config import DistributionConfig
from imdb_dist.distribute import make_strategy
strategy = make_strategy(DistributionConfig(**json.loads(sys.argv[1])))
print(json.dumps({
    "type": type(strategy).__name__,
    "replicas": strategy.num_replicas_in_sync,
    # Private, read only to check the built strategy holds our options.
    "implementation": strategy.extended._communication_options.implementation.name,
}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# tf.distribute.MultiWorkerMirroredStrategy is CollectiveAllReduceStrategy by class name.
@pytest.mark.parametrize(("cpu_devices", "kind", "replicas"), [(0, "CollectiveAllReduceStrategy", 1),
                                                                (2, "CpuReplicasMultiWorkerStrategy", 2)])
def test_a_multi_worker_strategy_is_built_with_the_resolved_collective(cpu_devices, kind, replicas):
    # TensorFlow's own default would be AUTO; on a worker without GPUs ours resolves to RING, named.
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{_free_port()}"]}, "task": {"type": "worker", "index": 0}}
    env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2"}
    args = json.dumps({"strategy": "multi_worker", "cpu_devices": cpu_devices})
    proc = subprocess.run([sys.executable, "-c", _MWMS_SCRIPT, args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert built == {"type": kind, "replicas": replicas, "implementation": "RING"}


# --------------------------------------------------------------------------- no silent fallback


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.mixed_precision=mixed_float16"], "train.mixed_precision"),
        (["distribution.strategy=mirrored", 'distribution.devices=["/gpu:0", "/gpu:1"]'], "distribution.devices"),
        (["distribution.collective=nccl"], "distribution.collective"),
    ],
)
def test_a_config_that_asks_for_a_gpu_stops_with_tensorflows_reason(overrides, key):
    cfg = load_config(overrides=overrides)
    assert gpu_requests(cfg) == [key]
    with pytest.raises(ConfigError, match=rf"^config key {re.escape(key)}: .* needs a GPU and TensorFlow sees none: "):
        check_devices(cfg)


def test_ray_use_gpu_asks_for_a_gpu_only_in_a_ray_worker():
    cfg = load_config(overrides=["ray.use_gpu=true", "ray.resources_per_worker={CPU: 1, GPU: 1}"])
    assert gpu_requests(cfg) == []  # imdb-dist train ignores the ray section
    assert gpu_requests(cfg, ray_worker=True) == ["ray.use_gpu"]
    with pytest.raises(ConfigError, match="^config key ray.use_gpu: true needs a GPU and TensorFlow sees none"):
        check_devices(cfg, ray_worker=True)


def test_a_cpu_rehearsal_may_run_mixed_float16_and_auto_logs_the_devices_and_why_no_gpu(caplog):
    rehearsal = load_config(overrides=["distribution.cpu_devices=2", "train.mixed_precision=mixed_float16"])
    assert gpu_requests(rehearsal) == []
    with caplog.at_level(logging.INFO, logger="imdb_dist.devices"):
        assert check_devices(rehearsal) is False
        assert check_devices(load_config()) is False
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("devices: ")]
    assert len(lines) == 2
    assert lines[0].startswith("devices: the CPU split into 2 logical devices, no GPU: ")
    assert lines[1].startswith("devices: the CPU, no GPU: ")


def _child(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


_REASON_SCRIPT = """
from imdb_dist.logs import import_tensorflow_quietly, setup_logging
setup_logging()
import_tensorflow_quietly()
from imdb_dist.devices import no_gpu_reason
print(no_gpu_reason())
"""


def test_the_reason_names_cuda_visible_devices_when_it_hides_every_gpu():
    proc = _child(_REASON_SCRIPT, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-2000:]
    if not tf.test.is_built_with_cuda():
        assert "built without CUDA" in proc.stdout
    else:
        assert proc.stdout.strip() == "CUDA_VISIBLE_DEVICES='' hides every GPU"


def test_imdb_dist_train_asking_for_a_gpu_exits_2_quoting_tensorflow_and_writes_nothing(tmp_path):
    data = write_aclimdb(tmp_path / "data", {"train": 40})
    out = tmp_path / "run"
    sets = [*tiny_overrides(data, out), "train.mixed_precision=mixed_float16"]
    proc = subprocess.run(
        [sys.executable, "-m", "imdb_dist.cli", "train", *[a for s in sets for a in ("--set", s)]],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "error: config key train.mixed_precision: mixed_float16 needs a GPU and TensorFlow sees none: "
    )
    # The reason quotes what TensorFlow said while it loaded, relayed as our log lines just before.
    said = re.findall(r"INFO imdb_dist\.logs: TensorFlow \w+ \([^)]*\): (.*)", proc.stderr)
    if tf.test.is_built_with_cuda() and "CUDA_VISIBLE_DEVICES" not in os.environ:
        assert said and all(message in error for message in said)
    assert not out.exists()


# --------------------------------------------------------------------------- what TensorFlow said, and when it is shown

_CHECK_SCRIPT = """
import sys
from pathlib import Path
from imdb_dist.logs import accelerator_notes, import_tensorflow_quietly, setup_logging
setup_logging()
import_tensorflow_quietly()
from imdb_dist.config import load_config
from imdb_dist.devices import check_devices
from imdb_dist.errors import ConfigError
try:
    check_devices(load_config(overrides=sys.argv[1:]))
except ConfigError as exc:
    print("error:", exc, file=sys.stderr)
print("\\n".join(accelerator_notes()))
"""


def _tensorflow_explains_itself() -> bool:
    """This machine's case: a CUDA build with no driver, whose start-up lines say why it found no GPU."""
    return tf.test.is_built_with_cuda() and "CUDA_VISIBLE_DEVICES" not in os.environ and nvidia_driver() is None


@pytest.mark.parametrize("asks_for_a_gpu", [False, True])
def test_tensorflows_cuda_lines_are_relayed_only_where_a_gpu_was_asked_for_and_quoted_in_the_reason(asks_for_a_gpu):
    if not _tensorflow_explains_itself():
        pytest.skip("TensorFlow says nothing about CUDA at start-up here (no CUDA build, or a driver)")
    overrides = ["train.mixed_precision=mixed_float16"] if asks_for_a_gpu else []
    proc = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = proc.stdout.strip().splitlines()
    assert any("cuInit" in note for note in notes), notes
    lines = proc.stderr.strip().splitlines()
    relayed = [line for line in lines if " imdb_dist.logs: TensorFlow " in line]
    if asks_for_a_gpu:
        # The story of the devices, at INFO, then the error that quotes it.
        assert [line.split(": ", 1)[1].split("): ", 1)[1] for line in relayed] == notes
        assert all(" INFO imdb_dist.logs: " in line for line in relayed), relayed
        assert lines[-1].startswith("error: config key train.mixed_precision: ")
        assert all(note in lines[-1] for note in notes)
    else:
        # No line that says "error" (cuInit's is TensorFlow's, not the run's); the devices line quotes it.
        unquoted = [line.split("TensorFlow said: ", 1)[0] for line in lines]
        assert not relayed and not [line for line in unquoted if "error" in line.lower()], lines
        devices = [line for line in lines if " devices: " in line]
        assert len(devices) == 1, lines
        assert " INFO imdb_dist.devices: devices: the CPU, no GPU: TensorFlow said: " in devices[0]
        assert all(note in devices[0] for note in notes)


# --------------------------------------------------------------------------- an NVIDIA driver TensorFlow cannot use


def _fake_nvidia_smi(directory) -> str:
    """A directory holding an executable named nvidia-smi, as a host with the NVIDIA driver's tools has on PATH."""
    directory.mkdir(exist_ok=True)
    smi = directory / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 0\n")
    smi.chmod(0o755)
    return str(directory)


def test_the_driver_is_found_by_its_kernel_module_or_its_tools_on_path(tmp_path):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
                       "GCC version:  gcc version 12.2.0\n")
    assert nvidia_driver(version, path="") == "NVIDIA driver 550.54.15"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
                       "(dvs-builder@U16-I3-B13-4-1)  Thu Jan 30 23:39:12 UTC 2025\n")  # the open kernel modules
    assert nvidia_driver(version, path="") == "NVIDIA driver 570.86.15"
    version.write_text("NVRM version: something else\n")
    assert nvidia_driver(version, path="") == f"NVIDIA driver ({version})"
    tools = _fake_nvidia_smi(tmp_path / "bin")
    assert nvidia_driver(tmp_path / "absent", path=tools) == f"NVIDIA driver tools ({tools}/nvidia-smi)"
    assert nvidia_driver(tmp_path / "absent", path=str(tmp_path)) is None


def test_auto_devices_on_a_host_with_a_driver_but_no_cuda_say_in_one_warning_to_install_the_gpu_extra(
    tmp_path, monkeypatch, caplog
):
    from imdb_dist.devices import cuda_libraries

    if cuda_libraries():
        pytest.skip("this TensorFlow has its CUDA libraries: the hint is about one that has none")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    caplog.set_level(logging.INFO, logger="imdb_dist.devices")
    if nvidia_driver() is None:
        # Without a driver: auto trains on the CPU and has nothing to suggest.
        assert check_devices(load_config()) is False
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        caplog.clear()
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    assert check_devices(load_config()) is False  # auto still trains, on the CPU
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("devices: the CPU, no GPU: this host has an NVIDIA driver")
    # The tests run from the checkout (an editable install): the hint reinstalls it from there, from any directory.
    assert f"""install the gpu extra (pip install -e "{REPO}[gpu]")""" in warnings[0], warnings[0]
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # the devices line is the hint: said once
    # A CPU rehearsal chose the CPU: no hint; a job that asks for a GPU stops, its reason naming the extra.
    caplog.clear()
    assert check_devices(load_config(overrides=["distribution.cpu_devices=2"])) is False
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    if tf.test.is_built_with_cuda():
        missing = f"the CUDA libraries of the gpu extra are not installed ({gpu_extra_command()})"
        with pytest.raises(ConfigError, match=re.escape(missing)):
            check_devices(load_config(overrides=["train.mixed_precision=mixed_float16"]))


def test_the_gpu_extra_hint_names_the_install_it_is_for(tmp_path: Path) -> None:
    # A checkout: reinstall it, editable, from its own directory (a relative ".[gpu]" fails from anywhere else).
    assert gpu_extra_command(REPO / "imdb_dist") == f'pip install -e "{REPO}[gpu]"'
    # An installed package (site-packages, a container's image): no pyproject.toml beside it; by name.
    installed = tmp_path / "site-packages" / "imdb_dist"
    installed.mkdir(parents=True)
    assert gpu_extra_command(installed) == 'pip install "imdb-dist[gpu]"'
