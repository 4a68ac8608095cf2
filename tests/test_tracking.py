"""Experiment tracking against a real MLflow server on loopback (bench/tracking.py's MlflowServer): one MLflow run per job.

What a run logs and reads back; a SIGKILLed and resumed run is one MLflow run
whose history is the uninterrupted run's, step for step; a server stopped
mid-run costs the run nothing and catches up; the refusals at start. The Ray
run with a killed worker is tests/test_launch.py's, the sweep's nested runs
tests/test_tune.py's (both log to a server of their own module).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, start_imdb_dist, tiny_overrides, write_aclimdb

from imdb_dist import rundir
from imdb_dist.config import load_config
from imdb_dist.errors import InputError
from imdb_dist.rundir import read_metrics
from imdb_dist.tracking import STEP_VALUES, config_params

pytestmark = pytest.mark.timeout(300)


def expected_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What the run directory's own logs say the MLflow run's metric history must be, key by key."""
    steps = read_metrics(run_dir / rundir.STEPS)
    epochs = read_metrics(run_dir / rundir.METRICS)
    per_epoch = steps[-1]["step"] // epochs[-1]["epoch"]
    history: dict[str, list[tuple[int, float]]] = {}
    for record in steps:
        for key in STEP_VALUES:
            history.setdefault(f"step_{key}", []).append((record["step"], float(record[key])))
    for record in epochs:
        for key, value in record.items():
            if key not in ("epoch", "wall_s"):
                history.setdefault(key, []).append((record["epoch"] * per_epoch, float(value)))
        history.setdefault("epoch", []).append((record["epoch"] * per_epoch, float(record["epoch"])))
    for group in rundir.RunDir.open(str(run_dir)).worker_groups():
        history.setdefault("workers", []).append(((group["epoch"] - 1) * per_epoch + group["step"],
                                                  float(group["workers"])))
    return history


def logged_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The MLflow run's whole metric history, key by key, in the order logged."""
    keys = client.get_run(run_id).data.metrics
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                                      key=lambda m: (m.step, m.timestamp))] for key in keys}


