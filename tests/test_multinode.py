"""Two Ray nodes with two IP addresses, the job submitted with `ray job submit`, the run on S3.

Each "host" is a Linux network namespace (joined by a veth pair) with its
own address, HOME and Ray temporary directory, as separate machines would
have; the only shared thing they use is the S3 server (moto, on the head's
address), so the run directory, the prepared shards and the checkpoints
travel over the network. The cluster is started as the README says on a
fresh machine: `ray get-auth-token --generate`, `ray start --head`, the token
copied to the second host, `RAY_AUTH_MODE=token ray start --address=...`,
then `RAY_AUTH_MODE=token ray job submit`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TINY, installed_script, write_aclimdb

from imdb_dist import rundir

# Two Ray nodes, an S3 server and a submitted job: about 75 s on a fast CPU.
pytestmark = [pytest.mark.ray, pytest.mark.multinode, pytest.mark.timeout(600)]

SUBNET = "10.213.77"
HEAD, WORKER = f"{SUBNET}.1", f"{SUBNET}.2"
S3_PORT, GCS_PORT, DASHBOARD_PORT = 9000, 6379, 8265
BUCKET = "imdb"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _namespaces_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"imdb-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces ``(head, worker)`` joined by a veth pair: HEAD and WORKER addresses."""
    reason = _namespaces_unavailable()
    if reason:
        print(f"skipping the two-host test: {reason}")
        pytest.skip(reason)
    tag = os.getpid() % 100000
    head, worker = f"imdb-head-{tag}", f"imdb-worker-{tag}"
    try:
        _ip("netns", "add", head)
        _ip("netns", "add", worker)
        _ip("link", "add", f"vh{tag}", "type", "veth", "peer", "name", f"vw{tag}")
        for ns, dev, address in ((head, f"vh{tag}", HEAD), (worker, f"vw{tag}", WORKER)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield head, worker
    finally:
        for ns in (head, worker):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(ns: str, home: Path, *command: str, **env: str) -> list[str]:
    """``command`` run inside namespace ``ns`` with its own HOME (a fresh machine's), plus ``env``."""
    assignments = [f"{key}={value}" for key, value in {"HOME": str(home), **env}.items()]
    return ["ip", "netns", "exec", ns, "env", *assignments, *command]


def wait_for(check, what: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc is None or proc.poll() is None, f"{what}: the process exited"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def test_ray_job_submit_trains_across_two_hosts_with_the_run_on_s3(hosts, tmp_path: Path) -> None:
    head_ns, worker_ns = hosts
    ray = installed_script("ray")
    homes = {name: tmp_path / f"home-{name}" for name in ("head", "worker", "client")}
    for home in homes.values():
        home.mkdir()
    # Short paths: Ray's unix sockets live in the temp dir.
    temps = {name: tempfile.mkdtemp(prefix=f"ray{name[0]}-", dir="/tmp") for name in ("head", "worker")}
    # "1": a real multi-node cluster (the test session sets 0, loopback-only single-node mode).
    env = {**CREDENTIALS, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    procs: list[subprocess.Popen] = []

    def start(command: list[str], log: str) -> subprocess.Popen:
        handle = open(tmp_path / log, "w")  # noqa: SIM115 - closed with the test's tmp_path
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        s3 = start(in_ns(head_ns, homes["head"], sys.executable, "-m", "moto.server", "-H", HEAD, "-p",
                         str(S3_PORT), **env), "moto.log")
        create = (f"import boto3; boto3.client('s3', endpoint_url='http://{HEAD}:{S3_PORT}')"
                  f".create_bucket(Bucket='{BUCKET}')")
        wait_for(lambda: subprocess.run(in_ns(head_ns, homes["head"], sys.executable, "-c", create, **env),
                                        capture_output=True).returncode == 0, "the S3 server", s3)

        # The README's route on a fresh machine: a token first, then the head.
        subprocess.run(in_ns(head_ns, homes["head"], ray, "get-auth-token", "--generate"), check=True,
                       capture_output=True, timeout=120)
        token = homes["head"] / ".ray" / "auth_token"
        assert token.is_file(), "ray get-auth-token --generate wrote no token"
        for other in ("worker", "client"):  # the token reaches the other machines out of band
            (homes[other] / ".ray").mkdir()
            shutil.copy(token, homes[other] / ".ray" / "auth_token")
        head = start(in_ns(head_ns, homes["head"], ray, "start", "--head", "--block", f"--node-ip-address={HEAD}",
                           f"--port={GCS_PORT}", f"--dashboard-host={HEAD}", f"--dashboard-port={DASHBOARD_PORT}",
                           "--num-cpus=1", f"--temp-dir={temps['head']}", **env), "head.log")
        address = f"http://{HEAD}:{DASHBOARD_PORT}"
        client = {"RAY_AUTH_MODE": "token", **env}
        wait_for(lambda: subprocess.run(in_ns(head_ns, homes["client"], ray, "job", "list", "--address", address,
                                              **client), capture_output=True).returncode == 0, "the head", head)
        worker = start(in_ns(worker_ns, homes["worker"], ray, "start", "--block", f"--address={HEAD}:{GCS_PORT}",
                             f"--node-ip-address={WORKER}", "--num-cpus=1", f"--temp-dir={temps['worker']}",
                             # A joining node reads its token file only in token mode (measured: without
                             # it, "InvalidAuthToken ... RAY_AUTH_MODE is currently 'disabled'").
                             RAY_AUTH_MODE="token", **env), "worker.log")
        nodes = (f"import ray, json; ray.init(address='{HEAD}:{GCS_PORT}');"
                 "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))")
        wait_for(lambda: json.loads((subprocess.run(
            in_ns(head_ns, homes["client"], sys.executable, "-c", nodes, **client),
            capture_output=True, text=True).stdout.strip().splitlines() or ["[]"])[-1]) == [HEAD, WORKER],
            "the second node to join", worker)

        data = write_aclimdb(tmp_path / "data", {"train": 100})
        storage = f"s3://{BUCKET}/runs?endpoint_override={HEAD}:{S3_PORT}&scheme=http"
        sets = [f"data.path={data}", f"ray.storage_path={storage}", "ray.name=two-hosts", "ray.num_workers=2",
                "ray.num_shards=4", *TINY]
        submitted = subprocess.run(
            in_ns(head_ns, homes["client"], ray, "job", "submit", "--address", address, "--working-dir", ".",
                  "--runtime-env", "job/runtime_env.yaml", "--", sys.executable, "job/train.py",
                  "--config", "job/configs/ray-local.yaml", *[arg for item in sets for arg in ("--set", item)],
                  **client),
            cwd=REPO, capture_output=True, text=True, timeout=900,
        )
        output = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, output[-4000:]
        assert "succeeded" in output
        # TF_CONFIG names both hosts, and each host ran one worker.
        placements = [json.loads(line.split("worker placement: ", 1)[1]) for line in output.splitlines()
                      if "worker placement: " in line]
        assert sorted(p["node"] for p in placements) == [HEAD, WORKER], output[-4000:]
        for placement in placements:
            assert sorted(host.split(":")[0] for host in placement["tf_config_workers"]) == [HEAD, WORKER]

        report_source = (
            f"import boto3, sys; s3 = boto3.client('s3', endpoint_url='http://{HEAD}:{S3_PORT}');"
            f"sys.stdout.write(s3.get_object(Bucket='{BUCKET}', Key='runs/two-hosts/{rundir.REPORT}')['Body'].read()"
            ".decode())"
        )
        fetched = subprocess.run(in_ns(head_ns, homes["client"], sys.executable, "-c", report_source, **env),
                                 capture_output=True, text=True, check=True)
        report = json.loads(fetched.stdout)
        assert report["workers"] == 2 and report["strategy"] == "CollectiveAllReduceStrategy"
        assert report["optimizer_steps"] > 0
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in reversed(procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for temp in temps.values():
            shutil.rmtree(temp, ignore_errors=True)
