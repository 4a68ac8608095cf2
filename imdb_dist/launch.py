"""Run the job on a Ray cluster: Ray Train (V2) ``TensorflowTrainer``, N workers, MultiWorkerMirrored.

The driver (this process; under ``ray job submit``, the job's entrypoint)
prepares the data once — validation split, vocabulary, TFRecord shards —
into the run directory ``ray.storage_path/ray.name``, then starts the
workers. Ray Train sets ``TF_CONFIG`` in each, so ``imdb_dist.train.run``
builds a MultiWorkerMirroredStrategy; rank 0 is the chief and the only
worker that writes to the run directory.

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
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tf_keras as keras

from imdb_dist import rundir
from imdb_dist.config import Config, config_from_dict, to_dict
from imdb_dist.data import shards
from imdb_dist.data.sources import load_reviews
from imdb_dist.errors import ConfigError, DataError, RunError
from imdb_dist.logs import setup_logging

log = logging.getLogger(__name__)

PREPARED = "data"
# Keras 3 breaks MultiWorkerMirroredStrategy under Ray Train (ray#47464):
# make `tf.keras` mean tf_keras in every worker, whatever a library imports.
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def run_dir_of(cfg: Config) -> Path:
    """Ray's run directory, ``storage_path/name`` (absolute: workers may start elsewhere)."""
    return Path(cfg.ray.storage_path).expanduser().resolve() / cfg.ray.name


def launch(cfg: Config, *, worker_callbacks: Sequence[keras.callbacks.Callback] = ()) -> Path:
    """Prepare the data, run the Ray Train job to the end, and return the run directory.

    Args:
        cfg: the job; its ``ray`` section sizes the cluster job.
        worker_callbacks: extra Keras callbacks for every worker's ``fit``
            (pickled to the workers).

    Raises:
        InputError: bad config or data (found before any worker starts).
        RunError: the workers failed more often than ``ray.max_failures``.
    """
    run_dir = run_dir_of(cfg)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(run_dir)))
    _check_replicas(cfg)
    rundir.check_writable(run_dir)
    if rundir.already_complete(run_dir, cfg):
        log.info("%s already holds a complete run of this config; nothing to do", run_dir)
        return run_dir
    prepare(cfg, run_dir)
    _connect()
    _fit(cfg, run_dir, list(worker_callbacks))
    return run_dir


def _check_replicas(cfg: Config) -> None:
    """Fail in the driver, not in N workers, when the batch cannot be split or the devices cannot serve the job."""
    per_worker = int(cfg.ray.resources_per_worker.get("GPU", 0)) if cfg.ray.use_gpu else 1
    replicas = cfg.ray.num_workers * max(per_worker, 1)
    if cfg.train.batch_size % replicas:
        raise ConfigError(
            "train.batch_size",
            f"global batch {cfg.train.batch_size} is not divisible by {replicas} replicas "
            f"({cfg.ray.num_workers} workers x {max(per_worker, 1)} devices)",
        )
    if cfg.train.mixed_precision == "mixed_float16" and not cfg.ray.use_gpu:
        raise ConfigError(
            "train.mixed_precision", "mixed_float16 needs GPU workers (ray.use_gpu: true); use auto or float32"
        )
    if cfg.distribution.strategy not in ("auto", "multi_worker"):
        raise ConfigError(
            "distribution.strategy", f"Ray workers run multi_worker (or auto), not {cfg.distribution.strategy}"
        )


def prepare(cfg: Config, run_dir: Path) -> Path:
    """Open the run dir (config), and write vocabulary and TFRecord shards once; a resumed run reuses them.

    Raises:
        DataError: the source is missing or malformed (nothing is written then).
    """
    from imdb_dist.data import pipeline

    target = run_dir / PREPARED
    if shards.read_manifest(target) is not None and rundir.read_vocab(run_dir) is not None:
        log.info("reusing the prepared data in %s", target)
        rundir.begin(run_dir, cfg)
        return target
    train, val = load_reviews(cfg.data, "train"), load_reviews(cfg.data, "validation")
    if len(train) < cfg.train.batch_size:
        raise DataError(
            f"{len(train)} training reviews are fewer than one global batch (train.batch_size {cfg.train.batch_size})"
        )
    rundir.begin(run_dir, cfg)
    # Adapted once, here, so every replica shares the same token ids.
    vectorizer = pipeline.make_vectorizer(cfg.data.vocab_size)
    pipeline.adapt_vectorizer(vectorizer, train.texts)
    rundir.write_vocab(run_dir, pipeline.vocabulary(vectorizer))
    shards.write_prepared(
        target, {"train": train, "validation": val}, cfg.ray.num_shards, meta={"data": to_dict(cfg)["data"]}
    )
    log.info("prepared %d training and %d validation reviews in %s", len(train), len(val), target)
    return target


def _connect() -> None:
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
    if address:
        ray.init(address=address)
    else:
        # A new throw-away single-node cluster on loopback ("local": never join
        # whatever cluster /tmp/ray says was started last).
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)


def _fit(cfg: Config, run_dir: Path, worker_callbacks: list[keras.callbacks.Callback]) -> None:
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    trainer = TensorflowTrainer(
        _worker_loop,
        train_loop_config={
            "config": to_dict(cfg),
            "prepared": str(run_dir / PREPARED),
            "callbacks": worker_callbacks,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=dict(cfg.ray.resources_per_worker),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.ray.name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ray.checkpoints_to_keep),
            worker_runtime_env={"env_vars": WORKER_ENV},
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        cause = _root_cause(exc)
        raise RunError(
            f"the Ray Train run failed (ray.max_failures={cfg.ray.max_failures} exhausted): {cause}; "
            f"resubmit to resume from the last checkpoint in {run_dir}"
        ) from exc


def _root_cause(exc: BaseException) -> str:
    """The innermost error's last line: Ray wraps worker errors in several layers."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _worker_loop(payload: dict[str, Any]) -> None:
    """One Ray Train worker: restore the latest checkpoint, then ``imdb_dist.train.run``."""
    import ray.train

    from imdb_dist.train import run

    setup_logging()
    cfg = config_from_dict(payload["config"])
    chief = ray.train.get_context().get_world_rank() == 0
    # Per-worker local copy of the checkpoint: the training loop reads and
    # writes it; Ray Train moves it to and from storage_path.
    local = Path(tempfile.mkdtemp(prefix="imdb-dist-ckpt-"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(local))
        log.info("restoring from the Ray Train checkpoint %s", checkpoint.path)

    def hand_to_ray(metrics: dict[str, Any]) -> None:
        # A barrier: every worker calls it after every save, rank 0 uploads.
        ray.train.report(
            {k: float(v) for k, v in metrics.items()},
            checkpoint=ray.train.Checkpoint.from_directory(str(local)) if chief else None,
        )

    try:
        run(
            cfg,
            prepared=Path(payload["prepared"]),
            backup_dir=local,
            after_checkpoint=hand_to_ray,
            extra_callbacks=payload["callbacks"],
        )
    finally:
        shutil.rmtree(local, ignore_errors=True)
