"""Multi-worker training through Ray Train on a real 2-CPU local cluster on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import tensorflow as tf
import tf_keras as keras
from conftest import (
    KEPT,
    REPO,
    installed_script,
    tensorflow_startup_lines,
    tiny_overrides,
    write_aclimdb,
)
from exactness import assert_same_epoch_metrics

from imdb_dist import rundir
from imdb_dist.config import load_config
from imdb_dist.errors import ConfigError, InputError, RunError
from imdb_dist.launch import launch
from imdb_dist.model import build_model
from imdb_dist.rundir import read_metrics

# Each test is one or more Ray Train runs (tens of seconds each) on the module's cluster.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
# Callbacks defined here travel to the Ray workers by value, not by module name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS_PER_EPOCH = 10  # 160 training reviews (80% of 200) / global batch 16


class RecordEpochs(keras.callbacks.Callback):
    """Appends ``pid rank epoch event loss`` lines to a shared file, from every worker."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _write(self, *fields: object) -> None:
        rank = ray.train.get_context().get_world_rank()
        with open(self.path, "a") as handle:
            handle.write(" ".join(map(str, (os.getpid(), rank, *fields))) + "\n")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._write(epoch + 1, "begin", 0)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._write(epoch + 1, "end", repr(float(logs["loss"])))


