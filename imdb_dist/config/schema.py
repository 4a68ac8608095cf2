"""The whole job's config: one frozen dataclass of the sections, and the checks that span two of them."""

from __future__ import annotations

import dataclasses

from imdb_dist.config.cluster import RayConfig, TuneConfig
from imdb_dist.config.job import (
    DataConfig,
    DistributionConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from imdb_dist.config.tracking import TrackingConfig
from imdb_dist.errors import ConfigError


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
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # The first conv + pool must see at least one window of real length.
        if self.data.max_len < self.model.kernel_size + self.model.pool_size - 1:
            raise ConfigError(
                "data.max_len",
                f"{self.data.max_len} is shorter than model.kernel_size + model.pool_size - 1 "
                f"({self.model.kernel_size + self.model.pool_size - 1})",
            )
