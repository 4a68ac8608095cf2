"""The image: its builds and sizes, and a container's time to its first training step against the host's.

Two parts, each optional:

- ``--builds``: the CPU image (``--build-arg DEVICE=cpu``) built cold
  (``--no-cache``, every wheel downloaded), then again after a one-line
  change to the code (a copy of this tree with a comment appended to
  ``imdb_dist/__init__.py``): which layers were rebuilt and how long it
  took; with ``--gpu`` also the GPU image, once. The sizes of both.
- ``--rounds N``: ``imdb-dist train --config CONFIG`` on the real reviews,
  alternating round by round between a container of the image (as the batch
  Job runs it: the image's user, a read-only root, /tmp and HOME as tmpfs,
  the data mounted read-only) and this tree on the host with a fresh HOME:
  seconds from before ``podman run`` (or the process start) to the end of
  the first optimizer step (its step point, ``run.log_every_steps=1``), and
  to the process's end.

Builds use podman as root with runc on ``--base`` (docker/debian-base.sh
makes it where no registry can be reached) and the host's CA bundle as the
``pip-ca`` build secret when it exists.

    python -m bench.container --data ../shared/data/imdb/aclImdb_train.tar.gz --builds --gpu --rounds 3
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.baseline import REPO
from bench.machine import cpu_model

PODMAN = ("podman", "--runtime", "runc")
CA_BUNDLE = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
TAG = "localhost/imdb-dist:bench"
# Podman's default ceilings for these are refused by this machine's sandbox (tests/pods.py says more).
_FILES = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
ULIMITS = (f"--ulimit=nofile={_FILES}:{_FILES}", "--ulimit=nproc=32768:32768")


def podman(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode:
        raise harness.ProcessFailed(f"podman {' '.join(args[:2])} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def build(tree: Path, base: str, device: str, tag: str, *, cache: bool) -> dict[str, Any]:
    """One ``podman build`` of ``tree``: seconds, and how many steps ran rather than came from the cache."""
    secret = ["--secret", f"id=pip-ca,src={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []
    started = time.perf_counter()
    done = podman("build", "--format", "docker", "--build-arg", f"DEVICE={device}", "--build-arg",
                  f"CUDA_IMAGE={base}", *secret, *([] if cache else ["--no-cache"]), "--tag", tag, str(tree))
    seconds = time.perf_counter() - started
    lines = (done.stdout + done.stderr).splitlines()
    steps = [line for line in lines if " STEP " in line or line.startswith("STEP ")]
    cached = sum(1 for line in lines if line.startswith("--> Using cache"))
    return {"seconds": round(seconds, 1), "steps": len(steps), "from_cache": cached, "size_bytes": size(tag)}


def size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def changed_copy(scratch: Path) -> Path:
    """The build context of this tree (what .dockerignore lets in), with one comment line more in the package.

    Copied with each file's mode: the build cache keys a COPY on content and
    permissions (not on modification times), so the copy's unchanged files
    hit the cache as a new clone's do.
    """
    tree = scratch / "changed"
    tree.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("imdb_dist", "job", "docker"):
        shutil.copytree(REPO / name, tree / name, ignore=ignore)
    with (tree / "imdb_dist" / "__init__.py").open("a", encoding="utf-8") as handle:
        handle.write("# a one-line change, for bench.container's rebuild\n")
    return tree


def first_step(out: Path, started: float, proc: subprocess.Popen[str]) -> float | None:
    """Seconds from ``started`` until the run's first step point lands in ``steps.jsonl``; None if it never did."""
    steps = out / "steps.jsonl"
    while proc.poll() is None:
        if steps.exists() and steps.stat().st_size:
            return time.perf_counter() - started
        time.sleep(0.05)
    return time.perf_counter() - started if steps.exists() and steps.stat().st_size else None


