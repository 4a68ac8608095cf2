"""The runs' shared settings (ray-gpu.yaml's sizes, the bench's epochs and batch, the user's --set) and each run's config."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from bench.baseline import REPO

GPU_CONFIG = REPO / "job" / "configs" / "ray-gpu.yaml"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The runs' shared settings, and where each run goes."""

    rehearsal: bool
    gpus: int  # visible to TensorFlow
    base: tuple[str, ...]  # overrides every run takes: data, sizes, then the user's --set
    batch: int  # per device
    workdir: Path
    timeout_s: float

    @property
    def all_devices(self) -> int:
        """Replicas of the all-devices run: every GPU, or the rehearsal's two logical CPUs."""
        return 2 if self.rehearsal else self.gpus

    def overrides(self, name: str, precision: str, *, devices: str, deterministic: bool = False) -> list[str]:
        """One run's config: the shared settings, then its devices, precision and run directory.

        ``devices``: ``one`` (one GPU; the rehearsal's CPU) or ``all``.
        """
        if devices == "all":
            placed = ["distribution.strategy=mirrored"]
            placed += ["distribution.cpu_devices=2"] if self.rehearsal else ["distribution.devices=[]"]
            # The same batch per GPU as the one-GPU run: the global batch grows with them.
            placed.append(f"train.batch_size={self.batch * self.all_devices}")
        elif self.rehearsal or self.gpus == 1:
            placed = ["distribution.strategy=default"]  # what the job picks itself on one GPU
        else:
            placed = ["distribution.strategy=mirrored", 'distribution.devices=["/gpu:0"]']
        return [
            *self.base,
            *placed,
            f"train.mixed_precision={precision}",
            f"train.deterministic={'true' if deterministic else 'false'}",
            f"run.output_dir={self.workdir / 'runs' / name}",
        ]

    def fallback(self, precision: str) -> str | None:
        """The precision a rehearsal's run takes if the job refuses ``precision`` on one CPU device."""
        # TODO(mixed_float16): imdb-dist refuses mixed_float16 on a single CPU
        # device (it is legal only with distribution.cpu_devices >= 2), so the
        # rehearsal's one-device "mixed" runs fall back to mixed_bfloat16; drop
        # this when mixed_float16 is accepted there.
        return "mixed_bfloat16" if self.rehearsal and precision == "mixed_float16" else None

    def collective(self) -> str:
        """The all-reduce the runs are configured with (``distribution.collective``)."""
        from imdb_dist.config import load_config

        return load_config(None, list(self.base)).distribution.collective

    def sizes(self) -> dict[str, Any]:
        """The sizes every run shares, for the summary."""
        from imdb_dist.config import load_config, to_dict

        cfg = to_dict(load_config(None, list(self.base)))
        return {
            "epochs": cfg["train"]["epochs"],
            "batch_per_device": self.batch,
            "max_len": cfg["data"]["max_len"],
            "vocab_size": cfg["data"]["vocab_size"],
            "learning_rate": cfg["train"]["learning_rate"],
            "model": cfg["model"],
            "overrides": list(self.base),
        }


def make_plan(args: argparse.Namespace, gpus: int, workdir: Path, data: Path) -> Plan:
    """The settings every run shares: ray-gpu.yaml's data and network sizes, these epochs and batch, the user's --set."""
    from imdb_dist.config import load_config, to_dict

    job = load_config(GPU_CONFIG)
    rehearsal = args.cpu_rehearsal
    batch = args.batch or (32 if rehearsal else 256)
    max_len = args.max_len or (128 if rehearsal else job.data.max_len)
    base = [
        "data.source=aclimdb",
        f"data.path={data}",
        f"data.max_len={max_len}",
        f"data.vocab_size={job.data.vocab_size}",
        *(f"model.{key}={json.dumps(value)}" for key, value in to_dict(job)["model"].items()),
        f"train.epochs={args.epochs}",
        f"train.batch_size={batch}",
        # The square-root rule from the default 0.001 at batch 64, as ray-gpu.yaml scales its 1024.
        f"train.learning_rate={0.001 * (batch / 64) ** 0.5:.6g}",
        # Every epoch runs (the figures need them all), and checkpoints only
        # at epoch ends and the stop: mid-epoch saves would time the disk.
        "train.early_stopping_patience=0",
        "run.checkpoint_steps=0",
        *args.overrides,
    ]
    # The user's --set may change the batch: the per-device batch is what the runs get.
    batch = load_config(None, base).train.batch_size
    return Plan(rehearsal, gpus, tuple(base), batch, workdir, args.timeout)
