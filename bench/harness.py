"""What every benchmark repeats: its command line, runs of the job as a user starts them, and the summary.

- the command line: :func:`parser` (a bad argument is one ``error:`` line
  and exit status 2) and the flags the benchmarks share (``--data``,
  ``--set``, ``--rounds``, ``--output``);
- the job in a fresh process (``imdb-dist train`` or ``launch``, this tree's
  or a baseline worktree's), and what its run directory says
  (``metrics.jsonl``, ``report.json``);
- variants interleaved round by round, so machine noise hits them alike,
  and their medians;
- the JSON summary, printed and written to ``--output``.

It imports no TensorFlow: ``bench.gpu``'s child process imports it before it
starts reading the archive, which must come before TensorFlow loads (as
``imdb-dist train`` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from bench.baseline import REPO

T = TypeVar("T")


# --------------------------------------------------------------------------- the command line


class BenchParser(argparse.ArgumentParser):
    """An argument parser whose refusals are one ``error: ...`` line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        refuse(message)


def parser(doc: str | None) -> BenchParser:
    """The benchmark's parser, described by the first line of its module docstring ``doc``."""
    return BenchParser(prog=_command(), description=doc.splitlines()[0] if doc else None)


def _command() -> str | None:
    """How usage names this benchmark, ``python -m bench.NAME`` (a package's would say ``__main__.py``); else None."""
    script = Path(sys.argv[0]).resolve()
    if script.suffix != ".py" or not script.is_relative_to(REPO / "bench"):
        return None
    module = script.relative_to(REPO).with_suffix("")
    parts = module.parts[:-1] if module.name == "__main__" else module.parts
    return "python -m " + ".".join(parts)


def refuse(message: str) -> NoReturn:
    """Bad input: say why in one line and exit 2 (what every command of the project does)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _existing(value: str) -> str:
    # Checked at parse time: otherwise the first child process fails minutes in, its traceback the only hint.
    if not Path(value).exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {value}")
    return value


def add_data(parser: argparse.ArgumentParser, *, required: bool = True, help: str | None = None) -> None:
    """``--data``: an aclImdb directory or ``.tar.gz`` that must exist."""
    parser.add_argument("--data", required=required, type=_existing,
                        help=help or "aclImdb directory or .tar.gz")


def add_sets(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_rounds(parser: argparse.ArgumentParser, default: int, help: str | None = None) -> None:
    """``--rounds N``: at least 1."""
    parser.add_argument("--rounds", type=at_least_one, default=default, help=help)


def chosen(parser: argparse.ArgumentParser, value: str, known: Iterable[str]) -> list[str]:
    """The variants ``--variants`` names (comma-separated, each once, in its order), or a usage error naming the unknown."""
    names, known = list(dict.fromkeys(value.split(","))), list(known)
    if unknown := [name for name in names if name not in known]:
        parser.error(f"--variants: unknown variant(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return names


def at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def add_output(parser: argparse.ArgumentParser, help: str = "also write the JSON summary here") -> None:
    """``--output FILE``."""
    parser.add_argument("--output", type=Path, help=help)


def emit(summary: dict[str, Any], output: Path | None = None) -> None:
    """Print the benchmark's JSON summary (what scripts and docs consume); also write it to ``output``."""
    text = json.dumps(summary, indent=2, sort_keys=True)
    print(text)
    if output is not None:
        output.write_text(text + "\n")


def progress(message: str) -> None:
    """A progress line on stderr (stdout holds only the JSON summary)."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- child processes: the job, or a benchmark


class ProcessFailed(RuntimeError):
    """A benchmark's child process exited non-zero; the message ends with its stderr's tail."""


@dataclasses.dataclass(frozen=True)
class Finished:
    """A child process that exited 0: what it printed, and its wall time timed from outside."""

    stdout: str
    stderr: str
    wall_s: float

    @property
    def log(self) -> str:
        """Both streams: the job logs to either."""
        return self.stdout + self.stderr


def start(argv: list[str], *, tree: Path = REPO, cwd: Path | None = None,
          env: Mapping[str, str | None] | None = None) -> subprocess.Popen[str]:
    """Start ``argv`` with the code of ``tree`` (this one, or a baseline worktree), its output captured.

    ``env``: variables to set on top of this process's, or (``None``) to
    remove. ``tree`` goes first on ``PYTHONPATH``, ahead of any installed
    copy, in the process and in the workers Ray starts for it.
    """
    merged: dict[str, str | None] = {**os.environ, "PYTHONPATH": str(tree), **(env or {})}
    return subprocess.Popen(
        argv, cwd=cwd or tree, text=True, env={key: value for key, value in merged.items() if value is not None},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[str], started: float) -> Finished:
    """Wait for a process :func:`start` started at ``started`` (``time.perf_counter()``); raise if it failed."""
    stdout, stderr = proc.communicate()
    if proc.returncode:
        what = " ".join(str(arg) for arg in proc.args[2:4])  # type: ignore[index]  # python -m MODULE ARG
        raise ProcessFailed(f"{what} exited {proc.returncode}:\n{stderr[-3000:]}")
    return Finished(stdout, stderr, time.perf_counter() - started)


def run(argv: list[str], **how: Any) -> Finished:
    """:func:`start` ``argv`` and wait for it, timed from outside."""
    started = time.perf_counter()
    return finish(start(argv, **how), started)


def job_argv(command: str, config: Path | str, sets: list[str]) -> list[str]:
    """``imdb-dist COMMAND --config CONFIG --set ...`` as this interpreter runs it."""
    return [sys.executable, "-m", "imdb_dist.cli", command, "--config", str(config),
            *[arg for item in sets for arg in ("--set", item)]]


def run_job(command: str, config: Path | str, sets: list[str], **how: Any) -> Finished:
    """One run of the job (``imdb-dist train`` or ``launch``) in a fresh process: :func:`run` of :func:`job_argv`."""
    return run(job_argv(command, config, sets), **how)


def summary_of(finished: Finished) -> dict[str, Any]:
    """The JSON summary a benchmark run as a child process printed (after any lines of its own)."""
    return json.loads(finished.stdout[finished.stdout.index("{"):])


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl``: one record per epoch."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_report(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``report.json``."""
    return json.loads((run_dir / "report.json").read_text())


def steady(speeds: list[float]) -> float | None:
    """The steady state: the median of the epochs after the first (which holds the cold start); None for one epoch."""
    return median(speeds[1:]) if len(speeds) > 1 else None


# --------------------------------------------------------------------------- rounds and medians


def interleave(variants: Mapping[str, Callable[[int], T]], rounds: int) -> dict[str, list[T]]:
    """Each variant once per round (called with the round), in turn: machine noise hits them alike."""
    results: dict[str, list[T]] = {name: [] for name in variants}
    for round_ in range(rounds):
        for name, run in variants.items():
            results[name].append(run(round_))
            progress(f"{name} {round_} {json.dumps(results[name][-1], default=str)}")
    return results


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def medians(runs: list[dict[str, Any]], keys: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Per key, the median over ``runs`` of its value."""
    return {key: median([run[key] for run in runs]) for key in keys}
