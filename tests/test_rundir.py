"""The run directory's room (imdb_dist.rundir): the lease, incremental sync and complete-only model reads.

Each test runs on a local directory and on a real S3 server (moto's, on
loopback, from tests/test_storage.py): the same interface must hold on both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import tensorflow as tf
from conftest import tiny_overrides, write_aclimdb
from test_storage import errors, imdb_dist, objects, s3, uri  # noqa: F401 - s3 is a fixture

from imdb_dist import rundir, storage
from imdb_dist.errors import InputError, RunError
from imdb_dist.export import locate_model
from imdb_dist.lease import LEASE
from imdb_dist.rundir.remote import complete_end


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh run directory location: a local path, or a prefix in the moto bucket."""
    if request.param == "local":
        yield str(tmp_path / "run")
    else:
        endpoint = request.getfixturevalue("s3")
        yield uri(endpoint, f"rundir-{time.monotonic_ns()}")


def lease_file(where: str) -> dict | None:
    run = rundir.RunDir.open(where)
    try:
        raw = run._read_lease()  # the test reads the file the lease protocol writes
        return None if raw is None else json.loads(raw)
    finally:
        run.close()


def put_lease(where: str, **fields: object) -> None:
    holder = {"id": "other", "host": "elsewhere", "pid": 1, "since": time.time() - 100, "renewed": time.time(),
              "ttl_s": 60.0, **fields}
    run = rundir.RunDir.open(where)
    run._write_lease(json.dumps(holder).encode())
    run.close()


def test_a_second_run_is_refused_naming_the_holder_and_gets_the_directory_once_it_ends(where: str) -> None:
    first = rundir.RunDir.open(where)
    first.acquire(ttl_s=60)
    held = lease_file(where)
    assert held is not None and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    second = rundir.RunDir.open(where)
    with pytest.raises(InputError) as refused:
        second.acquire(ttl_s=60)
    message = str(refused.value)
    assert "in use by another run" in message and f"pid {os.getpid()}" in message
    assert socket.gethostname() in message and "since" in message
    first.close()  # the run ends: its lease goes
    assert lease_file(where) is None
    second.acquire(ttl_s=60)
    assert lease_file(where)["id"] == second.lease.id
    second.close()


@pytest.mark.parametrize(
    ("holder", "taken"),
    [
        ({"renewed": time.time() - 120}, True),  # nobody renewed it for 2 minutes > its 60 s
        ({"host": socket.gethostname(), "pid": 0}, False),  # placeholder: replaced by a dead pid below
        ({}, False),  # a live holder elsewhere: fresh renewal
    ],
    ids=["expired", "dead-process-here", "live-elsewhere"],
)
def test_a_dead_holders_lease_is_taken_over_and_a_live_ones_is_not(where: str, holder: dict, taken: bool) -> None:
    if holder.get("pid") == 0:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        holder, taken = {"host": socket.gethostname(), "pid": gone.pid}, True
    put_lease(where, **holder)
    run = rundir.RunDir.open(where)
    try:
        if taken:
            run.acquire(ttl_s=60)
            assert lease_file(where)["id"] == run.lease.id
        else:
            with pytest.raises(InputError, match="host elsewhere pid 1"):
                run.acquire(ttl_s=60)
            assert lease_file(where)["id"] == "other"
    finally:
        run.close()


