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
    atomic on NFS too. A link unchanged for STALE_SYMLINK_S is taken to be a dead holder's."""
    def try_once() -> bool:
        try:
            os.symlink(target, path)
            return True
        except FileExistsError:
            _break_if_stale(path)
            return False

    wait_for(try_once, cancelled)
    try:
        yield
    finally:
        _remove_link(path)


def _break_if_stale(path: str) -> None:
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return
    if age > STALE_SYMLINK_S:
        logger.warning("Lock %s unchanged for %.0f s: its holder died; taking it over", path, age)
        _remove_link(path)


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
