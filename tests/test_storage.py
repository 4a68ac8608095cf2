"""The run directory on an S3-compatible server (moto's, on loopback): uploads, errors, outages, kills, secrets.

The server is a real HTTP S3 endpoint in its own process, started and
stopped here; pyarrow's S3 filesystem (the one Ray Train uses) talks to it
over TCP exactly as it would to AWS or MinIO. Outages are a TCP forwarder
in front of it (tests/forwarder.py) stopped and started again: the server
keeps its buckets.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import tiny_overrides, write_aclimdb
from exactness import assert_same_epoch_metrics
from test_job_submit import free_port
from test_launch import FailOnce, RecordEpochs, events, exported_weights

from imdb_dist import rundir, storage
from imdb_dist.config import load_config
from imdb_dist.errors import DataError, InputError
from imdb_dist.launch import launch
from imdb_dist.rundir import read_metrics

BUCKET = "imdb"
# moto accepts any key pair; the workers find these in their environment, as on a real cluster.
# Distinctive values: tests search every file, object and log line for them.
ACCESS_KEY = "AKIAIMDBDISTTEST7Q3X"
SECRET_KEY = "imdb-dist-secret-w9Jx4LkQ2vN8"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """``host:port`` of a fresh moto S3 server holding one empty bucket; credentials in the environment."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert server.poll() is None, "moto_server exited"
                assert time.monotonic() < deadline, "moto_server did not come up"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def uri(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http"


def objects(endpoint: str, prefix: str) -> dict[str, str]:
    """Every object under ``prefix``: key → ETag (changes when the object is rewritten)."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
    found: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = f"{item['ETag']}@{item['LastModified'].isoformat()}"
    return found


def test_files_and_trees_round_trip_through_the_bucket(s3: str, tmp_path: Path) -> None:
    root = storage.parse(uri(s3, "roundtrip"), "test")
    assert isinstance(root.filesystem, storage.RetryingS3FileSystem)
    blob = bytes(range(256)) * 1000
    storage.write_bytes(root.child("tree", "a", "b", "deep.bin"), blob)
    storage.write_bytes(root.child("tree", "top.txt"), b"top\n")
    assert storage.list_files(root.child("tree")) == {"a/b/deep.bin": len(blob), "top.txt": 4}
    assert storage.list_files(root.child("nothing")) == {}
    assert set(objects(s3, "roundtrip/")) == {"roundtrip/tree/top.txt", "roundtrip/tree/a/b/deep.bin"}
    back = tmp_path / "back"
    assert storage.download(root.child("tree"), back)
    assert (back / "a" / "b" / "deep.bin").read_bytes() == blob
    assert not storage.download(root.child("absent"), tmp_path / "absent")
    storage.write_bytes(root.child("tree", "top.txt"), b"new")
    assert storage.read_bytes(root.child("tree", "top.txt")) == b"new"
    assert storage.read_bytes(root.child("tree", "missing")) is None
    storage.delete(root.child("tree"))
    assert storage.list_files(root.child("tree")) == {}


def test_the_s3_retry_strategy_survives_pickling_as_ray_trains_copies_need() -> None:
    # Ray Train pickles the filesystem to its controller and workers; the copy must keep retrying.
    assert storage.retry_attempts(60) == 12 and storage.retry_attempts(0.7) == 5
    # An endpoint that accepts each connection and closes it at once: every call fails, and is retried.
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was closed: the test is over
                return
            connections.append(1)
            conn.close()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = listener.getsockname()[1]
    location = storage.parse(f"s3://{BUCKET}/x?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1",
                             "run.output_dir", retry_s=0.7)
    copy = pickle.loads(pickle.dumps(location.filesystem.with_attempts(5, "the test's budget")))
    assert isinstance(copy, storage.RetryingS3FileSystem) and copy.attempts == 5
    assert copy.budget == "the test's budget"  # what its retry warning names
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        copy.get_file_info(f"{BUCKET}/x/report.json")
    listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone may not)
    listener.close()
    acceptor.join(timeout=5)
    assert not acceptor.is_alive()
    # The first try and 5 retries; a plain S3FileSystem's copy tries 3 times in all.
    assert len(connections) == 6


class _ClosingEndpoint:
    """An endpoint that accepts each connection and closes it at once: every S3 call fails, and is retried."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections: list[float] = []  # when each was accepted (time.time, as log records' created)
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # the listener was closed: the test is over
                return
            self.connections.append(time.time())
            conn.close()

    def uri(self, prefix: str) -> str:
        port = self.listener.getsockname()[1]
        return f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone may not)
        self.listener.close()
        self.acceptor.join(timeout=5)


