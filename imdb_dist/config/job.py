"""The training job's sections: the data, the network, the optimisation, the devices and the run directory.

Each field's one-line meaning is the string right after it (read by
:mod:`imdb_dist.config.reference` for docs/configuration.md); a ``#``
comment above a field says why it is the way it is.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from pathlib import PurePosixPath
from typing import Literal

from imdb_dist.config.checks import check_range, no_credentials
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


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the reviews come from and how they are encoded."""

    source: Source = "auto"
    """`aclimdb` (a directory or .tar.gz), `download` (fetch `data.url`, verify `data.sha256`, cache it, read it as
    aclimdb), `tfds` (`imdb_reviews`), `keras` (`keras.datasets.imdb`), or `auto` (`data.path` or `$IMDB_DATA` as
    aclimdb, else download)."""
    path: str | None = None
    """aclimdb: the directory or .tar.gz; download: the cache directory (default `$IMDB_DIST_CACHE`, else
    `$XDG_CACHE_HOME/imdb-dist`, else `~/.cache/imdb-dist`); tfds: its `data_dir`; keras: an `imdb.npz`."""
    # A file that does not match data.sha256 is never cached (imdb_dist.data.download).
    url: str = OFFICIAL_URL
    """The aclImdb archive `download` fetches (`https://`, `http://` or `file://`)."""
    sha256: str = OFFICIAL_SHA256
    """The sha256 the downloaded archive must have; default: the official archive's published one."""
    validation_fraction: float = 0.1
    """The seeded share of the training reviews held out for validation, in (0, 0.5]."""
    # k-fold cross-validation: running every fold estimates accuracy with a
    # mean and spread (python -m bench.accuracy --folds K).
    folds: int = 0
    """>= 2: validate on fold `data.fold` of a seeded partition into this many parts instead of
    `validation_fraction`; 0: one split."""
    fold: int = 0
    """With `data.folds`: the fold (0-based) held out for validation."""
    seed: int = 1337
    """The validation split and every step's global batch (a function of seed, epoch and step, never of the
    topology)."""
    vocab_size: int = 20000
    """Token ids, including padding (0) and unknown (1)."""
    max_len: int = 400
    """Tokens kept per review: the last `max_len`, padded in front."""
    bucketing: bool = True
    """Batch reviews of similar length together, so short ones are not padded to `max_len`."""
    bucket_width: int = 50
    """Bucketed batches are padded to a multiple of this many tokens."""

    def __post_init__(self) -> None:
        if self.path is not None:
            no_credentials("data.path", self.path)
        no_credentials("data.url", self.url)
        check_range("data.validation_fraction", self.validation_fraction, 0.0, 0.5, low_open=True)
        if self.folds != 0:
            check_range("data.folds", self.folds, 2, 100)
            check_range("data.fold", self.fold, 0, self.folds - 1)
        elif self.fold != 0:
            raise ConfigError("data.fold", f"{self.fold} needs data.folds >= 2 (0: one validation_fraction split)")
        check_range("data.vocab_size", self.vocab_size, 3, 1_000_000)
        check_range("data.max_len", self.max_len, 8, 10_000)
        check_range("data.bucket_width", self.bucket_width, 8, 10_000)
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
    """Embedding width."""
    dropout: float = 0.25
    """Dropout after the embedding, in [0, 1)."""
    conv_filters: int = 64
    """Conv1D filters (relu, valid padding)."""
    kernel_size: int = 5
    """Conv1D kernel width, in tokens."""
    pool_size: int = 4
    """MaxPooling1D window."""
    lstm_units: int = 70
    """LSTM units (with cuDNN-eligible arguments)."""
    # Costs members x the compute (imdb_dist.model).
    members: int = 1
    """A deep ensemble: this many networks of these layers, trained side by side from their own initialisations
    and dropout masks, served as the mean of their probabilities (`val_accuracy` is the ensemble's)."""

    def __post_init__(self) -> None:
        check_range("model.members", self.members, 1, 64)
        for name in ("embedding_dim", "conv_filters", "kernel_size", "pool_size", "lstm_units"):
            check_range(f"model.{name}", getattr(self, name), 1, 100_000)
        check_range("model.dropout", self.dropout, 0.0, 1.0, high_open=True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation: the global batch is split evenly across all replicas."""

    epochs: int = 2
    """Epochs to train."""
    batch_size: int = 64
    """The **global** batch, split evenly across the replicas (which must divide it); an epoch is
    `n // batch_size` full global batches."""
    learning_rate: float = 0.001
    """Adam's learning rate."""
    # train.epochs as configured when the run starts or resumes.
    lr_schedule: Schedule = "constant"
    """`cosine`: decay the learning rate to 0 over `train.epochs`; `constant`: keep it."""
    mixed_precision: Precision = "auto"
    """`auto` (float16 on GPU, float32 on CPU), `float32`, `mixed_float16` (GPUs, or emulated in a CPU rehearsal),
    or `mixed_bfloat16`."""
    early_stopping_patience: int = 0
    """Epochs without a better `val_loss` before stopping, the best epoch's weights restored; 0: off."""
    steps_per_execution: int = 1
    """Optimizer steps per `tf.function` call, i.e. per dispatch from the host."""
    seed: int = 1337
    """Weight initialisation and the dropout masks (keyed on seed, step and replica)."""
    # Costs speed; see docs/BENCHMARKS.md.
    deterministic: bool = False
    """TensorFlow's op determinism: two runs of one config on one machine give identical weights."""

    def __post_init__(self) -> None:
        check_range("train.epochs", self.epochs, 1, 100_000)
        check_range("train.batch_size", self.batch_size, 1, 1_000_000)
        check_range("train.learning_rate", self.learning_rate, 0.0, 10.0, low_open=True)
        check_range("train.early_stopping_patience", self.early_stopping_patience, 0, 100_000)
        check_range("train.steps_per_execution", self.steps_per_execution, 1, 100_000)


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
    """Which tf.distribute strategy runs the replicas, and how they combine gradients."""

    strategy: Strategy = "auto"
    """`default` (one replica), `mirrored` (the local devices), `multi_worker` (Ray Train's workers, TF_CONFIG), or
    `auto`: multi_worker under TF_CONFIG, else mirrored with `cpu_devices` or several GPUs, else default."""
    devices: tuple[str, ...] = ()
    """mirrored only: the devices to mirror over (e.g. `["/gpu:0", "/gpu:1"]`); empty: all GPUs."""
    # The routes are imdb_dist.aggregation's.
    embedding_gradient: EmbeddingGradient = "auto"
    """How replicas combine the embedding's gradient: gather its rows (`sparse`), all-reduce the dense table
    (`dense`), or whichever sends fewer bytes at a full-length batch (`auto`)."""
    # bfloat16 rounds the gradient to 8 significant bits; its error and speed
    # are in docs/BENCHMARKS.md.
    embedding_transport: Transport = "float32"
    """The dtype the dense embedding gradient is all-reduced in: `bfloat16` sends half the bytes of a step's
    largest all-reduce; only the dense route uses it."""
    cpu_devices: int = 0
    """N >= 2: split the host CPU into N logical devices, one replica each (MirroredStrategy in one process, N
    local replicas per Ray worker): a multi-GPU job rehearsed on CPU; 0: off."""
    # TensorFlow's own AUTO would pick its ring even across GPU nodes
    # (imdb_dist.distribute.collective_for).
    collective: Collective = "auto"
    """How replicas all-reduce: `nccl` (GPUs only), `ring` (TensorFlow's gRPC ring across workers, a copy through
    one device within a process), or `auto` (`nccl` where the replicas are GPUs, else `ring`)."""

    def __post_init__(self) -> None:
        check_range("distribution.cpu_devices", self.cpu_devices, 0, 64)
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
    """The run directory: a path, or a storage URI (`s3://...`)."""
    checkpoint_steps: int = 0
    """Also checkpoint every N optimizer steps; 0: at the end of each epoch only."""
    log_every_steps: int = 0
    """Training loss, accuracy, learning rate and examples/s every N optimizer steps (steps.jsonl, TensorBoard,
    curves.png); 0: about 40 points per epoch."""
    # imdb_dist.lease renews it every quarter of this.
    lease_s: float = 60.0
    """The run directory's lease: a run that stopped renewing it this long ago is dead, and its directory is
    taken over."""
    # Other stores than S3 use their client's own retries.
    storage_retry_s: float = 60.0
    """How long each call to S3 retries a refused connection or a server error, with exponential backoff, before
    the run fails."""

    def __post_init__(self) -> None:
        if not self.output_dir.strip():
            raise ConfigError("run.output_dir", "must not be empty")
        no_credentials("run.output_dir", self.output_dir)
        check_range("run.checkpoint_steps", self.checkpoint_steps, 0, 10_000_000)
        check_range("run.log_every_steps", self.log_every_steps, 0, 10_000_000)
        check_range("run.lease_s", self.lease_s, 2.0, 86_400.0)
        check_range("run.storage_retry_s", self.storage_retry_s, 0.0, 3_600.0)
