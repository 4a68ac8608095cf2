"""A Kubernetes pod spec's container run with podman as the kubelet would run it, for tests/test_container.py.

Everything the container's behaviour depends on is read from the manifest,
not restated by a test: the command and args (Kubernetes' ``command``
replaces the image's ENTRYPOINT, ``args`` its CMD), env, workingDir, the
pod's and the container's securityContext (user, group, fsGroup,
runAsNonRoot, a read-only root filesystem, dropped capabilities, no
privilege escalation, the seccomp profile), the volume mounts (a claim is a
host directory owned by the fsGroup as the kubelet leaves it, a ConfigMap
its files read-only, an emptyDir a fresh tmpfs per pod) and the grace period
a stop allows. Resource requests and limits are the scheduler's business and
name GPUs this machine lacks: they are not applied. For a Ray pod, the
command KubeRay generates from the group's ``rayStartParams`` and the
container's limits (:func:`kuberay_start_command`).

podman runs as root with runc (the default crun refuses this machine's hybrid
cgroups); the containers run as the pod's user, not root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PODMAN = ("podman", "--runtime", "runc")


def _ulimits() -> tuple[str, ...]:
    """The resource limits a container starts with here: this machine's open files, 32768 processes.

    By default rootful podman raises both to ceilings of its own, which this
    machine's sandbox refuses (runc: "error setting rlimit ... operation not
    permitted"); the kubelet leaves them to the runtime too. What the job
    needs, it gets either way.
    """
    _, files = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, processes = resource.getrlimit(resource.RLIMIT_NPROC)
    processes = min(processes, 32768) if processes != resource.RLIM_INFINITY else 32768
    return (f"--ulimit=nofile={files}:{files}", f"--ulimit=nproc={processes}:{processes}")


ULIMITS = _ulimits()
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
            "Ti": 2**40}


def quantity(text: str | float) -> float:
    """A Kubernetes quantity as a number: ``"500m"`` → 0.5, ``"2Gi"`` → 2147483648."""
    match = _QUANTITY.match(str(text))
    assert match, f"not a Kubernetes quantity: {text!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


@dataclasses.dataclass(frozen=True)
class Volumes:
    """What the pod's volumes are on this host.

    Attributes:
        claims: a PersistentVolumeClaim's name → the host directory that stands for its volume.
        config_maps: a ConfigMap's name → its data (file name → text), as kustomize generates it.
        scratch: where a ConfigMap's files are written for the container to mount.
    """

    claims: Mapping[str, Path]
    config_maps: Mapping[str, Mapping[str, str]]
    scratch: Path


def container(pod_spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def grace_seconds(pod_spec: Mapping[str, Any]) -> int:
    """How long a stopped pod's containers have between SIGTERM and SIGKILL (Kubernetes' default: 30)."""
    return int(pod_spec.get("terminationGracePeriodSeconds", 30))


def run_args(
    pod_spec: Mapping[str, Any],
    container_name: str,
    *,
    image: str,
    volumes: Volumes,
    name: str,
    network: str | None = None,
    env: Mapping[str, str] = (),
    command: Sequence[str] | None = None,
    args: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``podman run -d ...`` for one container of ``pod_spec``, as the kubelet would start it.

    Args:
        image: the image the manifest's ``image`` stands for (kustomize sets it).
        name: the container's name here (also its hostname, like a pod's).
        network: the podman network (None: podman's default).
        env: what the platform adds to the container's env (KubeRay's variables, a Secret's token).
        command: the command a controller generates in place of the manifest's (KubeRay's ray start).
        args: in place of the manifest's args (another command of the same image, in the same pod).
        extra_args: appended to the container's args (a test's ``--set`` overrides).
    """
    spec = container(pod_spec, container_name)
    pod_security = pod_spec.get("securityContext", {})
    security = {**pod_security, **spec.get("securityContext", {})}
    run = [*PODMAN, "run", "--detach", "--name", name, "--hostname", name, *ULIMITS]
    if network is not None:
        run += ["--network", network]
    uid, gid = security.get("runAsUser"), security.get("runAsGroup")
    if security.get("runAsNonRoot"):
        assert uid not in (None, 0), f"{container_name}: runAsNonRoot needs a numeric non-root runAsUser"
    if uid is not None:
        run += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    if "fsGroup" in security:
        run += ["--group-add", str(security["fsGroup"])]
    assert not security.get("privileged"), f"{container_name}: a privileged container is not run here"
    if security.get("readOnlyRootFilesystem"):
        # Kubernetes mounts nothing writable of its own: no tmpfs at /tmp or /run unless a volume says so.
        run += ["--read-only", "--read-only-tmpfs=false"]
    capabilities = security.get("capabilities", {})
    run += [f"--cap-drop={cap.lower()}" for cap in capabilities.get("drop", [])]
    run += [f"--cap-add={cap.lower()}" for cap in capabilities.get("add", [])]
    if security.get("allowPrivilegeEscalation") is False:
        run += ["--security-opt=no-new-privileges"]
    seccomp = security.get("seccompProfile", {}).get("type", "RuntimeDefault")
    assert seccomp in ("RuntimeDefault", "Unconfined"), f"{container_name}: seccomp profile {seccomp}"
    if seccomp == "Unconfined":
        run += ["--security-opt=seccomp=unconfined"]
    if "workingDir" in spec:
        run += ["--workdir", spec["workingDir"]]
    for item in spec.get("env", []):
        assert "value" in item, f"{container_name}: env {item['name']} from a source is not run here"
        run += ["--env", f"{item['name']}={item['value']}"]
    for key, value in dict(env).items():
        run += ["--env", f"{key}={value}"]
    for mount in spec.get("volumeMounts", []):
        run += _mount(pod_spec, mount, volumes, security.get("fsGroup"), name)
    entrypoint = command if command is not None else spec.get("command")
    if entrypoint is not None:
        run += ["--entrypoint", json.dumps(list(entrypoint))]
    main_args = list(args) if args is not None else [] if command is not None else list(spec.get("args", []))
    return [*run, image, *main_args, *extra_args]