def _storage_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "imdb_dist.storage" and r.levelno == logging.WARNING]


def test_a_storage_call_that_starts_retrying_says_so_at_once_what_where_and_for_how_long(caplog) -> None:
    endpoint = _ClosingEndpoint()
    try:
        location = storage.parse(endpoint.uri("run"), "run.output_dir", retry_s=0.7)
        caplog.set_level(logging.INFO, logger="imdb_dist.storage")
        started = time.monotonic()
        with pytest.raises(OSError, match="NETWORK_CONNECTION"):
            storage.read_bytes(location.child("report.json"))
        ended = time.monotonic()
    finally:
        endpoint.close()
    warnings = _storage_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    message = warnings[0].getMessage()
    assert message.startswith(f"storage: cannot read {location.child('report.json')}: ")
    assert message.endswith("; retrying for up to 0.75 s (run.storage_retry_s)")  # 5 attempts
    # Said after the first attempt, before any retry: the retries' 0.75 s of waits come after it.
    assert len(endpoint.connections) == 1 + 6
    assert endpoint.connections[0] <= warnings[0].created <= endpoint.connections[1]
    assert ended - started >= 0.7


def test_a_store_that_answers_no_is_not_said_to_be_retried(s3: str, caplog) -> None:
    # A bucket that does not exist: the store's answer, which the SDK does not retry. A
    # "retrying for up to ..." warning would say the call waits when it fails at once.
    location = storage.parse(f"s3://no-such-bucket/run?endpoint_override={s3}&scheme=http", "run.output_dir",
                             retry_s=30)
    caplog.set_level(logging.INFO, logger="imdb_dist.storage")
    started = time.monotonic()
    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        storage.write_bytes(location.child("report.json"), b"{}")
    assert time.monotonic() - started < 10  # not the 30 s of retries
    assert not _storage_warnings(caplog), [r.getMessage() for r in caplog.records]


def test_an_unreachable_store_is_refused_before_a_run_in_seconds_whatever_its_retry_budget(caplog) -> None:
    """A typo in the endpoint at start is no outage: refused in a few seconds, not after run.storage_retry_s."""
    location = storage.parse(f"s3://{BUCKET}/run?endpoint_override=127.0.0.1:{free_port()}&scheme=http",
                             "run.output_dir")  # the default budget: 60 s, 102 s of waits
    assert location.filesystem.retry_s > 100  # 102 s of waits
    caplog.set_level(logging.INFO, logger="imdb_dist.storage")
    for check, what in ((storage.check_writable, "write"), (storage.check_reachable, "read")):
        caplog.clear()
        started = time.monotonic()
        with pytest.raises(InputError, match=rf"^run\.output_dir s3://{BUCKET}/run\S*: cannot {what} there: "):
            check(location, "run.output_dir")
        assert time.monotonic() - started < 15
        warnings = [r.getMessage() for r in _storage_warnings(caplog)]
        assert len(warnings) == 1 and warnings[0].startswith(f"storage: cannot {what} s3://{BUCKET}/run"), warnings
        assert warnings[0].endswith("; retrying for up to 3.15 s (before the run starts)"), warnings
    # A smaller budget wins.
    short = storage.parse(f"s3://{BUCKET}/run?endpoint_override=127.0.0.1:{free_port()}&scheme=http",
                          "run.output_dir", retry_s=0.1)
    caplog.clear()
    with pytest.raises(InputError):
        storage.check_writable(short, "run.output_dir")
    warnings = [r.getMessage() for r in _storage_warnings(caplog)]
    assert len(warnings) == 1 and warnings[0].endswith("up to 0.15 s (run.storage_retry_s)"), warnings


