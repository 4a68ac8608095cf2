"""This tree's git revision, and the code at another one checked out beside it, for side-by-side benchmarks."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def worktree(revision: str, where: Path) -> Iterator[Path]:
    """``revision`` checked out (detached) at ``where`` for the block, removed after."""
    subprocess.run(["git", "worktree", "add", "--detach", str(where), revision], cwd=REPO, check=True,
                   capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO, check=False)


def describe_tree() -> str | None:
    """This tree's commit, and whether tracked files differ from it (what a result was measured on)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}{' with uncommitted changes' if dirty else ''}"
