"""Graceful stop on SIGINT/SIGTERM for a worker process.

The first signal asks the worker to stop at the next safe point: the built-in trainer polls
`StopFlag.requested` between batches; code that cannot poll (a custom objective) is interrupted by
`StopRequested` raised from the handler while `raise_now` is set. A second signal raises at once.
Handlers are installed explicitly: a process started in the background inherits SIGINT as
*ignored*, so Python's default KeyboardInterrupt cannot be relied on.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
from types import FrameType

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


class StopRequested(Exception):
    """Raised where a trial must stop because the process was asked to."""


class StopFlag:
    """What the signal handlers record; read by the search loop and the trainer."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self.raise_now = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + signal number, as shells report a signalled process (130 SIGINT, 143 SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)

    def check(self) -> None:
        """Raise StopRequested if a stop was asked for (the trainer's safe point)."""
        if self.requested:
            raise StopRequested(f"stopped by {signal.Signals(self.signum).name}")

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: record the signal; raise where the running code cannot poll."""
        self.count += 1
        if self.signum is None:
            self.signum = signum
            logger.warning("%s received: stopping at the next safe point",
                           signal.Signals(signum).name)
        if self.raise_now or self.count > 1:
            raise StopRequested(f"stopped by {signal.Signals(signum).name}")


def install_stop_handlers(flag: StopFlag) -> None:
    """Route SIGINT and SIGTERM to `flag` (also when they were inherited as ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, flag.handle)


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM when the launcher dies, so a worker never lives on as an orphan."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup has to do
        logger.debug("PR_SET_PDEATHSIG unavailable")
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
