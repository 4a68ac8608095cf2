"""The sections for a Ray cluster: how ``imdb-dist launch`` runs the job there, and what ``imdb-dist tune`` searches.

As in :mod:`imdb_dist.config.job`, each field's one-line meaning is the
string right after it; ``#`` comments say why.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from imdb_dist.config.checks import check_range, no_credentials
from imdb_dist.errors import ConfigError

METRIC_MODES = {"val_accuracy": "max", "val_loss": "min"}


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """How ``imdb-dist launch`` / ``job/train.py`` run the job on a Ray cluster.

    Ray Train starts ``num_workers`` processes, each with
    ``resources_per_worker``, and wires them into a MultiWorkerMirroredStrategy.
    The run directory is ``storage_path/name``: a resubmitted job with the same
    two resumes from the last checkpoint there.
    """

    # Elastic: the job starts once min workers fit, continues with the workers
    # that fit after losing some, and grows back from the latest checkpoint
    # when capacity returns (checked every resize_interval_s). The global
    # batch is the same at every size (imdb_dist.data.plan).
    num_workers: int | tuple[int, int] = 2
    """Ray Train workers (processes; one per node is typical for GPUs), or `[min, max]` for Ray Train's elastic
    scaling; every size must split the global batch evenly across its replicas."""
    resize_interval_s: float = 60.0
    """Elastic only: how often Ray Train considers resizing a healthy worker group."""
    use_gpu: bool = False
    """Give each worker `resources_per_worker.GPU` GPUs."""
    resources_per_worker: dict[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 1.0})
    """Ray resources of one worker, e.g. `{CPU: 8, GPU: 8}` for one worker per 8-GPU node; each worker sizes
    TensorFlow's thread pools to its `CPU`."""
    # Must be shared by all nodes (NFS, a PVC) in a multi-node cluster.
    storage_path: str = "runs/ray"
    """Where run directories live: a path every node mounts, or a `pyarrow.fs` URI (`s3://`, `gs://`, `abfs://`,
    `hdfs://`)."""
    name: str = "imdb-dist"
    """The run's name: its run directory is `storage_path/name`."""
    max_failures: int = 0
    """Worker-group restarts from the last checkpoint before giving up; -1: forever."""
    checkpoints_to_keep: int = 2
    """Ray Train checkpoints kept in storage."""
    # Only the chief reads them, at the end; the training data is the token store.
    num_shards: int = 16
    """TFRecord files the validation reviews' text is written into (the export is scored on it at the end)."""
    # imdb_dist.prepare.RAY_DATA_FROM says where auto switches, and why.
    prepare: Literal["auto", "ray_data", "local"] = "auto"
    """Who tokenizes the corpus into the token store before training: `ray_data` (a Ray Data job across the
    cluster's CPUs), `local` (the driver, one process), `auto` (Ray Data from 200,000 training reviews)."""
    prepare_workers: int = 0
    """With Ray Data: tasks tokenizing at once; 0: as many as the cluster's free CPUs."""
    # imdb_dist.ray_cluster.check_gpus says why not Ray Train's own wait (it would
    # wait forever).
    gpu_wait_s: float = 0.0
    """With `use_gpu` on a cluster lacking GPUs for every worker: 0 exits 2 at once; N asks the cluster's
    autoscaler for them and waits up to N seconds."""
    # Ray's default is 2 s, and this wins over the variable in the
    # environment. The controller collects the workers' ray.train.report
    # calls at each poll, and a worker's report waits until its previous one
    # was collected (bench.checkpoint_pace). Failed workers and resizes are
    # noticed at the same pace.
    report_poll_s: float = 0.5
    """How often Ray Train's controller polls the workers (sets `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`): a job
    checkpointing more often trains at one checkpoint per poll."""

    def __post_init__(self) -> None:
        no_credentials("ray.storage_path", self.storage_path)
        if isinstance(self.num_workers, tuple):
            low, high = self.num_workers
            check_range("ray.num_workers[0]", low, 1, 100_000)
            check_range("ray.num_workers[1]", high, low, 100_000)
        else:
            check_range("ray.num_workers", self.num_workers, 1, 100_000)
        check_range("ray.resize_interval_s", self.resize_interval_s, 0.0, 86_400.0)
        check_range("ray.max_failures", self.max_failures, -1, 100_000)
        check_range("ray.checkpoints_to_keep", self.checkpoints_to_keep, 1, 100_000)
        check_range("ray.prepare_workers", self.prepare_workers, 0, 100_000)
        check_range("ray.num_shards", self.num_shards, 1, 100_000)
        check_range("ray.gpu_wait_s", self.gpu_wait_s, 0.0, 86_400.0)
        check_range("ray.report_poll_s", self.report_poll_s, 0.05, 60.0)
        for resource, amount in self.resources_per_worker.items():
            check_range(f"ray.resources_per_worker.{resource}", amount, 0.0, 1_000_000.0)
        if self.use_gpu and not self.resources_per_worker.get("GPU"):
            raise ConfigError("ray.resources_per_worker", "use_gpu needs a GPU count, e.g. {CPU: 8, GPU: 8}")
        if not self.name.strip() or "/" in self.name:
            raise ConfigError("ray.name", f"{self.name!r} must be a non-empty name without '/'")

    @property
    def worker_counts(self) -> range:
        """Every size the worker group may have: one, or min..max when elastic."""
        low, high = self.num_workers if isinstance(self.num_workers, tuple) else (self.num_workers,) * 2
        return range(low, high + 1)

    @property
    def elastic(self) -> bool:
        return len(self.worker_counts) > 1


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """``imdb-dist tune``: a Ray Tune search over this config's own keys (train and launch ignore it).

    Each trial trains the config with its sampled values in its own run
    directory; :func:`imdb_dist.tune.check_space` judges the space.
    """

    space: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Dotted config keys to search, each `{choice: [values]}`, `{grid: [values]}` (every value, `trials` times
    each), `{uniform: [low, high]}`, `{loguniform: [low, high]}` or `{randint: [low, high]}` (`high` excluded)."""
    trials: int = 4
    """Trials sampled (with `grid`: per grid point)."""
    concurrency: int = 0
    """Trials at once; 0: as many as the cluster's CPUs hold at `cpus_per_trial`."""
    cpus_per_trial: float = 1.0
    """A single-process trial's CPUs (its TensorFlow thread pools follow them)."""
    workers_per_trial: int = 1
    """1: each trial trains in one process; N > 1: each trial is a Ray Train run of N workers (`ray.num_workers`),
    each with `ray.resources_per_worker`."""
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    """What a trial is scored by: `val_accuracy` (higher is better) or `val_loss` (lower is better)."""
    folds: int = 0
    """>= 2: every trial trains each fold of a k-fold split (`data.folds`) and is scored by the folds' mean (no
    early stopping then)."""
    early_stop: bool = True
    """ASHA: stop the trials whose per-epoch metric trails, after `grace_epochs`."""
    grace_epochs: int = 1
    """Epochs every trial trains before ASHA may stop it."""
    seed: int = 0
    """The sampler's seed: one tune section samples the same trials."""

    def __post_init__(self) -> None:
        check_range("tune.trials", self.trials, 1, 100_000)
        check_range("tune.concurrency", self.concurrency, 0, 100_000)
        check_range("tune.cpus_per_trial", self.cpus_per_trial, 0.0, 100_000.0, low_open=True)
        check_range("tune.grace_epochs", self.grace_epochs, 1, 100_000)
        check_range("tune.workers_per_trial", self.workers_per_trial, 1, 100_000)
        if self.folds != 0:
            check_range("tune.folds", self.folds, 2, 100)

    @property
    def mode(self) -> str:
        """``max`` or ``min``: which way the metric improves."""
        return METRIC_MODES[self.metric]
