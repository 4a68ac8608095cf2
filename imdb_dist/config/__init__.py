"""The job's configuration: frozen dataclasses, loaded from YAML, validated.

Precedence is ``--set`` overrides > YAML file > dataclass defaults. Every
value is checked against its field's type when it is loaded, and every field
against its allowed range, so a typo or an impossible value fails before any
data is read, naming the dotted key at fault.

The package, by job: :mod:`~imdb_dist.config.job` and
:mod:`~imdb_dist.config.cluster` hold the sections (each field with its
one-line meaning), :mod:`~imdb_dist.config.schema` the whole :class:`Config`,
:mod:`~imdb_dist.config.loading` YAML, ``--set`` and type checks, and
:mod:`~imdb_dist.config.reference` writes docs/configuration.md from the
sections. It imports nothing of imdb_dist above it but :mod:`imdb_dist.errors`
(and :mod:`imdb_dist.storage`, on first use, to refuse credentials).
"""

from imdb_dist.config.cluster import METRIC_MODES, RayConfig, TuneConfig
from imdb_dist.config.job import (
    OFFICIAL_SHA256,
    OFFICIAL_URL,
    Collective,
    DataConfig,
    DistributionConfig,
    EmbeddingGradient,
    ModelConfig,
    Precision,
    RunConfig,
    Schedule,
    Source,
    Strategy,
    TrainConfig,
    Transport,
)
from imdb_dist.config.loading import (
    config_from_dict,
    dump_yaml,
    load_config,
    to_dict,
    with_values,
)
from imdb_dist.config.schema import Config
from imdb_dist.config.tracking import TrackingConfig

__all__ = [
    "METRIC_MODES",
    "OFFICIAL_SHA256",
    "OFFICIAL_URL",
    "Collective",
    "Config",
    "DataConfig",
    "DistributionConfig",
    "EmbeddingGradient",
    "ModelConfig",
    "Precision",
    "RayConfig",
    "RunConfig",
    "Schedule",
    "Source",
    "Strategy",
    "TrackingConfig",
    "TrainConfig",
    "Transport",
    "TuneConfig",
    "config_from_dict",
    "dump_yaml",
    "load_config",
    "to_dict",
    "with_values",
]
