"""The image, built from the working tree, running each manifest's containers as Kubernetes would run them.

The CPU image (``--build-arg DEVICE=cpu``) is built once for the module on
the local Debian base (docker/debian-base.sh; no registry is reached here).
Each test then runs a container of k8s/ with podman as the kubelet would
(tests/pods.py): the command, args, env, workingDir, user, read-only root,
dropped capabilities and volume mounts all come from the manifest; a test
adds only what it names (the GPU-only config keys replaced through
``--set``, a Ray cluster's token, the local server's URL). Claims are host
directories seeded with a generated dataset at ``datasets/aclImdb_v1.tar.gz``,
where the manifests' configs read it.

Needs root, podman, runc and the base image: .ci/run installs and makes
them; elsewhere the module skips, saying what is missing.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import REPO, installed_script, make_tarball, write_aclimdb
from exactness import model_weights
from pods import (
    ULIMITS,
    Volumes,
    grace_seconds,
    ip_address,
    kuberay_start_command,
    podman,
    run_args,
)

from imdb_dist import rundir
from imdb_dist.rundir import read_metrics

pytestmark = [pytest.mark.container, pytest.mark.timeout(600)]

K8S = REPO / "k8s"
BASE_IMAGE = os.environ.get("IMDB_DIST_BASE_IMAGE", "localhost/imdb-dist-base:bookworm")
IMAGE = "localhost/imdb-dist:test-cpu"
CLAIM = "imdb-dist-storage"
# The host's CA bundle, for pip behind a TLS-intercepting proxy (the Dockerfile's pip-ca secret).
CA_BUNDLE = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
# Our own subnet for the containers' network (tests/test_multinode.py uses 10.213.77.0/24).
SUBNET = "10.213.78.0/24"
# The GPU-only keys of the manifests' configs, and what a CPU takes instead.
CPU_INSTEAD_OF_GPU = ["train.mixed_precision=float32"]
# Where to find the data and where to write are the pod's (the manifest's config says); everything else
# the GPU job's CPU rehearsal changes is its rehearsal on CPUs.
_MACHINE_KEYS = {"data.source", "data.path", "ray.storage_path", "ray.name"}


def rehearsal_settings(job: Path, rehearsal: Path) -> list[str]:
    """``--set`` items that turn ``job`` into its CPU ``rehearsal`` (job/configs/ray-gpu-rehearsal.yaml), paths aside."""
    want, have = (yaml.safe_load(p.read_text(encoding="utf-8")) for p in (rehearsal, job))
    return [f"{section}.{key}={json.dumps(value)}" for section, keys in want.items() for key, value in keys.items()
            if value != have.get(section, {}).get(key) and f"{section}.{key}" not in _MACHINE_KEYS]


def _load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if doc]


(JOB,) = _load("job.yaml")
(LOADER,) = _load("data-loader.yaml")
(RAYJOB,) = _load("rayjob.yaml")
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))


def config_maps() -> dict[str, dict[str, str]]:
    """The ConfigMaps k8s/kustomization.yaml generates: name → {file name: text}."""
    result = {}
    for generator in KUSTOMIZATION.get("configMapGenerator", []):
        files = {}
        for entry in generator["files"]:
            key, _, source = entry.rpartition("=")
            files[key or Path(source).name] = (K8S / source).read_text(encoding="utf-8")
        result[generator["name"]] = files
    return result


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the container tests run podman as root"
    for tool in ("podman", "runc", "iptables"):  # iptables: podman's network backend runs it
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc mmdebstrap iptables)"
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        return f"no base image {BASE_IMAGE}: make it with docker/debian-base.sh"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU image built from the working tree (its dependency layers come from the cache once built)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    secret = ["--secret", f"id=pip-ca,src={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []
    # The Dockerfile's last install step runs pip check: a broken environment fails the build here.
    podman("build", "--format", "docker", "--build-arg", "DEVICE=cpu", "--build-arg",
           f"CUDA_IMAGE={BASE_IMAGE}", *secret, "--tag", IMAGE, str(REPO), timeout=1500)
    return IMAGE


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated aclImdb archive: 16 steps an epoch at single-node.yaml's batch of 512."""
    root = tmp_path_factory.mktemp("container-data")
    return make_tarball(write_aclimdb(root, {"train": 4600}), root / "aclImdb_v1.tar.gz")


@pytest.fixture(scope="module")
def network(image: str) -> Iterator[str]:
    name = f"imdb-dist-test-{os.getpid()}"
    # A network an interrupted earlier run left behind would hold the subnet: its containers go with it.
    for stale in podman("network", "ls", "--format", "{{.Name}}").stdout.split():
        if stale.startswith("imdb-dist-test-"):
            podman("network", "rm", "--force", stale, check=False)
    podman("network", "create", "--subnet", SUBNET, name)
    yield name
    podman("network", "rm", "--force", name, check=False)


