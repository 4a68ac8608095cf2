"""What MLflow tracking costs a run: ``imdb-dist train`` with ``tracking.uri`` on and off, side by side.

Each round runs the job twice, as users do (one fresh process each, the
config's data): once with tracking off, once logging to a real ``mlflow
server`` this benchmark starts on loopback (SQLite backend, local artifact
root; :class:`MlflowServer`, which the tests use too). Step checkpoints
every ``--every`` steps make the chief hand the tracker its records often.
From each run: the steady-state examples/s (epochs after the first),
the median examples/s of its training steps, the wall time from process
start to exit (the cold start, the end's wait for the tracker and the
artifacts' upload included), and with tracking, the MLflow run's metric
count (every step point and epoch line arrived).

    python -m bench.tracking --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --config job/configs/fast.yaml --every 50 --rounds 3 [--output docs/bench-results/tracking.json]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import harness
from bench.machine import cpu_model, free_port


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over ``root`` (its database and artifacts survive a restart), as users start one.

    One worker process: a run's requests are few, and the CI machine has two cores.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        if self.proc is not None and self.proc.poll() is None:
            return self  # running already
        self.root.mkdir(parents=True, exist_ok=True)
        beside = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(beside) if beside.exists() else "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=(self.root / "server.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Kill the server and its worker at once, as a lost host."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def measure(config: str, data: str, every: int, server: MlflowServer | None, extra: list[str],
            round_: int) -> dict[str, Any]:
    """One ``imdb-dist train`` into a fresh run directory; its speeds, wall time and (tracked) MLflow metrics."""
    config, data = str(Path(config).resolve()), str(Path(data).resolve())
    experiment = f"bench-{round_}"
    with tempfile.TemporaryDirectory(prefix="imdb-dist-bench-tracking-") as scratch:
        run_dir = Path(scratch) / "run"
        sets = [*extra, f"data.path={data}", f"run.output_dir={run_dir}", f"run.checkpoint_steps={every}"]
        if server is not None:
            sets += [f"tracking.uri={server.uri}", f"tracking.experiment={experiment}"]
        done = harness.run_job("train", config, sets, cwd=Path(scratch))
        report = harness.read_report(run_dir)
        records = harness.read_records(run_dir)
        points = len((run_dir / "steps.jsonl").read_text().splitlines())
    result: dict[str, Any] = {
        "wall_s": done.wall_s,
        "steady_examples_per_s": harness.steady([r["examples_per_s"] for r in records]),
        "examples_per_s_median": report["examples_per_s_median"],
        "optimizer_steps": report["optimizer_steps"],
        "step_points": points,
    }
    if server is not None:
        client = server.client()
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        history = client.get_metric_history(run.info.run_id, "step_loss")
        result["logged_step_points"] = len(history)
        result["mlflow_status"] = run.info.status
    return result


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--config", default="job/configs/fast.yaml")
    parser.add_argument("--every", type=int, default=50, help="run.checkpoint_steps: how often the tracker is fed")
    harness.add_rounds(parser, default=3)
    harness.add_sets(parser)
    harness.add_output(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imdb-dist-bench-mlflow-") as root:
        server = MlflowServer(Path(root)).start()
        try:
            runs = harness.interleave({
                "off": lambda round_: measure(args.config, args.data, args.every, None, args.overrides, round_),
                "on": lambda round_: measure(args.config, args.data, args.every, server, args.overrides, round_),
            }, args.rounds)
        finally:
            server.stop()
    keys = ("steady_examples_per_s", "examples_per_s_median", "wall_s")
    medians = {name: harness.medians(got, keys) for name, got in runs.items()}
    harness.emit({
        "bench": "tracking",
        "cpu": cpu_model(),
        "config": args.config,
        "sets": args.overrides,
        "every": args.every,
        "rounds": args.rounds,
        "medians": medians,
        # Tracking on against off, measured side by side: speed (1.0 = no cost) and wall time.
        "on_vs_off": {key: medians["on"][key] / medians["off"][key] for key in keys},
        "runs": runs,
    }, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
