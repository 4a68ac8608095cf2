"""Ray Train's TensorFlow set-up (``TF_CONFIG`` in every worker), without TensorFlow in Ray Train's controller.

Ray Train's own ``TensorflowConfig`` lives in the ``ray.train.tensorflow``
package, whose ``__init__`` imports TensorFlow. Ray Train's controller
unpickles the trainer's backend config, so with it the controller loaded
TensorFlow (about 4 s of CPU on a 2-core machine, docs/BENCHMARKS.md, on
the path before it asks for the workers, and its memory for the whole job)
only to set ``TF_CONFIG`` in each worker. :class:`TFConfig` does that one
thing as Ray's backend does
(``ray/train/tensorflow/config.py``): every worker's ``host:port`` in rank
order, and each worker's own index, from a module that imports no
TensorFlow. The workers import TensorFlow themselves (``imdb_dist.launch``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig


def worker_address() -> str:
    """This worker's ``host:port`` for TensorFlow's collective server: the node's address, a port free now."""
    host = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def set_tf_config(workers: list[str], index: int) -> None:
    """``TF_CONFIG`` for the worker at ``index`` of ``workers``: what MultiWorkerMirroredStrategy reads."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


class _TFConfigBackend(Backend):
    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        workers = worker_group.execute(worker_address)
        ray.get([worker_group.execute_single_async(i, set_tf_config, workers, i) for i in range(len(worker_group))])


@dataclasses.dataclass
class TFConfig(BackendConfig):
    """The ``backend_config`` of our ``DataParallelTrainer``: sets ``TF_CONFIG`` in each worker as it starts."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _TFConfigBackend
