"""Run the job on a Ray cluster: Ray Train (V2), N workers, MultiWorkerMirrored.

The driver (this process; under ``ray job submit``, the job's entrypoint)
prepares the data once — validation split, vocabulary, TFRecord shards —
into the run directory ``ray.storage_path/ray.name``, then starts the
workers. Ray Train sets ``TF_CONFIG`` in each, so ``imdb_dist.train.run``
builds a MultiWorkerMirroredStrategy; rank 0 is the chief and the only
worker that writes to the run directory.

Storage: ``ray.storage_path`` is a local (or NFS) path, or a URI
(``s3://``, ``gs://``, ``abfs://``, ``hdfs://``). The run directory belongs
to :class:`imdb_dist.rundir.RunDir`: the driver holds its lease for the
whole job and syncs the prepared data there; each worker's
``imdb_dist.train.run`` fetches what it reads, and its chief syncs the logs
after every checkpoint and publishes the model and report at the end, under
the driver's lease. Ray Train moves the checkpoints, through the same
retrying filesystem. This module is the Ray glue only.

GPUs: a ``ray.use_gpu`` job is checked against the cluster after the data
is read and before anything is written (:func:`check_gpus`): a cluster
without the GPUs its workers need is one ``error:`` line (exit 2), at once or
after ``ray.gpu_wait_s`` seconds of asking the autoscaler for them, where Ray
Train would wait for them forever. A worker that refuses the job for bad
input (``InputError``: a GPU that TensorFlow cannot see) is the same: exit 2.

Fault tolerance: each checkpoint (every epoch, and every
``run.checkpoint_steps`` optimizer steps) is handed to Ray Train as a
``ray.train.Checkpoint``. When a worker dies, Ray restarts the worker group
(up to ``ray.max_failures`` times) and every worker restores the whole
resume state (:mod:`imdb_dist.checkpoint`) from ``ray.train.get_checkpoint()``
and continues at the saved (epoch, step) with the same data order and
dropout masks: the run ends with the model an uninterrupted run would have
produced, at the cost of the steps since that checkpoint. A resubmitted job
with the same ``name`` and ``storage_path`` resumes the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imdb_dist import rundir, storage
from imdb_dist.config import Config, config_from_dict, to_dict
from imdb_dist.errors import ConfigError, InputError, RunError
from imdb_dist.logs import import_tensorflow_quietly, setup_logging
from imdb_dist.prepare import prepare

# Nothing TensorFlow at import time: a Ray worker imports this module to
# run _worker_loop, which imports TensorFlow with its start-up lines filtered.
if TYPE_CHECKING:
    import tf_keras as keras

log = logging.getLogger(__name__)

# Keras 3 breaks MultiWorkerMirroredStrategy under Ray Train (ray#47464):
# make `tf.keras` mean tf_keras in every worker, whatever a library imports.
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray's worker_process_setup_hook for every process of our jobs (imdb_dist.logs).
QUIET_HOOK = "imdb_dist.logs.quiet_tensorflow_imports"
# How often Ray Train's controller polls the workers, and so collects their reports (ray.report_poll_s).
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def run_location(cfg: Config) -> storage.Location:
    """Ray's run directory, ``storage_path/name`` (a local path made absolute: workers may start elsewhere)."""
    where = storage.parse(cfg.ray.storage_path, "ray.storage_path", retry_s=cfg.run.storage_retry_s)
    return where.child(cfg.ray.name)


