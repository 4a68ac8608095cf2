"""Shared fixtures: generated aclImdb-layout data, the real data path, two logical CPUs.

Generated reviews are built from made-up word lists (no review text is
copied): positive reviews draw from POSITIVE words, negative ones from
NEGATIVE words, both padded with NEUTRAL filler, so a model can learn them.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

# Ray resolves 127.0.0.1 to the host's address on Linux unless its single-machine
# mode is on; keep every test cluster (and the TF_CONFIG it writes) on loopback.
# Read when ray is first imported, so set before anything imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# tf.keras resolves to tf_keras, as in every process of the job (imdb_dist.logs, launch.WORKER_ENV,
# the Dockerfile): else each test process, and every process a test starts (a benchmark, a worker,
# a child script), imports Keras 3 and matplotlib with TensorFlow, 1.2 s of CPU each (BENCHMARKS).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# Strict skips under CI, the longest files first, each file's time (tests/suite_rules.py).
pytest_plugins = ["suite_rules"]

from imdb_dist.logs import native_startup_filtered

# TensorFlow's start-up lines are filtered as the CLI filters them: else every
# pytest process (the controller and each xdist worker) prints them into the log.
# Its CUDA lines (cuInit's "error" on a machine without a GPU) are kept only
# where no log is configured; here they go to the log at DEBUG, as in the CLI.
_import_log = logging.NullHandler()
logging.getLogger().addHandler(_import_log)
with native_startup_filtered():
    import tensorflow as tf

    # Split the host CPU into two logical devices before any op runs, so tests can
    # build a MirroredStrategy with two replicas on a machine with no GPU.
    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
logging.getLogger().removeHandler(_import_log)


def sigint_as_from_a_shell() -> None:
    """``preexec_fn`` for a child that must hear Ctrl-C: SIGINT at its default, unblocked.

    pytest-xdist's workers ignore SIGINT (the controller handles Ctrl-C),
    and an ignored SIGINT is inherited: a Python child then never raises
    KeyboardInterrupt. A user's shell starts a command with the default.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


@pytest.fixture(autouse=True)
def _sigint_left_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    """Put SIGINT back as the test found it; warn, naming the test, if it was left ignored or blocked.

    Ray Train's trainer installs a SIGINT handler of its own and leaves it
    (restored quietly: a handler is not inherited by children). An ignored
    or blocked SIGINT is inherited, so one left behind would make a later
    test's Ctrl-C reach a child that cannot hear it.
    """
    handler, blocked = signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    now_handler = signal.getsignal(signal.SIGINT)
    now_blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if (now_handler, now_blocked) == (handler, blocked):
        return
    signal.signal(signal.SIGINT, handler)
    signal.pthread_sigmask(signal.SIG_BLOCK if blocked else signal.SIG_UNBLOCK, [signal.SIGINT])
    newly_deaf = (now_handler == signal.SIG_IGN and handler != signal.SIG_IGN) or (now_blocked and not blocked)
    if newly_deaf:
        warnings.warn(
            f"{request.node.nodeid} left SIGINT {'blocked' if now_blocked else 'ignored'}; restored",
            pytest.PytestWarning,
            stacklevel=1,
        )


@pytest.fixture(autouse=True)
def _distinct_collective_keys() -> None:
    """Give each test's MirroredStrategy its own collective key range.

    Every MirroredStrategy in a process numbers its collective ops from the
    same base, so a second strategy's all-reduce can meet the first one's
    stale instance with another shape. TensorFlow's own tests move this
    base per test ("Only set this in tests").
    """
    tf.distribute.MirroredStrategy._collective_key_base += 10_000


REPO = Path(__file__).resolve().parents[1]

