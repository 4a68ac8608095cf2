"""The README's `ray job submit` flow, end to end, against a `ray start --head` on loopback."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    REPO,
    TINY,
    installed_script,
    sweep_config,
    tensorflow_startup_lines,
    write_aclimdb,
)

from imdb_dist import rundir

# Each job is a Ray Train run of its own (the sweep's trial), beside a `ray start` head.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, dict[str, str]]]:
    """A `ray start --head --block` cluster in its own process group, shared by this module's jobs.

    Stopped by that group only: SIGTERM, then SIGKILL for what is left after
    a few seconds (measured: the GCS server, raylet and workers of a
    `ray start --block` outlive SIGTERM to the group for a minute and more).
    """
    ray = installed_script("ray")
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live here
    # Token authentication is on for clusters from `ray start`: the client must say so.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp_dir}",
         # Any free port, not the default 52365: a second cluster on this machine
         # (another test process's) may hold it, and an agent that cannot bind
         # its port serves no job submissions ("No available agent").
         "--dashboard-agent-listen-port=0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    # Ready means a job can be submitted: the dashboard answers `ray job list`
    # before the node's job agent has registered, and a submission then fails
    # with "No available agent to submit job" (seen on a loaded machine).
    probe = [ray, "job", "submit", "--address", address, "--", sys.executable, "-c", "pass"]
    try:
        deadline = time.monotonic() + 180
        while (tried := subprocess.run(probe, env=env, capture_output=True, text=True, timeout=180, check=False)).returncode:
            assert proc.poll() is None, "ray start exited"
            assert time.monotonic() < deadline, f"no job went through: {(tried.stdout + tried.stderr)[-2000:]}"
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(1)
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_sweep_of_ray_train_trials(head, tmp_path: Path) -> None:
    """job/tune.py on a `ray start` cluster, each trial a 2-worker Ray Train run (tune.workers_per_trial)."""
    address, env = head
    data = write_aclimdb(tmp_path / "data", {"train": 60})
    out = tmp_path / "sweep"  # absolute: the job runs in a temporary copy of the working directory
    grid = [0.03]  # one trial: the route is the claim here; sweeps of several trials are test_tune's
    config = sweep_config(
        tmp_path / "tune.yaml", data, out,
        {"space": {"train.learning_rate": {"grid": grid}}, "trials": 1, "early_stop": False, "workers_per_trial": 2},
        # Two workers of half a CPU each: one trial's Train run fits on the 2-CPU head beside the trial.
        ray={"resources_per_worker": {"CPU": 0.5}},
    )
    proc = subprocess.run(
        [installed_script("ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env", "job/runtime_env.yaml", "--", sys.executable, "job/tune.py", "--config", str(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The job's log (the driver, Tune, the trial's Ray Train controller and workers) holds no
    # TensorFlow start-up lines. (`job/train.py` through `ray job submit`, trained and exported:
    # tests/test_multinode.py, on a `ray start` cluster of two hosts.)
    noise = tensorflow_startup_lines(proc.stdout + proc.stderr)
    assert not noise, noise[:5]
    with (out / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(float(row["train.learning_rate"]) for row in rows) == grid
    for row in rows:
        assert row["status"] == "completed" and row["epochs"] == "2"
        report = json.loads((Path(row["run_dir"]) / rundir.REPORT).read_text())
        assert report["workers"] == 2 and report["replicas"] == 2
        assert report["validation"]["accuracy"] == pytest.approx(float(row["val_accuracy"]), abs=1e-6)
    assert (out / "best.yaml").is_file()


def test_a_submission_with_its_own_setup_hook_is_refused_in_one_line_and_writes_nothing(head, tmp_path: Path) -> None:
    # The job sets Ray's worker_process_setup_hook (TensorFlow loaded quietly in Ray's
    # processes); ray.init cannot merge a submission's own with it.
    address, env = head
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    storage = tmp_path / "storage"
    sets = [f"data.path={data}", f"ray.storage_path={storage}", *TINY]
    runtime_env = {"worker_process_setup_hook": "os.getcwd", "env_vars": {"TF_USE_LEGACY_KERAS": "1"}}
    proc = subprocess.run(
        [installed_script("ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env-json", json.dumps(runtime_env), "--",
         sys.executable, "job/train.py", "--config", "job/configs/ray-local.yaml",
         *[arg for item in sets for arg in ("--set", item)]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed" in output, output[-3000:]
    assert "Job entrypoint command failed with exit code 2" in output, output[-3000:]
    # One line from the job; `ray job submit` shows it twice (the streamed log, then its status message's tail).
    errors = {line for line in output.splitlines() if line.startswith("error: ")}
    assert errors == {
        (
            "error: the job's runtime env sets worker_process_setup_hook, which imdb-dist sets to "
            "imdb_dist.logs.quiet_tensorflow_imports (TensorFlow's start-up lines kept out of Ray's processes): "
            "drop it from the submission, or call that function from your hook"
        )
    }, output[-3000:]
    assert "Traceback" not in output
    assert not storage.exists()