class RecordThreads(keras.callbacks.Callback):
    """Appends ``rank intra inter`` (TensorFlow's thread pool sizes in this worker) to a shared file."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_train_begin(self, logs: dict | None = None) -> None:
        threading = tf.config.threading
        with open(self.path, "a") as handle:
            rank = ray.train.get_context().get_world_rank()
            handle.write(f"{rank} {threading.get_intra_op_parallelism_threads()} "
                         f"{threading.get_inter_op_parallelism_threads()}\n")


class FailOnce(keras.callbacks.Callback):
    """Rank ``rank`` fails at ``epoch``/``step`` the first time it gets there (a marker file remembers).

    It raises, or with ``kill`` SIGKILLs its own process, as a lost node would.
    """

    def __init__(self, marker: str, rank: int, epoch: int, step: int, kill: bool = False) -> None:
        super().__init__()
        self.marker, self.rank, self.epoch, self.step, self.kill = marker, rank, epoch, step, kill
        self._current = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._current = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        here = (self._current, batch + 1) == (self.epoch, self.step)
        if here and ray.train.get_context().get_world_rank() == self.rank and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault on rank {self.rank} at epoch {self.epoch} step {self.step}")


def exported_weights(run_dir: Path) -> dict[str, np.ndarray]:
    """The exported network's variables (the tokenizer's table left out), by checkpoint key."""
    reader = tf.train.load_checkpoint(str(run_dir / rundir.MODEL / "1" / "variables" / "variables"))
    network = [key for key in reader.get_variable_to_shape_map() if key.startswith("network_variables/")]
    assert network, "the export holds no network variables under the expected key"
    return {key: reader.get_tensor(key) for key in network}


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_config(tmp_path: Path, *extra: str):
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    return load_config(
        None,
        [
            *tiny_overrides(data, tmp_path / "unused"),
            "distribution.strategy=multi_worker",
            "ray.num_workers=2",
            f"ray.storage_path={tmp_path / 'storage'}",
            "ray.name=job",
            "ray.num_shards=4",
            *extra,
        ],
    )


def events(path: Path) -> list[tuple[int, int, int, str, str]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(int(pid), int(rank), int(epoch), event, loss) for pid, rank, epoch, event, loss in rows]


# An uninterrupted run that a faulted one is compared with: its checkpoints
# every 3 steps and the retries it is allowed do not change what it trains.
UNINTERRUPTED = ("train.epochs=2", "run.checkpoint_steps=3", "ray.max_failures=2", "train.deterministic=true")
# Each worker runs two replicas on two logical CPUs, the shape of a multi-GPU worker, with the
# embedding gradient all-reduced densely and rounded to bfloat16 for it (the rounding:
# tests/test_aggregation.py).
TWO_BY_TWO = ("distribution.cpu_devices=2", "distribution.embedding_gradient=dense",
              "distribution.embedding_transport=bfloat16")
# An elastic range whose largest size fits the cluster.
ELASTIC = ("ray.num_workers=[1, 2]", "ray.resize_interval_s=5")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> Callable[..., tuple[Path, Path]]:
    """``uninterrupted(members, *extra)``: ``(root, run_dir)`` of a 2-worker run, launched once per setting.

    The sync test reads it; the kill test holds a killed run to it.
    """
    runs: dict[tuple[str, ...], tuple[Path, Path]] = {}

    def get(members: int, *extra: str) -> tuple[Path, Path]:
        key = (f"model.members={members}", *extra)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"uninterrupted-{len(runs)}")
            cfg = ray_config(root, *key, *UNINTERRUPTED)
            callbacks = [RecordEpochs(str(root / "events.txt")), RecordThreads(str(root / "threads.txt"))]
            runs[key] = root, launch(cfg, worker_callbacks=callbacks).local_path()
        return runs[key]

    return get


def test_a_launch_that_tokenizes_as_a_ray_data_job_trains_what_one_process_prepares(uninterrupted, tmp_path) -> None:
    """ray.prepare ray_data: the store, vocabulary and batches of the driver's own preparation (auto, at this size).

    Against the sync test's 2x2 run (one reference launch less): the store and the global batches are
    the same on any topology (the batch digest is the plan's, tests/test_topology.py).
    """
    _, prepared_here = uninterrupted(1, *TWO_BY_TWO)
    run = launch(ray_config(tmp_path, "model.members=1", *UNINTERRUPTED, "ray.prepare=ray_data")).local_path()
    stores = sorted(path.name for path in (prepared_here / rundir.PREPARED).glob("*.npy"))
    assert len(stores) == 6
    for name in stores:
        assert (run / rundir.PREPARED / name).read_bytes() == (prepared_here / rundir.PREPARED / name).read_bytes()
    assert (run / rundir.VOCAB).read_text() == (prepared_here / rundir.VOCAB).read_text()
    reports = [json.loads((where / rundir.REPORT).read_text()) for where in (run, prepared_here)]
    assert reports[0]["batches_digest"] == reports[1]["batches_digest"] is not None


@pytest.mark.parametrize("members", [1, 2], ids=["one-network-2x2-bfloat16-transport", "ensemble-of-2"])
def test_two_workers_train_in_sync_and_only_the_chief_writes(uninterrupted, members: int) -> None:
    # One network at 2x2: the fault test's reference; an ensemble: the elastic-range test's run too.
    tmp_path, run_dir = uninterrupted(members, *(TWO_BY_TWO if members == 1 else ELASTIC))
    log, threads = tmp_path / "events.txt", tmp_path / "threads.txt"
    cfg = load_config(run_dir / rundir.CONFIG)
    assert run_dir == tmp_path / "storage" / "job"
    # Each worker was given 1 CPU (ray.resources_per_worker): one thread per pool, not one per core.
    assert sorted(threads.read_text().splitlines()) == ["0 1 1", "1 1 1"]
    rows = events(log)
    assert {rank for _, rank, *_ in rows} == {0, 1}
    for epoch in (1, 2):
        losses = {rank: loss for _, rank, e, event, loss in rows if e == epoch and event == "end"}
        assert losses[0] == losses[1], f"replicas disagree on the epoch {epoch} loss: {losses}"
    report = json.loads((run_dir / rundir.REPORT).read_text())
    local = cfg.distribution.cpu_devices or 1
    assert report["workers"] == 2 and report["replicas"] == 2 * local
    assert report["strategy"] == ("CpuReplicasMultiWorkerStrategy" if local > 1 else "CollectiveAllReduceStrategy")
    assert report["optimizer_steps"] == 2 * STEPS_PER_EPOCH
    storage = tmp_path / "storage"
    assert len(list(storage.rglob("saved_model.pb"))) == 1
    assert len(list(storage.rglob(rundir.REPORT))) == 1
    assert len(list(storage.rglob("events.out.tfevents.*"))) >= 1
    assert not list(storage.rglob("workertemp*")), "a non-chief worker wrote into the run directory"
    assert [r["epoch"] for r in read_metrics(run_dir / rundir.METRICS)] == [1, 2]
    assert sorted(p.name for p in run_dir.glob("checkpoint_*"))  # handed to Ray Train
    # The export holds every member's network, and the members are distinct networks, not copies.
    vocab_size = len(rundir.read_vocab(run_dir)) + 2  # padding and unknown
    one_network = build_model(dataclasses.replace(cfg.model, members=1), vocab_size=vocab_size)
    exported = list(exported_weights(run_dir).values())
    assert len(exported) == members * len(one_network.weights)
    embeddings = [w for w in exported if w.shape == one_network.weights[0].shape]
    assert len(embeddings) == members
    assert all(not np.array_equal(a, b) for i, a in enumerate(embeddings) for b in embeddings[i + 1 :])


@pytest.mark.timeout(240)
def test_the_controller_logs_each_checkpoint_it_keeps_one_poll_of_ray_report_poll_s_apart(tmp_path: Path) -> None:
    # A worker's report waits until its previous one was collected, and Ray Train's controller
    # collects at its polls, ray.report_poll_s apart (3 s here: well over Ray's default 2 s and
    # the tiny model's 2 steps, so the test fails unless the setting reaches the controller): so
    # the job log says when each checkpoint became Ray Train's, at most one per poll.
    poll = 3.0
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    sets = [*tiny_overrides(data, tmp_path / "unused"), "distribution.strategy=multi_worker", "ray.num_workers=2",
            f"ray.storage_path={tmp_path / 'storage'}", "ray.num_shards=4", "train.epochs=1",
            "run.checkpoint_steps=2", f"ray.report_poll_s={poll:g}"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # its own local cluster
    result = subprocess.run(
        [sys.executable, "-m", "imdb_dist.cli", "launch", *[arg for item in sets for arg in ("--set", item)]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kept = KEPT.findall(result.stdout + result.stderr)
    # Every checkpoint, in order, in the terms of the worker group line that would resume from it.
    assert [(int(epoch), int(step)) for _, epoch, step in kept] == [(1, 2), (1, 4), (1, 6), (1, 8), (2, 0)], kept
    times = [datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() for stamp, _, _ in kept]
    # A poll starts ray.report_poll_s after the previous one ended; each line is logged while its
    # poll ends, before the next one waits.
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.9 * poll, times
    # Ray Train's controller and workers import TensorFlow before our code runs in them: the
    # job's worker_process_setup_hook keeps its start-up lines out of the log there too.
    assert not tensorflow_startup_lines(result.stdout + result.stderr), tensorflow_startup_lines(result.stderr)[:5]


@pytest.mark.timeout(600)  # a run, two faults, Ray noticing each, two restarted worker groups
def test_workers_that_fail_twice_mid_epoch_end_with_the_uninterrupted_model_in_one_mlflow_run(
    uninterrupted, mlflow_server, tmp_path: Path
) -> None:
    # Two faults in one 2x2 run, the second in the group restarted after the first: the chief
    # raises at epoch 2 step 3 (an error in the training function), then rank 1 is SIGKILLed at
    # epoch 2 step 8 (a lost process; at 2x1 with an S3 outage besides: tests/test_storage.py).
    # Each restarted group resumes from the last checkpoint Ray Train kept, the rounding of the
    # bfloat16 all-reduce the same way on each resume.
    _, reference = uninterrupted(1, *TWO_BY_TWO)
    assert json.loads((reference / rundir.REPORT).read_text())["embedding_gradient"] == "dense, in bfloat16"
    log = tmp_path / "events.txt"
    faults = [FailOnce(str(tmp_path / "raised-once"), rank=0, epoch=2, step=3),
              FailOnce(str(tmp_path / "killed-once"), rank=1, epoch=2, step=8, kill=True)]
    cfg = ray_config(tmp_path / "failed", "model.members=1", *TWO_BY_TWO, *UNINTERRUPTED,
                     f"tracking.uri={mlflow_server.uri}", "tracking.experiment=ray")
    run_dir = launch(cfg, worker_callbacks=[*faults, RecordEpochs(str(log))]).local_path()
    assert (tmp_path / "raised-once").exists() and (tmp_path / "killed-once").exists(), "a fault was never injected"
    for rank in (0, 1):
        begun = [epoch for _, r, epoch, event, _ in events(log) if r == rank and event == "begin"]
        assert begun == [1, 2, 2, 2], (rank, begun)  # each restarted group resumed inside epoch 2, not at 1
    # The history: the first group, then Ray Train's two restarts at the same size inside epoch 2,
    # each from the last checkpoint Ray Train kept (which one depends on when its controller polled).
    report = json.loads((run_dir / rundir.REPORT).read_text())
    groups = [(g["workers"], g["cause"], g["epoch"]) for g in report["worker_groups"]]
    assert groups == [(2, "start", 1), *[(2, "restarted after a failure", 2)] * 2], groups
    got, want = exported_weights(run_dir), exported_weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    reports = [report, json.loads((reference / rundir.REPORT).read_text())]
    assert reports[0]["optimizer_steps"] == reports[1]["optimizer_steps"] == 2 * STEPS_PER_EPOCH
    assert reports[0]["replicas"] == reports[1]["replicas"] == 4
    assert reports[0]["embedding_gradient"] == "dense, in bfloat16"
    assert_same_epoch_metrics(read_metrics(run_dir / rundir.METRICS), read_metrics(reference / rundir.METRICS),
                              steps_per_epoch=STEPS_PER_EPOCH, replicas=4, split_epochs=[2])
    # Three worker groups, one MLflow run (tests/test_tracking.py): the chiefs of the restarted groups
    # attached to it and sent only what lay beyond it; the groups are its `workers` metric and tags.
    from test_tracking import expected_history, logged_history, the_run

    client = mlflow_server.client()
    run = the_run(client, "ray")
    history = logged_history(client, run.info.run_id)
    assert run.info.status == "FINISHED" and history == expected_history(run_dir)
    assert [s for s, _ in history["step_loss"]] == [r["step"] for r in read_metrics(reference / rundir.STEPS)]
    assert [run.data.tags[f"worker_group.{k}"].split(", ")[1] for k in (1, 2, 3)] == [
        "start", "restarted after a failure", "restarted after a failure"]
    assert run.data.tags["replicas"] == "4" and run.data.tags["workers"] == "2"
    assert "model/saved_model.pb" in {item.path for item in client.list_artifacts(run.info.run_id, rundir.MODEL)}
    # Resubmitted, the finished job trains nothing and its MLflow run stays the one, unchanged.
    assert launch(cfg).local_path() == run_dir
    assert logged_history(client, the_run(client, "ray").info.run_id) == history
    assert len(client.search_model_versions("name='ray'")) == 1


# The GPU job's CPU rehearsal (job/configs/ray-gpu-rehearsal.yaml: two workers of two replicas each) runs in
# tests/test_container.py: the RayJob's entrypoint with the rehearsal's settings, on the manifest's Ray pods.


def test_without_retries_a_failed_worker_fails_the_run_and_the_resubmitted_job_resumes_it(
    cluster, tmp_path: Path
) -> None:
    log = tmp_path / "events.txt"
    fault = FailOnce(str(tmp_path / "failed-once"), rank=1, epoch=2, step=5)
    with pytest.raises(RunError, match=r"max_failures=0.*injected fault on rank 1.*resubmit to resume"):
        launch(ray_config(tmp_path, "ray.max_failures=0"), worker_callbacks=[fault, RecordEpochs(str(log))])
    assert not (tmp_path / "storage" / "job" / rundir.REPORT).exists()
    # A resubmit that would train another model is refused in the driver, naming the key, before it writes.
    saved = (tmp_path / "storage" / "job" / rundir.CONFIG).read_text()
    with pytest.raises(InputError, match=r"whose model\.lstm_units is 8, not 5.*--change model\.lstm_units"):
        launch(ray_config(tmp_path, "model.lstm_units=5"))
    assert (tmp_path / "storage" / "job" / rundir.CONFIG).read_text() == saved
    # The same name and storage_path, and operational changes (the retries the failure message
    # suggests raising): a new Ray Train run picks up the last checkpoint, the end of epoch 1.
    resubmit = ray_config(tmp_path, "ray.max_failures=2", "ray.checkpoints_to_keep=3")
    run_dir = launch(resubmit, worker_callbacks=[RecordEpochs(str(log))]).local_path()
    begun = [epoch for _, rank, epoch, event, _ in events(log) if rank == 0 and event == "begin"]
    assert begun == [1, 2, 2]
    report = json.loads((run_dir / rundir.REPORT).read_text())
    assert report["optimizer_steps"] == 2 * STEPS_PER_EPOCH
    assert report["changes"] == []
    assert [(g["cause"], g["epoch"]) for g in report["worker_groups"]] == [("start", 1), ("resubmitted", 2)]


def test_a_batch_that_does_not_split_across_workers_is_refused_before_starting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size.*15.*2 replicas"):
        launch(ray_config(tmp_path, "train.batch_size=15"))
    assert not (tmp_path / "storage").exists()


def test_an_elastic_range_with_a_size_that_cannot_split_the_batch_is_refused_naming_it(tmp_path: Path) -> None:
    # Global batch 16: 1, 2 and 4 workers split it, 3 does not.
    with pytest.raises(ConfigError, match=r"ray\.num_workers: .*16 .*3 workers x 1 devices = 3 replicas \(every size"):
        launch(ray_config(tmp_path, "ray.num_workers=[1, 4]"))
    assert not (tmp_path / "storage").exists()


def test_an_elastic_job_starts_with_the_workers_that_fit_and_trains_to_the_end(uninterrupted) -> None:
    # The cluster's 2 CPUs hold both workers of [1, 2]: Ray Train's elastic policy starts with 2.
    # (The ensemble's run of the sync test: where both workers fit, the range changes nothing else.)
    _, run_dir = uninterrupted(2, *ELASTIC)
    report = json.loads((run_dir / rundir.REPORT).read_text())
    assert report["workers"] == 2 and report["optimizer_steps"] == 2 * STEPS_PER_EPOCH
    assert report["config"]["ray"]["num_workers"] == [1, 2]
    assert [(g["workers"], g["cause"]) for g in report["worker_groups"]] == [(2, "start")]


def test_mixed_float16_without_gpu_workers_is_refused_before_starting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.mixed_precision.*ray\.use_gpu"):
        launch(ray_config(tmp_path, "train.mixed_precision=mixed_float16"))
    assert not (tmp_path / "storage").exists()


def test_what_ray_trains_controller_unpickles_loads_no_tensorflow(tmp_path: Path) -> None:
    # The controller unpickles the trainer's backend config and its loop's config; with Ray's own
    # TensorflowConfig (ray.train.tensorflow) or Keras callbacks in the config that loaded TensorFlow
    # there, about 7 s of CPU before it asks for the workers (imdb_dist.ray_backend).
    import ray.cloudpickle

    from imdb_dist.launch import _worker_loop
    from imdb_dist.ray_backend import TFConfig

    blob = tmp_path / "controller.pkl"
    blob.write_bytes(ray.cloudpickle.dumps(
        (TFConfig(), _worker_loop, {"callbacks": ray.cloudpickle.dumps([RecordEpochs(str(tmp_path / "log"))])})
    ))
    check = ("import sys, ray.cloudpickle;"
             "backend, loop, config = ray.cloudpickle.loads(open(sys.argv[1], 'rb').read());"
             "print(backend.backend_cls.__name__, loop.__name__, "
             "','.join(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tf_keras', 'keras'})) or '-')")
    result = subprocess.run([sys.executable, "-c", check, str(blob)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["_TFConfigBackend", "_worker_loop", "-"], result.stdout


def test_the_backend_sets_tf_config_as_ray_does() -> None:
    # Every worker's host:port in rank order and the worker's own index: what MultiWorkerMirroredStrategy reads.
    from imdb_dist.ray_backend import set_tf_config

    saved = os.environ.get("TF_CONFIG")
    try:
        set_tf_config(["10.0.0.1:1234", "10.0.0.2:4321"], 1)
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        assert resolver.cluster_spec().as_dict() == {"worker": ["10.0.0.1:1234", "10.0.0.2:4321"]}
        assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    finally:
        if saved is None:
            os.environ.pop("TF_CONFIG", None)
        else:
            os.environ["TF_CONFIG"] = saved


def test_a_cluster_the_launcher_starts_listens_on_loopback_only() -> None:
    script = (
        # As in `imdb-dist launch`: nothing imports ray before the launcher connects.
        "from imdb_dist.ray_cluster import connect; connect(); import json, ray;"
        "print(json.dumps({'gcs': ray.get_runtime_context().gcs_address,"
        " 'nodes': [n['NodeManagerAddress'] for n in ray.nodes()]})); ray.shutdown()"
    )
    # Without the test session's loopback setting: the launcher must apply it itself.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env, check=False)
    assert result.returncode == 0, result.stderr
    where = json.loads(result.stdout.strip().splitlines()[-1])
    assert where["gcs"].startswith("127.0.0.1:")
    assert where["nodes"] == ["127.0.0.1"]


def test_every_worker_fitting_alone_gets_the_same_vocabulary(tmp_path: Path) -> None:
    """Without a shared vocab file, workers fit it independently: that must be deterministic."""
    data = write_aclimdb(tmp_path / "data", {"train": 30})
    script = (
        "import sys, json; sys.path.insert(0, 'tests');"
        "from imdb_dist.data import pipeline; from imdb_dist.data.sources import read_aclimdb;"
        f"texts = read_aclimdb({str(data)!r}, 'train').texts;"
        "print(json.dumps(pipeline.fit_tokenizer(texts, 40).vocabulary))"
    )
    vocabularies = [
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    ]
    assert json.loads(vocabularies[0]) == json.loads(vocabularies[1])
    assert len(json.loads(vocabularies[0])) == 38


def test_bad_data_is_refused_before_any_worker_starts_and_writes_nothing(tmp_path: Path) -> None:
    cfg = load_config(None, [*tiny_overrides(tmp_path / "missing", tmp_path / "unused"),
                             f"ray.storage_path={tmp_path / 'storage'}", "ray.name=job"])
    from imdb_dist.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        launch(cfg)
    assert not (tmp_path / "storage").exists()
    # Data that leaves no validation review (4 reviews, 10% held out): refused as the workers would
    # refuse it, but before the config, vocabulary and shards are written.
    few = write_aclimdb(tmp_path / "few", {"train": 2})
    cfg = load_config(None, [*tiny_overrides(few, tmp_path / "unused"), "train.batch_size=2",
                             "data.validation_fraction=0.1", f"ray.storage_path={tmp_path / 'storage'}",
                             "ray.name=job"])
    with pytest.raises(ConfigError, match=r"data\.validation_fraction.*no validation reviews"):
        launch(cfg)
    assert not (tmp_path / "storage").exists()


def launch_command(tmp_path: Path, *extra: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """``imdb-dist launch`` of a tiny GPU job (``ray.use_gpu``, 1 GPU a worker) as a child process; and its seconds."""
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    sets = [
        *tiny_overrides(data, tmp_path / "unused"),
        "distribution.strategy=multi_worker",
        "ray.use_gpu=true",
        "ray.resources_per_worker={CPU: 1, GPU: 1}",
        f"ray.storage_path={tmp_path / 'storage'}",
        *extra,
    ]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "imdb_dist.cli", "launch", *[arg for item in sets for arg in ("--set", item)]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    return result, time.monotonic() - started


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("wait", [0, 3], ids=["at-once", "after-asking-the-autoscaler"])
def test_gpu_workers_on_a_cluster_without_gpus_exit_2_naming_what_it_has_and_write_nothing(
    tmp_path: Path, wait: int
) -> None:
    # The launcher's own local cluster (no RAY_ADDRESS); an empty CUDA_VISIBLE_DEVICES keeps
    # Ray from counting a GPU the machine may have. Ray Train would wait for GPUs forever.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"CUDA_VISIBLE_DEVICES": ""}
    result, took = launch_command(tmp_path, f"ray.gpu_wait_s={wait}", env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result)
    assert re.fullmatch(
        r"error: ray\.use_gpu is true but the Ray cluster at 127\.0\.0\.1:\d+ has no GPUs "
        r"\(it has: CPU \d+, memory \d+\.\d GiB, 1 node\); .*set ray\.use_gpu=false to train on CPUs.*",
        line,
    ), line
    if wait:
        assert "still so after ray.gpu_wait_s=3 s of asking its autoscaler" in line
        assert took > wait
    else:
        assert "set ray.gpu_wait_s=N to wait N seconds" in line
    # Interpreter, TensorFlow and a local cluster start-up included (about 15 s on 2 cores).
    assert took < 45 + wait, f"took {took:.0f} s"
    assert not (tmp_path / "storage").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def ray_head(*args: str, env: dict[str, str]) -> Iterator[str]:
    """A ``ray start --head --block`` on loopback in its own process group; yields its GCS address.

    Ready when ``ray status`` answers; stopped by its group: SIGTERM, then
    SIGKILL for what outlives it by 5 s.
    """
    ray = installed_script("ray")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live here
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={address.rpartition(':')[2]}",
         f"--ray-client-server-port={free_port()}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
         "--dashboard-agent-listen-port=0", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([ray, "status", f"--address={address}"], env=env, capture_output=True, check=False).returncode:
            assert proc.poll() is None, "ray start exited"
            assert time.monotonic() < deadline, "the head never answered ray status"
            time.sleep(2)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(1)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def one_fake_gpu() -> Iterator[dict[str, str]]:
    """The environment of a client of a one-node ``ray start`` cluster that declares 1 GPU TensorFlow cannot see.

    Ray is told to leave CUDA_VISIBLE_DEVICES alone and it hides any real
    GPU: on any machine, Ray places GPU workers there and TensorFlow in them finds none.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",  # on for clusters from `ray start`: the client must say so
        "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
        "CUDA_VISIBLE_DEVICES": "-1",
    }
    with ray_head("--num-cpus=1", "--num-gpus=1", env=env) as address:
        yield {**env, "RAY_ADDRESS": address}


