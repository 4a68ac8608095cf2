"""The Kubernetes manifests in k8s/, validated offline.

The RayJob is checked against KubeRay's CRD schema made strict
(../shared/schemas/rayjob-v1.strict.schema.json: unknown fields fail, as with
`kubectl apply` under strict field validation); core kinds against the
Kubernetes OpenAPI schemas that kubernetes-validate ships, strict, for a
pinned Kubernetes version. Beyond the schemas, the tests check that the
manifests agree with the project: the commands name configs that exist and
load, the mounts are where those configs point, the GPU counts match the Ray
config, and every pod runs as the image's non-root user.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from imdb_dist.config import Config, load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# Pinned: the Kubernetes release whose API the core objects are validated against
# (kubernetes-validate 1.37.0 ships the schemas of 1.25 to 1.37). The manifests use
# nothing newer than 1.31 (podFailurePolicy with onPodConditions is GA there).
KUBERNETES_VERSION = "1.32.0"
RAYJOB_SCHEMA = Path(
    os.environ.get("RAYJOB_SCHEMA", REPO.parent / "shared" / "schemas" / "rayjob-v1.strict.schema.json")
)
STORAGE_CLAIM = "imdb-dist-storage"
DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
MANIFEST_FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# (file name, index in file, object): every document of every manifest file.
DOCUMENTS = [(p.name, i, doc) for p in MANIFEST_FILES for i, doc in enumerate(load_documents(p))]


def generated_configmaps() -> list[dict[str, Any]]:
    """The ConfigMaps k8s/kustomization.yaml generates, as kustomize builds them (less the name hash)."""
    result = []
    for gen in KUSTOMIZATION.get("configMapGenerator", []):
        data = {}
        for entry in gen.get("files", []):
            key, _, file = entry.rpartition("=")
            data[key or PurePosixPath(file).name] = (K8S / file).read_text(encoding="utf-8")
        labels = dict(gen.get("options", {}).get("labels", {}))
        result.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"], "labels": labels}, "data": data})
    return result


def all_objects() -> list[dict[str, Any]]:
    """What `kubectl apply -k k8s/` sends, before kustomize's name hashing and label/image transforms."""
    return [doc for _, _, doc in DOCUMENTS] + generated_configmaps()


def the(kind: str) -> dict[str, Any]:
    (obj,) = [doc for _, _, doc in DOCUMENTS if doc["kind"] == kind]
    return obj


