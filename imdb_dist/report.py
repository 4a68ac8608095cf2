"""The end of a run, on the chief: export the model, score the export, draw the curves, write the report, publish.

``report.json`` describes what users will serve (the export, scored
through itself) and how the run got there; written last, it marks the run
directory complete (:mod:`imdb_dist.rundir`).
"""

from __future__ import annotations

import logging
import platform
import statistics
from typing import Any

import tensorflow as tf
import tf_keras as keras

from imdb_dist import __version__
from imdb_dist.config import Config, to_dict
from imdb_dist.curves import plot_curves
from imdb_dist.data import plan
from imdb_dist.data.pipeline import Tokenizer
from imdb_dist.data.training import TrainingData
from imdb_dist.distribute import Worker
from imdb_dist.evaluate import metrics, score_texts
from imdb_dist.export import export_trained, load_model
from imdb_dist.rundir import CURVES, METRICS, MODEL, STEPS, RunDir
from imdb_dist.timings import Timings, since_process_start

log = logging.getLogger(__name__)


def finish(
    cfg: Config,
    worker: Worker,
    run_dir: RunDir,
    tokenizer: Tokenizer,
    model: keras.Model,
    data: TrainingData,
    timings: Timings,
    wall_s: float,
    *,
    batches_digest: int | None,
) -> None:
    """Export a float32 copy of the model, score it on the validation split, draw the curves, report, publish.

    ``cfg``: the whole config, which the report records.
    """
    val_set = data.val_reviews()
    with timings.phase("export"):
        export = export_trained(cfg.model, cfg.data, run_dir.work / MODEL, tokenizer, model,
                                version=run_dir.next_model_version())
    with timings.phase("score"):
        # Scored through the export itself: the report describes what users will serve.
        validation = metrics(score_texts(load_model(export), val_set.texts), val_set.labels)
    # Drawn after, not in a thread beside the export: the two are mostly
    # Python, and sharing the GIL made the export 3x slower (measured).
    with timings.phase("curves"):
        records = run_dir.log(METRICS).records()
        plot_curves(records, run_dir.log(STEPS).records(), run_dir.work / CURVES)
    process_s = since_process_start()
    report = {
        "validation": validation,
        # The version of model/ this run published (TF-Serving layout).
        "model_version": int(export.name),
        "epochs": len(records),
        "stopped_early": len(records) < cfg.train.epochs,
        # Every step's global batch that made the model, in order (imdb_dist.digest):
        # equal in two runs that trained the same batches at the same steps, whatever their topology.
        "batches_digest": batches_digest,
        "examples_per_s_median": statistics.median(r["examples_per_s"] for r in records) if records else None,
        "wall_s": wall_s,
        # Seconds per phase of this process (a resumed run: of the resuming
        # process), and from its start to the report.
        "timings": {"phases_s": dict(timings.seconds), "process_s": process_s},
        # Movies of the validation reviews, held out of training as a whole
        # (the source named them); null: the split may share movies.
        "validation_movies": data.validation_movies,
        **_history(run_dir),
        **_how_it_trained(worker, model),
        "config": to_dict(cfg),
        "versions": {
            "imdb_dist": __version__,
            "data_plan": plan.PLAN_VERSION,
            "tensorflow": tf.__version__,
            "python": platform.python_version(),
        },
    }
    run_dir.write_report(report)
    with timings.phase("publish"):
        run_dir.publish()
    log.info("time: %s%s", timings.summary(),
             f"; {process_s:.1f} s from process start to the report" if process_s is not None else "")
    log.info("done: validation accuracy %.4f auc %.4f (n=%d); model at %s", validation["accuracy"],
             validation["auc"], validation["n"], run_dir.location.child(MODEL, export.name))


def _history(run_dir: RunDir) -> dict[str, Any]:
    """What happened to the run across its attempts, from its run directory."""
    return {
        # Deliberate changes made on resumes (--change), oldest first.
        "changes": run_dir.changes(),
        # Under Ray: every worker group that trained it (size, cause: start, shrunk, grown, restarted, resubmitted).
        "worker_groups": run_dir.worker_groups(),
        # A run directory on remote storage: what this process uploaded at each sync (every checkpoint).
        "uploads": run_dir.uploaded,
    }


def _how_it_trained(worker: Worker, model: keras.Model) -> dict[str, Any]:
    """The topology, precision and gradient route of the process that finished the run."""
    return {
        "optimizer_steps": int(model.optimizer.iterations.numpy()),
        "strategy": type(worker.strategy).__name__,
        "workers": worker.num_workers,
        "replicas": worker.replicas,
        "precision": worker.precision,
        # How the replicas all-reduced the embedding gradient (null: one replica, nothing to reduce).
        "embedding_gradient": _embedding_gradient(model, worker),
    }


def _embedding_gradient(model: keras.Model, worker: Worker) -> str | None:
    """``dense, in float32`` / ``dense, in bfloat16`` / ``sparse``, as the run's optimizer reduced it; None: one replica."""
    if worker.replicas == 1:
        return None
    optimizer = model.optimizer
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return f"dense, in {optimizer.transport}" if optimizer.dense_sparse_gradients else "sparse"