# A TensorFlow C++ start-up line as absl writes it, anywhere in a line (Ray prefixes the lines of
# its processes with their name): absl's pre-init notice, or a line of the files that speak while
# TensorFlow loads ("I0000 00:00:17... 123 port.cc:153] oneDNN ..."). Not every absl-format line:
# gRPC's or a runtime error's are not start-up noise.
TF_STARTUP_LINE = re.compile(
    r"absl::InitializeLog"
    r"|\b[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ (port|cpu_feature_guard|cudart_stub|cuda_platform|cuda_dnn|cuda_fft"
    r"|cuda_blas|cuda_executor)\.cc:\d+\] "
)


# The Ray Train controller's line for each checkpoint it keeps (imdb_dist.controller_log), with its
# timestamp: groups (time, epoch, step).
KEPT = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO imdb_dist\.controller_log: "
                  r"Ray Train kept the checkpoint: training resumes from epoch (\d+) step (\d+)")


def tensorflow_startup_lines(output: str) -> list[str]:
    """The lines of ``output`` that are TensorFlow's native start-up noise (none, in a healthy run's output)."""
    return [line for line in output.splitlines() if TF_STARTUP_LINE.search(line)]

def start_imdb_dist(*args: str, preexec_fn=None) -> subprocess.Popen:
    """``imdb-dist ARGS`` as a child process of this Python, from the repository root, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "imdb_dist.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,  # noqa: PLW1509 - two signal calls, safe after fork
    )


def installed_script(name: str) -> str:
    """A console script of this Python's environment (``imdb-dist``, ``ray``), found next to
    ``sys.executable`` first: the venv need not be activated, nor on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    assert found, f"the {name} console script is not installed (pip install -e .)"
    return found


def _real_data() -> Path:
    """The real reviews: $IMDB_REAL_DATA, else CI's ../shared copy, else the archive ``imdb-dist train`` downloaded."""
    if os.environ.get("IMDB_REAL_DATA"):
        return Path(os.environ["IMDB_REAL_DATA"])
    shared = REPO.parent / "shared" / "data" / "imdb" / "aclImdb_train.tar.gz"
    if shared.is_file():
        return shared
    from imdb_dist.config import OFFICIAL_URL
    from imdb_dist.data.download import cache_dir

    downloaded = cache_dir() / OFFICIAL_URL.rpartition("/")[2]
    return downloaded if downloaded.is_file() else shared


REAL_DATA = _real_data()

POSITIVE = ["superb", "delightful", "masterful", "gripping", "charming", "brilliant", "moving", "joyous"]
NEGATIVE = ["dreadful", "tedious", "clumsy", "lifeless", "awful", "boring", "muddled", "shoddy"]
NEUTRAL = ["film", "plot", "actor", "scene", "the", "a", "story", "camera", "music", "ending", "it", "was"]


