"""The job's configuration: frozen dataclasses, loaded from YAML, validated.

Precedence is ``--set`` overrides > YAML file > dataclass defaults. Every
value is checked against its field's type when it is loaded, and every field
against its allowed range, so a typo or an impossible value fails before any
data is read, naming the dotted key at fault.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml

from imdb_dist.errors import ConfigError

Source = Literal["auto", "aclimdb", "download", "tfds", "keras"]
Strategy = Literal["auto", "default", "mirrored", "multi_worker"]
Precision = Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]
Schedule = Literal["constant", "cosine"]
EmbeddingGradient = Literal["auto", "dense", "sparse"]
Collective = Literal["auto", "ring", "nccl"]
Transport = Literal["float32", "bfloat16"]

# The Large Movie Review Dataset v1.0 as its authors publish it (84,125,825
# bytes): what data.source download (and auto without a data path) fetches.
# The sha256 is the one TensorFlow Datasets publishes for this URL in
# tensorflow_datasets/datasets/imdb_reviews/checksums.tsv. Kept here, not in
# imdb_dist.data.download, because the config must not import data modules.
OFFICIAL_URL = "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
OFFICIAL_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# file:// serves a local mirror (an air-gapped cluster's shared disk, tests).
_URL_SCHEMES = ("http://", "https://", "file://")


def _no_credentials(key: str, location: str) -> None:
    """Refuse a URI with credentials in it before it can be stored anywhere (:mod:`imdb_dist.storage`)."""
    from imdb_dist.storage import check_no_credentials

    check_no_credentials(location, key)


def _check_range(
    key: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if not math.isfinite(value):
        raise ConfigError(key, f"{value!r} is not a finite number")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(key, f"{value!r} is out of range {lo}{low}, {high}{hi}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the reviews come from and how they are encoded."""

    source: Source = "auto"
    # aclimdb: directory or .tar.gz; tfds: data_dir; keras: an imdb.npz path;
    # download: the cache directory (default: $IMDB_DIST_CACHE, else
    # $XDG_CACHE_HOME/imdb-dist, else ~/.cache/imdb-dist).
    path: str | None = None
    # download: the aclImdb archive to fetch and the sha256 it must have; a
    # file that does not match is never cached (imdb_dist.data.download).
    url: str = OFFICIAL_URL
    sha256: str = OFFICIAL_SHA256
    validation_fraction: float = 0.1
    # k-fold cross-validation: with folds >= 2 the validation reviews are fold
    # `fold` (0-based) of a seeded partition into `folds` parts, and
    # validation_fraction is not used. Running every fold estimates accuracy
    # with a mean and spread (python -m bench.accuracy --folds K).
    folds: int = 0
    fold: int = 0
    seed: int = 1337
    vocab_size: int = 20000
    max_len: int = 400
    # Group reviews of similar length so short ones are not padded to max_len.
    bucketing: bool = True
    bucket_width: int = 50

    def __post_init__(self) -> None:
        if self.path is not None:
            _no_credentials("data.path", self.path)
        _no_credentials("data.url", self.url)
        _check_range("data.validation_fraction", self.validation_fraction, 0.0, 0.5, low_open=True)
        if self.folds != 0:
            _check_range("data.folds", self.folds, 2, 100)
            _check_range("data.fold", self.fold, 0, self.folds - 1)
        elif self.fold != 0:
            raise ConfigError("data.fold", f"{self.fold} needs data.folds >= 2 (0: one validation_fraction split)")
        _check_range("data.vocab_size", self.vocab_size, 3, 1_000_000)
        _check_range("data.max_len", self.max_len, 8, 10_000)
        _check_range("data.bucket_width", self.bucket_width, 8, 10_000)
        if not _SHA256.fullmatch(self.sha256):
            raise ConfigError("data.sha256", f"{self.sha256!r} is not a sha256 (64 hexadecimal digits)")
        if not self.url.lower().startswith(_URL_SCHEMES):
            raise ConfigError("data.url", f"{self.url!r} must start with {', '.join(_URL_SCHEMES)}")
        # The cache keeps the file under the last part of the URL's path.
        if PurePosixPath(urllib.parse.urlsplit(self.url).path).name in ("", ".", ".."):
            raise ConfigError("data.url", f"{self.url!r} names no file (its path must end in a file name)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the fixed network (Embedding, Conv1D, MaxPooling1D, LSTM, Dense)."""

    embedding_dim: int = 128
    dropout: float = 0.25
    conv_filters: int = 64
    kernel_size: int = 5
    pool_size: int = 4
    lstm_units: int = 70
    # A deep ensemble: this many networks of these layers, trained side by
    # side from their own initialisations, served as the mean of their
    # probabilities (costs members x the compute; see imdb_dist.model).
    members: int = 1

    def __post_init__(self) -> None:
        _check_range("model.members", self.members, 1, 64)
        for name in ("embedding_dim", "conv_filters", "kernel_size", "pool_size", "lstm_units"):
            _check_range(f"model.{name}", getattr(self, name), 1, 100_000)
        _check_range("model.dropout", self.dropout, 0.0, 1.0, high_open=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: the global batch is split evenly across all replicas."""

    epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 0.001
    # cosine: decay from learning_rate to 0 over train.epochs (as configured
    # when the run starts or resumes).
    lr_schedule: Schedule = "constant"
    mixed_precision: Precision = "auto"
    # 0 disables early stopping; otherwise patience in epochs on val_loss,
    # restoring the best epoch's weights at the end.
    early_stopping_patience: int = 0
    steps_per_execution: int = 1
    # Weight initialisation and the dropout masks (keyed on seed, step, replica).
    seed: int = 1337
    # TensorFlow's op determinism: two runs of one config on one machine give
    # identical weights (costs speed; see docs/BENCHMARKS.md).
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check_range("train.epochs", self.epochs, 1, 100_000)
        _check_range("train.batch_size", self.batch_size, 1, 1_000_000)
        _check_range("train.learning_rate", self.learning_rate, 0.0, 10.0, low_open=True)
        _check_range("train.early_stopping_patience", self.early_stopping_patience, 0, 100_000)
        _check_range("train.steps_per_execution", self.steps_per_execution, 1, 100_000)


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
    """Which tf.distribute strategy runs the replicas."""

    strategy: Strategy = "auto"
    # mirrored only: explicit devices (e.g. ["/gpu:0", "/gpu:1"]); empty = all GPUs.
    devices: tuple[str, ...] = ()
    # How replicas combine the embedding's gradient (imdb_dist.aggregation):
    # gather its rows (sparse), all-reduce the dense table (dense), or
    # whichever sends fewer bytes at a full-length batch (auto).
    embedding_gradient: EmbeddingGradient = "auto"
    # The dtype the dense embedding gradient is all-reduced in: float32, or
    # bfloat16 for half the bytes of a step's largest all-reduce (rounded to
    # 8 significant bits; docs/BENCHMARKS.md). Only the dense route uses it.
    embedding_transport: Transport = "float32"
    # N >= 2: split the host CPU into N logical devices and run one replica
    # on each (MirroredStrategy in one process; N local replicas per Ray
    # worker): the shape of a multi-GPU job, rehearsed on CPU. 0: off.
    cpu_devices: int = 0
    # How replicas all-reduce (imdb_dist.distribute.collective_for): nccl
    # (NVIDIA's library: GPUs only), ring (TensorFlow's own: a gRPC ring
    # across workers, a copy through one device within a process), auto
    # (nccl where the replicas are GPUs, ring elsewhere). TensorFlow's own
    # AUTO would pick its ring even across GPU nodes.
    collective: Collective = "auto"

    def __post_init__(self) -> None:
        _check_range("distribution.cpu_devices", self.cpu_devices, 0, 64)
        if self.collective == "nccl" and self.cpu_devices:
            raise ConfigError("distribution.collective", "nccl needs GPU replicas, not cpu_devices: use auto or ring")
        if self.embedding_transport != "float32" and self.embedding_gradient == "sparse":
            raise ConfigError(
                "distribution.embedding_transport",
                f"{self.embedding_transport} applies to the dense all-reduce, and embedding_gradient is sparse",
            )
        if self.cpu_devices == 1:
            raise ConfigError("distribution.cpu_devices", "1 is no split: use 0 (off) or at least 2 devices")
        if self.cpu_devices and self.strategy == "default":
            raise ConfigError(
                "distribution.cpu_devices", "needs the mirrored, multi_worker or auto strategy, not default"
            )
        if self.cpu_devices and self.devices:
            raise ConfigError("distribution.cpu_devices", "and distribution.devices both choose the devices: set one")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where results go and how often the run saves itself."""

    output_dir: str = "runs/default"
    # 0 = checkpoint at the end of every epoch only; N = also every N steps.
    checkpoint_steps: int = 0
    # Training loss, accuracy, learning rate and examples/s every N optimizer
    # steps (steps.jsonl, TensorBoard, curves.png); 0 = about 40 points per epoch.
    log_every_steps: int = 0
    # The run directory's lease (imdb_dist.lease): renewed every quarter of this; a run that stopped
    # renewing it this long ago is dead, and its directory is taken over.
    lease_s: float = 60.0
    # How long each call to remote storage retries a refused connection or a server error, with
    # exponential backoff, before the run fails (S3; other stores use their client's own retries).
    storage_retry_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.output_dir.strip():
            raise ConfigError("run.output_dir", "must not be empty")
        _no_credentials("run.output_dir", self.output_dir)
        _check_range("run.checkpoint_steps", self.checkpoint_steps, 0, 10_000_000)
        _check_range("run.log_every_steps", self.log_every_steps, 0, 10_000_000)
        _check_range("run.lease_s", self.lease_s, 2.0, 86_400.0)
        _check_range("run.storage_retry_s", self.storage_retry_s, 0.0, 3_600.0)


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """How ``imdb-dist launch`` / ``job/train.py`` run the job on a Ray cluster.

    Ray Train starts ``num_workers`` processes, each with
    ``resources_per_worker``, and wires them into a MultiWorkerMirroredStrategy.
    The run directory is ``storage_path/name``: a resubmitted job with the same
    two resumes from the last checkpoint there.
    """

    # An int: that many workers. [min, max]: Ray Train's elastic scaling: the
    # job starts once min workers fit, continues with the workers that fit
    # after losing some, and grows back from the latest checkpoint when
    # capacity returns (checked every resize_interval_s). The global batch
    # is the same at every size (imdb_dist.data.plan).
    num_workers: int | tuple[int, int] = 2
    resize_interval_s: float = 60.0
    use_gpu: bool = False
    # e.g. {CPU: 8, GPU: 8} for one worker per 8-GPU node.
    resources_per_worker: dict[str, float] = dataclasses.field(default_factory=lambda: {"CPU": 1.0})
    # Must be shared by all nodes (NFS, a PVC) in a multi-node cluster.
    storage_path: str = "runs/ray"
    name: str = "imdb-dist"
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    # TFRecord files each prepared split is written into (every worker reads
    # all of them, in parallel; the global plan picks each step's examples).
    num_shards: int = 16
    # use_gpu on a cluster without GPUs for every worker: 0 fails at once
    # (exit 2); N asks the cluster's autoscaler for them and waits up to N
    # seconds (imdb_dist.launch.check_gpus says why not Ray Train's own wait).
    gpu_wait_s: float = 0.0
    # How often Ray Train's controller polls the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, which
    # this sets; Ray's default is 2 s). It collects their ray.train.report calls then, and a
    # worker's report waits until its previous one was collected: a job checkpointing more often
    # than this trains at one checkpoint per poll (bench.checkpoint_pace). The controller notices
    # failed workers and resizes at the same pace. It wins over the variable in the environment.
    report_poll_s: float = 0.5

    def __post_init__(self) -> None:
        _no_credentials("ray.storage_path", self.storage_path)
        if isinstance(self.num_workers, tuple):
            low, high = self.num_workers
            _check_range("ray.num_workers[0]", low, 1, 100_000)
            _check_range("ray.num_workers[1]", high, low, 100_000)
        else:
            _check_range("ray.num_workers", self.num_workers, 1, 100_000)
        _check_range("ray.resize_interval_s", self.resize_interval_s, 0.0, 86_400.0)
        _check_range("ray.max_failures", self.max_failures, -1, 100_000)
        _check_range("ray.checkpoints_to_keep", self.checkpoints_to_keep, 1, 100_000)
        _check_range("ray.num_shards", self.num_shards, 1, 100_000)
        _check_range("ray.gpu_wait_s", self.gpu_wait_s, 0.0, 86_400.0)
        _check_range("ray.report_poll_s", self.report_poll_s, 0.05, 60.0)
        for resource, amount in self.resources_per_worker.items():
            _check_range(f"ray.resources_per_worker.{resource}", amount, 0.0, 1_000_000.0)
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


SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
METRIC_MODES = {"val_accuracy": "max", "val_loss": "min"}
# Keys a search may not vary: where results go, and the search itself.
_UNTUNABLE = ("run.output_dir", "ray.storage_path", "ray.name")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """``imdb-dist tune``: a Ray Tune search over this config's own keys (train and launch ignore it).

    ``space`` maps dotted config keys to one of ``{choice: [values]}``,
    ``{grid: [values]}`` (every value, ``trials`` times each),
    ``{uniform: [low, high]}``, ``{loguniform: [low, high]}`` or
    ``{randint: [low, high]}`` (``high`` excluded). Each trial trains the
    config with its sampled values in its own run directory.
    """

    space: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    trials: int = 4
    # Trials at once; 0: as many as the cluster's CPUs hold at cpus_per_trial.
    concurrency: int = 0
    # A single-process trial's CPUs (its TensorFlow thread pools follow them).
    cpus_per_trial: float = 1.0
    # 1: each trial trains in one process; N > 1: each trial is a Ray Train
    # run of N workers (ray.num_workers), each with ray.resources_per_worker.
    workers_per_trial: int = 1
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    # >= 2: every trial trains each fold of data.folds-style k-fold splits
    # and is scored by the folds' mean metric (no early stopping then).
    folds: int = 0
    # ASHA: stop the trials whose per-epoch metric trails, after grace_epochs.
    early_stop: bool = True
    grace_epochs: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_range("tune.trials", self.trials, 1, 100_000)
        _check_range("tune.concurrency", self.concurrency, 0, 100_000)
        _check_range("tune.cpus_per_trial", self.cpus_per_trial, 0.0, 100_000.0, low_open=True)
        _check_range("tune.grace_epochs", self.grace_epochs, 1, 100_000)
        _check_range("tune.workers_per_trial", self.workers_per_trial, 1, 100_000)
        if self.folds != 0:
            _check_range("tune.folds", self.folds, 2, 100)

    @property
    def mode(self) -> str:
        """``max`` or ``min``: which way the metric improves."""
        return METRIC_MODES[self.metric]


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole job."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distribution: DistributionConfig = dataclasses.field(default_factory=DistributionConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        # The first conv + pool must see at least one window of real length.
        if self.data.max_len < self.model.kernel_size + self.model.pool_size - 1:
            raise ConfigError(
                "data.max_len",
                f"{self.data.max_len} is shorter than model.kernel_size + model.pool_size - 1 "
                f"({self.model.kernel_size + self.model.pool_size - 1})",
            )


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build the config from defaults, an optional YAML file, and ``key=value`` overrides.

    Args:
        path: a YAML file whose nested mapping mirrors :class:`Config`.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML
            scalars and then checked against the field's type.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key, wrong type or
            out-of-range value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    return _build(Config, raw, prefix="")


def with_values(config: Config, values: dict[str, Any]) -> Config:
    """``config`` with dotted keys set to ``values``, type- and range-checked like ``--set``."""
    raw = to_dict(config)
    for key, value in values.items():
        _set(raw, key, value)
    return _build(Config, raw, prefix="")


def check_space(config: Config) -> None:
    """Refuse a ``tune.space`` that is empty or names a key, kind or range no trial could train.

    Every value a trial could be given is checked against its key's type and
    range (a range by its ends), so a bad space fails before any trial starts.
    """
    space = config.tune.space
    if not space:
        raise ConfigError("tune.space", "is empty: name at least one config key to search over")
    base = dataclasses.replace(config, tune=TuneConfig())
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if key.startswith("tune.") or key in _UNTUNABLE:
            raise ConfigError(where, "cannot be searched over")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(where, f"must be one of {', '.join(f'{{{k}: [...]}}' for k in SPACE_KINDS)}")
        ((kind, values),) = spec.items()
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}", "must be a non-empty list")
        if kind in ("choice", "grid"):
            candidates = values
        else:
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"{where}.{kind}", f"must be [low, high], not {values!r}")
            low, high = values
            if not low < high:
                raise ConfigError(f"{where}.{kind}", f"impossible range: low {low!r} is not below high {high!r}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}.{kind}", f"impossible range: loguniform needs low > 0, not {low!r}")
            if kind == "randint" and not all(isinstance(v, int) for v in values):
                raise ConfigError(f"{where}.{kind}", f"needs integer ends, not {values!r}")
            candidates = [low, high - 1] if kind == "randint" else [float(low), float(high)]
        for value in candidates:
            try:
                with_values(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(where, f"{value!r} is not a valid value ({exc})") from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a config from :func:`to_dict` output (e.g. after crossing a process boundary)."""
    return _build(Config, raw, prefix="")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc}") from None
    try:
        # safe_load never constructs Python objects from tags like !!python/object.
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("", f"invalid YAML in {path}{line}: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", f"override {item!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not a YAML scalar: keep the string and let the type check judge.
    _set(raw, key, value)


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in the nested mapping ``raw``; :func:`_build` then judges names, types and ranges."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip("."), f"must be a mapping, not {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be ints or bools
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key (known here: {known})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, prefix=f"{key}.")
        else:
            values[name] = _coerce(key, hint, value)
    return cls(**values)


def _describe(hint: Any) -> str:
    """A type hint in words: ``int``, ``a list of 2 int``, ``a list of str``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return f"a list of {args[0].__name__}" if Ellipsis in args else f"a list of {len(args)} {args[0].__name__}"
    return getattr(hint, "__name__", str(hint))


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against ``hint``; the only conversions are int/numeric str->float and list->tuple."""
    if hint is Any:
        return value  # tune.space values: check_space judges them against their own keys
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, inner[0], value)
        for option in inner:  # int | tuple[int, int]: the first that fits
            try:
                return _coerce(key, option, value)
            except ConfigError:
                pass
        kinds = " or ".join(_describe(option) for option in inner)
        raise ConfigError(key, f"expected {kinds}, got {type(value).__name__} {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(key, args[0], k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        if Ellipsis not in args and len(value) != len(args):  # tuple[int, int]: exactly two
            raise ConfigError(key, f"expected a list of {len(args)}, got {len(value)}: {list(value)!r}")
        return tuple(_coerce(f"{key}[{i}]", args[0 if Ellipsis in args else i], v) for i, v in enumerate(value))
    # bool is an int subclass: never let `true` pass for a count, or 1 for a flag.
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-3 as a string; it is how learning rates are written.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(key, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML, in field order, loadable by :func:`load_config`."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
