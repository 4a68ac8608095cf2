"""Resuming a run: operational changes pass, a change to the model is refused unless named, and named ones are recorded.

Each test trains a tiny model in process on generated reviews (one epoch),
then resumes it for a second with some keys changed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_overrides, write_aclimdb

from imdb_dist import rundir
from imdb_dist.config import load_config
from imdb_dist.errors import InputError
from imdb_dist.rundir import read_metrics
from imdb_dist.train import run


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_aclimdb(tmp_path_factory.mktemp("fingerprint") / "data", {"train": 60})


def config(data: Path, out: Path, *extra: str):
    return load_config(None, [*tiny_overrides(data, out), "train.epochs=1", *extra])


def one_epoch(data: Path, out: Path, *extra: str) -> Path:
    run(config(data, out, *extra))
    return out


@pytest.fixture(scope="module")
def trained_once(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the tiny model, for the tests that resume a copy of it."""
    return one_epoch(data, tmp_path_factory.mktemp("trained-once") / "run")


def _unchanged(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in (rundir.CONFIG, rundir.FINGERPRINT, rundir.METRICS)}


def resumable(trained_once: Path, tmp_path: Path) -> Path:
    """A copy of the one-epoch run, for a test to resume."""
    return shutil.copytree(trained_once, tmp_path / "run")


def test_operational_changes_resume_the_run(data: Path, trained_once: Path, tmp_path: Path) -> None:
    out = resumable(trained_once, tmp_path)
    moved = shutil.copytree(data, tmp_path / "moved-data")  # the same reviews elsewhere
    run(config(moved, out, "train.epochs=2", "ray.max_failures=5", "ray.num_workers=3", "run.checkpoint_steps=3",
               "train.steps_per_execution=2", "run.log_every_steps=2", "distribution.cpu_devices=2",
               "train.deterministic=true"))
    assert [r["epoch"] for r in read_metrics(out / rundir.METRICS)] == [1, 2]
    report = json.loads((out / rundir.REPORT).read_text())
    assert report["changes"] == [] and report["epochs"] == 2


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["train.learning_rate=0.02"], "train.learning_rate"),
        (["model.lstm_units=5"], "model.lstm_units"),
        (["data.seed=7"], "data.seed"),
        (["train.batch_size=8"], "train.batch_size"),
    ],
)
def test_a_model_defining_change_is_refused_naming_the_key_and_writes_nothing(
    data, trained_once, tmp_path, extra, key
) -> None:
    out = resumable(trained_once, tmp_path)
    before = _unchanged(out)
    with pytest.raises(InputError, match=rf"holds a run whose {key} is .*add --change {key}"):
        run(config(data, out, "train.epochs=2", *extra))
    assert _unchanged(out) == before


