"""The run directory on an S3-compatible server (moto's, on loopback): uploads, errors, a 2-worker run, a kill.

The server is a real HTTP S3 endpoint in its own process, started and
stopped here; pyarrow's S3 filesystem (the one Ray Train uses) talks to it
over TCP exactly as it would to AWS or MinIO.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import tiny_overrides, write_aclimdb
from test_job_submit import free_port
from test_launch import FailOnce, RecordEpochs, events, exported_weights

from imdb_dist import rundir, storage
from imdb_dist.callbacks import read_metrics
from imdb_dist.config import load_config
from imdb_dist.errors import InputError
from imdb_dist.launch import launch

BUCKET = "imdb"
# moto accepts any key pair; the workers find these in their environment, as on a real cluster.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
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
        cwd=cwd, capture_output=True, text=True, timeout=300, env=env or dict(os.environ),
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
        result = launch_cli(*tiny_overrides(data, tmp_path / "unused"), f"ray.storage_path={target}",
                            cwd=tmp_path, env=env)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ray.storage_path" in errors[0] and "cannot" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "home"], "something was written locally"


def test_plain_train_refuses_a_uri_instead_of_writing_a_local_s3_directory(tmp_path: Path) -> None:
    from conftest import installed_script

    data = write_aclimdb(tmp_path / "data", {"train": 100})
    sets = [*tiny_overrides(data, tmp_path / "unused"), f"run.output_dir={uri('127.0.0.1:9', 'plain')}"]
    result = subprocess.run(
        [installed_script("imdb-dist"), "train", *[arg for item in sets for arg in ("--set", item)]],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "run.output_dir" in result.stderr and "ray.storage_path" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.fixture(scope="module")
def cluster(s3: str) -> Iterator[None]:
    # After the credentials are in os.environ: the workers inherit them from the raylet.
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    yield
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
            *extra,
        ],
    )


@pytest.mark.ray
@pytest.mark.timeout(600)  # two Ray Train runs, one with a SIGKILLed worker, then the CLI three times
def test_a_run_on_s3_survives_a_killed_worker_and_exports_the_uninterrupted_model(
    s3: str, cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # anything written "locally" by mistake would land here
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    reference = launch(s3_config(data, str(tmp_path / "local"))).local_path()

    log = tmp_path / "events.txt"
    # Killed at epoch 2 step 5: the last checkpoint (optimizer step 12) is in the bucket only.
    kill = FailOnce(str(tmp_path / "killed-once"), rank=1, epoch=2, step=5, kill=True)
    run = launch(s3_config(data, uri(s3, "runs")), worker_callbacks=[kill, RecordEpochs(str(log))])
    assert (tmp_path / "killed-once").exists(), "the worker was never killed"
    begun = [epoch for _, rank, epoch, event, _ in events(log) if rank == 1 and event == "begin"]
    assert begun == [1, 2, 2], begun  # resumed inside epoch 2, from the bucket's checkpoint
    assert str(run) == uri(s3, "runs/job")

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
    losses = [[r["loss"] for r in read_metrics(d / rundir.METRICS)] for d in (copy, reference)]
    assert losses[0] == losses[1]
    report = json.loads((copy / rundir.REPORT).read_text())
    assert report["optimizer_steps"] == json.loads((reference / rundir.REPORT).read_text())["optimizer_steps"]

    # Resubmitting the finished job reads the bucket, finds it complete and changes nothing.
    before = objects(s3, "runs/job/")
    assert launch(s3_config(data, uri(s3, "runs"))) == run
    assert objects(s3, "runs/job/") == before

    # `imdb-dist evaluate` and `predict` take the model's URI.
    from conftest import installed_script

    scored = subprocess.run(
        [installed_script("imdb-dist"), "evaluate", "--model", str(run.child(rundir.MODEL)), "--data", str(data),
         "--split", "validation"],
        capture_output=True, text=True, timeout=300,
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout)["accuracy"] == pytest.approx(report["validation"]["accuracy"])
    predicted = subprocess.run(
        [installed_script("imdb-dist"), "predict", "--model", str(run.child(rundir.MODEL)), "a fine film"],
        capture_output=True, text=True, timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert json.loads(predicted.stdout)["index"] == 0
    missing = subprocess.run(
        [installed_script("imdb-dist"), "predict", "--model", uri(s3, "runs/nothing/model"), "x"],
        capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
