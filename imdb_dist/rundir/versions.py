"""The model's layout in a run directory: ``model/<version>/`` (TF-Serving's), each version complete once marked.

Each export takes the next version, and a version is complete once its
``assets.extra/imdb_dist.json`` exists: locally the version is renamed into
place whole, remotely that file is uploaded after all the others
(:func:`imdb_dist.export.locate_model` reads only complete versions). The
previous complete version is kept, so a reader that chose it while a new
one is published can still load it.
"""

from __future__ import annotations

import re
from pathlib import Path

from imdb_dist.rundir.files import MODEL

# Inside a model version: written last, so its presence marks the version complete (imdb_dist.export.METADATA).
MODEL_MARKER = "assets.extra/imdb_dist.json"
# Model versions kept: the newest, and the one before for readers that chose it while the newest was published.
KEEP_VERSIONS = 2


def version_part(relative: str) -> str | None:
    """The version of a path ``model/<version>/...``, or None."""
    parts = relative.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == MODEL and parts[1].isdigit() else None


def stale_versions(complete: dict[int, bool]) -> list[int]:
    """Versions to delete, given each version's completeness: all before the newest complete one but the one before."""
    done = sorted(v for v, ok in complete.items() if ok)
    keep = set(done[-KEEP_VERSIONS:])
    return [v for v in complete if done and v < done[-1] and v not in keep]


def local_versions(model_root: Path) -> list[int]:
    return [int(p.name) for p in model_root.iterdir() if p.name.isdigit()] if model_root.is_dir() else []


def newest_complete(files: dict[str, int], root: str) -> int | None:
    """The highest version under ``root`` (a ``model/`` path inside ``files``, or '') that holds its marker."""
    marker = re.compile(rf"^{re.escape(f'{root}/' if root else '')}(\d+)/{re.escape(MODEL_MARKER)}$")
    return max((int(m[1]) for name in files if (m := marker.match(name))), default=None)
