"""Benchmarks: run from the repository root as ``python -m bench.<name> --help``.

Results, and the command that reproduces each, are in docs/BENCHMARKS.md.
What the benchmarks share has one home each: ``harness`` (the command line,
the job in a fresh process and its run directory, rounds and medians, the
JSON summary), ``machine`` (the CPU record), ``timing`` (the in-process
epoch timer), ``baseline`` (this tree's revision, another one's worktree)
and ``seed`` (the seed-style script every comparison starts from).
"""