def test_imdb_dist_train_refuses_an_unreachable_run_directory_at_start_in_one_line(tmp_path: Path) -> None:
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    target = f"s3://{BUCKET}/run?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    started = time.monotonic()
    result = imdb_dist("train", sets=[*tiny_overrides(data, tmp_path / "unused"), f"run.output_dir={target}"])
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert errors(result) == [result.stderr.strip().splitlines()[-1]]
    assert "run.output_dir" in errors(result)[0] and "cannot write there" in errors(result)[0]
    assert "retrying for up to 3.15 s (before the run starts)" in result.stderr
    assert "Traceback" not in result.stderr
    # TensorFlow's start-up, then 3 s of retries: not the 102 s of the run's budget.
    assert elapsed < 60, elapsed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"], "something was written locally"


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("nosuch://bucket/runs", r"ray\.storage_path nosuch://bucket/runs is not a storage URI"),
        ("s3://", r"names no bucket"),
    ],
)
def test_a_uri_pyarrow_cannot_use_is_one_line(location: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        storage.parse(location, "ray.storage_path")


def launch_cli(*sets: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    from conftest import installed_script

    return subprocess.run(
        [installed_script("imdb-dist"), "launch", *[arg for item in sets for arg in ("--set", item)]],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=env or dict(os.environ), check=False,
    )


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("bucket", "bucket does not exist"),
        ("port", "Could not connect"),
    ],
)
def test_storage_that_cannot_be_written_fails_in_one_line_before_anything_starts(
    s3: str, tmp_path: Path, where: str, message: str
) -> None:
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    target = (
        f"s3://no-such-bucket/runs?endpoint_override={s3}&scheme=http"
        if where == "bucket"
        else f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    )
    # Retried with backoff for run.storage_retry_s first: a second here, not the default minute.
    result = launch_cli(*tiny_overrides(data, tmp_path / "unused"), f"ray.storage_path={target}",
                        "run.storage_retry_s=1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "ray.storage_path" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"], "something was written locally"


def test_without_credentials_a_store_that_checks_them_is_refused_in_one_line(tmp_path: Path) -> None:
    """moto in IAM mode: after the first (bucket-creating) request, unsigned requests are rejected."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1"},
    )
    try:
        import boto3

        client = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket="locked")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert time.monotonic() < deadline, "moto_server did not come up"
                time.sleep(0.5)
        data = write_aclimdb(tmp_path / "data", {"train": 100})
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        home = tmp_path / "home"  # no ~/.aws either
        home.mkdir()
        env.update(HOME=str(home), AWS_EC2_METADATA_DISABLED="true")
        target = f"s3://locked/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
        # moto answers an unsigned request with a 500 (AWS with a 403), which the SDK retries: for a second here.
        result = launch_cli(*tiny_overrides(data, tmp_path / "unused"), f"ray.storage_path={target}",
                            "run.storage_retry_s=1", cwd=tmp_path, env=env)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ray.storage_path" in errors[0] and "cannot" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "home"], "something was written locally"


def imdb_dist(*args: str, sets: list[str] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    from conftest import installed_script

    return subprocess.run(
        [installed_script("imdb-dist"), *args, *[arg for item in sets for arg in ("--set", item)]],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def joined(endpoint: str, key: str) -> str:
    """A log as the bucket holds it mid-run: the base object and its ``~OFFSET`` parts (imdb_dist.rundir)."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
    parts = sorted(k for k in objects(endpoint, key) if k == key or k.startswith(f"{key}~"))
    return "".join(client.get_object(Bucket=BUCKET, Key=k)["Body"].read().decode() for k in parts)


def wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def secrets_in(texts: list[str], root: Path) -> list[str]:
    """Where a credential of CREDENTIALS appears: in these texts, or in a file below ``root``."""
    found = [f"output {i}" for i, text in enumerate(texts) if ACCESS_KEY in text or SECRET_KEY in text]
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if ACCESS_KEY.encode() in data or SECRET_KEY.encode() in data:
                found.append(str(path))
    return found


