"""The imdb-dist command: exit codes, one-line errors, and the JSON it prints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import make_tarball, tiny_overrides, write_aclimdb

from imdb_dist import rundir
from imdb_dist.cli import main

# Long enough to look like the generated training reviews (the tiny model has seen nothing shorter).
GOOD = " ".join(["superb", "the", "brilliant", "film", "moving", "plot"] * 5)
BAD = " ".join(["dreadful", "the", "tedious", "film", "shoddy", "plot"] * 5)


def sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def assert_one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0]
    return err[0]


def _bad_yaml(tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("train:\n  epochs: [1\n")
    return ["--config", str(tmp / "bad.yaml")]


def _unknown_key(tmp: Path) -> list[str]:
    (tmp / "c.yaml").write_text("data:\n  max_lenn: 10\n")
    return ["--config", str(tmp / "c.yaml")]


def _corrupt_tarball(tmp: Path) -> Path:
    good = make_tarball(write_aclimdb(tmp / "src", {"train": 20}), tmp / "good.tar.gz")
    bad = tmp / "bad.tar.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return bad


def _empty_class(tmp: Path) -> Path:
    data = write_aclimdb(tmp / "src", {"train": 20})
    for review in (data / "train" / "neg").iterdir():
        review.unlink()
    return data


def _non_utf8(tmp: Path) -> Path:
    data = write_aclimdb(tmp / "src", {"train": 20})
    (data / "train" / "pos" / "3_9.txt").write_bytes(b"caf\xe9 latin-1 text")
    return data


@pytest.mark.parametrize(
    "case, needles",
    [
        (lambda t: _bad_yaml(t), ["invalid YAML", "bad.yaml", "(line "]),
        (lambda t: _unknown_key(t), ["data.max_lenn", "unknown key"]),
        (lambda t: ["--set", "train.epochs=two"], ["train.epochs", "expected int"]),
        (lambda t: ["--set", "data.max_len=0"], ["data.max_len", "out of range"]),
        (lambda t: ["--set", "train.epochs"], ["not of the form key.path=value"]),
        (lambda t: ["--set", f"data.path={t / 'nowhere'}"], ["does not exist", "nowhere"]),
        (lambda t: ["--set", f"data.path={_corrupt_tarball(t)}"], ["corrupt or truncated", "bad.tar.gz"]),
        (lambda t: ["--set", f"data.path={_empty_class(t)}"], ["train/neg holds no reviews"]),
        (lambda t: ["--set", f"data.path={_non_utf8(t)}"], ["not valid UTF-8", "3_9.txt"]),
        (lambda t: ["--set", "train.mixed_precision=mixed_float16"], ["train.mixed_precision", "needs a GPU"]),
    ],
    ids=["bad-yaml", "unknown-key", "wrong-type", "impossible-value", "override-syntax", "missing-data",
         "corrupt-tarball", "empty-class-dir", "non-utf8-review", "mixed-float16-without-gpu"],
)
def test_train_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys, case, needles) -> None:
    out = tmp_path / "run"
    data = write_aclimdb(tmp_path / "data", {"train": 20})
    args = ["train", *sets(tiny_overrides(data, out)), *case(tmp_path)]
    assert main(args) == 2
    assert_one_line_error(capsys, *needles)
    assert not out.exists()


def test_train_unwritable_output_dir_exits_2(tmp_path: Path, capsys) -> None:
    data = write_aclimdb(tmp_path / "data", {"train": 20})
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", *sets(tiny_overrides(data, blocker / "run"))]) == 2
    assert_one_line_error(capsys, "run.output_dir", "is a file")
    # launch: refused in the driver before it reads the data or joins a cluster, naming its own key.
    assert main(["launch", *sets([*tiny_overrides(data, tmp_path / "unused"), f"ray.storage_path={blocker}/runs"])]) == 2
    assert_one_line_error(capsys, "ray.storage_path", "is a file")


def test_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict"])
    assert exc.value.code == 2
    assert_one_line_error(capsys, "--model")


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_dir_that_is_not_a_model_exits_2(tmp_path: Path, capsys, command: str) -> None:
    extra = ["--data", str(tmp_path)] if command == "evaluate" else ["some text"]
    assert main([command, "--model", str(tmp_path), *extra]) == 2
    assert_one_line_error(capsys, "holds no complete imdb-dist model export")


def test_predict_scores_each_review(trained_run: Path, capsys) -> None:
    model = str(trained_run / rundir.MODEL)
    assert main(["predict", "--model", model, GOOD, BAD, ""]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["label"] == "positive" and rows[1]["label"] == "negative"
    assert rows[0]["score"] > 0.5 > rows[1]["score"]
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)


def test_predict_file_skips_blank_lines_and_keeps_line_numbers(trained_run: Path, tmp_path: Path, capsys) -> None:
    reviews = tmp_path / "reviews.txt"
    reviews.write_text(f"{GOOD}\n\n   \n{BAD}\n", encoding="utf-8")
    assert main(["predict", "--model", str(trained_run / rundir.MODEL), "--file", str(reviews)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["line"], r["label"]) for r in rows] == [(1, "positive"), (4, "negative")]


@pytest.mark.parametrize(
    "content, args, needle",
    [
        (None, [], "needs review TEXT arguments or --file"),
        (b"\xff\xfe\n", ["--file"], "not valid UTF-8"),
        (b"\n  \n", ["--file"], "holds no reviews"),
    ],
    ids=["nothing", "non-utf8-file", "only-blank-lines"],
)
def test_predict_bad_input_exits_2(trained_run: Path, tmp_path: Path, capsys, content, args, needle) -> None:
    if content is not None:
        (tmp_path / "in.txt").write_bytes(content)
        args = [*args, str(tmp_path / "in.txt")]
    assert main(["predict", "--model", str(trained_run / rundir.MODEL), *args]) == 2
    assert_one_line_error(capsys, needle)


def test_predict_takes_a_1_mb_review_whitespace_and_any_unicode(trained_run: Path, tmp_path: Path, capsys) -> None:
    reviews = tmp_path / "in.txt"
    huge = " ".join([GOOD] * 6000)
    assert len(huge.encode()) > 1_000_000
    reviews.write_text(huge + "\n", encoding="utf-8")
    model = str(trained_run / rundir.MODEL)
    assert main(["predict", "--model", model, "--file", str(reviews)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["line"] == 1 and row["label"] == "positive"
    texts = ["   \t ", "Un film émouvant, très réussi 🎬🍿👍", "素晴らしい映画でした", "ممتاز"]
    assert main(["predict", "--model", model, *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert all(0.0 <= r["score"] <= 1.0 and r["label"] in ("positive", "negative") for r in rows)


def test_train_with_a_10_mb_review_among_the_data_succeeds(tmp_path: Path, capsys) -> None:
    data = write_aclimdb(tmp_path / "data", {"train": 50})
    huge = " ".join([GOOD] * 60_000)
    assert len(huge.encode()) > 10_000_000
    (data / "train" / "pos" / "999_10.txt").write_text(huge, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", *sets(tiny_overrides(data, out)), "--set", "train.epochs=1"]) == 0
    assert (out / rundir.REPORT).is_file()


def test_evaluate_on_a_source_with_only_a_test_split(trained_run: Path, tmp_path: Path, capsys) -> None:
    data = write_aclimdb(tmp_path / "data", {"test": 15}, seed=7)
    with tarfile.open(tmp_path / "test.tar.gz", "w:gz") as archive:
        archive.add(data, arcname="aclImdb")
    assert main(["evaluate", "--model", str(trained_run / rundir.MODEL), "--data", str(tmp_path / "test.tar.gz")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"accuracy", "auc", "loss", "n", "confusion"}
    assert result["n"] == 30 and sum(map(sum, result["confusion"])) == 30
    assert result["accuracy"] >= 0.8


def test_evaluate_without_data_reads_imdb_data(trained_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """No --data: the source is auto, as in training ($IMDB_DATA here; else the verified download)."""
    data = write_aclimdb(tmp_path / "data", {"test": 12}, seed=3)
    monkeypatch.setenv("IMDB_DATA", str(data))
    assert main(["evaluate", "--model", str(trained_run / rundir.MODEL)]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 24


def test_evaluate_validation_reproduces_the_runs_split(trained_run: Path, capsys) -> None:
    data = load_data_path(trained_run)
    assert main(["evaluate", "--model", str(trained_run / rundir.MODEL), "--data", data, "--split", "validation"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((trained_run / rundir.REPORT).read_text())["validation"]
    assert result["n"] == report["n"]
    assert result["accuracy"] == pytest.approx(report["accuracy"])
    assert result["confusion"] == report["confusion"]


def test_evaluate_validation_reproduces_a_cross_validation_folds_split(tmp_path: Path, capsys) -> None:
    from imdb_dist.config import load_config
    from imdb_dist.train import run

    data = write_aclimdb(tmp_path / "data", {"train": 60})
    run_dir = run(load_config(None, [*tiny_overrides(data, tmp_path / "run"), "data.folds=3", "data.fold=2"]))
    assert main(["evaluate", "--model", str(run_dir / rundir.MODEL), "--data", str(data), "--split", "validation"]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((run_dir / rundir.REPORT).read_text())["validation"]
    assert result["n"] == report["n"] == 40  # fold 2 of 3 over 120 reviews, not the 10% fraction split (12)
    assert result["confusion"] == report["confusion"]


def load_data_path(run_dir: Path) -> str:
    from imdb_dist.config import load_config

    return load_config(run_dir / rundir.CONFIG).data.path


def test_the_console_script_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("train: {epochs: !!python/object/apply:os.system [echo pwned]}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "imdb_dist.cli", "train", "--config", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "pwned" not in proc.stdout


def test_bad_data_read_while_tensorflow_loads_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    """A fresh ``imdb-dist train`` reads the archive in a child process: its error is still one line, exit 2."""
    out = tmp_path / "run"
    data = _corrupt_tarball(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "imdb_dist.cli", "train", *sets(tiny_overrides(data, out))],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]

    *logged, error = proc.stderr.strip().splitlines()
    assert all(re.match(OUR_LOG_LINE, line) for line in logged), logged  # no traceback, no native noise
    assert error.startswith("error: ") and "corrupt or truncated" in error and "bad.tar.gz" in error
    assert not out.exists()


def test_the_ray_job_entrypoint_runs_launch() -> None:
    from conftest import REPO

    proc = subprocess.run(
        [sys.executable, "job/train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: imdb-dist launch" in proc.stdout and "--config" in proc.stdout


# Lines through our logging set-up: "2026-11-27 11:27:13,123 INFO imdb_dist.train: ...". Python
# libraries' warnings come through it too (e.g. Keras timing its callbacks on a tiny model); native
# lines and stray prints do not.
OUR_LOG_LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) [\w.]+: "


def test_a_healthy_run_prints_only_our_lines(trained_run: Path, tmp_path: Path) -> None:
    """No TensorFlow C++ start-up lines (absl notice, CUDA stubs, CPU features, cuInit) on stderr: log lines only.

    Nor a line that says "error": on a machine without a GPU, TensorFlow's
    "failed call to cuInit" is relayed only where a GPU was asked for (this
    run asks for none); the ``devices:`` line quotes it as its reason.
    """

    from conftest import installed_script

    data = write_aclimdb(tmp_path / "data", {"train": 100})
    commands = [
        ["train", *sets(tiny_overrides(data, tmp_path / "run"))],
        ["predict", "--model", str(trained_run / rundir.MODEL), GOOD],
    ]
    # A fresh HOME's matplotlib config: the curves build its font cache, which it announces at INFO.
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "matplotlib")}
    for command in commands:
        proc = subprocess.run(
            [installed_script("imdb-dist"), *command], capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env=env, check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        foreign = [line for line in proc.stderr.splitlines() if line.strip() and not re.match(OUR_LOG_LINE, line)]
        assert not foreign, f"imdb-dist {command[0]} printed lines that are not ours: {foreign[:5]}"
        libraries = [line for line in proc.stderr.splitlines() if re.match(r"^\S+ \S+ \w+ matplotlib", line)]
        assert not libraries, f"imdb-dist {command[0]} relayed a library's chatter: {libraries[:3]}"
        # The devices line may quote what TensorFlow said (cuInit's "CUDA error" on a machine without a GPU) as
        # its reason: a quote, not a line of its own.
        unquoted = [line.split("TensorFlow said: ", 1)[0] for line in proc.stderr.splitlines()]
        errors = [line for line in unquoted if re.search(r"\berror\b", line, re.IGNORECASE)]
        assert not errors, f"a healthy imdb-dist {command[0]} printed a line that says error: {errors[:3]}"
        if command[0] == "train":
            assert "done: validation accuracy" in proc.stderr
            devices = [line for line in proc.stderr.splitlines() if ": devices: " in line]
            assert len(devices) == 1 and re.search(r": devices: (the CPU, no GPU: .|\d+ GPU\(s\): )", devices[0]), devices


ACCELERATOR_LINES = [
    "Could not find cuda drivers",
    "failed call to cuInit: UNKNOWN (303)",
    "Cannot dlopen some GPU libraries.",
    "NCCL version 2.21.5",
]
_NATIVE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1795779347.209620   16682 cpu_feature_guard.cc:227] This binary is optimized",
    f"I0000 00:00:1795779347.209620   16682 cudart_stub.cc:31] {ACCELERATOR_LINES[0]}",
    f"E0000 00:00:1795779347.2   16682 cuda.cc:1] {ACCELERATOR_LINES[1]}",
    f"W0000 00:00:1795779347.2   16682 gpu_device.cc:2] {ACCELERATOR_LINES[2]}",
    f"I0000 00:00:1795779347.2   16682 nccl.cc:3] {ACCELERATOR_LINES[3]}",
    "E0000 00:00:1795779347.2   16682 op_kernel.cc:1] a real native error",
]
_FILTER_SCRIPT = """
import logging, os, sys
from imdb_dist.logs import accelerator_notes, native_startup_filtered, relay_accelerator_notes, setup_logging
mode = sys.argv[1]
if mode != "plain":
    setup_logging()
