"""Strategy, chief and precision decisions: the only module that reads TF_CONFIG.

Create the strategy first thing in a worker (:func:`start_worker`):
MultiWorkerMirroredStrategy must exist before any other TensorFlow op
initialises the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import tensorflow as tf
import tf_keras as keras
from tensorflow.python.distribute import collective_all_reduce_strategy

from imdb_dist import aggregation
from imdb_dist.config import Config, DistributionConfig
from imdb_dist.devices import check_devices, is_gpu
from imdb_dist.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Worker:
    """What this process is within the job."""

    strategy: tf.distribute.Strategy
    chief: bool
    num_workers: int
    index: int
    precision: str

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def start_worker(cfg: Config, *, ray_worker: bool) -> Worker:
    """Check the devices, build the strategy, resolve the precision and seed: this process, ready to train.

    Raises:
        ConfigError: the job asks for a GPU there is not, or its global batch does not split among the replicas.
    """
    # Devices are read first (that does not initialise the runtime): a job
    # that needs a GPU and has none stops here, before anything is written.
    gpu = check_devices(cfg, ray_worker=ray_worker) and not cfg.distribution.cpu_devices
    # Then the strategy: MultiWorkerMirroredStrategy must be created before
    # any other op initialises the TensorFlow runtime.
    strategy = make_strategy(cfg.distribution)
    replicas = strategy.num_replicas_in_sync
    if cfg.train.batch_size % replicas:
        raise ConfigError(
            "train.batch_size",
            f"global batch {cfg.train.batch_size} is not divisible by {replicas} replicas in sync",
        )
    num_workers, index = worker_index(strategy)
    precision = resolve_precision(cfg.train.mixed_precision, gpu=gpu)
    log.info(
        "strategy %s: %d worker(s), %d replica(s) in sync on %s; precision %s; global batch %d",
        type(strategy).__name__,
        num_workers,
        replicas,
        ", ".join(local_devices(strategy)) or "the default device",
        precision,
        cfg.train.batch_size,
    )
    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.deterministic:
        # Ops without a deterministic kernel raise instead of varying run to run.
        tf.config.experimental.enable_op_determinism()
    return Worker(strategy, is_chief(strategy), num_workers, index, precision)


def dense_embedding_gradient(cfg: DistributionConfig, *, replicas: int, rows: int, vocab: int, dim: int) -> bool:
    """Whether the replicas all-reduce the embedding gradient dense (``distribution.embedding_gradient``); logged.

    ``rows``: token positions per replica and step (a full-length batch); ``vocab`` and ``dim``: the embedding's shape.
    """
    transport = cfg.embedding_transport
    dense = aggregation.dense_embedding_gradient(
        cfg.embedding_gradient, replicas=replicas, rows=rows, vocab=vocab, dim=dim, transport=transport
    )
    if replicas > 1:
        log.info(
            "embedding gradient: %s all-reduce (%s); per replica and step, gathering a full-length batch "
            "sends %.1f MB, the dense all-reduce in %s %.1f MB",
            f"dense, in {transport}," if dense else "sparse (gathered rows)",
            cfg.embedding_gradient,
            aggregation.gathered_bytes(rows, dim, replicas) / 1e6,
            transport,
            aggregation.reduced_bytes(vocab, dim, replicas, transport) / 1e6,
        )
    return dense


def cluster_spec() -> dict | None:
    """The parsed ``TF_CONFIG`` (set by Ray Train or the operator), or None if unset.

    Raises:
        ConfigError: TF_CONFIG is set but not JSON with ``cluster`` and ``task``.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError("TF_CONFIG", f"is not valid JSON: {exc.msg} at column {exc.colno}") from None
    task = spec.get("task") if isinstance(spec, dict) else None
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    well_formed = (
        isinstance(cluster, dict)
        and all(isinstance(v, list) for v in cluster.values())
        and isinstance(task, dict)
        and isinstance(task.get("type"), str)
        and type(task.get("index")) is int  # not bool, not float
    )
    if not well_formed:
        raise ConfigError(
            "TF_CONFIG",
            'must be {"cluster": {"<type>": ["host:port", ...]}, "task": {"type": "<type>", "index": <int>}}',
        )
    if not 0 <= task["index"] < len(cluster.get(task["type"], [])):
        raise ConfigError("TF_CONFIG", f"task {task} is not in the cluster {sorted(cluster)}")
    return spec


