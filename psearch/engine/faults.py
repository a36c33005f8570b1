"""Faults of the machine rather than of a trial: a full disk, a storage that hiccups.

Importable by the launcher (no torch, no optuna): a full disk ends the run cleanly (a worker
exits EXIT_DISK_FULL), a transient storage error is retried with back-off. Exception types of
optuna, SQLAlchemy and sqlite3 are looked up by module name: an exception of such a type means
its module is loaded already, so nothing is imported here to recognise it.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

from psearch.engine.errors import FailReason

logger = logging.getLogger(__name__)
T = TypeVar("T")

DISK_FULL_REASON = FailReason.DISK_FULL  # the fail reason of a trial that filled the disk
SQLITE_FULL = 13  # sqlite3's error code for "database or disk is full"
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
# How long the study's storage may stay unreachable (a database restarted, a maintenance window)
# before a worker gives up on it; its launcher restarts it once the storage answers again.
OUTAGE_VAR = "PARALLEL_SEARCH_STORAGE_OUTAGE_S"
DEFAULT_OUTAGE_S = 300.0
LONGEST_RETRY_DELAY_S = 15.0
# What the study's storage raises: a locked SQLite file, a dropped database connection, ...
STORAGE_ERROR_TYPES = (("optuna.exceptions", "StorageInternalError"),
                       ("sqlalchemy.exc", "SQLAlchemyError"), ("sqlite3", "Error"))


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it or was being handled when it was raised (__cause__,
    __context__), each once (pure)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__context__, current.__cause__]


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` or anything in its chain says the disk (or the quota) is full: OSError
    ENOSPC or EDQUOT, SQLite's 'database or disk is full' (pure)."""
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(e, "sqlite_errorcode", None) == SQLITE_FULL or \
                "database or disk is full" in str(e):
            return True
    return False


def is_storage_error(exc: BaseException) -> bool:
    """True when `exc` or anything in its chain was raised by the study's storage (pure)."""
    kinds = tuple(getattr(sys.modules[module], name) for module, name in STORAGE_ERROR_TYPES
                  if module in sys.modules)
    return any(isinstance(e, kinds) for e in exception_chain(exc))


def is_transient_storage_error(exc: BaseException) -> bool:
    """A storage error that may pass by waiting (a locked database, a dropped connection); a
    full disk does not (pure)."""
    return is_storage_error(exc) and not is_disk_full(exc)


def one_line(exc: BaseException) -> str:
    """'OperationalError: database is locked': the innermost cause, first line only (Optuna's
    StorageInternalError says only that a commit failed; SQLAlchemy appends the SQL) (pure)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def free_space_line(path: str | Path) -> str:
    """'1.2 MiB free of 4.0 GiB on /scratch/run': the file system holding `path` (or its
    nearest existing parent)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError as exc:
        return f"free space of {folder} unknown ({exc.strerror})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on {folder}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def outage_s(environ=os.environ) -> float:
    """How long a storage outage is waited out (PARALLEL_SEARCH_STORAGE_OUTAGE_S, default 300)."""
    try:
        return max(0.0, float(environ.get(OUTAGE_VAR, DEFAULT_OUTAGE_S)))
    except ValueError:
        return DEFAULT_OUTAGE_S


def outage_delays(total_s: float | None = None) -> tuple[float, ...]:
    """Back-off delays (0.5, 1, 2, 4, 8, 15, 15, …) that add up to at least `total_s` (default
    `outage_s()`) (pure but for the default)."""
    total_s = outage_s() if total_s is None else total_s
    delays, spent, delay = [], 0.0, 0.5
    while spent < total_s:
        delays.append(delay)
        spent += delay
        delay = min(LONGEST_RETRY_DELAY_S, delay * 2)
    return tuple(delays)


def retry(fn: Callable[[], T], what: str, delays: Sequence[float] = RETRY_DELAYS_S,
          is_transient: Callable[[BaseException], bool] = is_transient_storage_error,
          sleep: Callable[[float], None] = time.sleep,
          cancelled: Callable[[], bool] | None = None) -> T:
    """`fn()`, called again after each of `delays` while it fails transiently; the last error,
    or any other one, is raised, also as soon as `cancelled()` turns true while waiting. `what`
    names the call in the warning logged per retry (once per distinct error after the first)."""
    said = None
    for delay in (*delays, None):
        try:
            result = fn()
        except Exception as exc:
            if delay is None or not is_transient(exc):
                raise
            line = one_line(exc)
            if line != said:
                logger.warning("%s failed (%s); trying again for up to %.0f s", what, line,
                               sum(delays))
                said = line
            if _sleep_unless(delay, sleep, cancelled):
                raise
            continue
        if said is not None:
            logger.info("%s succeeded after the storage came back", what)
        return result
    raise AssertionError("unreachable")


def _sleep_unless(delay: float, sleep: Callable[[float], None],
                  cancelled: Callable[[], bool] | None) -> bool:
    """Sleep `delay` in short steps; True (and stop early) once `cancelled()` is."""
    if cancelled is None:
        sleep(delay)
        return False
    end = time.monotonic() + delay
    while True:
        if cancelled():
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        sleep(min(0.2, left))
