"""The Ray cluster a job runs on: joining it, and whether it has the GPUs the job's workers need.

Nothing TensorFlow here: the Ray driver (:mod:`imdb_dist.launch`) and a
Tune sweep use it before any worker starts.
"""

from __future__ import annotations

import logging
import os
import time

from imdb_dist.config import Config
from imdb_dist.errors import InputError

log = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray's worker_process_setup_hook for every process of our jobs (imdb_dist.logs).
QUIET_HOOK = "imdb_dist.logs.quiet_tensorflow_imports"


def connect() -> None:
    """Join the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else start one on loopback."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # On Linux Ray turns 127.0.0.1 into the host's network address (and so
        # does the TF_CONFIG it writes) unless its single-machine mode is on.
        # Read when ray is first imported.
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    if ray.is_initialized():
        return
    # Every Ray process of the job (Ray Train's controller and workers import TensorFlow before
    # our code runs in them) loads TensorFlow without its start-up lines. Merged by ray.init with
    # a submitted job's runtime env.
    quiet = {"worker_process_setup_hook": QUIET_HOOK}
    if address:
        try:
            ray.init(address=address, runtime_env=quiet)
        except ValueError as exc:
            if "worker_process_setup_hook" not in str(exc):
                raise
            raise InputError(
                f"the job's runtime env sets worker_process_setup_hook, which imdb-dist sets to {QUIET_HOOK} "
                "(TensorFlow's start-up lines kept out of Ray's processes): drop it from the submission, "
                "or call that function from your hook"
            ) from exc
    else:
        # A new throw-away single-node cluster on loopback ("local": never join
        # whatever cluster /tmp/ray says was started last).
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=quiet)


# Seconds between looks at the cluster while waiting for GPUs (ray.gpu_wait_s).
_GPU_POLL_S = 2.0


def check_gpus(cfg: Config) -> None:
    """Refuse a ``ray.use_gpu`` job the connected cluster has no GPUs for: not now, nor after ``ray.gpu_wait_s``.

    Ray Train V2 would wait forever instead. It reserves a placement group of
    the workers' bundles and gives up on it after
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s: ray/train/v2/_internal/
    execution/worker_group/worker_group.py, ``_start_impl``) with a
    ``WorkerGroupStartupTimeoutError``, which its only failure policy retries
    as a controller error up to ``FailureConfig.controller_failure_limit``,
    by default -1: forever (failure_handling/default.py,
    ``RETRYABLE_CONTROLLER_ERRORS``). Its own up-front check
    (``InsufficientClusterResourcesError``) runs only where an autoscaler has
    published the cluster's node types, which a fixed cluster never does.

    An autoscaling cluster (KubeRay with a GPU worker group scaled to zero)
    has no GPUs until something asks for them, so with ``ray.gpu_wait_s: N``
    the workers' bundles are requested from its autoscaler
    (``ray.autoscaler.sdk.request_resources``) and the GPUs awaited for up to
    N seconds; the request is withdrawn when the wait ends (it would
    otherwise hold the nodes up after the job), by which time Ray Train's
    placement group, itself a demand the autoscaler sees, takes it over. With
    the default 0 a cluster without the GPUs fails at once: on a fixed
    cluster they never come, and the message names ``ray.gpu_wait_s``.

    Some GPUs but too few fails the same way, not with a warning: Ray Train
    would wait for the missing ones forever just the same. They are counted
    per node (a worker's GPUs are on one node), on live nodes, whatever runs
    there now. Only GPUs are checked: a CPU job on an autoscaling cluster
    often starts with no CPU worker nodes at all.

    Raises:
        InputError: one line: what the job needs and what the cluster has.
    """
    if not cfg.ray.use_gpu:
        return
    per_worker = float(cfg.ray.resources_per_worker["GPU"])  # RayConfig: > 0 with use_gpu
    if _gpu_workers_placeable(per_worker) >= _needed(cfg):
        return
    waited = bool(cfg.ray.gpu_wait_s)
    if waited and _wait_for_gpus(cfg, per_worker):
        return
    raise InputError(_gpu_shortfall(cfg, per_worker, waited=waited))


def _needed(cfg: Config) -> int:
    """The workers the job needs to start: all of them, or an elastic job's minimum."""
    return cfg.ray.worker_counts[0]


def _gpu_workers_placeable(per_worker: float) -> int:
    """How many workers of ``per_worker`` GPUs the cluster's live nodes hold (on an idle cluster)."""
    import ray

    return sum(
        int(node["Resources"].get("GPU", 0.0) / per_worker + 1e-9) for node in ray.nodes() if node.get("Alive")
    )


def _wait_for_gpus(cfg: Config, per_worker: float) -> bool:
    """Ask the autoscaler for the workers' bundles; True once the cluster holds them, False after ``gpu_wait_s``."""
    from ray.autoscaler.sdk import request_resources

    bundles = [dict(cfg.ray.resources_per_worker) for _ in range(_needed(cfg))]
    log.info(
        "the Ray cluster lacks GPUs for %d workers of %s: asked its autoscaler for them, waiting up to %g s "
        "(ray.gpu_wait_s)",
        _needed(cfg),
        bundles[0],
        cfg.ray.gpu_wait_s,
    )
    deadline = time.monotonic() + cfg.ray.gpu_wait_s
    request_resources(bundles=bundles)
    try:
        while _gpu_workers_placeable(per_worker) < _needed(cfg):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(_GPU_POLL_S, left))
        log.info("the Ray cluster now has GPUs for %d workers", _needed(cfg))
        return True
    finally:
        request_resources(bundles=[])


def _gpu_shortfall(cfg: Config, per_worker: float, *, waited: bool) -> str:
    """The one-line error: what the job needs, what the cluster has, what to change."""
    import ray

    resources = ray.cluster_resources()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    gpus = resources.get("GPU", 0.0)
    has = [f"CPU {resources.get('CPU', 0.0):g}"] + ([f"GPU {gpus:g}"] if gpus else [])
    has.append(f"memory {resources.get('memory', 0.0) / 2**30:.1f} GiB")
    has.append(f"{len(nodes)} node{'s' * (len(nodes) != 1)}")
    if gpus and len(nodes) > 1:
        has[-1] += " with " + " + ".join(f"{node['Resources'].get('GPU', 0.0):g}" for node in nodes) + " GPUs"
    where = f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
    if gpus:
        lacks = (
            f"has GPUs for only {_gpu_workers_placeable(per_worker)} of the job's {_needed(cfg)} workers "
            f"of {per_worker:g} GPU{'s' * (per_worker != 1)} each (on one node)"
        )
    else:
        lacks = "has no GPUs"
    message = f"ray.use_gpu is true but {where} {lacks} (it has: {', '.join(has)})"
    if waited:
        message += f"; still so after ray.gpu_wait_s={cfg.ray.gpu_wait_s:g} s of asking its autoscaler for them"
    fixes = ["set ray.use_gpu=false to train on CPUs"]
    if gpus:
        fixes.append("lower ray.num_workers or ray.resources_per_worker.GPU")
    if not waited:
        fixes.append("set ray.gpu_wait_s=N to wait N seconds for an autoscaler to add GPU nodes")
    return f"{message}; {', or '.join(fixes)}"