def make_strategy(cfg: DistributionConfig) -> tf.distribute.Strategy:
    """The strategy ``distribution.strategy`` names; ``auto`` picks by environment.

    ``auto``: TF_CONFIG set → MultiWorkerMirroredStrategy; ``cpu_devices``,
    or more than one GPU → MirroredStrategy over all of them; else the
    default strategy. With ``cpu_devices: N`` the host CPU is first split
    into N logical devices and the strategy runs one replica on each (a
    worker under TF_CONFIG: :class:`CpuReplicasMultiWorkerStrategy`).
    Replicas all-reduce as ``distribution.collective`` says
    (:func:`collective_for`).
    """
    name = cfg.strategy
    spec = cluster_spec()
    if cfg.cpu_devices:
        split_cpu(cfg.cpu_devices)
    if name == "auto":
        if spec is not None:
            name = "multi_worker"
        elif cfg.cpu_devices or len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multi_worker":
        if spec is None:
            raise ConfigError("distribution.strategy", "multi_worker needs TF_CONFIG (Ray Train sets it)")
        # A worker's replicas are its GPUs when it has any (TensorFlow's rule), else one CPU replica.
        gpus = not cfg.cpu_devices and bool(tf.config.list_physical_devices("GPU"))
        collective = collective_for(cfg.collective, gpus=gpus)
        log.info("all-reduce across workers: %s (distribution.collective %s)", collective, cfg.collective)
        options = communication_options(collective)
        if cfg.cpu_devices:
            return CpuReplicasMultiWorkerStrategy(cfg.cpu_devices, options)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "mirrored":
        devices = list(cfg.devices) or [f"/cpu:{i}" for i in range(cfg.cpu_devices)]
        if not devices:  # all GPUs, as TensorFlow's MirroredStrategy() takes them; none: the CPU
            devices = [f"/gpu:{i}" for i in range(len(tf.config.list_physical_devices("GPU")))] or ["/cpu:0"]
        gpus = all(is_gpu(device) for device in devices)
        collective = collective_for(cfg.collective, gpus=gpus)
        log.info("all-reduce across devices: %s (distribution.collective %s)", collective, cfg.collective)
        ops = cross_device_ops(collective)
        return tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=ops)
    if cfg.devices:
        raise ConfigError("distribution.devices", f"only applies to the mirrored strategy, not {name}")
    return tf.distribute.get_strategy()


def collective_for(name: str, *, gpus: bool) -> str:
    """``nccl`` or ``ring``: ``distribution.collective`` resolved for replicas on GPUs or not.

    ``auto`` is NCCL on GPUs. TensorFlow's own ``AUTO`` is not: across
    workers it runs its gRPC ring and turns to NCCL only when asked
    (``collective_param_resolver_local.cc``), so 16 GPUs would all-reduce
    every step through the hosts' CPUs and sockets.

    Raises:
        ConfigError: ``nccl`` for replicas that are not GPUs.
    """
    if name == "auto":
        return "nccl" if gpus else "ring"
    if name == "nccl" and not gpus:
        raise ConfigError("distribution.collective", "nccl all-reduces between GPUs and these replicas are not GPUs")
    return name


def communication_options(collective: str) -> tf.distribute.experimental.CommunicationOptions:
    """MultiWorkerMirroredStrategy's options for a resolved collective (``nccl`` or ``ring``)."""
    implementation = tf.distribute.experimental.CommunicationImplementation
    return tf.distribute.experimental.CommunicationOptions(
        implementation=implementation.NCCL if collective == "nccl" else implementation.RING
    )


def cross_device_ops(collective: str) -> tf.distribute.CrossDeviceOps:
    """MirroredStrategy's all-reduce for a resolved collective: NCCL, or a reduction through one device.

    Named rather than left to TensorFlow (``select_cross_device_ops``), which
    picks NCCL on GPUs only when it finds the kernel registered and
    otherwise falls back with no more than a log line. The ring's stand-in
    within a process is what TensorFlow itself uses for CPU replicas.
    """
    if collective == "nccl":
        return tf.distribute.NcclAllReduce()
    return tf.distribute.ReductionToOneDevice()