_NUMBERS = itertools.count()


class Pods:
    """The containers a test starts (removed at its end), on claims that are host directories."""

    def __init__(self, root: Path, image: str, dataset: Path) -> None:
        self.root, self.image = root, image
        self.claims: dict[str, Path] = {}
        self.dataset = dataset
        self.names: list[str] = []

    def claim(self, name: str = CLAIM, *, seeded: bool = True) -> Path:
        """A fresh volume for the claim ``name``, with the dataset where the manifests' configs read it."""
        path = self.root / f"claim-{len(self.claims)}"
        path.mkdir()
        if seeded:
            (path / "datasets").mkdir()
            shutil.copy(self.dataset, path / "datasets" / "aclImdb_v1.tar.gz")
        self.claims[name] = path
        return path

    def start(self, pod_spec: dict[str, Any], container_name: str, **how: Any) -> str:
        name = f"imdb-dist-test-{os.getpid()}-{next(_NUMBERS)}"
        volumes = Volumes(claims=self.claims, config_maps=config_maps(), scratch=self.root / "config-maps")
        podman(*run_args(pod_spec, container_name, image=self.image, volumes=volumes, name=name, **how)[3:])
        self.names.append(name)
        return name

    def wait(self, name: str, timeout: float = 500) -> int:
        return int(podman("wait", name, timeout=timeout).stdout.strip())

    def logs(self, name: str) -> str:
        result = podman("logs", name, check=False)
        return result.stdout + result.stderr

    def remove_all(self) -> None:
        for name in self.names:
            podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture
def pods(tmp_path: Path, image: str, dataset: Path) -> Iterator[Pods]:
    made = Pods(tmp_path, image, dataset)
    try:
        yield made
    finally:
        made.remove_all()


def _job_spec() -> dict[str, Any]:
    return JOB["spec"]["template"]["spec"]


def _job_config() -> dict[str, Any]:
    (files,) = config_maps().values()
    return yaml.safe_load(files["single-node.yaml"])


def _host_path(claim: Path, pod_path: str, mount_path: str = "/mnt/imdb-dist") -> Path:
    """Where a path under the claim's mount in a pod is on the host."""
    return claim / Path(pod_path).relative_to(mount_path)


# --------------------------------------------------------------------------- the image


# The first test builds the image: seconds from the layer cache, minutes on a machine's first build.
@pytest.mark.timeout(840)
def test_the_cpu_image_has_tensorflow_without_cuda_and_pip_check_passes(image: str) -> None:
    run = podman("run", "--rm", *ULIMITS, "--entrypoint", "pip", image, "list", "--format", "json")
    installed = {p["name"].lower(): p["version"] for p in json.loads(run.stdout)}
    assert installed["tensorflow"].startswith("2.21.") and installed["imdb-dist"] == "0.1.0"
    assert not [name for name in installed if name.startswith("nvidia-")], "the CPU image holds CUDA wheels"
    assert podman("run", "--rm", *ULIMITS, "--entrypoint", "pip", image, "check").stdout.startswith("No broken requirements")
    # The default command: the CLI's help, as the image's user, not root.
    helped = podman("run", "--rm", *ULIMITS, image)
    assert helped.stdout.startswith("usage: imdb-dist")
    assert podman("run", "--rm", *ULIMITS, "--entrypoint", "id", image, "-u").stdout.strip() == "10001"


# --------------------------------------------------------------------------- the batch Job


def _train_job(pods: Pods) -> tuple[Path, str]:
    claim = pods.claim()
    name = pods.start(_job_spec(), "trainer", extra_args=[f"--set={key}" for key in CPU_INSTEAD_OF_GPU])
    return claim, name


