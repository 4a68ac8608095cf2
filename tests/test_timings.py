"""Phase timing for the report: the clock since process start, and phases that add up."""

from __future__ import annotations

import subprocess
import sys
import time

from imdb_dist.timings import Timings, since_process_start


def test_since_process_start_counts_from_the_interpreters_start() -> None:
    # A fresh interpreter that waits 1.5 s before asking: the answer includes
    # that wait and its own start-up, and nothing from before it existed.
    script = "import time; time.sleep(1.5); from imdb_dist.timings import since_process_start as s; print(s())"
    before = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    lifetime = time.monotonic() - before
    assert 1.5 <= float(out) <= lifetime + 0.02


def test_since_process_start_grows_with_this_process() -> None:
    first = since_process_start()
    time.sleep(0.2)
    second = since_process_start()
    assert first is not None and second is not None
    assert 0.15 <= second - first <= 1.0


def test_a_phase_run_twice_adds_up_and_keeps_its_first_place() -> None:
    timings = Timings()
    with timings.phase("a"):
        time.sleep(0.05)
    with timings.phase("b"):
        pass
    with timings.phase("a"):
        time.sleep(0.05)
    assert list(timings.seconds) == ["a", "b"]
    assert timings.seconds["a"] >= 0.1
    assert timings.summary().startswith("a 0.1 s, b 0.0 s")


def test_a_phase_that_raises_is_still_timed() -> None:
    timings = Timings()
    try:
        with timings.phase("failing"):
            raise ValueError
    except ValueError:
        pass
    assert "failing" in timings.seconds