def test_other_reviews_under_the_same_path_are_refused_as_a_change_of_data(data: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(data, tmp_path / "data")
    out = one_epoch(copy, tmp_path / "run")
    before = _unchanged(out)
    shutil.rmtree(copy)
    write_aclimdb(copy, {"train": 60}, seed=99)  # same layout and size, other reviews
    with pytest.raises(InputError, match=r"holds a run whose data\.content is '[0-9a-f]{64}'"):
        run(config(copy, out, "train.epochs=2"))
    assert _unchanged(out) == before


def test_a_change_of_resolved_precision_is_refused(data: Path, trained_once: Path, tmp_path: Path) -> None:
    out = resumable(trained_once, tmp_path)  # auto: float32 on this CPU
    with pytest.raises(InputError, match=r"train\.mixed_precision is 'float32', not 'mixed_bfloat16'"):
        run(config(data, out, "train.epochs=2", "train.mixed_precision=mixed_bfloat16"))
    # Naming auto's resolved value explicitly changes nothing.
    run(config(data, out, "train.epochs=2", "train.mixed_precision=float32"))


def test_a_named_change_trains_on_and_is_recorded_in_the_report(
    data: Path, trained_once: Path, tmp_path: Path
) -> None:
    out = resumable(trained_once, tmp_path)
    run(config(data, out, "train.epochs=2", "train.learning_rate=0.0005"), changes=["train.learning_rate"])
    report = json.loads((out / rundir.REPORT).read_text())
    assert report["changes"] == [{"key": "train.learning_rate", "from": 0.01, "to": 0.0005, "epochs_done": 1}]
    assert report["config"]["train"]["learning_rate"] == 0.0005
    # From here on the new value is the run's: resuming with it needs no --change.
    run(config(data, out, "train.epochs=3", "train.learning_rate=0.0005"))
    assert len(json.loads((out / rundir.REPORT).read_text())["changes"]) == 1


def test_more_epochs_extend_a_constant_schedule_but_change_a_cosine_one(
    data: Path, trained_once: Path, tmp_path: Path
) -> None:
    constant = resumable(trained_once, tmp_path)
    run(config(data, constant, "train.epochs=2"))
    assert json.loads((constant / rundir.REPORT).read_text())["changes"] == []
    cosine = one_epoch(data, tmp_path / "cosine", "train.lr_schedule=cosine")
    with pytest.raises(InputError, match=r"holds a run whose train\.epochs is 1, not 2.*--change train\.epochs"):
        run(config(data, cosine, "train.lr_schedule=cosine", "train.epochs=2"))
    run(config(data, cosine, "train.lr_schedule=cosine", "train.epochs=2"), changes=["train.epochs"])
    changes = json.loads((cosine / rundir.REPORT).read_text())["changes"]
    assert [(c["key"], c["from"], c["to"], c["epochs_done"]) for c in changes] == [("train.epochs", 1, 2, 1)]


def test_change_accepts_only_keys_a_resume_checks(data: Path, tmp_path: Path) -> None:
    sets = [a for s in tiny_overrides(data, tmp_path / "run") for a in ("--set", s)]
    for key in ("ray.max_failures", "train.learning_rat"):
        proc = subprocess.run([sys.executable, "-m", "imdb_dist.cli", "train", *sets, "--change", key],
                              cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --change {key}: not a key a resume checks")
    assert not (tmp_path / "run").exists()


def test_urls_files_added_to_the_data_regroup_the_split_a_resume_needs_change_data_content(tmp_path: Path) -> None:
    # A run begun on reviews split by review; the same reviews with the archive's urls files split by movie.
    data = write_aclimdb(tmp_path / "data", {"train": 60})
    out = one_epoch(data, tmp_path / "run")
    grouped = write_aclimdb(tmp_path / "grouped", {"train": 60}, movies=10)  # the same reviews (same seed)
    for label in ("pos", "neg"):
        assert {p.name: p.read_text() for p in (grouped / "train" / label).iterdir()} == {
            p.name: p.read_text() for p in (data / "train" / label).iterdir()}
    with pytest.raises(InputError, match=r"data\.content.*--change data\.content"):
        run(config(grouped, out, "train.epochs=2"))
    run(config(grouped, out, "train.epochs=2"), changes=["data.content"])
    report = json.loads((out / rundir.REPORT).read_text())
    assert report["epochs"] == 2 and report["validation_movies"] >= 1


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        (rundir.FINGERPRINT, '{"config": ', "is not valid JSON"),
        (rundir.FINGERPRINT, '{"colour": "blue"}', "is not a fingerprint imdb-dist wrote"),
        (rundir.CHANGES, '{"key": "train.learning_rate"\n', "is not valid JSON"),
    ],
    ids=["fingerprint-torn", "fingerprint-foreign", "changes-torn"],
)
def test_a_run_file_edited_by_hand_is_refused_naming_it_and_nothing_is_written(
    data: Path, trained_once: Path, tmp_path: Path, name: str, text: str, says: str
) -> None:
    # Written whole and renamed into place, these files are never torn by a crash: a resume that
    # cannot read one is refused (an input error: exit 2 from the CLI), not a traceback.
    out = resumable(trained_once, tmp_path)
    (out / name).write_text(text)
    before = _unchanged(out)
    with pytest.raises(InputError, match=rf"^{out / name} {says}"):
        run(config(data, out, "train.epochs=2"))
    assert _unchanged(out) == before
