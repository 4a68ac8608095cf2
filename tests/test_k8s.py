"""The Kubernetes manifests in k8s/, validated offline.

Every RayJob (the fixed one, k8s/rayjob.yaml, and the elastic one,
k8s/rayjob-elastic.yaml) is checked against KubeRay's CRD schema made strict
(../shared/schemas/rayjob-v1.strict.schema.json: unknown fields fail, as with
`kubectl apply` under strict field validation); core kinds against the
Kubernetes OpenAPI schemas that kubernetes-validate ships, strict, for a
pinned Kubernetes version. Beyond the schemas, the tests check that the
manifests agree with the project: the commands name configs that exist and
load, the mounts are where those configs point, the GPU counts (and the
elastic worker group's bounds) match the Ray config, and every pod runs as
the image's non-root user.
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
from pods import quantity

from imdb_dist.config import Config, load_config, to_dict

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


def component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


JOB = the("Job")
LOADER = the("Pod")
PVC = the("PersistentVolumeClaim")
# Every RayJob in the manifests: the RayJob tests below run for each.
RAYJOBS = [doc for _, _, doc in DOCUMENTS if doc["kind"] == "RayJob"]
RAYJOB_NAMES = [r["metadata"]["name"] for r in RAYJOBS]
(FIXED,) = [r for r in RAYJOBS if component(r) == "ray"]
(ELASTIC,) = [r for r in RAYJOBS if component(r) == "ray-elastic"]


@pytest.fixture(params=RAYJOBS, ids=RAYJOB_NAMES)
def rayjob(request) -> dict[str, Any]:
    return request.param


def head(rayjob: dict[str, Any]) -> dict[str, Any]:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]


def workers(rayjob: dict[str, Any]) -> dict[str, Any]:
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def entrypoint_args(rayjob: dict[str, Any]) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


def ray_config(rayjob: dict[str, Any]) -> tuple[Path, Config]:
    """The config the entrypoint runs: its --config file with its --set overrides, as the job CLI loads them."""
    args = entrypoint_args(rayjob)
    path = REPO / args[args.index("--config") + 1]
    overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    overrides += [arg.split("=", 1)[1] for arg in args if arg.startswith("--set=")]
    return path, load_config(path, overrides)


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
    specs = {}
    for rj in RAYJOBS:
        name = rj["metadata"]["name"]
        specs[f"{name} ray head"] = head(rj)["template"]["spec"]
        specs[f"{name} ray gpu workers"] = workers(rj)["template"]["spec"]
        specs[f"{name} ray job submitter"] = rj["spec"]["submitterPodTemplate"]["spec"]
    specs["single-node job"] = JOB["spec"]["template"]["spec"]
    specs["data loader"] = LOADER["spec"]
    return specs


TRAINING_PODS = [
    *(f"{name} {group}" for name in RAYJOB_NAMES for group in ("ray head", "ray gpu workers")),
    "single-node job",
]


def image_uid() -> int:
    return int(re.search(r"^ARG APP_UID=(\d+)$", DOCKERFILE, flags=re.MULTILINE).group(1))


def image_workdir() -> str:
    return re.findall(r"^WORKDIR (\S+)$", DOCKERFILE, flags=re.MULTILINE)[-1]


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


def test_the_rayjobs_are_the_fixed_and_the_elastic_one():
    assert sorted(component(r) for r in RAYJOBS) == ["ray", "ray-elastic"]
    assert len(set(RAYJOB_NAMES)) == len(RAYJOBS), "each RayJob needs its own name"


def test_rayjob_passes_the_strict_kuberay_schema(rayjob_validator, rayjob):
    errors = sorted(rayjob_validator.iter_errors(rayjob), key=lambda e: list(e.absolute_path))
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
def test_strict_schema_rejects_a_misspelt_field(rayjob_validator, rayjob, path, field, typo):
    broken = copy.deepcopy(rayjob)
    node = broken
    for key in path:
        node = node[key]
    node[typo] = node.pop(field)
    messages = [e.message for e in rayjob_validator.iter_errors(broken)]
    assert any(f"'{typo}' was unexpected" in m for m in messages), messages


@pytest.mark.parametrize(
    ("field", "typo"),
    [("idleTimeoutSeconds", "idleTimeoutSecond"), ("upscalingMode", "upscaleMode"), ("version", "versions")],
)
def test_strict_schema_rejects_a_misspelt_autoscaler_option(rayjob_validator, field, typo):
    broken = copy.deepcopy(ELASTIC)
    options = broken["spec"]["rayClusterSpec"]["autoscalerOptions"]
    options[typo] = options.pop(field)
    messages = [e.message for e in rayjob_validator.iter_errors(broken)]
    assert any(f"'{typo}' was unexpected" in m for m in messages), messages


def test_strict_schema_rejects_an_unknown_upscaling_mode(rayjob_validator):
    broken = copy.deepcopy(ELASTIC)
    broken["spec"]["rayClusterSpec"]["autoscalerOptions"]["upscalingMode"] = "Eager"
    assert list(rayjob_validator.iter_errors(broken))


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
    assert kinds == ["ConfigMap", "Job", "PersistentVolumeClaim", "Pod", "RayJob", "RayJob"]


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
    result = subprocess.run([*command, str(K8S)], capture_output=True, text=True, timeout=120, check=False)
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


# The guide that tells users how to apply the manifests (the README links to it).
GUIDE = (REPO / "docs" / "kubernetes.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("component", "kinds"),
    [
        ("storage", ["PersistentVolumeClaim"]),
        ("data-loader", ["Pod"]),
        ("ray", ["RayJob"]),
        ("ray-elastic", ["RayJob"]),
        ("single-node", ["ConfigMap", "Job"]),
    ],
)
def test_guide_label_selector_picks_the_intended_objects(component, kinds):
    selector = f"-l app.kubernetes.io/component={component}"
    # The whole label: component=ray must not be found inside component=ray-elastic.
    assert re.search(rf"kubectl apply -k k8s/ {re.escape(selector)}(?![\w-])", GUIDE), selector
    selected = [o for o in all_objects() if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    assert sorted(o["kind"] for o in selected) == kinds


def test_guides_use_only_existing_label_selectors():
    # The guide and the README's short Kubernetes section both show selectors: each must select something.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    used = set(re.findall(r"-l app\.kubernetes\.io/component=([\w-]+)", GUIDE + readme))
    labels = {o["metadata"].get("labels", {}).get("app.kubernetes.io/component") for o in all_objects()}
    assert used and used <= labels


# --- the commands in the manifests are real -------------------------------------------------


def test_rayjob_entrypoint_names_a_config_that_loads(rayjob):
    args = entrypoint_args(rayjob)
    assert args[:2] == ["python", "job/train.py"]
    assert (REPO / args[1]).is_file()
    path, cfg = ray_config(rayjob)
    assert path.is_relative_to(REPO / "job" / "configs")
    assert cfg.ray.use_gpu and cfg.distribution.strategy == "multi_worker"


def test_rayjob_runs_from_the_images_code_directory(rayjob):
    """Relative paths in the entrypoint resolve against the Ray containers' workingDir, the image's WORKDIR."""
    for spec in (head(rayjob)["template"]["spec"], workers(rayjob)["template"]["spec"]):
        for container in spec["containers"]:
            assert container["workingDir"] == image_workdir() == "/app"


def _runtime_env(rayjob: dict[str, Any]) -> dict[str, str]:
    return yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]


def test_rayjob_runtime_env_sets_legacy_keras_like_job_runtime_env(rayjob):
    env = _runtime_env(rayjob)
    assert env["TF_USE_LEGACY_KERAS"] == "1"
    assert env == yaml.safe_load((REPO / "job" / "runtime_env.yaml").read_text(encoding="utf-8"))["env_vars"]


def test_rayjob_entrypoint_runs_help(rayjob):
    args = entrypoint_args(rayjob)
    result = subprocess.run(
        [sys.executable, args[1], "--help"],
        cwd=REPO, env={**os.environ, **_runtime_env(rayjob)}, capture_output=True, text=True, timeout=120, check=False,
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
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: imdb-dist train")


# --- lifecycle ------------------------------------------------------------------------------


def test_rayjob_cleans_up_retries_and_has_a_deadline(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0
    _, cfg = ray_config(rayjob)
    assert cfg.ray.max_failures >= 1, "worker failures inside an attempt are retried by Ray Train"


def test_rayjob_ray_version_matches_the_image(rayjob):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    pinned = re.search(r"~=(\d+\.\d+)", ray).group(1)
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"].startswith(pinned + ".")


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


def test_gpu_workers_match_the_ray_config(rayjob):
    _, cfg = ray_config(rayjob)
    group = workers(rayjob)
    # One pod per Ray Train worker: the group spans every size the job may take.
    assert range(group["minReplicas"], group["maxReplicas"] + 1) == cfg.ray.worker_counts
    assert group["replicas"] == cfg.ray.worker_counts[0]
    (container,) = group["template"]["spec"]["containers"]
    resources = container["resources"]
    gpus = cfg.ray.resources_per_worker["GPU"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == gpus
    assert quantity(resources["limits"]["cpu"]) >= cfg.ray.resources_per_worker["CPU"]
    tolerations = group["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations)
    for container in head(rayjob)["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    for n in cfg.ray.worker_counts:
        assert cfg.train.batch_size % (n * gpus) == 0, f"{n} workers x {gpus} GPUs do not split the global batch"


def test_fixed_rayjob_has_a_fixed_worker_group_and_no_autoscaler():
    _, cfg = ray_config(FIXED)
    assert not cfg.ray.elastic and isinstance(cfg.ray.num_workers, int)
    group = workers(FIXED)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == cfg.ray.num_workers
    assert FIXED["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is False


# --- the elastic RayJob ---------------------------------------------------------------------


def test_elastic_rayjob_worker_group_spans_the_configs_min_and_max():
    """ray.num_workers [min, max] is the GPU group's minReplicas/maxReplicas; it starts at min."""
    path, cfg = ray_config(ELASTIC)
    assert path == REPO / "job" / "configs" / "ray-elastic.yaml"
    assert cfg.ray.elastic and isinstance(cfg.ray.num_workers, tuple)
    low, high = cfg.ray.num_workers
    group = workers(ELASTIC)
    assert (group["minReplicas"], group["maxReplicas"]) == (low, high)
    # KubeRay submits the job once the cluster's pods are ready: start with the pods the job needs to start.
    assert group["replicas"] == low
    assert (low, high) == (1, 4), "docs/kubernetes.md and the manifest's comments describe 1 to 4 GPU pods"