@pytest.mark.timeout(600)  # five short training processes, one of them waiting out its storage's retries
def test_train_on_s3_publishes_whole_models_survives_lost_storage_and_leaks_no_credentials(
    s3: str, tmp_path: Path
) -> None:
    """``imdb-dist train`` with run.output_dir on S3, through a forwarder the test slows, kills and revives."""
    from forwarder import Forwarder

    data = write_aclimdb(tmp_path / "data", {"train": 100})
    outputs: list[str] = []

    def train(target: str, *sets: str) -> subprocess.CompletedProcess:
        result = imdb_dist("train", sets=[*tiny_overrides(data, tmp_path / "unused"), f"run.output_dir={target}",
                                         "run.checkpoint_steps=3", *sets])
        outputs.extend([result.stdout, result.stderr])
        return result

    with Forwarder("127.0.0.1", int(s3.rsplit(":", 1)[1])) as link:
        target = uri(f"127.0.0.1:{link.port}", "train/run")
        first = train(target)
        assert first.returncode == 0, first.stderr[-3000:]
        keys = set(objects(s3, "train/run/"))
        for name in (rundir.REPORT, rundir.CONFIG, "model/1/saved_model.pb", f"model/1/{rundir.MODEL_MARKER}",
                     "checkpoints/checkpoint", rundir.METRICS, rundir.STEPS):
            assert f"train/run/{name}" in keys, name
        assert not any("~" in key for key in keys), "a published run holds whole logs"
        assert "train/run/lease.json" not in keys, "the lease goes when the run ends"
        report = json.loads(storage.read_bytes(storage.parse(target, "t").child(rundir.REPORT)))
        assert report["config"]["run"]["output_dir"] == target and report["model_version"] == 1
        before = imdb_dist("predict", "--model", target, "a fine film")
        assert before.returncode == 0, before.stderr[-2000:]

        # One more epoch; the chief is SIGKILLed while it uploads the new export (the link slowed to watch it).
        more = subprocess.Popen(
            [installed_script_path(), "train", *[a for item in [*tiny_overrides(data, tmp_path / "unused"),
             f"run.output_dir={target}", "run.checkpoint_steps=3", "train.epochs=3"] for a in ("--set", item)]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            wait_for(lambda: '"epoch": 3' in joined(s3, f"train/run/{rundir.METRICS}"), "epoch 3's checkpoint", more)
            link.upstream_rate = 100_000
            wait_for(lambda: any(k.startswith("train/run/model/2/") for k in objects(s3, "train/run/model/")),
                     "the new export's upload", more)
            more.kill()
        finally:
            more.kill()
            outputs.append(more.communicate()[0])
        link.upstream_rate = 0
        keys = set(objects(s3, "train/run/"))
        assert f"train/run/model/2/{rundir.MODEL_MARKER}" not in keys, "the kill came too late: the upload finished"
        # Readers get the previous complete export, or exit 2: never a mix.
        after = imdb_dist("predict", "--model", str(storage.parse(target, "t").child(rundir.MODEL)), "a fine film")
        assert after.returncode == 0 and after.stdout == before.stdout, after.stderr[-2000:]
        for model, message in [(target, "run is not complete"),
                               (str(storage.parse(target, "t").child(rundir.MODEL, "2")), "not a complete model"),
                               (uri(s3, "train/nothing/model"), "does not exist")]:
            refused = imdb_dist("predict", "--model", model, "a fine film")
            assert refused.returncode == 2 and len(errors(refused)) == 1 and message in errors(refused)[0], (
                refused.stderr[-2000:])
        # The same command again: the dead run's lease is taken over, the run completes as version 3.
        again = train(target, "train.epochs=3")
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads(imdb_dist("evaluate", "--model", target, "--data", str(data), "--split",
                                    "validation").stdout)["n"] > 0
        # (pyarrow's delete_dir leaves an empty "model/" marker object behind: not a version)
        versions = {k.split("/")[3] for k in objects(s3, "train/run/model/") if not k.endswith("/")}
        assert versions == {"1", "3"}, versions

        # Storage gone for good mid-run: one line, exit 1, after the retry budget; the last checkpoint is intact.
        gone = uri(f"127.0.0.1:{link.port}", "train/gone")
        dying = subprocess.Popen(
            [installed_script_path(), "train", *[a for item in [*tiny_overrides(data, tmp_path / "unused"),
             f"run.output_dir={gone}", "run.checkpoint_steps=3", "run.storage_retry_s=2"] for a in ("--set", item)]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        wait_for(lambda: "train/gone/checkpoints/checkpoint" in objects(s3, "train/gone/"), "a checkpoint", dying)
        link.stop()
        out, err = dying.communicate(timeout=120)
        outputs.extend([out, err])
        assert dying.returncode == 1, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "after retrying" in lines[0] and "Traceback" not in err, err[-3000:]
        link.start()
        resumed = train(gone)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming at epoch" in resumed.stderr, "the run did not resume from the checkpoint left in the bucket"

    # No credential in any output, local file or object.
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{s3}")
    bodies = [client.get_object(Bucket=BUCKET, Key=k)["Body"].read().decode("latin-1") for k in objects(s3, "train/")]
    assert not secrets_in(outputs + bodies, tmp_path)


def installed_script_path() -> str:
    from conftest import installed_script

    return installed_script("imdb-dist")


def test_a_uri_with_credentials_is_refused_in_one_line_that_does_not_print_them(s3: str, tmp_path: Path) -> None:
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    before = objects(s3, "")
    for target in (f"s3://{ACCESS_KEY}:{SECRET_KEY}@{BUCKET}/leak?endpoint_override={s3}&scheme=http",
                   f"s3://{BUCKET}/leak?endpoint_override={s3}&scheme=http&secret_key={SECRET_KEY}"):
        for command, key in (("train", "run.output_dir"), ("launch", "ray.storage_path")):
            result = imdb_dist(command, sets=[*tiny_overrides(data, tmp_path / "unused"), f"{key}={target}"])
            assert result.returncode == 2, result.stderr[-2000:]
            assert len(errors(result)) == 1 and "credentials come from the environment" in errors(result)[0]
            assert key in errors(result)[0] and not secrets_in([result.stdout, result.stderr], tmp_path)
        # Readers too: a model location with credentials is refused before anything is read.
        for result in (imdb_dist("predict", "--model", target, "a fine film"),
                       imdb_dist("evaluate", "--model", target, "--data", str(data), "--split", "train")):
            assert result.returncode == 2, result.stderr[-2000:]
            assert len(errors(result)) == 1 and "credentials come from the environment" in errors(result)[0]
            assert "--model" in errors(result)[0] and not secrets_in([result.stdout, result.stderr], tmp_path)
    assert objects(s3, "") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.fixture(scope="module")
def cluster(s3: str) -> Iterator[Path]:
    """A local Ray cluster; yields its session directory (its logs)."""
    # After the credentials are in os.environ: the workers inherit them from the raylet.
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    # Ray points session_latest at the session it just started (another test process may start one later).
    yield Path("/tmp/ray/session_latest").resolve()
    ray.shutdown()


def s3_config(data: Path, storage_path: str, *extra: str):
    return load_config(
        None,
        [
            *tiny_overrides(data, Path("unused")),
            "distribution.strategy=multi_worker",
            "ray.num_workers=2",
            f"ray.storage_path={storage_path}",
            "ray.name=job",
            "ray.num_shards=4",
            "train.epochs=2",
            "run.checkpoint_steps=3",
            "ray.max_failures=1",
            # Longer than the tests' 20 s outage (51 s: imdb_dist.storage.retry_attempts).
            "run.storage_retry_s=30",
            *extra,
        ],
    )


OUTAGE_S = 20.0


@pytest.mark.ray
@pytest.mark.timeout(600)  # two Ray Train runs, one with a 20 s outage and a SIGKILLed worker, then the CLI
def test_a_run_on_s3_survives_an_outage_and_a_killed_worker_and_exports_the_uninterrupted_model(
    s3: str, cluster: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from forwarder import Forwarder

    monkeypatch.chdir(tmp_path)  # anything written "locally" by mistake would land here
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    reference = launch(s3_config(data, str(tmp_path / "local"))).local_path()

    log = tmp_path / "events.txt"
    # Killed at epoch 2 step 5: the last checkpoint (optimizer step 12) is in the bucket only.
    kill = FailOnce(str(tmp_path / "killed-once"), rank=1, epoch=2, step=5, kill=True)
    link = Forwarder("127.0.0.1", int(s3.rsplit(":", 1)[1])).start()
    outage: dict[str, float] = {}

    def refuse_for_a_while() -> None:
        # Once Ray Train has stored its first checkpoint: the workers, the controller (its own
        # checkpoint_manager_snapshot.json), the driver's lease and the chief's syncs all meet a
        # refusing endpoint for OUTAGE_S seconds.
        deadline = time.monotonic() + 300
        while not any("/checkpoint_" in k for k in objects(s3, "runs/job/")) and time.monotonic() < deadline:
            time.sleep(0.05)
        link.stop()
        outage["stopped"] = time.monotonic()
        time.sleep(OUTAGE_S)
        outage["connections"] = link.connections
        link.start()
        outage["restarted"] = time.monotonic()

    watcher = threading.Thread(target=refuse_for_a_while, daemon=True)
    watcher.start()
    endpoint = f"127.0.0.1:{link.port}"
    try:
        run = launch(s3_config(data, uri(endpoint, "runs")), worker_callbacks=[kill, RecordEpochs(str(log))])
        ended = time.monotonic()
        watcher.join(timeout=OUTAGE_S + 5)
        assert "restarted" in outage and ended > outage["restarted"], "the run did not go on through the outage"
        assert link.connections > outage["connections"], "nothing reached the storage after the outage"
        assert (tmp_path / "killed-once").exists(), "the worker was never killed"
        begun = [epoch for _, rank, epoch, event, _ in events(log) if rank == 1 and event == "begin"]
        assert begun == [1, 2, 2], begun  # resumed inside epoch 2, from the bucket's checkpoint
        assert str(run) == uri(endpoint, "runs/job")
        check_the_s3_run(s3, endpoint, run, data, reference, tmp_path)
    finally:
        link.stop()
    # No credential in the run directory, the local files, or any Ray log of this cluster.
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://{s3}")
    bodies = [client.get_object(Bucket=BUCKET, Key=k)["Body"].read().decode("latin-1") for k in objects(s3, "runs/")]
    assert not secrets_in(bodies, tmp_path) and not secrets_in([], cluster)


def check_the_s3_run(
    s3: str, endpoint: str, run: storage.Location, data: Path, reference: Path, tmp_path: Path
) -> None:
    """The run in the bucket: complete, the uninterrupted model, and read back by the CLI."""
    keys = set(objects(s3, "runs/job/"))
    for name in (rundir.CONFIG, rundir.VOCAB, rundir.METRICS, rundir.REPORT, rundir.CURVES, "data/manifest.json"):
        assert f"runs/job/{name}" in keys, name
    assert any(k.startswith("runs/job/checkpoint_") for k in keys), "no Ray checkpoint in the bucket"
    assert any(k.startswith("runs/job/tensorboard/") for k in keys)
    assert "runs/job/model/1/saved_model.pb" in keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "events.txt", "killed-once", "local"]

    # The model, read back from the bucket, is the uninterrupted run's.
    copy = tmp_path / "from-bucket"
    assert storage.download(run, copy)
    got, want = exported_weights(copy), exported_weights(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    report, want = json.loads((copy / rundir.REPORT).read_text()), json.loads((reference / rundir.REPORT).read_text())
    # Two workers of one replica each, resumed inside epoch 2 (tests/exactness.py).
    assert_same_epoch_metrics(read_metrics(copy / rundir.METRICS), read_metrics(reference / rundir.METRICS),
                              steps_per_epoch=want["optimizer_steps"] // 2, replicas=2, split_epochs=[2])
    assert report["config"]["run"]["output_dir"] == str(run), "the report names the run directory as given"
    assert report["optimizer_steps"] == want["optimizer_steps"] and report["replicas"] == want["replicas"] == 2

    # Resubmitting the finished job reads the bucket, finds it complete and changes nothing.
    before = objects(s3, "runs/job/")
    assert launch(s3_config(data, uri(endpoint, "runs"))) == run
    assert objects(s3, "runs/job/") == before

    # `imdb-dist evaluate` takes the model's URI, and scores the export as the report does (predict
    # and the refusals of a model that is not there: the train test above).
    from conftest import installed_script

    scored = subprocess.run(
        [installed_script("imdb-dist"), "evaluate", "--model", str(run.child(rundir.MODEL)), "--data", str(data),
         "--split", "validation"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout)["accuracy"] == pytest.approx(report["validation"]["accuracy"])


def test_a_token_store_on_s3_is_read_by_ranged_requests_row_for_row_as_the_local_one(s3: str, tmp_path: Path) -> None:
    import numpy as np

    from imdb_dist.data import preparation, store
    from imdb_dist.data.sources import Reviews

    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(50)]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 30))) for _ in range(300)]
    reviews = Reviews(texts, rng.integers(0, 2, 300).astype(np.int32))
    vocabulary, section = preparation.write_store(tmp_path, {"train": reviews}, preparation.LocalEngine(),
                                                  vocab_size=40, max_len=20)
    root = storage.parse(uri(s3, "store"), "test")
    for path in tmp_path.iterdir():
        storage.write_bytes(root.child(path.name), path.read_bytes())
    local = store.open_split(store.local_files(tmp_path), section, "train", vocabulary)
    remote = store.open_split(store.remote_files(root), section, "train", vocabulary)
    index = np.array([299, 5, 6, 7, 100, 0])
    assert [a.tolist() for a in remote.rows(index)] == [a.tolist() for a in local.rows(index)]
    # Locally a pread per run of adjacent rows (0, 5-7, 100, 299); remotely, rows less than 8 KiB apart
    # (the whole of this small store) are one ranged GET that reads the gaps too.
    assert local.requests == 4 and remote.requests == 1 and remote.fetched_bytes > local.fetched_bytes
    # An epoch of a worker's stream: the local batches, in one request per window of batches, where
    # each row alone would be a request of its own.
    from imdb_dist.data import plan

    global_plan = plan.GlobalPlan(local.lengths, batch_size=8, seed=1, max_len=20, min_len=1, bucket_width=4)
    share = plan.Share(2, 2, 1)
    before = remote.requests
    ours = list(plan.stream(remote, global_plan, share, epochs=2).as_numpy_iterator())
    theirs = list(plan.stream(local, global_plan, share, epochs=2).as_numpy_iterator())
    assert len(ours) == len(theirs) == 2 * global_plan.steps_per_epoch
    assert all(np.array_equal(a, b) and np.array_equal(y, z) for (a, y), (b, z) in zip(ours, theirs))
    rows_read = 2 * global_plan.steps_per_epoch * 4
    assert remote.requests - before == -(-rows_read // plan._WINDOW_ROWS) < rows_read
    storage.write_bytes(root.child("train.tokens.npy"), (tmp_path / "train.tokens.npy").read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        store.open_split(store.remote_files(root), section, "train", vocabulary)


def test_a_token_store_on_s3_reads_its_rows_through_an_outage_within_the_retry_budget(s3: str, tmp_path: Path) -> None:
    """Workers read rows all through training: a read that meets a refusing store retries, as every call does."""
    import threading

    import numpy as np
    from forwarder import Forwarder

    from imdb_dist.data import preparation, store
    from imdb_dist.data.sources import Reviews

    texts = [f"w{i % 7} w{i % 5} w{i % 3}" for i in range(50)]
    reviews = Reviews(texts, np.arange(50, dtype=np.int32) % 2)
    vocabulary, section = preparation.write_store(tmp_path, {"train": reviews}, preparation.LocalEngine(),
                                                  vocab_size=20, max_len=5)
    with Forwarder("127.0.0.1", int(s3.rsplit(":", 1)[1])) as link:
        root = storage.parse(uri(f"127.0.0.1:{link.port}", "outage"), "test", retry_s=10)
        for path in tmp_path.iterdir():
            storage.write_bytes(root.child(path.name), path.read_bytes())
        local = store.open_split(store.local_files(tmp_path), section, "train", vocabulary)
        remote = store.open_split(store.remote_files(root), section, "train", vocabulary)
        link.stop()  # opened, then the store refuses: the reads below start inside the outage
        threading.Timer(1.5, link.start).start()
        index = np.array([49, 3, 4, 20])
        assert [a.tolist() for a in remote.rows(index)] == [a.tolist() for a in local.rows(index)]