def _mount(pod_spec: Mapping[str, Any], mount: Mapping[str, Any], volumes: Volumes, fs_group: int | None,
           pod: str) -> list[str]:
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    target = mount["mountPath"]
    read_only = ",readonly" if mount.get("readOnly") else ""
    if "persistentVolumeClaim" in volume:
        root = volumes.claims[volume["persistentVolumeClaim"]["claimName"]]
        _own_for(root, fs_group)
        source = root / mount.get("subPath", "")
        if not source.exists():  # the kubelet creates a missing subPath
            source.mkdir(parents=True)
            _own_for(source, fs_group)
        return ["--mount", f"type=bind,source={source},destination={target}{read_only}"]
    if "configMap" in volume:
        files = volumes.scratch / f"{pod}-{mount['name']}"
        files.mkdir(parents=True, exist_ok=True)
        for key, text in volumes.config_maps[volume["configMap"]["name"]].items():
            (files / key).write_text(text, encoding="utf-8")
            (files / key).chmod(0o644)
        files.chmod(0o755)
        return ["--mount", f"type=bind,source={files},destination={target},readonly"]  # always read-only
    if "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
        size = volume["emptyDir"].get("sizeLimit")
        limit = f",tmpfs-size={int(quantity(size))}" if size else ""
        return ["--mount", f"type=tmpfs,destination={target},tmpfs-mode=1777{limit}"]
    if "emptyDir" in volume:
        # A fresh, empty directory of the pod's, as the kubelet makes it: mode 0777, the fsGroup's. (A tmpfs
        # over a directory the image has, such as HOME, keeps that directory's owner and mode here.)
        scratch = volumes.scratch / f"{pod}-{mount['name']}"
        scratch.mkdir(parents=True, exist_ok=True)
        if fs_group is not None:
            os.chown(scratch, -1, fs_group)
        scratch.chmod(0o777)
        return ["--mount", f"type=bind,source={scratch},destination={target}"]
    raise AssertionError(f"volume {volume['name']}: only claims, ConfigMaps and emptyDirs are run here")


def _own_for(path: Path, fs_group: int | None) -> None:
    """What the kubelet does to a volume for a pod's fsGroup: group-owned, group-writable, setgid."""
    if fs_group is not None:
        os.chown(path, -1, fs_group)
        path.chmod(0o2775)


def kuberay_start_command(group: Mapping[str, Any], container_name: str, *, head_address: str | None) -> list[str]:
    """The command KubeRay gives a Ray container: ``ray start`` with the group's rayStartParams, blocking.

    As KubeRay builds it (its ``GenerateRayStartCommand``): every rayStartParam
    as ``--key=value``; ``--num-cpus``, ``--memory`` and ``--num-gpus`` from
    the container's limits where the params do not set them; the head with
    ``--head`` and its dashboard on every address, a worker with the head's
    address. ``head_address``: None for the head, else ``host:port`` of its GCS.
    """
    params = {key: str(value) for key, value in group.get("rayStartParams", {}).items()}
    limits = container(group["template"]["spec"], container_name).get("resources", {}).get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(max(1, int(quantity(limits["cpu"]))))
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(int(quantity(limits["memory"])))
    if "num-gpus" not in params and "nvidia.com/gpu" in limits:
        params["num-gpus"] = str(int(quantity(limits["nvidia.com/gpu"])))
    if head_address is None:
        params.setdefault("dashboard-host", "0.0.0.0")
        start = ["ray", "start", "--head"]
    else:
        params["address"] = head_address
        start = ["ray", "start"]
    flags = [f"--{key}={value}" for key, value in params.items()]
    # KubeRay: `/bin/bash -lc -- "ulimit -n 65536; ray start ... --block"`.
    return ["/bin/bash", "-lc", "--", "ulimit -n 65536; " + " ".join([*start, *flags, "--block"])]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``podman --runtime runc ARGS``: its output; raises with podman's own words when ``check`` and it fails."""
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} ... exited {result.returncode}: {result.stderr[-3000:]}")
    return result


def ip_address(name: str, network: str) -> str:
    """The container's address on ``network``."""
    out = podman("inspect", "--format", "{{json .NetworkSettings.Networks}}", name).stdout
    return json.loads(out)[network]["IPAddress"]
