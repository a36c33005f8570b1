"""Graceful stop on SIGINT/SIGTERM/SIGHUP for a worker process: how a stop reaches a trial (the
launcher's side, forwarding Ctrl+C/SIGTERM to every worker's process group, is controller.py).

The first signal asks the worker to stop at the next safe point: the built-in trainer polls
`StopFlag.requested` between batches, and so do the loops that watch a trial's ranks (ranks.py)
or its training program (program.py), which then end those processes; code that cannot poll (a
custom objective) is interrupted by `StopRequested` raised from the handler while `raise_now` is
set. The trial ends `interrupted` (trial.py) and runs again on the rerun. A second Ctrl+C (SIGINT, a
moment after the first) raises at once. Repeated SIGTERMs do not escalate: they arrive in bursts
(`scancel` signals every process while the launcher forwards its own; Linux sends the
parent-death signal once per launcher thread), and the launcher escalates with SIGKILL itself.
SIGHUP (the terminal of a stand-alone run was closed) stops like SIGTERM.
Handlers are installed explicitly: a process started in the background inherits SIGINT as
*ignored*, so Python's default KeyboardInterrupt cannot be relied on.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from types import FrameType

from psearch.engine.errors import signal_exit

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
# A second SIGINT sooner than this is the same keypress reaching us twice, not a second one.
ESCALATION_MIN_GAP_S = 0.5


class StopRequested(Exception):
    """Raised where a trial must stop because the process was asked to."""


class StopFlag:
    """What the signal handlers record; read by the search loop and the trainer."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.first_at = 0.0
        self.raise_now = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + signal number, as shells report a signalled process (130 SIGINT, 143 SIGTERM,
        129 SIGHUP)."""
        return signal_exit(self.signum or signal.SIGINT)

    def check(self) -> None:
        """Raise StopRequested if a stop was asked for (the trainer's safe point)."""
        if self.requested:
            raise StopRequested(f"stopped by {signal.Signals(self.signum).name}")

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: record the signal; raise where the running code cannot poll."""
        first = self.signum is None
        if first:
            self.signum, self.first_at = signum, time.monotonic()
            logger.warning("%s received: stopping at the next safe point",
                           signal.Signals(signum).name)
        if not first and is_escalation(signum, time.monotonic() - self.first_at):
            logger.warning("Second Ctrl+C: stopping now")
        elif not self.raise_now:
            return
        raise StopRequested(f"stopped by {signal.Signals(signum).name}")


def is_escalation(signum: int, seconds_since_first: float) -> bool:
    """A repeated signal means 'stop now' only for a person pressing Ctrl+C again (pure)."""
    return signum == signal.SIGINT and seconds_since_first >= ESCALATION_MIN_GAP_S


def install_stop_handlers(flag: StopFlag) -> None:
    """Route SIGINT and SIGTERM to `flag` (also when they were inherited as ignored), and SIGHUP
    unless it is ignored on purpose (`nohup`: closing the terminal must not stop the run)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, flag.handle)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, flag.handle)


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM when the launcher dies, so a worker never lives on as an orphan."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the launcher's own cleanup has to do
        logger.debug("PR_SET_PDEATHSIG unavailable")
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
