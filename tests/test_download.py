"""The verified download of the aclImdb archive: cache, checksum, failures, and ``imdb-dist train`` on it.

Nothing is mocked: a real HTTP server on loopback serves a small generated
archive in the official layout, right, altered, cut short or stalled.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    TINY,
    installed_script,
    make_tarball,
    sigint_as_from_a_shell,
    write_aclimdb,
)

from imdb_dist import rundir
from imdb_dist.config import OFFICIAL_SHA256, OFFICIAL_URL, DataConfig
from imdb_dist.data.download import (
    ABANDONED_AFTER_S,
    ENV_CACHE,
    cache_dir,
    fetch,
    file_sha256,
)
from imdb_dist.data.sources import (
    ENV_PATH,
    load_reviews,
    load_training_splits,
    read_aclimdb,
)
from imdb_dist.errors import DataError

NAME = "aclImdb_v1.tar.gz"
GOOD = f"/{NAME}"
ALTERED = f"/altered/{NAME}"  # same length, other bytes
CUT = f"/cut/{NAME}"  # announces the whole length, sends half, closes
STALLED = f"/stalled/{NAME}"  # announces the whole length, sends half, then waits


class Served:
    """The server's state: what it serves and how often each path was asked for."""

    def __init__(self, archive: bytes) -> None:
        self.archive = archive
        self.sha256 = hashlib.sha256(archive).hexdigest()
        self.altered = archive[:-1] + bytes([archive[-1] ^ 0xFF])
        self.requests: collections.Counter[str] = collections.Counter()
        self.release = threading.Event()
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(served: Served) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.requests[self.path] += 1
            body = {GOOD: served.archive, ALTERED: served.altered, CUT: served.archive, STALLED: served.archive}
            if self.path not in body:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-gzip")
            self.send_header("Content-Length", str(len(body[self.path])))
            self.end_headers()
            if self.path in (CUT, STALLED):
                self.wfile.write(body[self.path][: len(body[self.path]) // 2])
                self.wfile.flush()
                if self.path == STALLED:
                    served.release.wait(60)
                return  # the connection closes short of Content-Length
            self.wfile.write(body[self.path])

        def log_message(self, format: str, *args: object) -> None:
            pass  # no access log in the test output

    return Handler


def official_layout(root: Path) -> Path:
    """A small archive laid out as aclImdb_v1.tar.gz is: reviews plus its non-review files."""
    # movies: the urls files, one line per review (line N: review N's movie), as in the official archive.
    base = write_aclimdb(root, {"train": 40, "test": 10}, unsup=5, movies=12)
    (base / "imdb.vocab").write_text("the\nfilm\nplot\n", encoding="utf-8")
    (base / "imdbEr.txt").write_text("0.1\n-0.2\n0.3\n", encoding="utf-8")
    for split in ("train", "test"):
        (base / split / "labeledBow.feat").write_text("9 0:1 1:2\n", encoding="utf-8")
    (base / "train" / "urls_unsup.txt").write_text("http://www.imdb.com/title/tt0000000/usercomments\n" * 5)
    (base / "train" / "unsupBow.feat").write_text("0 0:1\n", encoding="utf-8")
    return make_tarball(base, root / NAME)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A real HTTP server on 127.0.0.1 serving the generated archive, counting requests per path."""
    served = Served(official_layout(tmp_path_factory.mktemp("served")).read_bytes())
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    served.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="archive-server", daemon=True)
    thread.start()
    yield served
    served.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to the loopback server go to it, whatever proxy the machine is set up with."""
    for key in list(os.environ):
        if key.lower().endswith("_proxy"):
            monkeypatch.delenv(key)


def held(cache: Path) -> list[str]:
    """Every name in the cache directory, hidden ones (a temporary download) included."""
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def assert_one_line(error: DataError, *needles: str) -> str:
    message = str(error)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_the_default_url_and_sha256_are_the_ones_tensorflow_datasets_publishes():
    """The checksum is not ours to invent: TFDS (a dependency) ships the one it verifies downloads with."""
    import tensorflow_datasets

    published = Path(tensorflow_datasets.__file__).parent / "datasets" / "imdb_reviews" / "checksums.tsv"
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in published.read_text().splitlines() if line.strip()}
    assert OFFICIAL_URL in rows, sorted(rows)
    size, sha256, _name = rows[OFFICIAL_URL]
    assert (OFFICIAL_SHA256, int(size)) == (sha256, 84_125_825)
    assert DataConfig().url == OFFICIAL_URL and DataConfig().sha256 == OFFICIAL_SHA256


def test_cache_dir_prefers_imdb_dist_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ENV_CACHE, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "imdb-dist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # invalid by the XDG spec: ignored
    assert cache_dir() == tmp_path / "home" / ".cache" / "imdb-dist"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "imdb-dist"
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_fetch_downloads_a_verified_file_once_then_serves_it_from_the_cache(server, tmp_path):
    cache = tmp_path / "cache"
    before = server.requests[GOOD]
    first = fetch(server.url(GOOD), server.sha256, cache)
    assert first == cache / NAME
    assert file_sha256(first) == server.sha256
    assert server.requests[GOOD] == before + 1
    assert held(cache) == [NAME]  # no temporary file left beside it
    again = fetch(server.url(GOOD), server.sha256.upper(), cache)
    assert again == first
    assert server.requests[GOOD] == before + 1  # no request at all


def test_a_download_that_does_not_match_the_checksum_is_refused_and_nothing_is_cached(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        fetch(server.url(ALTERED), server.sha256, cache)
    got = hashlib.sha256(server.altered).hexdigest()
    received = f"received {len(server.altered)} bytes"
    assert_one_line(info.value, server.url(ALTERED), received, got, server.sha256, "nothing was cached")
    assert held(cache) == []


def test_the_download_command_prints_the_verified_file_and_refuses_a_mismatch_in_one_line(server, tmp_path, capsys):
    from imdb_dist.cli import main

    target = tmp_path / "datasets"
    assert main(["download", "--to", str(target), "--url", server.url(GOOD), "--sha256", server.sha256]) == 0
    assert capsys.readouterr().out == f"{target / NAME}\n" and file_sha256(target / NAME) == server.sha256
    other = tmp_path / "other"
    assert main(["download", "--to", str(other), "--url", server.url(ALTERED), "--sha256", server.sha256]) == 2
    out, err = capsys.readouterr()
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert out == "" and "does not match its checksum" in line and held(other) == []


def test_a_response_cut_short_of_its_content_length_is_refused_and_nothing_is_cached(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        fetch(server.url(CUT), server.sha256, cache)
    received = f"received {len(server.archive) // 2} of {len(server.archive)} bytes"
    assert_one_line(info.value, server.url(CUT), received, "nothing was cached")
    assert held(cache) == []


def test_a_cached_file_corrupted_on_disk_is_downloaded_again(server, tmp_path, caplog):
    cache = tmp_path / "cache"
    path = fetch(server.url(GOOD), server.sha256, cache)
    before = server.requests[GOOD]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="imdb_dist.data.download"):
        assert fetch(server.url(GOOD), server.sha256, cache) == path
    assert server.requests[GOOD] == before + 1
    assert file_sha256(path) == server.sha256
    assert held(cache) == [NAME]
    assert any("downloading it again" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_a_download_abandoned_by_a_killed_process_is_removed_by_the_next_fetch(server, tmp_path):
    """A SIGKILL mid-download leaves a hidden part file; the next fetch removes it, but not a live one's."""
    cache = tmp_path / "cache"
    cache.mkdir()
    abandoned, live = cache / f".{NAME}.dead01.part", cache / f".{NAME}.live01.part"
    abandoned.write_bytes(b"half an archive")
    live.write_bytes(b"being written")
    old = time.time() - 2 * ABANDONED_AFTER_S
    os.utime(abandoned, (old, old))
    assert fetch(server.url(GOOD), server.sha256, cache) == cache / NAME
    assert held(cache) == sorted([NAME, live.name])
    # Also when the archive is already cached: no request, and the leftover is gone all the same.
    os.utime(live, (old, old))
    before = server.requests[GOOD]
    fetch(server.url(GOOD), server.sha256, cache)
    assert server.requests[GOOD] == before and held(cache) == [NAME]


def free_port() -> int:
    """A loopback port nothing listens on (bound by the OS, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_server_is_one_line_with_the_offline_hint(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/{NAME}"
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        fetch(url, "0" * 64, tmp_path / "cache")
    assert_one_line(info.value, url, "refused", "set data.path or $IMDB_DATA")
    assert time.monotonic() - started < 30
    assert held(tmp_path / "cache") == []


def test_a_missing_file_on_the_server_names_the_http_status(server, tmp_path):
    with pytest.raises(DataError) as info:
        fetch(server.url("/nothing/here.tar.gz"), server.sha256, tmp_path / "cache")
    assert_one_line(info.value, server.url("/nothing/here.tar.gz"), "HTTP 404")
    assert held(tmp_path / "cache") == []


def test_auto_without_a_path_downloads_and_reads_both_splits_from_the_archive(server, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_PATH, raising=False)
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "cache"))
    cfg = DataConfig(url=server.url(GOOD), sha256=server.sha256, validation_fraction=0.25)
    train, val = load_training_splits(cfg)
    test = load_reviews(cfg, "test")
    archive = tmp_path / "cache" / NAME
    assert file_sha256(archive) == server.sha256
    # unsup and the non-review files ignored; whole movies go to validation until it holds 25%
    assert len(train) + len(val) == 80 and len(val) >= 20 and len(test) == 20
    assert train.groups is not None and not set(train.groups) & set(val.groups)
    assert sorted(train.texts + val.texts) == sorted(read_aclimdb(archive, "train").texts)
    assert test.texts == read_aclimdb(archive, "test").texts


# Runs in a fresh interpreter: read_ahead forks only while its process has one
# thread and no TensorFlow, and the stop tests need a process of their own.
_CHILD = """
import json, pathlib, sys, time
from imdb_dist.config import DataConfig
from imdb_dist.data.download import fetch
from imdb_dist.data.sources import read_ahead
mode, url, sha256, cache = sys.argv[1:]
if mode == "fetch":
    fetch(url, sha256, pathlib.Path(cache))
    sys.exit(0)
reading = read_ahead(DataConfig(source="download", url=url, sha256=sha256, path=cache))
if mode == "read":
    train, val = reading.result()
    n = len(train) + len(val)
    print(json.dumps({"background": reading.in_background, "tf": "tensorflow" in sys.modules, "n": n}))
else:  # exit while the child is still downloading: multiprocessing terminates it (SIGTERM)
    deadline = time.monotonic() + 30
    while not list(pathlib.Path(cache).glob(".*.part")) and time.monotonic() < deadline:
        time.sleep(0.05)
    print(json.dumps({"saw_part": bool(list(pathlib.Path(cache).glob(".*.part")))}))
"""


def start_child(mode: str, url: str, sha256: str, cache: Path) -> subprocess.Popen:
    # Started as from a shell: under pytest-xdist it would inherit an ignored SIGINT, and the
    # Ctrl-C test's child would never see its KeyboardInterrupt.
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode, url, sha256, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=sigint_as_from_a_shell,  # noqa: PLW1509 - two signal calls, safe after fork
    )


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_read_ahead_downloads_in_its_child_process(server, tmp_path):
    proc = start_child("read", server.url(GOOD), server.sha256, tmp_path / "cache")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out) == {"background": True, "tf": False, "n": 80}
    assert held(tmp_path / "cache") == [NAME]


def test_ctrl_c_during_a_download_leaves_nothing_in_the_cache(server, tmp_path):
    cache = tmp_path / "cache"
    proc = start_child("fetch", server.url(STALLED), server.sha256, cache)
    try:
        assert wait_for(lambda: bool(list(cache.glob(".*.part")))), "the download never started"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in err
    assert held(cache) == []


def test_a_read_ahead_child_stopped_mid_download_by_its_parents_exit_leaves_nothing(server, tmp_path):
    cache = tmp_path / "cache"
    proc = start_child("exit", server.url(STALLED), server.sha256, cache)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out) == {"saw_part": True}
    assert held(cache) == []


def console(*overrides: str, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``imdb-dist train`` as a user runs it: the console script, a fresh HOME, no data path anywhere."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_PATH, ENV_CACHE, "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    sets = [arg for item in overrides for arg in ("--set", item)]
    command = [installed_script("imdb-dist"), "train", *sets]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def tiny_run(server: Served, out: Path, sha256: str | None = None) -> list[str]:
    return [
        f"data.url={server.url(GOOD)}",
        f"data.sha256={sha256 or server.sha256}",
        "data.validation_fraction=0.2",
        "train.epochs=1",
        f"run.output_dir={out}",
        *TINY,
    ]


def test_imdb_dist_train_downloads_into_the_home_cache_then_reuses_it(server, tmp_path):
    home = tmp_path / "home"
    before = server.requests[GOOD]
    first = console(*tiny_run(server, tmp_path / "run1"), home=home, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run1" / rundir.REPORT).is_file()
    cache = home / ".cache" / "imdb-dist"
    assert held(cache) == [NAME] and file_sha256(cache / NAME) == server.sha256
    assert server.requests[GOOD] == before + 1
    report = json.loads((tmp_path / "run1" / rundir.REPORT).read_text())
    # At least 20% of the 80 labeled training reviews, in whole movies (the archive's urls files).
    assert report["validation"]["n"] >= 16 and report["validation_movies"] >= 1

    second = console(*tiny_run(server, tmp_path / "run2"), home=home, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "run2" / rundir.REPORT).is_file()
    assert server.requests[GOOD] == before + 1  # served from the cache
    assert "sha256 verified" in second.stderr


@pytest.mark.parametrize("served", ["wrong sha256", ALTERED, CUT], ids=["wrong-sha256", "corrupt", "truncated"])
def test_a_bad_download_makes_imdb_dist_train_exit_2_with_one_line_and_leave_nothing(server, tmp_path, served):
    home = tmp_path / "home"
    wrong = hashlib.sha256(b"not the archive").hexdigest() if served == "wrong sha256" else server.sha256
    url = server.url(GOOD if served == "wrong sha256" else served)
    overrides = [item for item in tiny_run(server, tmp_path / "run", sha256=wrong) if not item.startswith("data.url=")]
    proc = console(f"data.url={url}", *overrides, home=home, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert url in lines[-1] and "nothing was cached" in lines[-1]
    assert not (tmp_path / "run").exists()
    assert held(home / ".cache" / "imdb-dist") == []