def fake_review(rng: random.Random, positive: bool, length: int = 30) -> str:
    """A made-up review: neutral filler with a few sentiment words and some markup."""
    words = [rng.choice(NEUTRAL) for _ in range(length)]
    cue = POSITIVE if positive else NEGATIVE
    for _ in range(max(3, length // 6)):
        words[rng.randrange(length)] = rng.choice(cue)
    text = " ".join(words)
    return text[:40] + "<br /><br />" + text[40:] + "."


def write_aclimdb(
    root: Path,
    splits: dict[str, int],
    *,
    seed: int = 0,
    unsup: int = 0,
    length: int = 30,
    label_noise: float = 0.0,
    movies: int = 0,
) -> Path:
    """Write ``aclImdb/<split>/{pos,neg}/ID_RATING.txt`` with ``n`` reviews per class per split.

    ``label_noise``: the share of reviews written with the other class's
    words, so that a model can only memorise them (it overfits).
    ``movies``: also write the official ``<split>/urls_{pos,neg}.txt``, each
    review's movie drawn from that many.
    """
    rng = random.Random(seed)
    # Its own stream: the reviews are the same with or without the urls files.
    movie_rng = random.Random(seed + 1)
    base = root / "aclImdb"
    for split, n in splits.items():
        for label in ("pos", "neg"):
            folder = base / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rating = rng.randint(7, 10) if label == "pos" else rng.randint(1, 4)
                # Only drawn with noise, so noiseless data stays what it always was.
                flipped = label_noise > 0 and rng.random() < label_noise
                positive = (label == "pos") != flipped
                (folder / f"{i}_{rating}.txt").write_text(fake_review(rng, positive, length), encoding="utf-8")
            if movies:
                urls = [f"http://www.imdb.com/title/tt{movie_rng.randrange(movies):07d}/usercomments\n" for _ in range(n)]
                (base / split / f"urls_{label}.txt").write_text("".join(urls), encoding="utf-8")
    if unsup:
        folder = base / "train" / "unsup"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(unsup):
            (folder / f"{i}_0.txt").write_text(fake_review(rng, True, length), encoding="utf-8")
    (base / "README").write_text("generated for tests\n", encoding="utf-8")
    return base


def make_tarball(source: Path, target: Path) -> Path:
    """Pack ``source`` (an ``aclImdb`` dir) as ``target`` (.tar.gz), with the dir at the top."""
    with tarfile.open(target, "w:gz") as archive:
        archive.add(source, arcname=source.name)
    return target


@pytest.fixture
def aclimdb(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``aclimdb({"train": 40}, unsup=5)`` returns the generated ``aclImdb`` dir."""

    def make(splits: dict[str, int] | None = None, **kwargs) -> Path:
        return write_aclimdb(tmp_path / "data", splits or {"train": 40}, **kwargs)

    return make


@pytest.fixture
def real_data() -> Path:
    """The real 25k training reviews; tests using it skip when the file is absent."""
    if not REAL_DATA.is_file():
        pytest.skip(
            f"real IMDB data not found at {REAL_DATA}: set IMDB_REAL_DATA, provide ../shared, or run the README's "
            "first imdb-dist train, which downloads it"
        )
    return REAL_DATA


# A model and data shape that train in seconds (generated reviews are ~30 words).
TINY = [
    "data.max_len=32",
    "data.vocab_size=64",
    "data.bucket_width=8",
    "model.embedding_dim=8",
    "model.conv_filters=8",
    "model.kernel_size=3",
    "model.pool_size=2",
    "model.lstm_units=8",
    "train.batch_size=16",
    "train.learning_rate=0.01",
]


def tiny_overrides(data: Path, out: Path) -> list[str]:
    """``--set`` overrides for a seconds-long run of a tiny model on generated data."""
    return [
        "data.source=aclimdb",
        f"data.path={data}",
        "data.validation_fraction=0.2",
        "train.epochs=2",
        f"run.output_dir={out}",
        *TINY,
    ]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run of a tiny model on generated data, shared by the tests that only read it."""
    from imdb_dist.config import load_config
    from imdb_dist.train import run

    root = tmp_path_factory.mktemp("trained")
    data = write_aclimdb(root / "data", {"train": 100, "test": 20})
    return run(load_config(None, tiny_overrides(data, root / "run")))


def sweep_config(path: Path, data: Path, out: Path, tune: dict, ray: dict | None = None,
                 tracking: dict | None = None, **train) -> Path:
    """A tiny-model sweep config: the TINY settings, generated data, this tune (and ray, tracking) section."""
    raw: dict = {}
    for item in [*TINY, "data.source=aclimdb", "data.validation_fraction=0.2", f"data.path={data}",
                 f"run.output_dir={out}", "train.epochs=2"]:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    raw["train"].update(train)
    raw["tune"] = tune
    if ray:
        raw["ray"] = ray
    if tracking:
        raw["tracking"] = tracking
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real ``mlflow server`` on loopback (bench/tracking.py's MlflowServer), one per test process.

    Shared by the tracking, launch and tune tests (each names experiments of its own): a server's
    start is seconds of CPU.
    """
    from bench.tracking import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()
