"""Where a run's wall time goes: named phases, timed in order, for the log and ``report.json``.

Most IMDB jobs are one or two epochs, so the cold start (importing
TensorFlow, reading the archive, building the vocabulary, tracing the step,
exporting) is a large share of a run. ``report.json``'s ``timings`` says how
large, phase by phase; ``bench.coldstart`` reads it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator


class Timings:
    """Wall seconds per named phase, in the order the phases first ran; a phase run twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def summary(self) -> str:
        """``"data 2.1 s, tokenize 3.8 s, ..."``."""
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())


def since_process_start() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included); None off Linux.

    From ``/proc``: the process's start time in clock ticks after boot
    against the system's uptime, both to 10 ms.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as stat, open("/proc/uptime", encoding="ascii") as uptime:
            # Field 22 (starttime); the command name (field 2) may hold spaces, so split after its ')'.
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            up = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, up - started_ticks / os.sysconf("SC_CLK_TCK"))
