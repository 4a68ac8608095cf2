"""Scale-out: weak scaling under Ray Train, and what a distributed step spends and sends.

One subcommand a module, each documented there with its reproduce command:

- ``weak`` (:mod:`bench.scaling.weak`): ``imdb-dist launch`` as users run
  it, 1 worker x 1 CPU against 2 workers x 1 CPU at the same per-worker
  batch (and two independent 1-worker jobs at once, and a baseline revision);
- ``step`` (:mod:`bench.scaling.step`): two MultiWorkerMirrored workers on
  loopback, the distributed step's time against its compute and its
  collectives, the bytes it sends, and each route's traffic at 8 to 64
  replicas;
- ``transport-error`` (:mod:`bench.scaling.transport_error`): the error the
  bfloat16 transport of the dense embedding gradient adds to the gradient;
- ``threads`` (:mod:`bench.scaling.threads`): the ceiling this machine puts
  on any scale-out, and the pool sizes for a 1-CPU worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# The subcommands' default sizes: 256 reviews of up to 400 tokens per worker, a 20,000-word vocabulary.
PER_WORKER_BATCH = 256
MAX_LEN = 400
VOCAB = 20_000


def add_worker(sub: Any, name: str, work: Callable[..., None]) -> None:
    """An internal subcommand: a process a subcommand starts, called with its parent's JSON as keywords."""
    worker = sub.add_parser(name)
    worker.add_argument("spec", type=json.loads)
    worker.set_defaults(run=lambda args: work(**args.spec))
