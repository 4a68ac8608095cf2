"""Run by ``bench.store`` as a script: ``imdb-dist launch`` of a config, every Ray worker timed and weighed.

It imports ``imdb_dist`` from ``PYTHONPATH`` (this tree, or a baseline
worktree: the code under test) and calls ``launch`` with one extra Keras
callback, :class:`Probe`, defined here so that cloudpickle sends it to the
workers by value (the baseline tree does not have it). Each worker writes
``<out>/worker-<pid>.json``: when its process started, when its first step
point ended (wall clock, comparable across the processes of one machine),
its peak RSS then and at the end. This process writes ``<out>/driver.json``
with the moment it started, before importing anything: the job's submit.

    python bench/store_probe.py OUT --config CONFIG [--set KEY=VALUE ...]
"""

from __future__ import annotations

import time

SUBMITTED = time.time()

import argparse
import json
import os
import resource
from pathlib import Path

import tf_keras as keras


class Probe(keras.callbacks.Callback):
    """Each worker's start, first step point and peak memory, into a JSON file of its own."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.first: float | None = None
        self.first_rss_kb: int | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.first is None:
            self.first = time.time()
            self.first_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def on_train_end(self, logs: dict | None = None) -> None:
        import psutil

        record = {
            "pid": os.getpid(),
            "process_started": psutil.Process().create_time(),
            "first_step_point": self.first,
            "peak_rss_mb_at_first_step": (self.first_rss_kb or 0) / 1024,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        Path(self.out, f"worker-{os.getpid()}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    from imdb_dist.config import load_config
    from imdb_dist.launch import launch
    from imdb_dist.logs import setup_logging

    setup_logging()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "driver.json").write_text(json.dumps({"submitted": SUBMITTED}))
    launch(load_config(Path(args.config), args.set), worker_callbacks=[Probe(args.out)])


if __name__ == "__main__":
    main()
