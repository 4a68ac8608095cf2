"""``imdb-dist tune``: refusals of bad search spaces, and real sweeps on a local Ray cluster."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, sweep_config, write_aclimdb

from imdb_dist import rundir
from imdb_dist.cli import main
from imdb_dist.config import load_config
from imdb_dist.rundir import read_metrics

LR = "train.learning_rate"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_aclimdb(tmp_path_factory.mktemp("tune") / "data", {"train": 60})


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"space": {}}, "config key tune.space: is empty"),
        ({"space": {LR: {"uniform": [0.1, 0.01]}}}, f"tune.space.{LR}.uniform: impossible range"),
        ({"space": {LR: {"loguniform": [0.0, 0.01]}}}, f"tune.space.{LR}.loguniform: impossible range"),
        ({"space": {"model.dropout": {"uniform": [0.2, 1.5]}}}, "tune.space.model.dropout: 1.5 is not a valid value"),
        ({"space": {"train.epochs": {"randint": [3, 3]}}}, "tune.space.train.epochs.randint: impossible range"),
        ({"space": {"train.nonsense": {"choice": [1, 2]}}}, "config key train.nonsense: unknown key"),
        ({"space": {LR: {"normal": [0.0, 1.0]}}}, f"tune.space.{LR}: must be one of"),
        ({"space": {LR: {"choice": []}}}, f"tune.space.{LR}.choice: must be a non-empty list"),
        ({"space": {"run.output_dir": {"choice": ["a", "b"]}}}, "tune.space.run.output_dir: cannot be searched"),
        ({"space": {LR: {"choice": [0.01]}}, "sampler": "bayes"}, "config key tune.sampler: unknown key"),
        ({"space": {LR: {"choice": [0.01]}}, "trials": 0}, "config key tune.trials: 0 is out of range"),
        ({"space": {LR: {"choice": [0.01]}}, "metric": "val_auc"}, "config key tune.metric: 'val_auc' is not one of"),
    ],
)
def test_a_bad_tune_section_is_one_error_line_and_exit_2(data, tmp_path, capsys, tune, message) -> None:
    out = tmp_path / "sweep"
    config = sweep_config(tmp_path / "tune.yaml", data, out, tune)
    assert main(["tune", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists(), "a refused sweep must write nothing"


def test_a_directory_holding_another_sweep_or_other_files_is_refused(data, tmp_path, capsys) -> None:
    from imdb_dist.config import dump_yaml

    out = tmp_path / "sweep"
    config = sweep_config(tmp_path / "tune.yaml", data, out, {"space": {LR: {"choice": [0.01, 0.02]}}})
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["tune", "--config", str(config)]) == 2
    assert "is not empty and holds no sweep" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    other = load_config(config, ["tune.trials=9"])
    (out / rundir.CONFIG).write_text(dump_yaml(other))
    assert main(["tune", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "holds a sweep of a different config (sections tune differ)" in err and err.count("\n") == 1


def test_missing_data_is_one_error_line_and_exit_2_before_any_trial(data, tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    config = sweep_config(tmp_path / "tune.yaml", tmp_path / "nowhere", out, {"space": {LR: {"choice": [0.01]}}})
    assert main(["tune", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nowhere" in err, err
    assert not out.exists()


def test_the_shipped_sweep_preset_has_a_valid_space() -> None:
    from imdb_dist.tune import check_space

    cfg = load_config(REPO / "job" / "configs" / "tune-local.yaml")
    check_space(cfg)
    assert cfg.tune.trials >= 4 and cfg.tune.workers_per_trial == 1


def test_the_space_is_checked_before_tensorflow_or_ray_loads() -> None:
    # imdb-dist tune refuses a bad space at once: importing the package and checking loads neither.
    code = (
        "import sys\n"
        "from imdb_dist.config import load_config\n"
        "from imdb_dist.tune import check_space\n"
        f"check_space(load_config({str(REPO / 'job' / 'configs' / 'tune-local.yaml')!r}))\n"
        "print(sorted(m for m in ('tensorflow', 'tf_keras', 'ray') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_train_ignores_a_tune_section_and_refuses_a_bad_one(data, tmp_path) -> None:
    good = load_config(sweep_config(tmp_path / "a.yaml", data, tmp_path / "a", {"space": {LR: {"choice": [0.1]}}}))
    assert good.tune.space == {LR: {"choice": [0.1]}}
    with pytest.raises(Exception, match="tune.trials"):
        load_config(sweep_config(tmp_path / "b.yaml", data, tmp_path / "b", {"space": {}, "trials": -1}))


def _tune(config: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own
    return subprocess.Popen([sys.executable, "-m", "imdb_dist.cli", "tune", "--config", str(config)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return err


def _results(out: Path) -> list[dict]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.ray
@pytest.mark.timeout(400)  # a sweep on a local Ray cluster, interrupted, then resumed
def test_a_sweep_writes_results_best_config_and_curves_and_resumes_into_the_same_mlflow_runs(
    data, mlflow_server, tmp_path
) -> None:
    out = tmp_path / "sweep"
    grid = [0.01, 0.03]
    config = sweep_config(tmp_path / "tune.yaml", data, out,
                          {"space": {LR: {"grid": grid}}, "trials": 1, "early_stop": False},
                          tracking={"uri": mlflow_server.uri, "experiment": "resumed-sweep"})
    # Interrupted once the first epoch of a trial is logged: Tune saves its state on SIGINT.
    proc = _tune(config)
    deadline = time.monotonic() + 300
    while not any(read_metrics(path) for path in (out / "trials").glob(f"*/{rundir.METRICS}")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "run the same command again to resume" in err, err[-3000:]
    assert not (out / "results.csv").exists(), "an interrupted sweep has no results yet"

    err = _finish(_tune(config))
    assert "resuming the sweep" in err
    rows = _results(out)
    assert sorted(float(row[LR]) for row in rows) == grid
    for row in rows:
        assert row["status"] == "completed" and row["epochs"] == "2"
        assert 0.0 <= float(row["val_accuracy"]) <= 1.0
        # Every epoch trained and logged once, across the interruption.
        assert [r["epoch"] for r in read_metrics(Path(row["run_dir"]) / rundir.METRICS)] == [1, 2]
        report = json.loads((Path(row["run_dir"]) / rundir.REPORT).read_text())
        assert report["config"]["train"]["learning_rate"] == float(row[LR])
        assert report["validation"]["accuracy"] == pytest.approx(float(row["val_accuracy"]), abs=1e-6)
    best_row = max(rows, key=lambda row: float(row["val_accuracy"]))
    best = load_config(out / "best.yaml")
    assert best.train.learning_rate == float(best_row[LR])
    assert best.tune.space == {}
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"
    # MLflow (tests/test_tracking.py): the sweep's run, and each trial's training run nested under it, one
    # run each across the interruption, its history its run directory's, its value a param; the best tagged.
    from test_tracking import expected_history, logged_history

    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name("resumed-sweep").experiment_id])
    (sweep,) = [run for run in runs if "imdb_dist.sweep" in run.data.tags]
    trials = {run.data.tags["imdb_dist.run_dir"]: run for run in runs
              if run.data.tags.get("mlflow.parentRunId") == sweep.info.run_id}
    assert len(runs) == 3 and sorted(trials) == sorted(row["run_dir"] for row in rows)
    assert sweep.info.status == "FINISHED" and sweep.data.tags["imdb_dist.best_trial"] == best_row["trial_id"]
    for row in rows:
        trial = trials[row["run_dir"]]
        assert trial.info.status == "FINISHED" and float(trial.data.params[LR]) == float(row[LR])
        assert logged_history(client, trial.info.run_id) == expected_history(Path(row["run_dir"]))
        assert (trial.data.tags.get("imdb_dist.best_trial") == "true") == (row is best_row)

    # best.yaml is a complete config `imdb-dist train` takes as it is.
    trained = subprocess.run([sys.executable, "-m", "imdb_dist.cli", "train", "--config", str(out / "best.yaml"),
                              "--set", f"run.output_dir={tmp_path / 'best'}"], cwd=REPO, capture_output=True, text=True,
                             check=False)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "best" / rundir.REPORT).is_file()


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_cross_validated_sweep_scores_each_trial_by_its_folds_mean_in_nested_mlflow_runs(
    data, mlflow_server, tmp_path
) -> None:
    out = tmp_path / "sweep"
    # One trial (several are the sweep above's), trained on each of two folds.
    config = sweep_config(tmp_path / "tune.yaml", data, out,
                          {"space": {LR: {"grid": [0.03]}}, "trials": 1, "folds": 2},
                          tracking={"uri": mlflow_server.uri, "experiment": "sweep"}, epochs=1)
    _finish(_tune(config))
    rows = _results(out)
    assert len(rows) == 1
    for row in rows:
        assert row["status"] == "completed"
        folds = [json.loads((Path(row["run_dir"]) / f"fold{k}" / rundir.REPORT).read_text()) for k in range(2)]
        assert [f["config"]["data"]["fold"] for f in folds] == [0, 1]
        assert sum(f["validation"]["n"] for f in folds) == 120  # the two folds hold out every review once
        mean = sum(f["validation"]["accuracy"] for f in folds) / 2
        assert float(row["cv_val_accuracy"]) == pytest.approx(mean, abs=1e-6)
    assert load_config(out / "best.yaml").data.folds == 0, "best.yaml trains on the usual split"
    # MLflow: the sweep's run; under it the trial's, with its sampled value and its fold-averaged score;
    # under the trial its two folds' training runs; the best trial tagged on both.
    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    parents = {run.info.run_id: run.data.tags.get("mlflow.parentRunId") for run in runs}
    (sweep,) = [run for run in runs if parents[run.info.run_id] is None]
    trials = [run for run in runs if parents[run.info.run_id] == sweep.info.run_id]
    assert len(runs) == 1 + 1 + 2 and len(trials) == 1
    best = max(rows, key=lambda row: float(row["cv_val_accuracy"]))
    assert sweep.info.status == "FINISHED" and sweep.data.tags["imdb_dist.best_trial"] == best["trial_id"]
    assert sweep.data.metrics["best_cv_val_accuracy"] == pytest.approx(float(best["cv_val_accuracy"]))
    for trial in trials:
        row = next(row for row in rows if row["trial_id"] == trial.data.tags["imdb_dist.trial_id"])
        assert json.loads(trial.data.params[LR]) == float(row[LR])
        scores = client.get_metric_history(trial.info.run_id, "cv_val_accuracy")
        assert [m.step for m in scores] == [0, 1]
        assert scores[-1].value == pytest.approx(float(row["cv_val_accuracy"]), abs=1e-6)
        assert (trial.data.tags.get("imdb_dist.best_trial") == "true") == (row is best)
        folds = [run for run in runs if parents[run.info.run_id] == trial.info.run_id]
        assert len(folds) == 2 and all(run.info.status == "FINISHED" for run in folds)
