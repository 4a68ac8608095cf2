"""The smoke preset on the real 25k IMDB training reviews, through the installed console script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, installed_script

from imdb_dist import rundir
from imdb_dist.rundir import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def imdb_dist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([installed_script("imdb-dist"), *args], capture_output=True, text=True, timeout=900, cwd=REPO, check=False)


def test_smoke_preset_on_real_data(real_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    proc = imdb_dist(
        "train",
        "--config", "job/configs/smoke.yaml",
        "--set", f"data.path={real_data}",
        "--set", f"run.output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (rundir.CONFIG, rundir.METRICS, rundir.TENSORBOARD, rundir.CHECKPOINTS, rundir.REPORT, rundir.CURVES):
        assert (out / name).exists(), name
    assert (out / rundir.MODEL / "1" / "saved_model.pb").is_file()
    # One log line per epoch, no per-batch progress in a non-interactive job.
    assert proc.stderr.count("epoch 1:") == 1 and "ETA" not in proc.stderr + proc.stdout
    report = json.loads((out / rundir.REPORT).read_text())
    assert report["validation"]["n"] == 2500
    assert report["validation"]["accuracy"] >= 0.80, report["validation"]
    assert read_metrics(out / rundir.METRICS)[-1]["val_accuracy"] >= 0.80

    evaluated = imdb_dist("evaluate", "--model", str(out / "model"), "--data", str(real_data), "--split", "validation")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(report["validation"]["accuracy"])

    predicted = imdb_dist(
        "predict", "--model", str(out / "model"),
        "One of the best films I have seen: wonderful acting and a moving story.",
        "Terrible. The plot made no sense and the acting was awful; a waste of time.",
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    labels = [json.loads(line)["label"] for line in predicted.stdout.splitlines()]
    assert labels == ["positive", "negative"]
