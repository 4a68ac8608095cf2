"""The machine a benchmark ran on, for its record: absolute figures depend on it."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any


def cpu_model() -> dict[str, Any]:
    """``lscpu``'s model name and the vector flags that change CPU step times."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {
        "model": fields.get("Model name", "").strip(),
        "cpus": os.cpu_count(),
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
    }


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (a server or worker a benchmark starts takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