def sync_then_lose_the_lease(run: rundir.RunDir, where: str, new_holder: str) -> None:
    """``run`` syncs its log; another run (host elsewhere, pid 1) takes the lease; ``run``'s next sync must refuse."""
    (run.work / "metrics.jsonl").write_text('{"epoch": 1}\n')
    run.sync()
    put_lease(where, id=new_holder)
    (run.work / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    # Whether the sync's check or the renewal thread noticed first, the refusal names the new holder.
    with pytest.raises(RunError, match="host elsewhere pid 1"):
        run.sync()


def test_the_lease_is_renewed_while_the_run_lives_and_a_run_that_lost_it_stops_writing(where: str) -> None:
    run = rundir.RunDir.open(where)
    run.acquire(ttl_s=2.0)  # renewed every 0.5 s
    first = lease_file(where)["renewed"]
    time.sleep(1.6)
    assert lease_file(where)["renewed"] > first
    # Another run takes the directory over (this one looked dead to it): this one must not write again.
    sync_then_lose_the_lease(run, where, "intruder")
    run.close()
    assert lease_file(where)["id"] == "intruder", "a run that lost its lease must not delete the new holder's"


def test_a_ray_chief_writes_only_while_its_drivers_lease_holds(where: str) -> None:
    # Under Ray the driver holds the lease and the chief, another process, writes under it (RunDir.attach).
    driver = rundir.RunDir.open(where)
    lease_id = driver.acquire(ttl_s=60)
    chief = rundir.RunDir.open(where)
    chief.attach(lease_id)
    try:
        # The driver was stopped and the job resubmitted: the new driver took the lease over.
        sync_then_lose_the_lease(chief, where, "resubmitted")
        with pytest.raises(RunError, match="held by another run"):
            chief.publish()
    finally:
        chief.close()
        driver.close()
    assert lease_file(where)["id"] == "resubmitted"
    if where.startswith("s3://"):  # a local run writes in place: there the refusal stops the run (above)
        assert json_lines(where, "metrics.jsonl") == [{"epoch": 1}], "the old run uploaded after losing its lease"


def json_lines(where: str, name: str) -> list[dict]:
    run = rundir.RunDir.open(where)
    try:
        run.fetch([name])
        return rundir.read_metrics(run.work / name)
    finally:
        run.close()


# launch on S3 only: a local storage_path takes the same RunDir route, at the price of another Ray start.
@pytest.mark.parametrize(("backend", "command"), [("local", "train"), ("s3", "train"), ("s3", "launch")])
def test_a_second_cli_run_on_a_held_directory_exits_2_naming_the_holder_and_writes_nothing(
    backend: str, command: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "local":
        where = str(tmp_path / "runs")
    else:
        where = uri(request.getfixturevalue("s3"), f"held-{time.monotonic_ns()}")
    data = write_aclimdb(tmp_path / "data", {"train": 100})
    # A live run (this test process) holds the directory: the one the command will resolve.
    run_location = where if command == "train" else storage.parse(where, "x").child("job").uri
    holder = rundir.RunDir.open(run_location)
    holder.acquire(ttl_s=60)
    before = listing(run_location)
    try:
        sets = [*tiny_overrides(data, tmp_path / "unused"), "run.output_dir=" + where]
        if command == "launch":
            sets += [f"ray.storage_path={where}", "ray.name=job"]
        result = imdb_dist(command, sets=sets)
        assert result.returncode == 2, result.stderr[-3000:]
        (line,) = errors(result)
        assert "is in use by another run" in line and f"pid {os.getpid()}" in line, line
        assert f"host {socket.gethostname()}" in line and "since" in line, line
        assert "Traceback" not in result.stderr
        assert listing(run_location) == before, "the refused run wrote to the directory"
        assert lease_file(run_location)["id"] == holder.lease.id
    finally:
        holder.close()


def listing(where: str) -> dict[str, bytes]:
    """Every file under ``where`` (local or S3) with its contents, the lease's renewal time masked."""
    location = storage.parse(where, "x")
    found = {}
    if location.local:
        root = Path(location.path)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    else:
        selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
        files = {}
        for info in location.filesystem.get_file_info(selector):
            if info.type == pafs.FileType.File:
                with location.filesystem.open_input_stream(info.path) as stream:
                    files[info.path[len(location.path) + 1:]] = stream.read()
    for name, data in files.items():
        found[name] = b"<the lease>" if name == LEASE else data
    return found


def records(*payloads: bytes) -> bytes:
    """TFRecord framing of ``payloads``, as TensorBoard's event files hold them."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"records-{os.getpid()}-{time.monotonic_ns()}"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for payload in payloads:
            writer.write(payload)
    data = path.read_bytes()
    path.unlink()
    return data


def test_a_sync_uploads_only_what_changed_and_a_log_only_its_new_lines(s3: str) -> None:  # noqa: F811
    location = uri(s3, "sync")
    prefix = "sync/"
    run = rundir.RunDir.open(location)
    run.acquire(ttl_s=60)
    events = run.work / rundir.TENSORBOARD / "train" / "events.out.tfevents.1.host.v2"
    events.parent.mkdir(parents=True)
    first = records(b"a" * 100, b"b" * 50)
    events.write_bytes(first)
    steps = run.work / rundir.STEPS
    steps.write_text('{"step": 1}\n{"step": 2}\n')
    (run.work / rundir.CONFIG).write_text("train: {}\n")
    assert run.sync() == len(first) + steps.stat().st_size + len("train: {}\n")
    assert run.sync() == 0, "nothing changed"

    # Two new lines and half of a third: the lines go up as a segment, the half waits.
    with steps.open("a") as out:
        out.write('{"step": 3}\n{"step": 4}\n{"step": ')
    second = records(b"c" * 70)
    events.write_bytes(first + second + second[:9])  # a record and a torn one
    assert run.sync() == len('{"step": 3}\n{"step": 4}\n') + len(second)
    keys = set(objects(s3, prefix))
    assert f"{prefix}steps.jsonl~{24:012d}" in keys
    assert f"{prefix}tensorboard/train/events.out.tfevents.1.host.v2~{len(first):012d}" in keys
    # TensorBoard reads each part on its own: every part is whole records.
    for key in keys:
        if "tfevents" in key:
            body = storage.read_bytes(storage.parse(uri(s3, key), "test"))
            assert complete_end("x.tfevents", body) == len(body)

    # A second process joins the parts into the file's complete lines.
    reader = rundir.RunDir.open(location)
    reader.fetch([rundir.STEPS])
    assert (reader.work / rundir.STEPS).read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4}\n'
    reader.close()

    # Rewritten (a resume dropped the lines after its checkpoint): uploaded whole, the parts dropped.
    steps.write_text('{"step": 1}\n{"step": 9}\n')
    assert run.sync() == steps.stat().st_size
    assert not any(k.startswith(f"{prefix}steps.jsonl~") for k in objects(s3, prefix))

    # Deleted here: deleted there. Published: every log whole, no parts.
    (run.work / rundir.CONFIG).unlink()
    with steps.open("a") as out:
        out.write('{"step": 10}\n')
    run.sync()
    run.publish()
    keys = set(objects(s3, prefix))
    assert f"{prefix}{rundir.CONFIG}" not in keys
    assert not any("~" in key for key in keys), keys
    assert storage.read_bytes(storage.parse(uri(s3, f"{prefix}steps.jsonl"), "t")) == steps.read_bytes()
    run.close()
    assert f"{prefix}{LEASE}" not in set(objects(s3, prefix))


def fake_version(root: Path, version: int, *, complete: bool) -> None:
    """A model version's files: a complete one has its marker (written last by a publish)."""
    target = root / rundir.MODEL / str(version)
    (target / "variables").mkdir(parents=True)
    (target / "saved_model.pb").write_bytes(b"pb")
    (target / "variables" / "variables.index").write_bytes(b"idx")
    if complete:
        (target / rundir.MODEL_MARKER).parent.mkdir(parents=True)
        (target / rundir.MODEL_MARKER).write_text("{}")


def test_only_complete_model_versions_and_complete_runs_are_read(where: str, tmp_path: Path) -> None:
    run = rundir.RunDir.open(where)
    run.acquire(ttl_s=60)
    fake_version(run.work, 1, complete=True)
    (run.work / rundir.CONFIG).write_text("train: {}\n")
    run.publish()
    fake_version(run.work, 2, complete=False)  # a publish killed half-way through
    run.sync()
    assert run.next_model_version() == 3
    model = str(storage.parse(where, "t").child(rundir.MODEL))
    with locate_model(model) as path:
        assert path.name == "1" and (path / rundir.MODEL_MARKER).is_file()
    with (pytest.raises(InputError, match="not a complete model export"),
          locate_model(str(storage.parse(where, "t").child(rundir.MODEL, "2")))):
        pass
    with pytest.raises(InputError, match="run is not complete"), locate_model(where):
        pass
    (run.work / rundir.REPORT).write_text(json.dumps({"model_version": 1}))
    fake_version(run.work, 3, complete=True)
    run.publish()
    with locate_model(where) as path:
        assert path.name == "1", "the report names the version its run published"
    # The publish of version 3 dropped the incomplete version 2 and kept 1 for readers that chose it.
    assert rundir.RunDir.open(where).next_model_version() == 4
    remaining = (
        sorted({name.split("/")[0] for name in storage.list_files(run.location.child(rundir.MODEL))})
        if run.remote
        else sorted(p.name for p in (run.work / rundir.MODEL).iterdir())
    )
    assert remaining == ["1", "3"]
    run.close()


def test_on_a_store_that_shows_files_as_they_grow_a_file_is_replaced_whole_and_no_staging_file_stays(
    tmp_path: Path,
) -> None:
    """HDFS and Azure show a file while it is written: write_bytes stages it under a hidden name, then moves it."""
    import pyarrow.fs as pafs

    filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert not storage.object_store(filesystem)
    target = storage.Location(filesystem, "run/report.json", "subtree://run/report.json")
    storage.write_bytes(target, b"old")
    storage.write_bytes(target, b"new")
    assert (tmp_path / "run" / "report.json").read_bytes() == b"new"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["report.json"], "a staging file was left behind"


def test_a_run_being_opened_is_a_new_run_to_its_other_workers_and_anything_else_is_foreign(tmp_path: Path) -> None:
    # Between the chief's lease and its config.yaml the directory holds the lease and the
    # hidden files both are staged in; another worker of the same run reads it then.
    run = tmp_path / "run"
    run.mkdir()
    for name in (LEASE, f".{LEASE}.3f2a9c.tmp", f".{rundir.CONFIG}.k2j4x1"):
        (run / name).write_text("{}")
    opened = rundir.RunDir.open(str(run))
    assert opened.prior_config() is None
    (run / ".notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an imdb-dist run"):
        opened.prior_config()
    opened.close()