def test_elastic_rayjob_runs_kuberays_autoscaler():
    """The autoscaler turns Ray Train's demand into worker pods; without it the group would stay at replicas."""
    cluster = ELASTIC["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["version"] == "v2"
    assert options["upscalingMode"] in ("Default", "Aggressive"), "regain every lost pod at once"
    # The autoscaler V2 runs Ray pods that are replaced, never restarted in place.
    for spec in (head(ELASTIC)["template"]["spec"], workers(ELASTIC)["template"]["spec"]):
        assert spec["restartPolicy"] == "Never"
    # It talks to the Kubernetes API with the head pod's service account (KubeRay creates it).
    head_spec = head(ELASTIC)["template"]["spec"]
    assert head_spec.get("automountServiceAccountToken", True) is not False
    assert "serviceAccountName" not in head_spec


def test_elastic_autoscaler_keeps_a_joining_pod_until_ray_train_looks():
    """A pod that has just joined is idle until Ray Train's next resize check: it must outlive that wait."""
    _, cfg = ray_config(ELASTIC)
    idle = ELASTIC["spec"]["rayClusterSpec"]["autoscalerOptions"]["idleTimeoutSeconds"]
    assert idle > cfg.ray.resize_interval_s
    raw = yaml.safe_load((REPO / "job" / "configs" / "ray-elastic.yaml").read_text(encoding="utf-8"))
    assert "resize_interval_s" in raw["ray"], "set explicitly: the manifest's idle timeout is sized on it"


def test_elastic_run_survives_losing_every_worker_pod_once():
    _, cfg = ray_config(ELASTIC)
    assert cfg.ray.max_failures == -1 or cfg.ray.max_failures >= cfg.ray.worker_counts[-1]
    _, fixed = ray_config(FIXED)
    assert cfg.ray.name != fixed.ray.name, "its own run directory: a changed config is refused in an existing one"
    assert ELASTIC["metadata"]["name"] != FIXED["metadata"]["name"]


def test_elastic_autoscaler_container_is_hardened_like_the_others():
    options = ELASTIC["spec"]["rayClusterSpec"]["autoscalerOptions"]
    context = options["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged", False) is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "image" not in options, "the sidecar uses the head's image, which the kustomization names"
    assert quantity(options["resources"]["limits"]["memory"]) >= quantity(options["resources"]["requests"]["memory"])
    assert not options.get("env") and not options.get("envFrom")


# What the elastic config may change from the fixed RayJob's ray-gpu.yaml, and
# nothing else: the same model, data, epochs and mounts, made elastic.
ELASTIC_CHANGES = {
    "ray.num_workers", "ray.resize_interval_s", "ray.max_failures", "ray.name",
    "train.batch_size", "train.learning_rate",  # every size must split the global batch
    "run.checkpoint_steps",  # a resize restarts from the latest checkpoint
}


def test_the_elastic_config_is_the_fixed_config_made_elastic():
    fixed, elastic = (to_dict(ray_config(rj)[1]) for rj in (FIXED, ELASTIC))
    differ = {
        f"{section}.{key}" for section in fixed for key in fixed[section] if fixed[section][key] != elastic[section][key]
    }
    assert differ <= ELASTIC_CHANGES, sorted(differ - ELASTIC_CHANGES)
    assert {"ray.num_workers", "ray.name"} <= differ


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
    result = []
    for rj in RAYJOBS:
        _, ray_cfg = ray_config(rj)
        for group, spec in (("ray head", head(rj)["template"]["spec"]), ("ray gpu workers", workers(rj)["template"]["spec"])):
            result.append((f"{rj['metadata']['name']} {group}", spec, spec["containers"][0], ray_cfg))
    job_spec = JOB["spec"]["template"]["spec"]
    result.append(("single-node job", job_spec, job_spec["containers"][0], load_config(job_config_file())))
    return result


@pytest.mark.parametrize("pod", TRAINING_PODS)
def test_run_directory_is_on_the_shared_volume(pod):
    (_name, spec, container, cfg) = next(t for t in _training_containers() if t[0] == pod)
    run_root = cfg.ray.storage_path if cfg.ray.use_gpu else cfg.run.output_dir
    mount = mount_for(container, run_root)
    assert volume(spec, mount["name"])["persistentVolumeClaim"]["claimName"] == STORAGE_CLAIM
    assert not mount.get("readOnly") and "subPath" not in mount


@pytest.mark.parametrize("pod", TRAINING_PODS)
def test_dataset_is_mounted_read_only_where_data_path_points(pod):
    (_name, spec, container, cfg) = next(t for t in _training_containers() if t[0] == pod)
    mount = mount_for(container, cfg.data.path)
    assert mount["readOnly"] is True
    assert volume(spec, mount["name"])["persistentVolumeClaim"]["claimName"] == STORAGE_CLAIM
    # Where the file is on the volume, which is where the guide has it copied.
    on_volume = PurePosixPath(mount.get("subPath", "")) / PurePosixPath(cfg.data.path).relative_to(mount["mountPath"])
    assert f"imdb-dist-data-loader:/mnt/imdb-dist/{on_volume}" in GUIDE


def test_data_loader_mounts_the_volume_where_the_guide_copies_to():
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
def test_ray_object_store_fits_in_dev_shm(rayjob, group):
    spec = head(rayjob) if group == "head" else workers(rayjob)
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


@pytest.mark.parametrize("pod", list(pod_specs()))
def test_containers_have_a_read_only_root_and_write_only_to_their_own_scratch_volumes(pod):
    """/tmp and the image user's HOME are emptyDirs of the pod; everything else written is a mounted volume.

    tests/test_container.py runs the pods so, in the image: a write anywhere else would fail there.
    """
    spec = pod_specs()[pod]
    home = "/home/" + re.search(r"useradd [^\n]*--create-home [^\n]* (\w+)(?: \\)?\n", DOCKERFILE).group(1)
    for container in spec["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        for path in ("/tmp", home):
            assert "emptyDir" in volume(spec, mounts[path]), (pod, path)


def test_manifests_hold_no_secrets():
    secretish = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY|CREDENTIAL", re.IGNORECASE)
    assert not [o for o in all_objects() if o["kind"] == "Secret"]
    for spec in pod_specs().values():
        for container in spec["containers"]:
            for env in container.get("env", []):
                assert not (secretish.search(env["name"]) and "value" in env), env["name"]
    # Ray's token is generated by KubeRay into a Secret of its own.
    for rayjob in RAYJOBS:
        assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
        assert not secretish.search(rayjob["spec"]["runtimeEnvYAML"])
        for env in rayjob["spec"]["rayClusterSpec"].get("autoscalerOptions", {}).get("env", []):
            assert not (secretish.search(env["name"]) and "value" in env), env["name"]
