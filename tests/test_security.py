"""Nothing read from disk or the command line is unpickled, eval'd or loaded as unsafe YAML.

Checked on the syntax tree of every module the job ships (``imdb_dist``,
``job``, ``bench``), so a new ``pickle.load`` or ``yaml.load`` fails CI.
The other security promises have their own tests: YAML Python tags refused
(test_config), non-root container (test_docker), loopback-only local Ray
clusters (test_launch).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

SHIPPED = sorted(p for root in ("imdb_dist", "job", "bench") for p in (REPO / root).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# module attribute -> why it is unsafe on untrusted input
UNSAFE_ATTRIBUTES = {
    ("yaml", "load"): "constructs Python objects from tags; use yaml.safe_load",
    ("yaml", "unsafe_load"): "constructs Python objects",
    ("yaml", "full_load"): "constructs some Python objects",
    ("yaml", "Loader"): "the unsafe loader",
    ("yaml", "UnsafeLoader"): "the unsafe loader",
}


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES or node.module.split(".")[-1] in UNSAFE_MODULES:
                found.append(f"{where} imports from {node.module}")
            found += [f"{where} imports {a.name} from {node.module}" for a in node.names if a.name in UNSAFE_MODULES]
            if node.module == "yaml":
                found += [f"{where} imports yaml.{a.name}" for a in node.names if ("yaml", a.name) in UNSAFE_ATTRIBUTES]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in UNSAFE_BUILTINS:
            found.append(f"{where} calls {node.func.id}()")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in UNSAFE_ATTRIBUTES:
                found.append(f"{where} uses {node.value.id}.{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            found.append(f"{where} passes allow_pickle")
    return found


def test_the_shipped_code_is_found():
    names = {p.relative_to(REPO).as_posix() for p in SHIPPED}
    assert {"imdb_dist/config/loading.py", "imdb_dist/export.py", "job/train.py", "bench/seed.py"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_unpickling_eval_or_unsafe_yaml(path: Path):
    assert _problems(path) == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "from ray import cloudpickle",
        "x = eval(text)",
        "import yaml\nyaml.load(text)",
        "from yaml import unsafe_load",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
    ],
)
def test_the_check_catches_each_unsafe_form(tmp_path: Path, source: str):
    module = tmp_path / "unsafe.py"
    module.write_text(source + "\n", encoding="utf-8")
    assert _problems(module)
