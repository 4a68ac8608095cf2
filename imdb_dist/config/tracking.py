"""The experiment-tracking section: where the chief logs each run (MLflow), off by default."""

from __future__ import annotations

import dataclasses
import re

from imdb_dist.config.checks import check_range, no_credentials
from imdb_dist.errors import ConfigError

# The tracking URIs a run can use: a server, or a server-less local SQLite store.
_SCHEMES = ("http://", "https://", "sqlite:///")
# MLflow's own limits on an experiment's and a tag's name.
_NAME = re.compile(r"[^\x00-\x1f]{1,250}")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking: one MLflow run per job, whatever resumes, restarts or resizes it (docs/tracking.md)."""

    # Credentials come from MLflow's own environment variables (MLFLOW_TRACKING_TOKEN, or
    # MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD), never from the URI.
    uri: str = ""
    """The MLflow tracking URI: `http(s)://host:port` (a tracking server) or `sqlite:///path.db` (a local store,
    no server); empty: no tracking. Needs the `tracking` extra (`pip install 'imdb-dist[tracking]'`)."""
    experiment: str = "imdb-dist"
    """The MLflow experiment the run is logged in (created if missing)."""
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    """Tags set on the MLflow run, e.g. `{team: nlp}`."""
    registered_model: str = ""
    """The registered model the exported model becomes a version of, where the server has a model registry;
    empty: the experiment's name."""
    # A later outage is retried in the background; this bounds only the wait at the very end.
    flush_timeout_s: float = 60.0
    """At the end of a run, how long to wait for a tracker that does not answer before warning and leaving it behind
    (the run's own files are complete, and a resubmit catches the tracker up)."""

    def __post_init__(self) -> None:
        if self.uri:
            no_credentials("tracking.uri", self.uri,
                           "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
            if not self.uri.lower().startswith(_SCHEMES):
                raise ConfigError("tracking.uri", f"{self.uri!r} must start with {', '.join(_SCHEMES)}")
        if not _NAME.fullmatch(self.experiment):
            raise ConfigError("tracking.experiment", f"{self.experiment!r} must be 1 to 250 printable characters")
        for name, value in self.tags.items():
            if not _NAME.fullmatch(name) or name.startswith("mlflow."):
                raise ConfigError(f"tracking.tags.{name}", "a tag's name: 1 to 250 printable characters, not mlflow.*")
            if len(value) > 8000:
                raise ConfigError(f"tracking.tags.{name}", "a tag's value holds at most 8000 characters")
        if self.registered_model and not _NAME.fullmatch(self.registered_model):
            raise ConfigError("tracking.registered_model", f"{self.registered_model!r} is no model name")
        check_range("tracking.flush_timeout_s", self.flush_timeout_s, 0.0, 86_400.0)

    @property
    def enabled(self) -> bool:
        return bool(self.uri)

    @property
    def model_name(self) -> str:
        return self.registered_model or self.experiment