def launch(
    cfg: Config, *, worker_callbacks: Sequence[keras.callbacks.Callback] = (), changes: Sequence[str] = ()
) -> storage.Location:
    """Prepare the data, run the Ray Train job to the end, and return the run directory.

    The driver holds the run directory's lease (:mod:`imdb_dist.lease`)
    from its first write until the job ends; the workers write under it.

    Args:
        cfg: the job; its ``ray`` section sizes the cluster job.
        worker_callbacks: extra Keras callbacks for every worker's training
            loop (pickled to the workers).
        changes: model-defining keys this command means to change in a run
            it resumes (``--change``; :mod:`imdb_dist.fingerprint`).

    Raises:
        InputError: bad config, data or storage, a cluster without the GPUs
            the job asks for (found before anything is written), another
            live run on the run directory; or a worker refused the job for
            bad input.
        RunError: the workers failed more often than ``ray.max_failures``,
            or the storage failed after its retries.
    """
    location = run_location(cfg)
    # The run directory as the user named it: what the report and the workers' config say.
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(location)))
    _check_replicas(cfg)

    def join_cluster() -> None:
        # After the data is read and checked (bad data needs no cluster), before the first write.
        connect()
        check_gpus(cfg)

    with rundir.RunDir(location, "ray.storage_path") as run_dir:
        lease = prepare(cfg, run_dir, before_writing=join_cluster, changes=changes)
        if lease is None:  # already complete (logged)
            return location
        _fit(cfg, run_dir, lease, list(worker_callbacks))
    return location


def _check_replicas(cfg: Config) -> None:
    """Fail in the driver, not in N workers, when the batch cannot be split or the devices cannot serve the job."""
    if cfg.distribution.cpu_devices:
        per_worker = cfg.distribution.cpu_devices
    else:
        per_worker = max(int(cfg.ray.resources_per_worker.get("GPU", 0)), 1) if cfg.ray.use_gpu else 1
    # Elastic: the global batch is the same at every size the group may take, so each must split it.
    misfits = [n for n in cfg.ray.worker_counts if cfg.train.batch_size % (n * per_worker)]
    if misfits:
        sizes = ", ".join(f"{n} workers x {per_worker} devices = {n * per_worker} replicas" for n in misfits)
        key = "train.batch_size" if not cfg.ray.elastic else "ray.num_workers"
        raise ConfigError(
            key,
            f"global batch {cfg.train.batch_size} is not divisible by the replicas of {sizes}"
            + (f" (every size in {list(cfg.ray.num_workers)} must split it)" if cfg.ray.elastic else ""),
        )
    # A CPU rehearsal (cpu_devices) may run mixed_float16 emulated, to try loss scaling.
    if cfg.train.mixed_precision == "mixed_float16" and not cfg.ray.use_gpu and not cfg.distribution.cpu_devices:
        raise ConfigError(
            "train.mixed_precision",
            "mixed_float16 needs GPU workers (ray.use_gpu: true) or a CPU rehearsal (distribution.cpu_devices); "
            "use auto or float32",
        )
    if cfg.distribution.strategy not in ("auto", "multi_worker"):
        raise ConfigError(
            "distribution.strategy", f"Ray workers run multi_worker (or auto), not {cfg.distribution.strategy}"
        )


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