if mode == "debug":
    logging.getLogger().setLevel(logging.DEBUG)
try:
    with native_startup_filtered():
        for line in sys.argv[2:]:
            os.write(2, (line + "\\n").encode())
        print("a python line", file=sys.stderr)
        raise SystemExit(3)
finally:
    if mode == "relay":  # as the device check does where a GPU was asked for
        relay_accelerator_notes()
    print(list(accelerator_notes()))
"""


def _filtered(mode: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", _FILTER_SCRIPT, mode, *_NATIVE]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_the_start_up_filter_drops_noise_and_keeps_accelerator_lines_out_of_an_info_log() -> None:
    proc = _filtered("log")
    assert proc.returncode == 3
    # Noise (absl's notice, the CPU-feature line) is gone; other native and Python lines are kept as written;
    # the accelerator lines (cuInit's "error" among them) are no line of an INFO log.
    assert proc.stderr.splitlines() == [_NATIVE[-1], "a python line"]
    assert proc.stdout.strip() == repr(ACCELERATOR_LINES)  # kept for the "no GPU" reason


@pytest.mark.parametrize(("mode", "level"), [("debug", "DEBUG"), ("relay", "INFO")])
def test_the_accelerator_lines_are_relayed_as_ours_at_debug_and_at_info_when_asked(mode: str, level: str) -> None:
    proc = _filtered(mode)
    assert proc.returncode == 3
    lines = proc.stderr.splitlines()
    assert lines[:2] == [_NATIVE[-1], "a python line"]
    relayed = lines[2:]
    assert len(relayed) == len(ACCELERATOR_LINES)
    ours = OUR_LOG_LINE.replace("(INFO|WARNING)", level)
    for line, message in zip(relayed, ACCELERATOR_LINES):
        assert re.match(ours, line) and line.endswith(message), line
    assert "TensorFlow warning (gpu_device.cc:2): Cannot dlopen" in relayed[2]
    assert "TensorFlow error (cuda.cc:1): failed call to cuInit" in relayed[1]
    assert proc.stdout.strip() == repr(ACCELERATOR_LINES)


def test_without_a_configured_log_the_start_up_filter_keeps_accelerator_lines_as_written() -> None:
    proc = _filtered("plain")
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == [*_NATIVE[2:], "a python line"]


_HOOKED_IMPORT = """
import json, sys
from imdb_dist.logs import accelerator_notes, quiet_tensorflow_imports
quiet_tensorflow_imports()
quiet_tensorflow_imports()  # a second call installs nothing more
import tensorflow  # as ray.train.tensorflow does, with nothing of ours around it
print(json.dumps({"notes": list(accelerator_notes()), "loader": type(tensorflow.__spec__.loader).__name__,
                  "cuda": tensorflow.test.is_built_with_cuda(),
                  "finders": sum(type(f).__name__ == "_QuietTensorFlowFinder" for f in sys.meta_path)}))
