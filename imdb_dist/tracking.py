"""Experiment tracking in MLflow: one MLflow run per job, whatever resumes, restarts or resizes it (docs/tracking.md).

- The command that starts a job (``imdb-dist train``, the Ray launcher, a
  sweep's trial) checks the tracker before anything is written
  (:func:`check`), then opens the job's MLflow run once and keeps its id in
  the run directory (:func:`open_run`, ``tracking.json``): every later
  attempt attaches to it.
- The chief (:class:`Tracker`) mirrors the run directory's own logs into it
  after every checkpoint, and the results and model at the end, from one
  background thread that retries a tracker that is down while training goes on.

**No step is logged twice**: the chief sends only what a checkpoint made
durable (no resume drops it), and an attaching attempt sends only what lies
beyond the last step the server holds of each metric family.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imdb_dist import storage
from imdb_dist.config import Config, TrackingConfig, to_dict
from imdb_dist.errors import ConfigError, InputError
from imdb_dist.fingerprint import flatten
from imdb_dist.rundir import (
    CONFIG,
    CURVES,
    FINGERPRINT,
    METRICS,
    MODEL,
    REPORT,
    STEPS,
    TRACKING,
    RunDir,
)

log = logging.getLogger(__name__)

# steps.jsonl's values, logged as step_<name> (TensorBoard's names for the same points).
STEP_VALUES = ("loss", "accuracy", "learning_rate", "examples_per_s")
# MLflow's limits on one log_batch call.
_BATCH_METRICS, _BATCH_PARAMS = 1000, 100
_PARAM_CHARS = 6000
# How long the check at start waits for a server: a typo in the URI should not hold a command for minutes.
_CHECK_TIMEOUT_S = 5.0
# Backoff between attempts of a send the server did not answer: doubling up to this.
_MAX_BACKOFF_S = 30.0
# The MLflow error codes that are the server's answer to the request itself: retrying cannot help.
_ANSWERED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
             "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "FEATURE_DISABLED", "ENDPOINT_NOT_FOUND"}


def client(cfg: TrackingConfig) -> Any:
    """An ``MlflowClient`` for ``cfg.uri``, our retries in charge of its HTTP requests.

    Raises:
        ConfigError: the ``mlflow`` package (the ``tracking`` extra) is not installed.
    """
    # MLflow retries a request 7 times with backoff (minutes) by default: the check at start must answer in
    # seconds, and the sender's own loop retries while training goes on. A user's own setting wins.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow prints its own "View run" line when a run ends; the finished run's link is our line.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return client_class(cfg)(tracking_uri=cfg.uri, registry_uri=cfg.uri)


def client_class(cfg: TrackingConfig) -> Any:
    """``mlflow.MlflowClient``.

    Raises:
        ConfigError: the ``mlflow`` package (the ``tracking`` extra) is not installed.
    """
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError(
            "tracking.uri", "tracking needs the MLflow client: pip install 'imdb-dist[tracking]'"
        ) from None
    for name in ("alembic", "mlflow"):  # a SQLite store's migrations and MLflow's notices: not our lines
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient


def check(cfg: TrackingConfig) -> None:
    """Before anything is written: the tracker answers and lets us in, and the experiment can be had.

    Raises:
        InputError: no server answers at ``tracking.uri``, or it refuses (naming the URI redacted).
    """
    if not cfg.enabled:
        return
    shown = storage.redact(cfg.uri)
    client_class(cfg)  # the extra is installed
    if cfg.uri.lower().startswith(("http://", "https://")):
        import requests  # MLflow's own HTTP client: the same proxies and CA bundle (REQUESTS_CA_BUNDLE)

        # MLflow's /health answers without credentials: an unreachable server fails here, in seconds.
        # TLS as MLflow's client does it: its CA file, or its insecure switch.
        verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or (
            os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true")
        try:
            requests.get(cfg.uri.rstrip("/") + "/health", timeout=_CHECK_TIMEOUT_S, verify=verify).raise_for_status()
        except requests.RequestException as exc:
            raise InputError(f"tracking.uri {shown}: no MLflow server answers there ({reason(exc)})") from None
    try:
        experiment_id(client(cfg), cfg.experiment)  # a SQLite store is opened (created) here
    except Exception as exc:  # noqa: BLE001 - MlflowException, or the store's own (SQLAlchemy's, requests')
        raise InputError(f"tracking.uri {shown}: the tracker refused: {reason(exc)}") from None


def experiment_id(mlflow: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing (another process creating it at once is fine)."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise InputError(f"tracking.experiment {name!r} is deleted on the server: restore it or choose another")
        return found.experiment_id
    try:
        return mlflow.create_experiment(name)
    except Exception:
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def open_run(cfg: Config, run_dir: RunDir, *, parent: str | None = None, name: str | None = None) -> str | None:
    """The MLflow run of the job in ``run_dir``: the one it keeps, or a new one (kept there now).

    Called by the command that holds the run directory, after it has written
    the config, before any training: a job's every attempt finds the id in
    ``tracking.json``. A run kept for another tracking URI is replaced.
    ``parent``: the sweep's (or trial's) run, for a nested run.
    Returns the run id, or None when tracking is off.
    """
    if not cfg.tracking.enabled:
        return None
    run_dir.fetch([TRACKING])
    kept = run_dir.tracked_run()
    if kept is not None and kept.get("uri") == storage.redact(cfg.tracking.uri):
        return str(kept["run_id"])
    mlflow = client(cfg.tracking)
    tags = {**cfg.tracking.tags, "imdb_dist.run_dir": str(run_dir)}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent
    fingerprint = run_dir.work / FINGERPRINT
    if fingerprint.exists():
        for key, value in json.loads(fingerprint.read_text()).items():
            if key != "config":  # the params hold it, key by key
                tags[f"fingerprint.{key}"] = json.dumps(value) if not isinstance(value, str) else value
    run = mlflow.create_run(experiment_id(mlflow, cfg.tracking.experiment), tags=tags,
                            run_name=name or Path(str(run_dir.location.path)).name)
    run_id = run.info.run_id
    log_params(mlflow, run_id, config_params(cfg))
    run_dir.record_tracked_run({"uri": storage.redact(cfg.tracking.uri), "run_id": run_id,
                                "experiment": cfg.tracking.experiment})
    log.info("tracking: MLflow run %s in experiment %r at %s", run_id, cfg.tracking.experiment,
             storage.redact(cfg.tracking.uri))
    return run_id


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as JSON (strings as they are), cut to MLflow's limit."""
    return {key: (value if isinstance(value, str) else json.dumps(value))[:_PARAM_CHARS]
            for key, value in flatten(to_dict(cfg)).items()}


