"""The suite's own rules, as CI runs them: strict skips, the longest files first, each file's time.

A pytest plugin (tests/conftest.py loads it; tests/test_ci_rules.py loads it
alone into a real pytest to show each rule). It imports nothing of ours and
no TensorFlow, so that pytest starts in a second.
"""

from __future__ import annotations

import os

import pytest

# CI (.ci/run) sets IMDB_DIST_STRICT=1. Its machine has everything the suite
# needs (the real data in ../shared, root and ip for network namespaces, the
# S3 server, kubectl), so there a skip means a broken set-up hid a promise:
# it fails instead. Only tests marked no_gpu, which are about a machine
# without a GPU, may skip there. Elsewhere skips stay skips, reason printed.
STRICT = os.environ.get("IMDB_DIST_STRICT") == "1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if STRICT and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("no_gpu") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"IMDB_DIST_STRICT=1 (CI), where this test must run, but it skipped: {reason}"
    return report


# The two xdist workers (pyproject.toml's addopts) take whole files in
# collection order (--no-loadscope-reorder), two each at first, then one
# more each time a worker is free: the longest files first, so that the two
# finish together rather than one running a long file alone at the end.
# Seconds each file took with two workers in a fresh clone run as CI runs
# it, the machine partly shared (2-core AMD EPYC, AVX2 only, a6381fc,
# 2026-12-07; docs/BENCHMARKS.md "The suite's time per CPU kind"): launch
# 757, bench 722, multinode 512, resume 396, storage 320, tune 152, faults
# 129, fingerprint 91, job_submit 91, train 85, topology 77, loop 62,
# integration 58; every other file under 56. A file's time moves by tens of
# seconds with what runs beside it (the later run there), not its rank.
# Since the token store reads in windows (2026-12-07, Xeon): multinode 273
# alone, storage 221 alone; tracking (new) about 170.
LONGEST_FIRST = (
    "test_launch.py", "test_bench.py", "test_resume.py", "test_multinode.py", "test_storage.py", "test_container.py",
    "test_tune.py", "test_tracking.py", "test_faults.py", "test_fingerprint.py", "test_job_submit.py", "test_train.py",
    "test_topology.py", "test_loop.py", "test_integration.py", "test_cli.py", "test_aggregation.py",
    "test_rundir.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first; refuse a per-test timeout that faulthandler's hard stop would cut short."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's order is kept
    hard_stop = float(config.getini("faulthandler_timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        if hard_stop and marker and marker.args and marker.args[0] > hard_stop - 60:
            raise pytest.UsageError(
                f"{item.nodeid}: timeout {marker.args[0]} s is within a minute of faulthandler_timeout "
                f"({hard_stop:.0f} s), which would stop its test process instead of failing the test"
            )


# Each test file's time, setup, call and teardown summed, and the xdist worker that ran it: CI's
# output ends with them (README, "Test": the suite's budget), so the change that makes a file
# slow shows which file it is. Recorded where the reports arrive: xdist's controller, or the one
# process of -n 0.
_FILE_SECONDS: dict[str, float] = {}
_FILE_WORKER: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration
    worker = getattr(report, "node", None)  # xdist's controller: the worker that sent the report
    if worker is not None:
        _FILE_WORKER[path] = worker.gateway.id


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or not _FILE_SECONDS:  # an xdist worker: the controller prints
        return
    terminalreporter.write_sep("=", "seconds per test file (setup + call + teardown), longest first")
    workers: dict[str, float] = {}
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda item: -item[1]):
        worker = _FILE_WORKER.get(path, "-")
        workers[worker] = workers.get(worker, 0.0) + seconds
        terminalreporter.write_line(f"{seconds:8.1f}  {worker:>4}  {path}")
    for worker, seconds in sorted(workers.items()):
        terminalreporter.write_line(f"{seconds:8.1f}  {worker:>4}  (all its files)")
