"""The suite's own rules, as CI runs them: strict skips, a timeout on every test, no stray markers.

A generated test file is run by a real pytest with this repository's
pytest settings (pyproject.toml) and this directory's rules plugin
(tests/suite_rules.py, which conftest loads), so what is checked is what CI's
``IMDB_DIST_STRICT=1 python -m pytest`` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

_TESTS = '''
import threading, time
import pytest

def test_skipping_for_a_missing_prerequisite():
    pytest.skip("prerequisite missing")

@pytest.mark.no_gpu
def test_skipping_because_a_gpu_is_present():
    pytest.skip("a GPU is present")

@pytest.mark.timeout(2)
def test_hanging():
    threading.Thread(target=time.sleep, args=(60,), name="bystander", daemon=True).start()
    time.sleep(60)

def test_after_the_hang():
    pass
'''


def run_pytest(tmp_path: Path, source: str, *args: str, strict: bool, workers: int = 0) -> subprocess.CompletedProcess:
    (tmp_path / "test_generated.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    env.pop("IMDB_DIST_STRICT", None)
    if strict:
        env["IMDB_DIST_STRICT"] = "1"
    command = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
               "-p", "suite_rules", "-p", "no:cacheprovider", "-n", str(workers), "-rA", *args,
               str(tmp_path / "test_generated.py")]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


@pytest.mark.parametrize("strict", [False, True], ids=["plain", "IMDB_DIST_STRICT=1"])
def test_skips_fail_only_under_strict_and_a_hang_fails_its_test_with_every_threads_stack(tmp_path, strict):
    result = run_pytest(tmp_path, _TESTS, strict=strict)
    out = result.stdout
    assert "SKIPPED" in out and "a GPU is present" in out  # no_gpu may always skip
    if strict:
        assert "FAILED test_generated.py::test_skipping_for_a_missing_prerequisite" in out, out
        assert "it skipped: Skipped: prerequisite missing" in out
    else:
        assert "prerequisite missing" in out and "FAILED test_generated.py::test_skipping_for_a_missing" not in out
    assert "FAILED test_generated.py::test_hanging - Failed: Timeout (>2.0s)" in out, out
    assert "Stack of bystander" in out  # the other threads' stacks, printed at the timeout
    assert "PASSED test_generated.py::test_after_the_hang" in out  # the run went on
    assert result.returncode == 1


def test_a_misspelt_marker_is_refused(tmp_path):
    result = run_pytest(tmp_path, "import pytest\n\n@pytest.mark.rayy\ndef test_x():\n    pass\n", strict=False)
    assert result.returncode != 0 and "'rayy' not found in `markers`" in result.stdout + result.stderr


def test_a_timeout_that_faulthandlers_hard_stop_would_cut_short_is_refused(tmp_path):
    source = "import pytest\n\n@pytest.mark.timeout(890)\ndef test_x():\n    pass\n"
    result = run_pytest(tmp_path, source, strict=False)
    assert result.returncode != 0
    assert "within a minute of faulthandler_timeout" in result.stdout + result.stderr


def test_a_hang_python_cannot_interrupt_ends_its_worker_with_every_threads_stack(tmp_path):
    """The faulthandler backstop, as CI runs it (two xdist workers): the hung test fails, nothing waits on."""
    source = (
        "import time\n\n"
        "def test_hung():\n    time.sleep(600)\n\n"  # pytest-timeout off (timeout=0): only faulthandler is left
        "def test_after():\n    pass\n"
    )
    result = run_pytest(tmp_path, source, "-o", "timeout=0", "-o", "faulthandler_timeout=5", strict=True, workers=2)
    out = result.stdout + result.stderr
    assert "Timeout (0:00:05)!" in out and "most recent call first" in out, out[-3000:]  # every thread's stack
    assert "crashed while running" in out
    # Once: a replacement worker would run the same hung test again (--max-worker-restart=0).
    assert out.count("FAILED test_generated.py::test_hung") == 1, out[-3000:]
    assert result.returncode == 1