def log_params(mlflow: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in sorted(params.items())]
    for start in range(0, len(items), _BATCH_PARAMS):
        mlflow.log_batch(run_id, params=items[start : start + _BATCH_PARAMS])


def machine_tags(worker: Any) -> dict[str, str]:
    """What trains this attempt: the CPU, the accelerators, the replicas and workers (tags change on a resize)."""
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpus = [tf.config.experimental.get_device_details(d).get("device_name", d.name)
            for d in tf.config.list_physical_devices("GPU")]
    return {"machine.cpu": cpu, "machine.cpus": str(os.cpu_count() or 0),
            "machine.gpus": ", ".join(gpus) or "none", "replicas": str(worker.replicas),
            "workers": str(worker.num_workers), "precision": worker.precision,
            "strategy": type(worker.strategy).__name__}


class Tracker:
    """The chief's side: mirrors the run directory's logs and results into the job's MLflow run, in the background.

    ``steps_per_epoch`` places each epoch line at its global step.
    """

    def __init__(self, cfg: Config, run_dir: RunDir, steps_per_epoch: int, *, tags: dict[str, str] | None = None
                 ) -> None:
        run_dir.fetch([TRACKING])
        kept = run_dir.tracked_run()
        if kept is None:
            raise InputError(f"{run_dir} has no {TRACKING}: the command that started the job did not open its "
                             "MLflow run")
        self.cfg, self.run_dir, self.steps_per_epoch = cfg.tracking, run_dir, steps_per_epoch
        self.run_id: str = kept["run_id"]
        self._mlflow: Any = None  # opened by the thread: a SQLite store on a slow disk must not hold training
        self._experiment_id = ""
        self._marks: dict[str, int] | None = None  # the server's last step per metric family, read on attach
        self._latest: tuple[list[dict], list[dict], list[dict]] | None = None
        self._behind: tuple[list[dict], list[dict], list[dict]] | None = None  # mirror(one_behind=True)
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._wait_s = 0.0
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="tracking", daemon=True)
        self._thread.start()
        self._put("attach", lambda: self._attach(tags or {}))

    # -- what the training side calls (cheap: the thread does the talking) -----------------------

    def mirror(self, *, one_behind: bool = False) -> None:
        """After a checkpoint: send the server what the run directory's logs held at a durable checkpoint.

        ``one_behind`` (Ray): ``ray.train.report`` returns once Ray Train has
        collected the previous report (its queue holds one), not this one, so
        the records as of the previous checkpoint are sent; the end sends the rest.
        """
        current = (self.run_dir.log(STEPS).records(), self.run_dir.log(METRICS).records(),
                   self.run_dir.worker_groups())
        snapshot, self._behind = (self._behind, current) if one_behind else (current, None)
        if snapshot is None:
            return
        with self._lock:
            pending, self._latest = self._latest is not None, snapshot
        if not pending:  # one queued flush sends the latest snapshot, however many checkpoints an outage spans
            self._put("metrics", self._flush)

    def finish(self, model_version: Path | None) -> None:
        """At the end of the run: the last records, the results as artifacts, a model version, FINISHED; then wait."""
        self.mirror()
        self._put("artifacts", lambda: self._artifacts(model_version))
        self._put("status", lambda: self._mlflow.set_terminated(self.run_id, "FINISHED"))
        self.close()
        if not self._thread.is_alive() and self._down_since is None:
            where = storage.redact(self.cfg.uri)
            link = (f"{where.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self.run_id}"
                    if where.lower().startswith(("http://", "https://")) else where)
            log.info("tracking: MLflow run %s is complete: %s", self.run_id, link)

    def close(self, status: str | None = None, wait_s: float | None = None) -> None:
        """Send what is queued (``status``, e.g. ``FAILED`` or ``KILLED``, last), waiting at most ``wait_s``."""
        if status is not None:
            self._put("status", lambda: self._mlflow.set_terminated(self.run_id, status))
        wait = self.cfg.flush_timeout_s if wait_s is None else min(wait_s, self.cfg.flush_timeout_s)
        # The wait is for a tracker that does not answer: each send that goes through starts it again,
        # so a large model's upload to a slow but working server is not cut short.
        self._wait_s = wait
        self._deadline = time.monotonic() + wait
        self._queue.put(None)
        self._closing.set()
        while self._thread.is_alive() and time.monotonic() < self._deadline:
            self._thread.join(timeout=0.1)
        if self._thread.is_alive() or self._down_since is not None:
            log.warning(
                "tracking: the MLflow server at %s did not take the run's last records within "
                "tracking.flush_timeout_s=%gs; MLflow run %s is behind (the run's own files are complete: "
                "resubmitting the job catches it up)", storage.redact(self.cfg.uri), wait, self.run_id)

    # -- the background thread -------------------------------------------------------------------------

    def _put(self, what: str, send: Callable[[], None]) -> None:
        self._queue.put((what, send))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            what, send = item
            backoff = 1.0
            while True:
                try:
                    send()
                    if self._closing.is_set():
                        self._deadline = time.monotonic() + self._wait_s
                    if self._down_since is not None:
                        log.info("tracking: the MLflow server answers again after %.0f s; sending what waited",
                                 time.monotonic() - self._down_since)
                        self._down_since = None
                    break
                except Exception as exc:  # noqa: BLE001 - the client raises many types; none may stop training
                    if _answered(exc):
                        log.warning("tracking: the MLflow server refused the %s (%s); left out", what, reason(exc))
                        break
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        log.warning("tracking: cannot send the %s to %s (%s); retrying in the background, "
                                    "training goes on", what, storage.redact(self.cfg.uri), reason(exc))
                    if self._closing.is_set():  # the run's end waits: try every second until its deadline
                        if time.monotonic() >= self._deadline:
                            return
                        time.sleep(1.0)
                    else:
                        self._closing.wait(backoff)  # woken at once when the run ends
                        backoff = min(2 * backoff, _MAX_BACKOFF_S)

    def _attach(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if self._mlflow is None:
            self._mlflow = client(self.cfg)
        self._mlflow.update_run(self.run_id, status="RUNNING")
        self._experiment_id = self._mlflow.get_run(self.run_id).info.experiment_id
        if tags:
            self._mlflow.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        # How far the run got: the last step of the step points and of the epoch lines (an attempt never
        # sends beyond a checkpoint), and how many worker groups (two may start from one step).
        marks = {}
        for family, key in (("steps", "step_loss"), ("epochs", "loss")):
            marks[family] = max((m.step for m in self._mlflow.get_metric_history(self.run_id, key)), default=-1)
        marks["groups"] = len(self._mlflow.get_metric_history(self.run_id, "workers"))
        self._marks = marks

    def _flush(self) -> None:
        from mlflow.entities import Metric, RunTag

        with self._lock:
            latest, self._latest = self._latest, None
        if latest is None or self._marks is None:
            return
        steps, epochs, groups = latest
        try:
            now = int(time.time() * 1000)
            # One record's metrics always go in one (atomic) batch: the marks above stay exact.
            records: list[tuple[str, int, list[Any], list[Any]]] = []
            for record in steps:
                if record["step"] > self._marks["steps"]:
                    values = [Metric(f"step_{k}", float(record[k]), now, record["step"])
                              for k in STEP_VALUES if k in record]
                    records.append(("steps", record["step"], values, []))
            for record in epochs:
                step = record["epoch"] * self.steps_per_epoch
                if step > self._marks["epochs"]:
                    values = [Metric(k, float(v), now, step) for k, v in record.items()
                              if k not in ("epoch", "wall_s") and isinstance(v, (int, float))]
                    values.append(Metric("epoch", float(record["epoch"]), now, step))
                    records.append(("epochs", step, values, []))
            for index, group in enumerate(groups[self._marks["groups"]:], start=self._marks["groups"]):
                step = (group["epoch"] - 1) * self.steps_per_epoch + group["step"]
                tag = RunTag(f"worker_group.{index + 1}",
                             f"{group['workers']} worker(s), {group['cause']}, from epoch {group['epoch']} "
                             f"step {group['step']}")
                # At the group's own start time: MLflow keeps one metric per (key, step, value, timestamp),
                # and two groups of one size may start from one checkpoint.
                start = int(group["time"] * 1000) + index  # + index: two starts within a millisecond
                records.append(("groups", step, [Metric("workers", float(group["workers"]), start, step)], [tag]))
            batch: list[Any] = []
            tags: list[Any] = []
            done: list[tuple[str, int]] = []
            for family, step, values, extra in records:
                if batch and len(batch) + len(values) > _BATCH_METRICS:
                    self._send(batch, tags, done)
                    batch, tags, done = [], [], []
                batch += values
                tags += extra
                done.append((family, step))
            if batch:
                self._send(batch, tags, done)
        except BaseException:
            with self._lock:  # not sent: keep it, unless a newer snapshot came meanwhile
                if self._latest is None:
                    self._latest = latest
            raise

    def _send(self, metrics: list[Any], tags: list[Any], done: list[tuple[str, int]]) -> None:
        assert self._marks is not None
        self._mlflow.log_batch(self.run_id, metrics=metrics, tags=tags)
        for family, step in done:
            self._marks[family] = self._marks[family] + 1 if family == "groups" else max(self._marks[family], step)

    def _artifacts(self, model_version: Path | None) -> None:
        work = self.run_dir.work
        present = {item.path for item in self._mlflow.list_artifacts(self.run_id)}
        for name in (CONFIG, FINGERPRINT, METRICS, STEPS, CURVES, REPORT):
            if (work / name).exists() and name not in present:
                self._mlflow.log_artifact(self.run_id, str(work / name))
        if model_version is None or not model_version.is_dir():
            return
        if MODEL not in present:
            self._mlflow.log_artifacts(self.run_id, str(model_version), MODEL)
        register(self._mlflow, self.cfg.model_name, self.run_id)


def register(mlflow: Any, name: str, run_id: str) -> None:
    """A version of registered model ``name`` from the run's ``model`` artifact, once per run; skipped without a registry."""
    try:
        if mlflow.search_model_versions(f"run_id='{run_id}'"):
            return
        with contextlib.suppress(Exception):  # it exists already (or the call below says what is wrong)
            mlflow.create_registered_model(name)
        source = f"{mlflow.get_run(run_id).info.artifact_uri}/{MODEL}"
        version = mlflow.create_model_version(name, source, run_id=run_id)
        log.info("tracking: registered model %r version %s", name, version.version)
    except Exception as exc:
        if not _answered(exc):
            raise
        log.info("tracking: no model version registered (%s)", reason(exc))


def catch_up(cfg: Config, run_dir: RunDir) -> None:
    """A resubmitted job that is already complete: send what its MLflow run lacks (an earlier end left it behind)."""
    if not cfg.tracking.enabled or run_dir.tracked_run() is None:
        return
    report = json.loads((run_dir.work / REPORT).read_text())
    spe = max(1, report["optimizer_steps"] // max(1, report["epochs"]))  # its epochs were whole
    run_dir.fetch([CURVES], trees=[MODEL])
    version = run_dir.work / MODEL / str(report["model_version"])
    tracker = Tracker(cfg, run_dir, spe)
    tracker.finish(version)


def _answered(exc: BaseException) -> bool:
    """True when the tracker answered the request itself (a bad value, a missing run): no retry can help."""
    code = getattr(exc, "error_code", None)
    return code in _ANSWERED


def reason(exc: BaseException) -> str:
    """The first line of an error, cut short: a tracker's messages can run long."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