def the_run(client, experiment: str):
    """The one MLflow run of ``experiment`` (fails if there are more: a job is one run)."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [run.info.run_name for run in runs]
    return runs[0]


def train_args(data: Path, out: Path, server_uri: str, experiment: str, *extra: str) -> list[str]:
    sets = [*tiny_overrides(data, out), f"tracking.uri={server_uri}", f"tracking.experiment={experiment}", *extra]
    return ["train", *[a for item in sets for a in ("--set", item)]]


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return err


def _train_until_killed_in_epoch_two(args: list[str], out: Path) -> None:
    proc = start_imdb_dist(*args)
    deadline = time.monotonic() + 200
    while not any(r["epoch"] == 2 for r in _points(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training never reached epoch 2"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _points(out: Path) -> list[dict]:
    try:
        return read_metrics(out / rundir.STEPS)
    except (InputError, OSError):  # a line being written
        return []


def test_a_run_logs_its_config_curves_and_model_and_killed_and_resumed_is_one_run_of_the_same_history(
    mlflow_server, tmp_path: Path
) -> None:
    # 100 steps an epoch, a checkpoint every 7 and a point every 5: the kill lands in epoch 2, after
    # points the checkpoint before it does not cover (they must never reach the server twice).
    data = write_aclimdb(tmp_path / "data", {"train": 1000})
    run = ("train.epochs=3", "train.deterministic=true", "run.log_every_steps=5", "run.checkpoint_steps=7")
    reference = tmp_path / "uninterrupted"
    err = finish(start_imdb_dist(*train_args(data, reference, mlflow_server.uri, "uninterrupted", *run,
                                             "tracking.tags={team: nlp}")))
    client = mlflow_server.client()
    logged = the_run(client, "uninterrupted")
    run_id = logged.info.run_id
    assert json.loads((reference / rundir.TRACKING).read_text())["run_id"] == run_id
    assert f"tracking: MLflow run {run_id} in experiment 'uninterrupted' at {mlflow_server.uri}" in err
    assert f"tracking: MLflow run {run_id} is complete: {mlflow_server.uri}/#/experiments/" in err
    assert logged.info.status == "FINISHED"
    # The resolved config, key for key, as params; the job's tags, the fingerprint and the machine as tags.
    assert logged.data.params == config_params(load_config(reference / rundir.CONFIG))
    tags = logged.data.tags
    assert tags["team"] == "nlp" and tags["imdb_dist.run_dir"] == str(reference)
    assert tags["fingerprint.data"] == json.loads((reference / rundir.FINGERPRINT).read_text())["data"]
    assert tags["replicas"] == "1" and tags["machine.gpus"] == "none" and tags["machine.cpu"]
    # Every step point and epoch line, at its global step, once.
    want = logged_history(client, run_id)
    assert want == expected_history(reference)
    assert [step for step, _ in want["val_accuracy"]] == [100, 200, 300]
    # The results and the model as artifacts, and the model a version of the registered model.
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {rundir.REPORT, rundir.CURVES, rundir.CONFIG, rundir.METRICS, rundir.STEPS, rundir.MODEL} <= artifacts
    assert "model/saved_model.pb" in {item.path for item in client.list_artifacts(run_id, rundir.MODEL)}
    (version,) = client.search_model_versions("name='uninterrupted'")
    assert version.run_id == run_id and version.source.endswith("/model")

    # The same run SIGKILLed in epoch 2 and run again: one MLflow run, step for step the uninterrupted one's.
    out = tmp_path / "resumed"
    args = train_args(data, out, mlflow_server.uri, "resumed", *run)
    _train_until_killed_in_epoch_two(args, out)
    finish(start_imdb_dist(*args))
    got = logged_history(client, the_run(client, "resumed").info.run_id)
    assert the_run(client, "resumed").info.status == "FINISHED"
    assert got == expected_history(out)  # the run directory's own logs, no step twice
    assert got.keys() == want.keys()
    for key in want:
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key  # step for step
    # The same weights at every epoch's end: the validation curve is the uninterrupted run's, value for value.
    assert got["val_loss"] == want["val_loss"] and got["val_accuracy"] == want["val_accuracy"]


def test_a_tracker_down_mid_run_costs_the_run_nothing_and_the_run_catches_it_up(
    mlflow_server, tmp_path: Path
) -> None:
    data = write_aclimdb(tmp_path / "data", {"train": 1000})
    client = mlflow_server.client()
    # 1. The server is killed once the run has opened its MLflow run, and started again 6 s later:
    #    training goes on meanwhile, and what waited is sent once the server answers.
    out = tmp_path / "outage"
    args = train_args(data, out, mlflow_server.uri, "outage", "train.epochs=3", "run.checkpoint_steps=10",
                      "tracking.flush_timeout_s=120")
    proc = start_imdb_dist(*args)
    _wait_for(lambda: (out / rundir.TRACKING).exists(), proc)
    mlflow_server.stop()
    try:
        time.sleep(6)
        trained_during_outage = len(_points(out))
    finally:
        mlflow_server.start()  # the server is this test process's, shared with the tests after this one
    err = finish(proc)
    assert trained_during_outage > 1, "training waited for the tracker"
    assert "tracking: cannot send" in err and "retrying in the background, training goes on" in err
    assert "did not take the run's last records" not in err
    run = the_run(client, "outage")
    assert run.info.status == "FINISHED"
    assert logged_history(client, run.info.run_id) == expected_history(out)
    # 2. The server is out of reach for good (its link cut, through a forwarder: the server itself goes
    #    on for the catch-up): the run ends soon after tracking.flush_timeout_s, with one warning and its
    #    own files complete; the same command later, the link back, catches the MLflow run up.
    from forwarder import Forwarder

    out = tmp_path / "gone"
    with Forwarder("127.0.0.1", mlflow_server.port) as link:
        args = train_args(data, out, f"http://127.0.0.1:{link.port}", "gone", "train.epochs=2",
                          "tracking.flush_timeout_s=2")
        proc = start_imdb_dist(*args)
        _wait_for(lambda: (out / rundir.TRACKING).exists(), proc)
        link.stop()
        err = finish(proc)
        behind = [line for line in err.splitlines() if "did not take the run's last records" in line]
        assert len(behind) == 1 and "resubmitting the job catches it up" in behind[0], err[-3000:]
        assert (out / rundir.REPORT).exists() and (out / rundir.MODEL / "1" / "saved_model.pb").exists()
        run = the_run(client, "gone")
        assert run.info.status == "RUNNING" and logged_history(client, run.info.run_id) != expected_history(out)
        link.start()
        finish(start_imdb_dist(*args))
    run = the_run(client, "gone")
    assert run.info.status == "FINISHED"
    assert logged_history(client, run.info.run_id) == expected_history(out)
    assert rundir.REPORT in {item.path for item in client.list_artifacts(run.info.run_id)}


def _wait_for(check, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _cli(*args: str, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    run_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "imdb_dist.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=run_env, check=False)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_a_tracker_that_cannot_be_used_is_one_error_line_and_exit_2_before_anything_is_written(
    mlflow_server, tmp_path: Path
) -> None:
    from bench.machine import free_port

    data = write_aclimdb(tmp_path / "data", {"train": 100})
    out = tmp_path / "run"
    cases = {
        # Nothing listens there: refused within seconds (not after MLflow's minutes of retries).
        "unreachable": (train_args(data, out, f"http://127.0.0.1:{free_port()}", "x"), "no MLflow server answers"),
        # Credentials belong in MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, and are never printed.
        "credentials": (train_args(data, out, "http://me:hunter2@127.0.0.1:1", "x"), "carries credentials"),
    }
    # An experiment deleted on the server: the server refuses to log into it.
    client = mlflow_server.client()
    client.delete_experiment(client.create_experiment("deleted"))
    cases["refused"] = (train_args(data, out, mlflow_server.uri, "deleted"), "is deleted on the server")
    for name, (args, message) in cases.items():
        started = time.monotonic()
        refused = _cli(*args)
        assert refused.returncode == 2, (name, refused.stderr[-3000:])
        assert len(_errors(refused)) == 1 and message in _errors(refused)[0], (name, refused.stderr[-3000:])
        assert "hunter2" not in refused.stderr
        assert time.monotonic() - started < 60, name
        assert not out.exists(), name
    # Without the MLflow client installed: the error names the extra to install.
    hidden = ("import sys; sys.modules['mlflow'] = None; from imdb_dist.cli import console_main; "
              "sys.argv[0] = 'imdb-dist'; sys.exit(console_main())")
    refused = _cli(*train_args(data, out, mlflow_server.uri, "x"), code=hidden)
    assert refused.returncode == 2 and len(_errors(refused)) == 1, refused.stderr[-3000:]
    assert "pip install 'imdb-dist[tracking]'" in _errors(refused)[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("tracking.uri=file:///tmp/mlruns", "must start with http://, https://, sqlite:///"),
        ("tracking.uri=https://u:secret@mlflow.example.com", "MLFLOW_TRACKING_TOKEN"),
        ("tracking.tags={mlflow.user: me}", "not mlflow.*"),
        ("tracking.experiment=", "1 to 250 printable characters"),
        ("tracking.flush_timeout_s=-1", "out of range"),
    ],
)
def test_a_bad_tracking_section_is_refused_naming_its_key(setting: str, message: str) -> None:
    from imdb_dist.errors import InputError as Refused

    with pytest.raises(Refused, match=message) as refused:
        load_config(None, [setting])
    assert "secret" not in str(refused.value)
    assert load_config(None, []).tracking.enabled is False  # off unless a URI is given


def test_a_sqlite_uri_tracks_a_run_with_no_server_and_one_it_cannot_create_is_refused(tmp_path: Path) -> None:
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    (tmp_path / "a-file").write_text("not a directory")
    refused = _cli(*train_args(data, tmp_path / "refused", f"sqlite:///{tmp_path}/a-file/mlflow.db", "local"))
    assert refused.returncode == 2 and len(_errors(refused)) == 1, refused.stderr[-3000:]
    assert "tracking.uri" in _errors(refused)[0] and not (tmp_path / "refused").exists()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run"
    # From tmp_path: with no server, MLflow keeps the artifacts in ./mlruns of the working directory.
    finish(subprocess.Popen([sys.executable, "-m", "imdb_dist.cli", *train_args(data, out, uri, "local")],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert (tmp_path / "mlruns").is_dir() and not (REPO / "mlruns").exists()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = the_run(client, "local")
    assert run.info.status == "FINISHED" and logged_history(client, run.info.run_id) == expected_history(out)
    assert client.search_model_versions("name='local'")[0].run_id == run.info.run_id
