"""Print the runtime requirements of pyproject.toml, plus those of the named extras, one per line.

The Dockerfile installs these in a layer of their own before it copies the
code, so editing the code does not re-download several GB of wheels:

    python3 docker/requirements.py pyproject.toml gpu > /tmp/requirements.txt
    python3 docker/requirements.py --build-system pyproject.toml   # what builds the project's wheel
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the image has 3.12)
    import tomli as tomllib


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """``[project] dependencies`` followed by each extra's; an unknown extra is an error."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    result = list(project["dependencies"])
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"error: {pyproject} has no extra {extra!r} (known: {', '.join(sorted(optional))})")
        result += optional[extra]
    return result


def build_requirements(pyproject: Path) -> list[str]:
    """``[build-system] requires``: what builds the project's wheel."""
    return list(tomllib.loads(pyproject.read_text(encoding="utf-8"))["build-system"]["requires"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build-system"] and len(sys.argv) == 3:
        print("\n".join(build_requirements(Path(sys.argv[2]))))
    elif len(sys.argv) >= 2 and not sys.argv[1].startswith("-"):
        print("\n".join(requirements(Path(sys.argv[1]), sys.argv[2:])))
    else:
        raise SystemExit("usage: requirements.py PYPROJECT [EXTRA ...] | requirements.py --build-system PYPROJECT")