def split_cpu(devices: int) -> None:
    """Split the host CPU into ``devices`` logical devices (``/cpu:0`` ... ``/cpu:N-1``) sharing its cores.

    A process already split that way (a test session, a second run in one
    process) is left as it is.

    Raises:
        RuntimeError: the runtime is already initialised with another split
            (TensorFlow refuses to change it then).
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or ()) == devices:
        return
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)


class _CpuReplicasExtended(collective_all_reduce_strategy.CollectiveAllReduceExtended):
    def __init__(
        self,
        container: tf.distribute.Strategy,
        devices: int,
        options: tf.distribute.experimental.CommunicationOptions,
    ) -> None:
        self._cpu_devices = devices
        super().__init__(
            container,
            cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver(),
            communication_options=options,
        )

    def _initialize_local_devices(self, cluster_resolver: Any, worker_device: str) -> tuple[tuple[str, ...], str]:
        return tuple(f"{worker_device}/device:CPU:{i}" for i in range(self._cpu_devices)), "CPU"


class CpuReplicasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy with N local replicas per worker on N logical CPUs (``cpu_devices``).

    TensorFlow's strategy gives a worker one local replica per GPU, and on a
    machine without GPUs exactly one, on ``CPU:0``
    (``CollectiveAllReduceExtended._initialize_local_devices``): no public
    option gives a CPU worker several. This class overrides that one method
    to list the worker's logical CPUs instead, and nothing else: the
    collectives, variables, replica ids and input handling are TensorFlow's,
    exactly as on a worker with N GPUs. It exists for the CPU rehearsal of a
    multi-GPU job only (a GPU worker never takes this path), and
    tests/test_topology.py fails if a TensorFlow upgrade stops honouring it.
    """

    def __init__(  # pylint: disable=super-init-not-called
        self, devices: int, options: tf.distribute.experimental.CommunicationOptions | None = None
    ) -> None:
        # Strategy.__init__ with our extended: MultiWorkerMirroredStrategy's own
        # __init__ would build TensorFlow's extended first and start a second server.
        options = options or tf.distribute.experimental.CommunicationOptions()
        tf.distribute.Strategy.__init__(self, _CpuReplicasExtended(self, devices, options))


def size_thread_pools(cpus: float) -> int:
    """Size TensorFlow's intra- and inter-op thread pools to ``cpus`` (at least 1); returns the size.

    By default each pool has a thread per core of the machine, so workers
    sharing a node each run as many threads as it has cores and slow each
    other down. A Ray worker calls this with the CPUs Ray gave it, before
    anything initialises the TensorFlow runtime (``imdb-dist train`` keeps
    the defaults: it has the machine to itself).

    Raises:
        RuntimeError: the runtime is already initialised (TensorFlow refuses then).
    """
    threads = max(1, int(cpus))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    return threads


def worker_index(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """``(num_workers, this worker's index)``: ``(1, 0)`` unless multi-worker.

    The index orders chief before workers, as tf.distribute's input
    pipeline ids do, so it can pick this worker's data shard.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1, 0
    cluster = resolver.cluster_spec().as_dict()
    n_chief = len(cluster.get("chief", []))
    total = n_chief + len(cluster.get("worker", []))
    index = resolver.task_id if resolver.task_type == "chief" else n_chief + resolver.task_id
    return total, index


def local_devices(strategy: tf.distribute.Strategy) -> tuple[str, ...]:
    """The devices this worker's replicas run on, one per local replica; ``()`` for the default strategy.

    The default strategy has one replica and leaves placement to TensorFlow.
    """
    try:
        return tuple(strategy.extended.worker_devices)
    except RuntimeError:  # "unsupported by default tf.distribute.Strategy"
        return ()


def local_replicas(strategy: tf.distribute.Strategy) -> int:
    """How many replicas this worker runs."""
    return max(len(local_devices(strategy)), 1)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """The one process that writes the run directory.

    TF's rule: the ``chief`` task if the cluster has one, else ``worker`` 0;
    any single-process strategy is its own chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def resolve_precision(name: str, *, gpu: bool) -> str:
    """``auto`` → ``mixed_float16`` when the replicas are GPUs, ``float32`` elsewhere; explicit names as given.

    On CPUs float16 math is emulated and slow, and bfloat16 is only a win
    where it is measured to be (docs/BENCHMARKS.md), so it is opt-in. An
    explicit ``mixed_float16`` without a GPU is refused earlier, by
    :func:`imdb_dist.devices.check_devices`, except in a CPU rehearsal (``cpu_devices``),
    where it runs emulated, slowly, to try loss scaling before renting GPUs.
    """
    if name == "auto":
        return "mixed_float16" if gpu else "float32"
    return name


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[None]:
    """Build layers under the Keras dtype policy ``name``, restoring the old one after.

    Layers take the global policy when they are created, so only model
    construction needs to sit inside this block.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
