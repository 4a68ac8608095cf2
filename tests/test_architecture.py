"""The package's layers and its acyclic imports, as pyproject.toml's import-linter contracts state them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package under ``root`` (it puts its working directory first on the path)."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
                          cwd=root, capture_output=True, text=True, timeout=120, check=False)


def test_the_package_keeps_its_contracts() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


@pytest.mark.parametrize(
    ("edits", "broken"),
    [
        # A component that reaches up into the training job: an upward import.
        ({"model.py": "import imdb_dist.train"}, "Layers"),
        # Two modules of one layer that import each other: a cycle.
        ({"digest.py": "import imdb_dist.checkpoint", "checkpoint.py": "import imdb_dist.digest"}, "No cycles"),
        # Keras 3 instead of tf_keras.
        ({"export.py": "import keras"}, "tf_keras only"),
    ],
    ids=["upward-import", "cycle", "keras-3"],
)
def test_each_contract_fails_on_the_import_it_forbids(tmp_path: Path, edits: dict[str, str], broken: str) -> None:
    # A copy of the package with the imports added, checked against the same contracts.
    shutil.copytree(REPO / "imdb_dist", tmp_path / "imdb_dist", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for module, line in edits.items():
        target = tmp_path / "imdb_dist" / module
        target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Broken contracts" in result.stdout, result.stdout[-4000:]
    # The broken contracts' section names the contract the edit breaks, and the import it added.
    section = result.stdout.split("Broken contracts", 1)[1]
    assert broken in section, section
    added = [module.removesuffix(".py") for module in edits]
    assert any(f"imdb_dist.{name}" in section or f".{name} ->" in section for name in added), section