"""


def test_ray_s_setup_hook_makes_a_bare_tensorflow_import_quiet_and_keeps_what_it_said_about_gpus() -> None:
    # The hook Ray runs in every process of our jobs (imdb_dist.ray_cluster.connect), before Ray
    # Train's TensorFlow backend imports TensorFlow there.
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", _HOOKED_IMPORT], capture_output=True, text=True, timeout=120,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from conftest import tensorflow_startup_lines

    assert not tensorflow_startup_lines(proc.stderr), proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # What it said about CUDA (on this machine: no driver) is kept for the device check, and printed
    # nowhere: it is debug output until a job asks for a GPU.
    assert not proc.stderr.strip(), proc.stderr[-2000:]
    import tensorflow as tf

    if got["cuda"] and not tf.config.list_physical_devices("GPU") and "CUDA_VISIBLE_DEVICES" not in os.environ:
        assert got["notes"]  # this machine's case: TensorFlow said why it found no GPU
    assert got["loader"] != "_QuietLoader" and got["finders"] == 1  # TensorFlow keeps its own loader


_OVERLAPPING = """
import os, threading
from imdb_dist.logs import native_startup_filtered
NOISE = b"I0000 00:00:1796230718.208342   17784 port.cc:153] oneDNN custom operations are on.\\n"
a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
def a():
    with native_startup_filtered():
        a_in.set(); b_in.wait(); os.write(2, NOISE + b"from a\\n")
    a_out.set()
def b():
    a_in.wait()
    with native_startup_filtered():  # entered inside a's block, left after it
        b_in.set(); a_out.wait(); os.write(2, NOISE + b"from b\\n")
threads = [threading.Thread(target=a), threading.Thread(target=b)]
for t in threads: t.start()
for t in threads: t.join()
os.write(2, b"after\\n")
"""


def test_the_start_up_filter_holds_for_overlapping_threads_and_gives_stderr_back() -> None:
    # A Ray process may import TensorFlow in one thread and tf_keras in another: each block's
    # noise is dropped, its other lines kept, and stderr works after the last block ends.
    proc = subprocess.run([sys.executable, "-c", _OVERLAPPING], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["from a", "from b", "after"]