def _fit(cfg: Config, run_dir: rundir.RunDir, lease: str, worker_callbacks: list[keras.callbacks.Callback]) -> None:
    import ray.cloudpickle
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from imdb_dist.controller_log import KeptCheckpoints
    from imdb_dist.ray_backend import TFConfig

    run = run_dir.location
    parent = posixpath.dirname(run.path)
    # Ray Train hands this variable on from the driver to its controller (ray/train/v2/_internal/
    # constants.py, ENV_VARS_TO_PROPAGATE; not in Ray's published docs, so
    # tests/test_launch.py fails if a Ray upgrade stops it reaching the controller).
    os.environ[REPORT_POLL_ENV] = f"{cfg.ray.report_poll_s:g}"
    # Ray Train's own TensorflowTrainer would load TensorFlow in its controller (imdb_dist.ray_backend);
    # so would Keras callbacks in the loop's config, which the controller unpickles too: they travel
    # as bytes, unpickled in the workers only (our own objects, from this process).
    trainer = DataParallelTrainer(
        _worker_loop,
        backend_config=TFConfig(),
        train_loop_config={
            "config": to_dict(cfg),
            "callbacks": ray.cloudpickle.dumps(worker_callbacks),
            # One id per submission: a worker group started again under it is a restart or a resize.
            "submission": uuid.uuid4().hex,
            "lease": lease,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            elastic_resize_monitor_interval_s=cfg.ray.resize_interval_s,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=dict(cfg.ray.resources_per_worker),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.ray.name,
            # Ray Train writes its checkpoints through the same pyarrow filesystem, retries included
            # (imdb_dist.storage.RetryingS3FileSystem keeps them when Ray pickles it).
            storage_path=parent,
            storage_filesystem=run.filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
            worker_runtime_env={"env_vars": WORKER_ENV},
            callbacks=[KeptCheckpoints()],
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        refused = _worker_input_error(exc)
        if refused is not None:
            rank, error = refused
            # Retried like any worker failure first (ray.max_failures times): Ray Train V2
            # builds its one failure policy from FailureConfig alone (data_parallel_trainer.py,
            # create_failure_policy), and DefaultFailurePolicy retries every WorkerGroupError
            # (failure_handling/default.py, _is_retryable_error): no hook tells a bad
            # config from a lost node. Each retry fails as fast (before the strategy is built).
            raise InputError(f"Ray worker rank {rank}: {error}") from exc
        cause = _root_cause(exc)
        raise RunError(
            f"the Ray Train run failed (ray.max_failures={cfg.ray.max_failures} exhausted): {cause}; "
            f"resubmit to resume from the last checkpoint in {run}"
        ) from exc


def _root_cause(exc: BaseException) -> str:
    """The innermost error's last line: Ray wraps worker errors in several layers."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _worker_input_error(exc: BaseException) -> tuple[int, InputError] | None:
    """The first worker's (by rank) ``InputError`` in a failed run, anywhere in its ``__cause__`` chain.

    Ray Train V2 raises a ``WorkerGroupError`` whose ``worker_failures`` map
    each failed rank to the exception its train function raised, unwrapped
    from Ray's ``UserExceptionWithTraceback`` (worker_group/poll.py,
    ``WorkerGroupPollStatus.errors``) and unpickled in this process.
    """
    failures = getattr(exc, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        link: BaseException | None = failure
        while link is not None:
            if isinstance(link, InputError):
                return rank, link
            link = link.__cause__
    return None


def _worker_loop(payload: dict[str, Any]) -> None:
    """One Ray Train worker: restore the latest checkpoint, then ``imdb_dist.train.run`` under the driver's lease."""
    import ray.cloudpickle
    import ray.train

    setup_logging()
    import_tensorflow_quietly()
    from imdb_dist.distribute import size_thread_pools
    from imdb_dist.train import Launched
    from imdb_dist.train import run as train

    cfg = config_from_dict(payload["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # Where each rank runs and which hosts its TF_CONFIG (set by Ray Train) names: what to check first
    # when a multi-node job hangs in its first collective.
    hosts = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", [])
    # The CPUs Ray gave this worker, not the node's cores: co-located workers would oversubscribe them.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    threads = size_thread_pools(cpus) if cpus else None
    placement = {
        "rank": rank,
        "node": ray.util.get_node_ip_address(),
        "tf_config_workers": hosts,
        "cpus": cpus,
        "tf_threads": threads,
    }
    log.info("worker placement: %s", json.dumps(placement))
    scratch = Path(tempfile.mkdtemp(prefix="imdb-dist-worker-"))
    # Per-worker local copy of the checkpoint: the training loop reads and
    # writes it; Ray Train moves it to and from storage_path.
    local = scratch / "checkpoint"
    local.mkdir()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(local))
        log.info("restoring from the Ray Train checkpoint %s", checkpoint.path)
    chief = False  # train.run says, once its strategy is built (on_start)

    def on_start(is_chief: bool, run_dir: rundir.RunDir) -> None:
        nonlocal chief
        chief = is_chief
        if chief:
            record_worker_group(run_dir.work, context.get_world_size(), payload["submission"],
                                local if checkpoint else None)
            # Now, not at the first checkpoint: a group lost before it saves anything is history too.
            run_dir.upload_only([rundir.WORKER_GROUPS])

    noticed: set[str] = set()

    def preemption_notice() -> bool:
        """Whether a node of this worker group is draining for preemption: then checkpoint at every step point.

        Ray's answer is rank 0's, broadcast (every worker asks at the same
        step points), so all workers checkpoint together. At the drain's
        deadline Ray Train restarts the group from the latest checkpoint it
        collected, on the nodes that remain (elastic: with the workers that
        fit), so every step trained after a notice is lost unless saved: from
        the notice on, a checkpoint at every step point keeps the loss to at
        most twice ``run.log_every_steps`` steps (``imdb_dist.controller_log``).
        """
        info = ray.train.get_preemption_info()
        if info is None:
            return False
        if chief and not set(info.preempted_node_ids) <= noticed:
            left = f", {info.deadline_ms / 1000 - time.time():.0f} s before its deadline" if info.deadline_ms else ""
            log.info("preemption notice: node(s) %s (rank(s) %s) draining%s; checkpointing now and at every step "
                     "point until Ray Train restarts the group", ", ".join(info.preempted_node_ids),
                     ", ".join(map(str, info.preempted_ranks)), left)
        noticed.update(info.preempted_node_ids)
        return True

    def hand_to_ray(metrics: dict[str, Any]) -> None:
        # train.run has synced the logs so far (chief) before this: Ray records the checkpoint after them.
        # A barrier: every worker calls it after every save, the chief uploads.
        ray.train.report(
            {k: float(v) for k, v in metrics.items()},
            checkpoint=ray.train.Checkpoint.from_directory(str(local)) if chief else None,
        )
        if chief and noticed and "step" in metrics:
            log.info("preemption: checkpoint at epoch %d step %d handed to Ray Train", metrics["epoch"],
                     metrics["step"])

    try:
        train(
            cfg,
            launched=Launched(lease=payload["lease"], checkpoints=local, on_start=on_start),
            after_checkpoint=hand_to_ray,
            checkpoint_now=preemption_notice,
            extra_callbacks=ray.cloudpickle.loads(payload["callbacks"]),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def record_worker_group(run_dir: Path, workers: int, submission: str, checkpoint: Path | None) -> dict[str, Any]:
    """Append this worker group's start to ``worker_groups.jsonl`` and log one line; returns the entry.

    The cause is read from the history: the first group of a run starts it;
    a later one of the same submission is Ray Train's doing, a resize
    (elastic: fewer workers after losing some, more when capacity returned)
    or a restart after a failure at the same size; one of a new submission
    resumes a resubmitted job. ``checkpoint``: the restored checkpoint,
    whose position the group starts from.
    """
    from imdb_dist.checkpoint import saved_position

    history = rundir.read_worker_groups(run_dir)
    epoch, step = saved_position(checkpoint) if checkpoint is not None else (0, 0)
    if not history:
        cause = "start"
    elif history[-1]["submission"] != submission:
        cause = "resubmitted"
    elif workers < history[-1]["workers"]:
        cause = "shrunk: lost workers"
    elif workers > history[-1]["workers"]:
        cause = "grown: capacity returned"
    else:
        cause = "restarted after a failure"
    entry = {"workers": workers, "epoch": epoch + 1, "step": step, "cause": cause, "submission": submission,
             "time": time.time()}
    previous = f" (was {history[-1]['workers']})" if history else ""
    log.info("worker group: %d worker(s)%s, %s; training from epoch %d step %d", workers, previous, cause,
             epoch + 1, step)
    lines = "".join(json.dumps(item) + "\n" for item in [*history, entry])
    rundir.atomic_write(run_dir / rundir.WORKER_GROUPS, lines)
    return entry