@pytest.mark.timeout(120)
def test_fewer_gpus_than_the_workers_need_exit_2_too(one_fake_gpu: dict[str, str], tmp_path: Path) -> None:
    result, took = launch_command(tmp_path, "ray.num_workers=2", env=one_fake_gpu)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result)
    assert re.fullmatch(
        r"error: ray\.use_gpu is true but the Ray cluster at 127\.0\.0\.1:\d+ has GPUs for only 1 of the job's "
        r"2 workers of 1 GPU each \(on one node\) \(it has: CPU 1, GPU 1, memory \d+\.\d GiB, 1 node\); "
        r".*lower ray\.num_workers or ray\.resources_per_worker\.GPU.*",
        line,
    ), line
    assert took < 45, f"took {took:.0f} s"
    assert not (tmp_path / "storage").exists()


@pytest.mark.timeout(180)
def test_a_worker_that_refuses_the_config_exits_2_with_its_line(one_fake_gpu: dict[str, str], tmp_path: Path) -> None:
    # The driver's check passes (the cluster has the GPU); the worker refuses ray.use_gpu
    # (imdb_dist.devices.check_devices) with a ConfigError.
    result, took = launch_command(tmp_path, "ray.num_workers=1", env=one_fake_gpu)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result)
    # Not a RunError naming a failed health check: the worker's own line, as the driver's would be.
    assert line.startswith("error: Ray worker rank 0: config key ray.use_gpu: "), line
    assert "GPU" in line
    assert took < 120, f"took {took:.0f} s"
