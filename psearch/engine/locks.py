"""Advisory locks that coordinate processes: flock files (the budget, the image cache, the summary)
and the journal storage's symlink lock. A flock is released by the OS if its holder dies, so a
crash never leaves one.

A wait for a lock polls instead of blocking in the kernel, so that a stop (Ctrl+C, SIGTERM) ends
it: the signal handler only sets a flag, and `cancelled()` reads it between tries.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from psearch.engine.stopping import StopRequested

logger = logging.getLogger(__name__)
POLL_S = 0.05
# A journal lock link left this long unchanged belongs to a holder that died (Optuna's own
# journal lock uses the same grace period).
STALE_SYMLINK_S = 30.0


def wait_for(try_once: Callable[[], bool], cancelled: Callable[[], bool] | None = None,
             waiting: str | None = None, note_after_s: float = 0.0, poll_s: float = POLL_S
             ) -> None:
    """Call `try_once` until it returns True; raise StopRequested as soon as `cancelled()` does.
    Log `waiting` (when given) once the wait has lasted `note_after_s`."""
    started = time.monotonic()
    noted = waiting is None
    while not try_once():
        if cancelled is not None and cancelled():
            raise StopRequested("stopped while waiting for a lock")
        if not noted and time.monotonic() - started >= note_after_s:
            logger.info("%s", waiting)
            noted = True
        time.sleep(poll_s)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, waiting: str | None = None,
              cancelled: Callable[[], bool] | None = None,
              note_after_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the block, waiting for another
    holder (see `wait_for` for `waiting`, `cancelled` and `note_after_s`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        def try_once() -> bool:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        wait_for(try_once, cancelled, waiting, note_after_s)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def symlink_lock(path: str, target: str, cancelled: Callable[[], bool] | None = None
                 ) -> Iterator[None]:
    """Hold the lock that a symlink at `path` (pointing to `target`) stands for: link creation is
    atomic on NFS too. A link this waiter has seen unchanged for STALE_SYMLINK_S of its own
    monotonic clock is taken to be a dead holder's (a holder keeps it for a moment only); its
    mtime is not compared with this host's clock, which may be skewed from the writer's."""
    watch = LinkWatch()

    def try_once() -> bool:
        try:
            os.symlink(target, path)
            return True
        except FileExistsError:
            watch.break_if_stale(path, time.monotonic())
            return False

    wait_for(try_once, cancelled)
    try:
        yield
    finally:
        _remove_link(path)


class LinkWatch:
    """How long one waiter has seen the same lock link (same inode and times) in place."""

    def __init__(self) -> None:
        self._identity: tuple[int, int, int] | None = None
        self._since = 0.0

    def unchanged_for(self, identity: tuple[int, int, int] | None, now: float) -> float:
        """Seconds `identity` has been seen as of monotonic `now` (0 when it just changed)."""
        if identity != self._identity:
            self._identity, self._since = identity, now
            return 0.0
        return now - self._since

    def break_if_stale(self, path: str, now: float) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        age = self.unchanged_for((st.st_ino, st.st_mtime_ns, st.st_ctime_ns), now)
        if age > STALE_SYMLINK_S:
            logger.warning("Lock %s unchanged for %.0f s: its holder died; taking it over",
                           path, age)
            _remove_link(path)
            self._identity = None


def _remove_link(path: str) -> None:
    """Rename, then unlink: of two processes removing the link at once, one does it."""
    moved = f"{path}.{uuid.uuid4().hex}.del"
    try:
        os.rename(path, moved)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return
    os.unlink(moved)
