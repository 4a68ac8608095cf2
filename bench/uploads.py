"""Bytes a run on remote storage uploads per checkpoint, early and late in the run.

Starts a real S3 server (moto's, on loopback), runs ``imdb-dist train``
with ``run.output_dir`` in its bucket as users do (a fresh process, real
data, a checkpoint at every epoch's end), and reads the run's
``report.json`` back from the bucket: its ``uploads`` hold, per sync,
the bytes the chief uploaded, how many of them were the checkpoint's, and
the size of the logs at that moment (what uploading every log whole at each
checkpoint would have sent for them). The first sync also carries what the
run writes once (config, fingerprint, vocabulary). A sync uploads only what changed: a
log's new lines or records as a segment (``imdb_dist.rundir``), so its
bytes per checkpoint should not grow with the run.

    python -m bench.uploads --data ../shared/data/imdb/aclImdb_train.tar.gz \\
        --config job/configs/fast.yaml --epochs 4 [--output docs/bench-results/uploads.json]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.machine import cpu_model, free_port

BUCKET = "bench"
# moto accepts any key pair.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_client(endpoint: str) -> Any:
    """An S3 client of the moto server at ``endpoint`` (``host:port``)."""
    import boto3

    return boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def start_s3() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on loopback with one empty bucket; its ``host:port``."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = s3_client(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return server, f"127.0.0.1:{port}"
        except Exception:  # noqa: BLE001 - not listening yet
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto's S3 server did not come up") from None
            time.sleep(0.3)


def measure(config: str, data: str, epochs: int, extra: list[str]) -> dict[str, Any]:
    """One run into a fresh bucket prefix; the per-sync upload records and what they add up to."""
    config, data = str(Path(config).resolve()), str(Path(data).resolve())  # the run starts in a scratch directory
    server, endpoint = start_s3()
    try:
        target = f"s3://{BUCKET}/run?endpoint_override={endpoint}&scheme=http"
        # The bench's own settings last: they win over --set.
        sets = [*extra, f"data.path={data}", f"train.epochs={epochs}", f"run.output_dir={target}",
                "run.checkpoint_steps=0"]
        with tempfile.TemporaryDirectory(prefix="imdb-dist-bench-uploads-") as scratch:
            wall = harness.run_job("train", config, sets, cwd=Path(scratch), env=CREDENTIALS).wall_s
        report = json.loads(s3_client(endpoint).get_object(Bucket=BUCKET, Key="run/report.json")["Body"].read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    # A checkpoint at each epoch's end: sync k is epoch k's (the report is written before the publish).
    per_epoch = report["uploads"]
    assert len(per_epoch) == report["epochs"], (len(per_epoch), report["epochs"])

    def other(sync: dict[str, int]) -> int:
        return sync["bytes"] - sync["checkpoint_bytes"]

    first, second, last = per_epoch[0], per_epoch[min(1, len(per_epoch) - 1)], per_epoch[-1]
    return {
        "epochs": report["epochs"],
        "wall_s": wall,
        "per_checkpoint": [{"epoch": i + 1, "other_bytes": other(sync), **sync} for i, sync in enumerate(per_epoch)],
        "first_to_last_checkpoint_ratio": last["bytes"] / first["bytes"],
        # Without the checkpoint (a Ray run's chief: Ray Train moves the checkpoint itself), from the
        # second checkpoint (the first also uploads the config and vocabulary): what this run sent,
        # and what uploading the logs whole would have sent.
        "logs_second_to_last_ratio": other(last) / other(second),
        "whole_logs_second_to_last_ratio": last["logs_size_bytes"] / second["logs_size_bytes"],
        "validation_accuracy": report["validation"]["accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__)
    harness.add_data(parser)
    parser.add_argument("--config", default="job/configs/fast.yaml")
    parser.add_argument("--epochs", type=int, default=4)
    harness.add_sets(parser)
    harness.add_output(parser)
    args = parser.parse_args(argv)
    summary = {
        "machine": cpu_model(),
        "config": args.config,
        "overrides": args.overrides,
        **measure(args.config, args.data, args.epochs, args.overrides),
    }
    harness.emit(summary, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
