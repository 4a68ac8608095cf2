"""The code at another git revision, checked out beside this tree, for side-by-side benchmarks."""

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
