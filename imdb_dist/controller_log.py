"""What the Ray Train controller tells the job log: each checkpoint it keeps.

A checkpoint a worker hands to ``ray.train.report`` is Ray Train's only once
its controller has collected every worker's report of it. The controller
polls the workers every ``ray.report_poll_s`` (``checkpoint/report_handler.py``
pairs the reports), so when a host is lost, the reports it had not yet
collected go with it, and the group restarts from the last checkpoint kept
before them. A worker's report waits until its previous one was collected
(the worker's result queue holds one), so that is never more than the
last checkpoint handed over: a restart redoes at most two checkpoints' steps. This callback logs that
checkpoint as it is kept, in the terms of the worker group line that
restarts from it (``training from epoch E step S``).

Built by the Ray driver (``imdb_dist.launch``), which hands it to Ray Train;
it runs in the controller's process. It needs ``ray.train``, so nothing else imports it.
"""

from __future__ import annotations

import logging
from typing import Any

import ray.train

log = logging.getLogger(__name__)


def resume_position(metrics: dict[str, Any]) -> tuple[int, int]:
    """``(epoch, step)``, 1-based epoch, a checkpoint's reported metrics resume training at.

    A mid-epoch checkpoint reports its epoch and step; an epoch's end reports
    the epoch alone, and resumes at the next epoch's step 0.
    """
    epoch = int(metrics["epoch"])
    return (epoch, int(metrics["step"])) if "step" in metrics else (epoch + 1, 0)


class KeptCheckpoints(ray.train.UserCallback):
    """Logs ``Ray Train kept the checkpoint: training resumes from epoch E step S`` on the controller."""

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: ray.train.Checkpoint | None
    ) -> None:
        if checkpoint is None:
            return
        # The controller is its own process: our log format, set once there.
        from imdb_dist.logs import setup_logging

        setup_logging()
        epoch, step = resume_position(metrics[0])
        log.info("Ray Train kept the checkpoint: training resumes from epoch %d step %d", epoch, step)