@pytest.fixture(scope="module")
def finished_job(image: str, dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The batch Job's trainer run to its end: (the host directory of its run directory, its log)."""
    made = Pods(tmp_path_factory.mktemp("job"), image, dataset)
    try:
        claim, name = _train_job(made)
        status = made.wait(name)
        log = made.logs(name)
        assert status == 0, log[-4000:]
        yield _host_path(claim, _job_config()["run"]["output_dir"]), log
    finally:
        made.remove_all()


def test_the_batch_jobs_trainer_runs_to_an_exported_model_that_predict_scores_in_the_image(
    finished_job: tuple[Path, str], pods: Pods
) -> None:
    run_dir, log = finished_job
    report = json.loads((run_dir / rundir.REPORT).read_text())
    assert report["precision"] == "float32" and report["validation"]["auc"] > 0.9
    assert (run_dir / rundir.MODEL / "1" / "saved_model.pb").is_file()
    # Written as the pod's user, into the fsGroup-owned volume.
    assert (run_dir / rundir.REPORT).stat().st_uid == JOB["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    # Our lines only: no TensorFlow C++ start-up noise, no warning (a write the read-only root refused).
    assert "devices: the CPU" in log and not re.search(r"^[EWI]\d{4} ", log, flags=re.MULTILINE), log[-3000:]
    assert not re.search(r"^\S+ \S+ (WARNING|ERROR) ", log, flags=re.MULTILINE), log[-3000:]
    # predict, in the same pod spec (its user, read-only root, mounts), on the exported model.
    pods.claims[CLAIM] = run_dir.parents[0]
    model = "/mnt/imdb-dist/" + run_dir.name
    name = pods.start(_job_spec(), "trainer", args=["predict", "--model", model, "good good great", "bad awful"])
    assert pods.wait(name) == 0, pods.logs(name)[-3000:]
    scores = [json.loads(line) for line in podman("logs", name).stdout.splitlines()]
    assert len(scores) == 2 and all(0.0 <= s["score"] <= 1.0 for s in scores), scores


def test_a_stopped_trainer_pod_resumes_in_the_next_and_ends_with_the_uninterrupted_model(
    finished_job: tuple[Path, str], pods: Pods
) -> None:
    claim, first = _train_job(pods)
    run_dir = _host_path(claim, _job_config()["run"]["output_dir"])
    steps = run_dir / rundir.STEPS
    deadline = time.monotonic() + 300
    # Stopped inside the second epoch, as a pod is stopped: SIGTERM, then SIGKILL after the grace period.
    while not (steps.exists() and any(r["epoch"] >= 2 for r in read_metrics(steps))):
        assert time.monotonic() < deadline and podman("inspect", "--format", "{{.State.Running}}",
                                                      first).stdout.strip() == "true", pods.logs(first)[-3000:]
        time.sleep(0.5)
    podman("stop", "--time", str(grace_seconds(_job_spec())), first, timeout=300)
    status, stopped = pods.wait(first), pods.logs(first)
    # The trainer (PID 1) heard SIGTERM and checkpointed before the grace period ran out: 128 + 15.
    assert status == 143, stopped[-3000:]
    assert "checkpoint" in stopped.lower(), stopped[-3000:]
    # The Job's next pod: the same spec on the same volume.
    second = pods.start(_job_spec(), "trainer", extra_args=[f"--set={key}" for key in CPU_INSTEAD_OF_GPU])
    assert pods.wait(second) == 0, pods.logs(second)[-4000:]
    assert "resuming at epoch" in pods.logs(second)
    uninterrupted, _ = finished_job
    got, want = model_weights(run_dir), model_weights(uninterrupted)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    digests = [[r["batches_digest"] for r in read_metrics(d / rundir.STEPS)] for d in (run_dir, uninterrupted)]
    assert digests[0] == digests[1]
    reports = [json.loads((d / rundir.REPORT).read_text()) for d in (run_dir, uninterrupted)]
    assert reports[0]["batches_digest"] == reports[1]["batches_digest"] and reports[0]["validation"] == reports[1][
        "validation"]


def test_a_run_directory_the_pods_user_cannot_write_is_one_error_line_and_exit_2(pods: Pods) -> None:
    claim = pods.claim()
    blocked = _host_path(claim, _job_config()["run"]["output_dir"])
    blocked.mkdir()
    os.chown(blocked, 0, 0)
    blocked.chmod(0o755)  # root's, not the fsGroup's: the pod's user cannot write it
    name = pods.start(_job_spec(), "trainer", extra_args=[f"--set={key}" for key in CPU_INSTEAD_OF_GPU])
    assert pods.wait(name) == 2
    result = podman("logs", name)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "run.output_dir" in errors[0], result.stderr[-3000:]
    assert not any(blocked.iterdir())


# --------------------------------------------------------------------------- the data loader


def test_the_data_loaders_download_step_fetches_and_checks_the_archive_and_refuses_a_bad_checksum(
    pods: Pods, network: str, dataset: Path
) -> None:
    claim = pods.claim(seeded=False)
    spec = LOADER["spec"]
    name = pods.start(spec, "loader", network=network)
    gateway = SUBNET.rsplit(".", 1)[0] + ".1"  # the host, on the containers' network
    served = pods.root / "served"
    served.mkdir()
    for name_there in (dataset.name, "altered.tar.gz"):
        shutil.copy(dataset, served / name_there)
    with (served / "altered.tar.gz").open("ab") as altered:
        altered.write(b"\0")  # one byte more: another sha256
    server = http.server.ThreadingHTTPServer(
        (gateway, 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://{gateway}:{server.server_address[1]}/{dataset.name}"
        step = _documented_download_step()
        sha256 = hashlib.sha256(dataset.read_bytes()).hexdigest()
        fetched = podman("exec", name, *step, "--url", url, "--sha256", sha256, check=False)
        assert fetched.returncode == 0, fetched.stderr[-3000:]
        target = claim / "datasets" / dataset.name
        assert fetched.stdout.strip() == "/mnt/imdb-dist/datasets/" + dataset.name
        assert target.read_bytes() == dataset.read_bytes() and target.stat().st_uid == spec["securityContext"]["runAsUser"]
        # A wrong checksum: one error line, exit 2, nothing new on the volume.
        before = sorted(p.name for p in target.parent.iterdir())
        refused = podman("exec", name, *step, "--url", url.replace(dataset.name, "altered.tar.gz"), "--sha256",
                         sha256, check=False)
        assert refused.returncode == 2
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "does not match its checksum" in errors[0], refused.stderr
        assert sorted(p.name for p in target.parent.iterdir()) == before
    finally:
        server.shutdown()


def _documented_download_step() -> list[str]:
    """The command docs/kubernetes.md runs in the data loader (``kubectl exec ... -- COMMAND``)."""
    guide = (REPO / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    (line,) = re.findall(r"kubectl -n imdb-dist exec imdb-dist-data-loader -- (imdb-dist download[^`\n]*)", guide)
    return shlex.split(line)


# --------------------------------------------------------------------------- the RayJob


def test_the_rayjobs_head_and_workers_run_its_entrypoint_submitted_from_outside_to_a_finished_run(
    pods: Pods, network: str
) -> None:
    claim = pods.claim()
    # The entrypoint's config with the settings of its CPU rehearsal: two workers of two replicas each, float32.
    rehearsal = rehearsal_settings(REPO / _entrypoint_config(), REPO / "job" / "configs" / "ray-gpu-rehearsal.yaml")
    assert "distribution.cpu_devices=2" in rehearsal and "ray.use_gpu=false" in rehearsal, rehearsal
    cluster = RAYJOB["spec"]["rayClusterSpec"]
    head_group, (worker_group,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    # KubeRay with authOptions.mode token: one generated token, in every Ray container's env.
    assert cluster["authOptions"]["mode"] == "token"
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = pods.start(head_group["template"]["spec"], "ray-head", network=network, env=token,
                      command=kuberay_start_command(head_group, "ray-head", head_address=None))
    address = ip_address(head, network)
    for _ in range(worker_group["replicas"]):
        pods.start(worker_group["template"]["spec"], "ray-worker", network=network, env=token,
                   command=kuberay_start_command(worker_group, "ray-worker", head_address=f"{address}:6379"))
    env = {**os.environ, **token, "RAY_ADDRESS": f"http://{address}:8265"}
    _wait_for_nodes(env, 1 + worker_group["replicas"], head, pods)
    runtime_env = yaml.safe_load(RAYJOB["spec"]["runtimeEnvYAML"])
    submitted = subprocess.run(
        [installed_script("ray"), "job", "submit", "--runtime-env-json", json.dumps(runtime_env), "--",
         *shlex.split(RAYJOB["spec"]["entrypoint"]), *[f"--set={item}" for item in rehearsal]],
        env=env, capture_output=True, text=True, timeout=500, check=False,
    )
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-5000:]
    config = yaml.safe_load((REPO / _entrypoint_config()).read_text(encoding="utf-8"))["ray"]
    run_dir = _host_path(claim, f"{config['storage_path']}/{config['name']}")
    report = json.loads((run_dir / rundir.REPORT).read_text())
    assert report["workers"] == worker_group["replicas"] == config["num_workers"]
    assert report["replicas"] == 2 * report["workers"] and report["strategy"] == "CpuReplicasMultiWorkerStrategy"
    assert report["precision"] == "float32" and report["optimizer_steps"] > 0
    assert (run_dir / rundir.MODEL / "1" / "saved_model.pb").is_file()


def _entrypoint_config() -> str:
    words = shlex.split(RAYJOB["spec"]["entrypoint"])
    return words[words.index("--config") + 1]


def _wait_for_nodes(env: dict[str, str], count: int, head: str, pods: Pods) -> None:
    """Until the head lists ``count`` live nodes (the workers joined with the token), asked from outside."""
    deadline = time.monotonic() + 180
    probe = [installed_script("ray"), "list", "nodes", "--format", "json", "--filter", "state=ALIVE"]
    while True:
        tried = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120, check=False)
        listed = tried.stdout.strip()
        # Until a node registers it says "No resource in the cluster".
        if tried.returncode == 0 and listed.startswith("[") and len(json.loads(listed)) == count:
            return
        assert time.monotonic() < deadline, (tried.stdout + tried.stderr)[-2000:] + pods.logs(head)[-2000:]
        time.sleep(2)