RAYJOB = the("RayJob")
JOB = the("Job")
LOADER = the("Pod")
PVC = the("PersistentVolumeClaim")
HEAD = RAYJOB["spec"]["rayClusterSpec"]["headGroupSpec"]
(WORKERS,) = RAYJOB["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def ray_config() -> tuple[Path, Config]:
    args = shlex.split(RAYJOB["spec"]["entrypoint"])
    path = REPO / args[args.index("--config") + 1]
    return path, load_config(path)


def job_config_file() -> Path:
    """The file behind the batch Job's --config: its ConfigMap mount, back to the generator's source file."""
    spec = JOB["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    config = PurePosixPath(container["args"][container["args"].index("--config") + 1])
    (mount,) = [m for m in container["volumeMounts"] if config.parent == PurePosixPath(m["mountPath"])]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    (gen,) = [g for g in KUSTOMIZATION["configMapGenerator"] if g["name"] == volume["configMap"]["name"]]
    sources = {entry.rpartition("=")[0] or PurePosixPath(entry).name: entry.rpartition("=")[2] for entry in gen["files"]}
    return K8S / sources[config.name]


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod template the manifests (and KubeRay, from them) create."""
    return {
        "ray head": HEAD["template"]["spec"],
        "ray gpu workers": WORKERS["template"]["spec"],
        "ray job submitter": RAYJOB["spec"]["submitterPodTemplate"]["spec"],
        "single-node job": JOB["spec"]["template"]["spec"],
        "data loader": LOADER["spec"],
    }


TRAINING_PODS = ["ray head", "ray gpu workers", "single-node job"]


def image_uid() -> int:
    return int(re.search(r"^ARG APP_UID=(\d+)$", DOCKERFILE, flags=re.MULTILINE).group(1))


def image_workdir() -> str:
    return re.findall(r"^WORKDIR (\S+)$", DOCKERFILE, flags=re.MULTILINE)[-1]


def quantity(text: str | int) -> int:
    """A Kubernetes quantity in bytes (or units): 8Gi, 512Mi, 8000000000, 8."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    assert match, f"unsupported quantity {text!r}"
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(match.group(1)) * scale[match.group(2)]


def mount_for(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount that holds ``path`` (the deepest one)."""
    target = PurePosixPath(path)
    mounts = [m for m in container["volumeMounts"] if target == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in target.parents]
    assert mounts, f"{path} is on no volume of container {container['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (vol,) = [v for v in spec["volumes"] if v["name"] == name]
    return vol


@pytest.fixture(scope="module")
def rayjob_validator() -> jsonschema.Draft7Validator:
    if not RAYJOB_SCHEMA.is_file():
        # A skip outside CI (a fresh clone has no ../shared); under IMDB_DIST_STRICT=1 a failure.
        pytest.skip(f"RayJob schema not found at {RAYJOB_SCHEMA} (it comes with ../shared; or set RAYJOB_SCHEMA)")
    schema = json.loads(RAYJOB_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# --- schemas --------------------------------------------------------------------------------


def test_every_manifest_is_in_the_kustomization_and_exists():
    resources = KUSTOMIZATION["resources"]
    assert sorted(resources) == sorted(p.name for p in MANIFEST_FILES)
    for name in resources:
        assert (K8S / name).is_file()


def test_rayjob_passes_the_strict_kuberay_schema(rayjob_validator):
    errors = sorted(rayjob_validator.iter_errors(RAYJOB), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("path", "field", "typo"),
    [
        (("spec",), "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        (("spec", "rayClusterSpec"), "workerGroupSpecs", "workerGroupSpec"),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0), "volumeMounts", "volumeMount"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec"), "tolerations", "toleration"),
    ],
    ids=["spec.shutdownAfterJobFinishes", "workerGroupSpecs", "head-volumeMounts", "worker-tolerations"],
)
def test_strict_schema_rejects_a_misspelt_field(rayjob_validator, path, field, typo):
    broken = copy.deepcopy(RAYJOB)
    node = broken
    for key in path:
        node = node[key]
    node[typo] = node.pop(field)
    messages = [e.message for e in rayjob_validator.iter_errors(broken)]
    assert any(f"'{typo}' was unexpected" in m for m in messages), messages


CORE_OBJECTS = [doc for doc in all_objects() if not doc["apiVersion"].startswith("ray.io/")]


@pytest.mark.parametrize("obj", CORE_OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_core_object_passes_kubernetes_schema(obj):
    validated = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert validated == "1.32"


@pytest.mark.parametrize(
    ("kind", "path", "field", "typo"),
    [
        ("Job", ("spec",), "backoffLimit", "backofLimit"),
        ("Job", ("spec", "template", "spec", "containers", 0), "volumeMounts", "volumeMount"),
        ("PersistentVolumeClaim", ("spec",), "accessModes", "accessMode"),
    ],
)
def test_kubernetes_schema_rejects_a_misspelt_field(kind, path, field, typo):
    broken = copy.deepcopy(the(kind))
    node = broken
    for key in path:
        node = node[key]
    node[typo] = node.pop(field)
    with pytest.raises(kubernetes_validate.ValidationError, match=typo):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_manifest_document_is_a_validated_kind():
    kinds = sorted(doc["kind"] for doc in all_objects())
    assert kinds == ["ConfigMap", "Job", "PersistentVolumeClaim", "Pod", "RayJob"]


# --- kustomize ------------------------------------------------------------------------------


def test_image_is_named_in_one_place():
    (image,) = KUSTOMIZATION["images"]
    assert image["newName"] and isinstance(image["newTag"], str) and image["newTag"]
    names = set()
    for spec in pod_specs().values():
        names |= {c["image"] for c in spec["containers"] + spec.get("initContainers", [])}
    assert names == {image["name"]}, "every container must use the placeholder the kustomization rewrites"


@pytest.mark.parametrize("gen", KUSTOMIZATION["configMapGenerator"], ids=lambda g: g["name"])
def test_configmap_generator_files_load_with_the_config_loader(gen):
    for entry in gen["files"]:
        source = K8S / entry.rpartition("=")[2]
        assert source.is_file() and K8S in source.resolve().parents, "kustomize only reads files under k8s/"
        load_config(source)


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    command = _kustomize()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed; the structural tests above still ran")
    result = subprocess.run([*command, str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_kustomize_build_sets_image_namespace_and_configmap_name(built):
    (image,) = KUSTOMIZATION["images"]
    expected = f"{image['newName']}:{image['newTag']}"
    images = set(re.findall(r"\bimage: (\S+)", yaml.safe_dump_all(built)))
    assert images == {expected}
    assert {doc["metadata"]["namespace"] for doc in built} == {KUSTOMIZATION["namespace"]}
    (configmap,) = [doc for doc in built if doc["kind"] == "ConfigMap"]
    (job,) = [doc for doc in built if doc["kind"] == "Job"]
    names = [v["configMap"]["name"] for v in job["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert names == [configmap["metadata"]["name"]]
    assert configmap["metadata"]["name"].startswith("imdb-dist-single-node-config-")


def test_kustomize_output_still_validates(built, rayjob_validator):
    for doc in built:
        if doc["kind"] == "RayJob":
            assert not list(rayjob_validator.iter_errors(doc))
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


README = (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("component", "kinds"),
    [
        ("storage", ["PersistentVolumeClaim"]),
        ("data-loader", ["Pod"]),
        ("ray", ["RayJob"]),
        ("single-node", ["ConfigMap", "Job"]),
    ],
)
def test_readme_label_selector_picks_the_intended_objects(component, kinds):
    selector = f"-l app.kubernetes.io/component={component}"
    assert f"kubectl apply -k k8s/ {selector}" in README
    selected = [o for o in all_objects() if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    assert sorted(o["kind"] for o in selected) == kinds


def test_readme_uses_only_existing_label_selectors():
    used = set(re.findall(r"-l app\.kubernetes\.io/component=([\w-]+)", README))
    labels = {o["metadata"].get("labels", {}).get("app.kubernetes.io/component") for o in all_objects()}
    assert used and used <= labels


# --- the commands in the manifests are real -------------------------------------------------


def test_rayjob_entrypoint_names_a_config_that_loads():
    args = shlex.split(RAYJOB["spec"]["entrypoint"])
    assert args[:2] == ["python", "job/train.py"]
    assert (REPO / args[1]).is_file()
    path, cfg = ray_config()
    assert path.is_relative_to(REPO / "job" / "configs")
    assert cfg.ray.use_gpu and cfg.distribution.strategy == "multi_worker"


def test_rayjob_runs_from_the_images_code_directory():
    """Relative paths in the entrypoint resolve against the Ray containers' workingDir, the image's WORKDIR."""
    for spec in (HEAD["template"]["spec"], WORKERS["template"]["spec"]):
        for container in spec["containers"]:
            assert container["workingDir"] == image_workdir() == "/app"


def _runtime_env() -> dict[str, str]:
    return yaml.safe_load(RAYJOB["spec"]["runtimeEnvYAML"])["env_vars"]


def test_rayjob_runtime_env_sets_legacy_keras_like_job_runtime_env():
    env = _runtime_env()
    assert env["TF_USE_LEGACY_KERAS"] == "1"
    assert env == yaml.safe_load((REPO / "job" / "runtime_env.yaml").read_text(encoding="utf-8"))["env_vars"]


def test_rayjob_entrypoint_runs_help():
    args = shlex.split(RAYJOB["spec"]["entrypoint"])
    result = subprocess.run(
        [sys.executable, args[1], "--help"],
        cwd=REPO, env={**os.environ, **_runtime_env()}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: imdb-dist launch")


def test_job_command_names_a_config_that_loads():
    (container,) = JOB["spec"]["template"]["spec"]["containers"]
    assert "command" not in container, "the image's ENTRYPOINT (imdb-dist) runs"
    assert container["args"][:2] == ["train", "--config"]
    cfg = load_config(job_config_file())
    assert cfg.distribution.strategy in ("mirrored", "auto")
    assert cfg.train.mixed_precision == "mixed_float16"


def test_job_train_command_runs_help():
    (container,) = JOB["spec"]["template"]["spec"]["containers"]
    result = subprocess.run(
        [sys.executable, "-m", "imdb_dist.cli", container["args"][0], "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: imdb-dist train")


# --- lifecycle ------------------------------------------------------------------------------


def test_rayjob_cleans_up_retries_and_has_a_deadline():
    spec = RAYJOB["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0
    _, cfg = ray_config()
    assert cfg.ray.max_failures >= 1, "worker failures inside an attempt are retried by Ray Train"


def test_rayjob_ray_version_matches_the_image():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    pinned = re.search(r"~=(\d+\.\d+)", ray).group(1)
    assert RAYJOB["spec"]["rayClusterSpec"]["rayVersion"].startswith(pinned + ".")


def test_job_retries_resumable_failures_only():
    spec = JOB["spec"]
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    fail_fast = [r for r in rules if r["action"] == "FailJob"]
    assert fail_fast and fail_fast[0]["onExitCodes"]["values"] == [2], "exit 2 is bad input: retrying cannot help"


@pytest.mark.parametrize("pod", TRAINING_PODS)
def test_grace_period_leaves_time_for_a_checkpoint(pod):
    assert pod_specs()[pod]["terminationGracePeriodSeconds"] >= 60


# --- GPUs, storage, shared memory -----------------------------------------------------------


def test_gpu_workers_match_the_ray_config():
    _, cfg = ray_config()
    assert WORKERS["replicas"] == WORKERS["minReplicas"] == WORKERS["maxReplicas"] == cfg.ray.num_workers
    (container,) = WORKERS["template"]["spec"]["containers"]
    resources = container["resources"]
    gpus = cfg.ray.resources_per_worker["GPU"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == gpus
    assert quantity(resources["limits"]["cpu"]) >= cfg.ray.resources_per_worker["CPU"]
    tolerations = WORKERS["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations)
    for head in HEAD["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert cfg.train.batch_size % (cfg.ray.num_workers * gpus) == 0


def test_single_node_job_takes_all_gpus_of_one_node():
    spec = JOB["spec"]
    assert spec["parallelism"] == spec["completions"] == 1
    (container,) = spec["template"]["spec"]["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus == 8
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["template"]["spec"]["tolerations"])
    cfg = load_config(job_config_file())
    assert cfg.distribution.devices == (), "mirror over every GPU the pod gets"
    for n in (1, 2, 4, gpus):
        assert cfg.train.batch_size % n == 0


def test_storage_claim_is_shared_read_write_many():
    assert PVC["metadata"]["name"] == STORAGE_CLAIM
    assert PVC["spec"]["accessModes"] == ["ReadWriteMany"]


def _training_containers() -> list[tuple[str, dict[str, Any], dict[str, Any], Config]]:
    _, ray_cfg = ray_config()
    job_cfg = load_config(job_config_file())
    return [
        ("ray head", HEAD["template"]["spec"], HEAD["template"]["spec"]["containers"][0], ray_cfg),
        ("ray gpu workers", WORKERS["template"]["spec"], WORKERS["template"]["spec"]["containers"][0], ray_cfg),
        ("single-node job", JOB["spec"]["template"]["spec"], JOB["spec"]["template"]["spec"]["containers"][0], job_cfg),
    ]


@pytest.mark.parametrize("pod", TRAINING_PODS)
def test_run_directory_is_on_the_shared_volume(pod):
    (name, spec, container, cfg) = [t for t in _training_containers() if t[0] == pod][0]
    run_root = cfg.ray.storage_path if cfg.ray.use_gpu else cfg.run.output_dir
    mount = mount_for(container, run_root)
    assert volume(spec, mount["name"])["persistentVolumeClaim"]["claimName"] == STORAGE_CLAIM
    assert not mount.get("readOnly") and "subPath" not in mount


@pytest.mark.parametrize("pod", TRAINING_PODS)
def test_dataset_is_mounted_read_only_where_data_path_points(pod):
    (name, spec, container, cfg) = [t for t in _training_containers() if t[0] == pod][0]
    mount = mount_for(container, cfg.data.path)
    assert mount["readOnly"] is True
    assert volume(spec, mount["name"])["persistentVolumeClaim"]["claimName"] == STORAGE_CLAIM
    # Where the file is on the volume, which is where the README has it copied.
    on_volume = PurePosixPath(mount.get("subPath", "")) / PurePosixPath(cfg.data.path).relative_to(mount["mountPath"])
    assert f"imdb-dist-data-loader:/mnt/imdb-dist/{on_volume}" in README


def test_data_loader_mounts_the_volume_where_the_readme_copies_to():
    (container,) = LOADER["spec"]["containers"]
    mount = mount_for(container, "/mnt/imdb-dist/datasets")
    assert mount["mountPath"] == "/mnt/imdb-dist" and "subPath" not in mount
    assert volume(LOADER["spec"], mount["name"])["persistentVolumeClaim"]["claimName"] == STORAGE_CLAIM
    assert "mkdir -p /mnt/imdb-dist/datasets" in " ".join(container["command"])


@pytest.mark.parametrize("pod", TRAINING_PODS)
def test_dev_shm_is_a_sized_memory_volume(pod):
    spec = pod_specs()[pod]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    empty_dir = volume(spec, mount["name"])["emptyDir"]
    assert empty_dir["medium"] == "Memory"
    assert quantity(empty_dir["sizeLimit"]) < quantity(container["resources"]["limits"]["memory"])


@pytest.mark.parametrize("group", ["head", "workers"])
def test_ray_object_store_fits_in_dev_shm(group):
    spec = HEAD if group == "head" else WORKERS
    store = quantity(spec["rayStartParams"]["object-store-memory"])
    (shm,) = [v for v in spec["template"]["spec"]["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert store <= quantity(shm["emptyDir"]["sizeLimit"])


# --- security -------------------------------------------------------------------------------


@pytest.mark.parametrize("pod", list(pod_specs()))
def test_pod_runs_as_the_images_non_root_user(pod):
    context = pod_specs()[pod]["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == image_uid() != 0
    assert context["runAsGroup"] != 0
    assert context["seccompProfile"]["type"] == "RuntimeDefault"


@pytest.mark.parametrize("pod", list(pod_specs()))
def test_containers_cannot_escalate_privileges(pod):
    for container in pod_specs()[pod]["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context.get("privileged", False) is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "add" not in context["capabilities"]


def test_manifests_hold_no_secrets():
    secretish = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY|CREDENTIAL", re.IGNORECASE)
    assert not [o for o in all_objects() if o["kind"] == "Secret"]
    for spec in pod_specs().values():
        for container in spec["containers"]:
            for env in container.get("env", []):
                assert not (secretish.search(env["name"]) and "value" in env), env["name"]
    # Ray's token is generated by KubeRay into a Secret of its own.
    assert RAYJOB["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert not secretish.search(RAYJOB["spec"]["runtimeEnvYAML"])
