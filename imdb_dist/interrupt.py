"""SIGTERM and Ctrl-C: finish the step, save a checkpoint, stop with a non-zero exit.

Schedulers (Kubernetes, Slurm, spot reclaims) send SIGTERM and wait a grace
period before SIGKILL. While training, the first SIGTERM or SIGINT only
raises a flag: the checkpoint callback sees it at the end of the current
step, saves, and raises :class:`Interrupted`, which the CLI turns into exit
status ``128 + signal`` (143 for SIGTERM, 130 for Ctrl-C). Outside training
(data loading, export) there is nothing to save, so the signal stops the
process at once. A second signal always stops at once.

Handlers can only be installed from the main thread; elsewhere (a Ray Train
worker) :func:`stop_on_signals` leaves signals alone and yields a request
that is never set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from imdb_dist.errors import RunError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(RunError):
    """The run was stopped by a signal; ``exit_code`` is ``128 + signal``."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclasses.dataclass
class StopRequest:
    """Set by the signal handler; polled by the training loop between steps."""

    signum: int | None = None
    # True while a step is running that should be finished and checkpointed.
    deferring: bool = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = SIGNALS) -> Iterator[StopRequest]:
    """Route ``signals`` to a :class:`StopRequest` for the duration of the block."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if request.deferring and not request.requested:
            request.signum = signum
            log.warning("%s: finishing this step, saving a checkpoint, then stopping (send it again to stop now)", name)
            return
        request.signum = signum
        raise Interrupted(signum, f"stopped by {name} (no checkpoint written since the last one)")

    previous = {signum: signal.signal(signum, handle) for signum in signals}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
