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
is read and before anything is written (:func:`imdb_dist.ray_cluster.check_gpus`): a cluster
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

from imdb_dist import rundir, storage, tracking
from imdb_dist.config import Config, config_from_dict, to_dict
from imdb_dist.errors import ConfigError, InputError, RunError
from imdb_dist.logs import import_tensorflow_quietly, setup_logging
from imdb_dist.prepare import prepare
from imdb_dist.ray_cluster import check_gpus, connect

# Nothing TensorFlow at import time: a Ray worker imports this module to
# run _worker_loop, which imports TensorFlow with its start-up lines filtered.
if TYPE_CHECKING:
    import tf_keras as keras

log = logging.getLogger(__name__)

# Keras 3 breaks MultiWorkerMirroredStrategy under Ray Train (ray#47464):
# make `tf.keras` mean tf_keras in every worker, whatever a library imports.
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
# How often Ray Train's controller polls the workers, and so collects their reports (ray.report_poll_s).
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def run_location(cfg: Config) -> storage.Location:
    """Ray's run directory, ``storage_path/name`` (a local path made absolute: workers may start elsewhere)."""
    where = storage.parse(cfg.ray.storage_path, "ray.storage_path", retry_s=cfg.run.storage_retry_s)
    return where.child(cfg.ray.name)


def launch(
    cfg: Config,
    *,
    worker_callbacks: Sequence[keras.callbacks.Callback] = (),
    changes: Sequence[str] = (),
    tracked_under: str | None = None,
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
        tracked_under: the MLflow run (a sweep's trial) the job's MLflow run
            nests under (:mod:`imdb_dist.tracking`).

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
    tracking.check(cfg.tracking)  # before anything is read or written

    def join_cluster() -> None:
        # After the data is read and checked (bad data needs no cluster), before the first write.
        connect()
        check_gpus(cfg)

    with rundir.RunDir(location, "ray.storage_path") as run_dir:
        lease = prepare(cfg, run_dir, before_writing=join_cluster, changes=changes)
        if lease is None:  # already complete (logged)
            tracking.catch_up(cfg, run_dir)
            return location
        tracking.open_run(cfg, run_dir, parent=tracked_under)
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
    from imdb_dist.train import run as train

    cfg = config_from_dict(payload["config"])
    context = ray.train.get_context()
    # Where each rank runs and which hosts its TF_CONFIG (set by Ray Train) names: what to check first
    # when a multi-node job hangs in its first collective.
    hosts = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", [])
    # The CPUs Ray gave this worker, not the node's cores: co-located workers would oversubscribe them.
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    threads = size_thread_pools(cpus) if cpus else None
    placement = {
        "rank": context.get_world_rank(),
        "node": ray.util.get_node_ip_address(),
        "tf_config_workers": hosts,
        "cpus": cpus,
        "tf_threads": threads,
    }
    log.info("worker placement: %s", json.dumps(placement))
    scratch = Path(tempfile.mkdtemp(prefix="imdb-dist-worker-"))
    try:
        # Per-worker local copy of the checkpoint: the training loop reads and
        # writes it; Ray Train moves it to and from storage_path.
        local = scratch / "checkpoint"
        local.mkdir()
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(local))
            log.info("restoring from the Ray Train checkpoint %s", checkpoint.path)
        callbacks = ray.cloudpickle.loads(payload["callbacks"])
        train(cfg, launched=_RayWorker(payload, local, restored=checkpoint is not None), extra_callbacks=callbacks)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _RayWorker:
    """A Ray Train worker's hooks into ``imdb_dist.train.run`` (:class:`imdb_dist.train.Launched`).

    Args:
        payload: the trainer's loop config (the submission's id, the driver's lease).
        checkpoints: this worker's local copy of the checkpoint, which Ray Train moves.
        restored: whether Ray Train gave the worker a checkpoint to start from.
    """

    def __init__(self, payload: dict[str, Any], checkpoints: Path, *, restored: bool) -> None:
        self.lease: str = payload["lease"]
        self.checkpoints = checkpoints
        self._submission: str = payload["submission"]
        self._restored = restored
        self._chief = False  # train.run says, once its strategy is built (on_start)
        self._noticed: set[str] = set()

    def on_start(self, chief: bool, run_dir: rundir.RunDir) -> None:
        import ray.train

        self._chief = chief
        if chief:
            workers = ray.train.get_context().get_world_size()
            checkpoint = self.checkpoints if self._restored else None
            run_dir.record_worker_group(worker_group(run_dir.worker_groups(), workers, self._submission, checkpoint))

    def checkpoint_now(self) -> bool:
        """Whether a node of this worker group is draining for preemption: then checkpoint at every step point.

        Ray's answer is rank 0's, broadcast (every worker asks at the same
        step points), so all workers checkpoint together. At the drain's
        deadline Ray Train restarts the group from the latest checkpoint it
        collected, on the nodes that remain (elastic: with the workers that
        fit), so every step trained after a notice is lost unless saved: from
        the notice on, a checkpoint at every step point keeps the loss to at
        most twice ``run.log_every_steps`` steps (``imdb_dist.controller_log``).
        """
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return False
        if self._chief and not set(info.preempted_node_ids) <= self._noticed:
            left = f", {info.deadline_ms / 1000 - time.time():.0f} s before its deadline" if info.deadline_ms else ""
            log.info("preemption notice: node(s) %s (rank(s) %s) draining%s; checkpointing now and at every step "
                     "point until Ray Train restarts the group", ", ".join(info.preempted_node_ids),
                     ", ".join(map(str, info.preempted_ranks)), left)
        self._noticed.update(info.preempted_node_ids)
        return True

    def after_checkpoint(self, metrics: dict[str, Any]) -> None:
        """Hand the checkpoint to Ray Train: a barrier, every worker calls it after every save, the chief uploads.

        ``imdb_dist.train.run`` has synced the logs so far (chief) before this: Ray records the checkpoint after them.
        """
        import ray.train

        ray.train.report(
            {k: float(v) for k, v in metrics.items()},
            checkpoint=ray.train.Checkpoint.from_directory(str(self.checkpoints)) if self._chief else None,
        )
        if self._chief and self._noticed and "step" in metrics:
            log.info("preemption: checkpoint at epoch %d step %d handed to Ray Train", metrics["epoch"],
                     metrics["step"])


def worker_group(history: list[dict[str, Any]], workers: int, submission: str,
                 checkpoint: Path | None) -> dict[str, Any]:
    """This worker group's start, as ``worker_groups.jsonl`` records it after ``history``; logged in one line.

    The cause is read from the history: the first group of a run starts it;
    a later one of the same submission is Ray Train's doing, a resize
    (elastic: fewer workers after losing some, more when capacity returned)
    or a restart after a failure at the same size; one of a new submission
    resumes a resubmitted job. ``checkpoint``: the restored checkpoint,
    whose position the group starts from.
    """
    from imdb_dist.checkpoint import saved_position

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
    previous = f" (was {history[-1]['workers']})" if history else ""
    log.info("worker group: %d worker(s)%s, %s; training from epoch %d step %d", workers, previous, cause,
             epoch + 1, step)
    return {"workers": workers, "epoch": epoch + 1, "step": step, "cause": cause, "submission": submission,
            "time": time.time()}