def train_once(where: str, config: str, data: Path, scratch: Path, round_: int, sets: list[str]) -> dict[str, Any]:
    """One ``imdb-dist train`` on the host or in a container: seconds to the first step and to its end."""
    out = scratch / f"{where}-{round_}"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # the container's user writes here
    settings = [*sets, "run.log_every_steps=1"]
    if where == "container":
        argv = [*PODMAN, "run", "--rm", *ULIMITS, "--read-only", "--read-only-tmpfs=false", "--cap-drop=all",
                "--security-opt=no-new-privileges", "--mount", "type=tmpfs,destination=/tmp,tmpfs-mode=1777",
                "--mount", "type=tmpfs,destination=/home/imdb,tmpfs-mode=1777",
                "--mount", f"type=bind,source={data},destination=/data/{data.name},readonly",
                "--mount", f"type=bind,source={out},destination=/runs/out", TAG,
                "train", "--config", config, "--set", f"data.path=/data/{data.name}", "--set", "run.output_dir=/runs/out",
                *[arg for item in settings for arg in ("--set", item)]]
        env = dict(os.environ)
    else:
        argv = harness.job_argv("train", config, [*settings, f"data.path={data}", f"run.output_dir={out}"])
        home = scratch / f"home-{round_}"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
        env.pop("MPLCONFIGDIR", None)
        env.pop("XDG_CACHE_HOME", None)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    to_first = first_step(out, started, proc)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode or to_first is None:
        raise harness.ProcessFailed(f"{where} train exited {proc.returncode}:\n{stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"first_step_s": round(to_first, 2), "wall_s": round(wall, 2),
            "val_accuracy": report["validation"]["accuracy"]}


def main() -> None:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--base", default="localhost/imdb-dist-base:bookworm", help="the image to build on")
    parser.add_argument("--builds", action="store_true", help="build the CPU image cold, then after a one-line change")
    parser.add_argument("--gpu", action="store_true", help="with --builds: build the GPU image once too")
    parser.add_argument("--no-cold", dest="cold", action="store_false",
                        help="with --builds: skip the cold build (the rebuild then starts from the layer cache as is)")
    parser.add_argument("--config", default="job/configs/smoke.yaml")
    parser.add_argument("--rounds", type=int, default=3, help="host and container runs of --config, alternating "
                        "(0: none; without --builds, the image an earlier --builds made)")
    harness.add_sets(parser)
    harness.add_output(parser)
    args = parser.parse_args()
    if shutil.which("podman") is None:
        harness.refuse("podman is not installed (apt-get install podman runc mmdebstrap)")
    summary: dict[str, Any] = {"cpu": cpu_model(), "base": args.base, "config": args.config}
    with tempfile.TemporaryDirectory(prefix="bench-container-") as scratch_dir:
        scratch = Path(scratch_dir)
        if args.builds:
            summary["builds"] = {}
            if args.cold:
                harness.progress("building the CPU image cold (--no-cache)")
                summary["builds"]["cpu_cold"] = build(REPO, args.base, "cpu", TAG, cache=False)
            else:
                harness.progress("building the CPU image from the layer cache")
                summary["builds"]["cpu_cached"] = build(REPO, args.base, "cpu", TAG, cache=True)
            harness.progress("rebuilding it after a one-line change")
            summary["builds"]["cpu_after_one_line_change"] = build(
                changed_copy(scratch), args.base, "cpu", TAG + "-changed", cache=True
            )
            if args.gpu:
                harness.progress("building the GPU image")
                summary["builds"]["gpu"] = build(REPO, args.base, "gpu", TAG + "-gpu", cache=True)
        if args.rounds:
            if subprocess.run([*PODMAN, "image", "exists", TAG], check=False).returncode:
                harness.refuse(f"no image {TAG}: build it with --builds")
            data = Path(args.data).resolve()
            runs = harness.interleave(
                {where: (lambda round_, where=where: train_once(where, args.config, data, scratch, round_,
                                                                args.overrides))
                 for where in ("host", "container")},
                args.rounds,
            )
            summary["runs"] = runs
            summary["median"] = {where: harness.medians(rs, ["first_step_s", "wall_s"]) for where, rs in runs.items()}
            summary["container_over_host"] = {
                key: summary["median"]["container"][key] / summary["median"]["host"][key]
                for key in ("first_step_s", "wall_s")
            }
    harness.emit(summary, args.output)


if __name__ == "__main__":
    sys.exit(main())
