"""Where the study lives: opening a storage URL, the lock that makes the trial budget exact, the
heartbeat settings, and what to tell the user about a storage (dashboard hint, network file system).

Storages: SQLite (the default, one node), PostgreSQL or MySQL (many nodes), and `journal:///PATH`
(a shared file system without a database server). The budget lock serialises "count, then start a
trial" with the storage's own mechanism, so it holds for every launcher of the study whether they
share a checkpoint folder or not:
- PostgreSQL: a transaction-scoped advisory lock (`pg_advisory_xact_lock`), held on a connection of
  its own while Optuna writes through its usual ones; the server drops it if the holder dies.
- MySQL: `GET_LOCK`/`RELEASE_LOCK`, likewise per connection.
- SQLite: SQLite itself serialises writers with locks on the database file, and a transaction kept
  open on a second connection (`BEGIN IMMEDIATE`) would block Optuna's own writes in the same
  process. So the lock is a file lock beside the database file: every process that opens that file
  shares it, whatever its checkpoint folder. (SQLite belongs on a node-local file system anyway.)
- Journal: Optuna's own journal file lock (`JournalFileSymlinkLock`) on a sibling file.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shlex
import time
import warnings
import weakref
import zlib
from pathlib import Path
from typing import Callable, Iterator

import optuna

from psearch.engine import layout, locks, optuna_internals
from psearch.engine.optuna_internals import rdb_backend, rdb_engine
from psearch.engine.config import SearchConfig
from psearch.engine.urls import (driver_url, journal_path, redact_url, sqlite_path, url_secrets,
                                 without_password)
from psearch.engine.errors import UsageError

logger = logging.getLogger(__name__)

# File systems on which SQLite's locking is unreliable (and a database file may be corrupted).
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs",
    "fuse.glusterfs", "panfs", "wekafs", "fuse.sshfs", "afs", "9p", "fuse.s3fs"})
GET_LOCK_TRY_S = 1  # one MySQL GET_LOCK try: a stop is noticed between tries
SCHEMA_RACE_RETRIES = 5
# The RDB storages this process opened, by (URL, grace). A forked child (a worker the launcher
# forks) must never use their pooled connections, which the parent goes on using; but it may take
# over the storage itself with a pool of its own, and skip opening it again (Optuna's schema
# check: ~25 ms with alembic loaded, 0.4 s without).
_OPENED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_INHERITED: dict = {}


def _take_over_in_child() -> None:
    """After a fork, in the child: forget the parent's connections without closing them
    (SQLAlchemy's `dispose(close=False)`, made for this); `make_storage` hands out the storages."""
    _INHERITED.clear()
    for key, storage in list(_OPENED.items()):
        optuna_internals.rdb_engine(storage).dispose(close=False)
        _INHERITED[key] = storage


os.register_at_fork(after_in_child=_take_over_in_child)


def heartbeat_interval_s(grace_s: int) -> int:
    """Seconds between heartbeats: a quarter of the grace period, at most 20 (pure)."""
    return max(1, min(20, grace_s // 4))


def is_schema_race(exc: BaseException) -> bool:
    """Whether opening a storage failed only because another process was creating its tables at
    the same moment (a duplicate table, index or version row) (pure)."""
    import sqlalchemy.exc

    if isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, sqlalchemy.exc.OperationalError) and (
        "already exists" in text or "duplicate" in text)


def make_storage(url: str, heartbeat_grace_s: int = SearchConfig.heartbeat_grace
                 ) -> optuna.storages.BaseStorage:
    """The storage behind one URL: an RDB (with Optuna's heartbeat) or a journal file."""
    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    db = sqlite_path(url)
    if db is not None:
        layout.check_sqlite_file(db)
        db.parent.mkdir(parents=True, exist_ok=True)
    if (url, heartbeat_grace_s) in _INHERITED:  # opened by the process this one was forked from
        return _INHERITED.pop((url, heartbeat_grace_s))
    # SQLite waits for a lock instead of failing at once; a server's pooled connections are
    # tested before use, so one dropped by a server restart is replaced, not used and failed.
    engine_kwargs = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                     else {"pool_pre_ping": True})
    # We record heartbeats ourselves (ask/tell, see study.Heartbeat): Optuna's notes on that are
    # noise.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    warnings.filterwarnings("ignore", message=".*heartbeat_interval.*experimental")
    warnings.filterwarnings("ignore", message=".*grace_period.*experimental")
    import sqlalchemy.exc

    for attempt in itertools.count():
        try:
            storage = optuna.storages.RDBStorage(
                driver_url(url), engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval_s(heartbeat_grace_s),
                grace_period=heartbeat_grace_s)
            _OPENED[(url, heartbeat_grace_s)] = storage
            return storage
        except (ImportError, ValueError, optuna.exceptions.StorageInternalError,
                sqlalchemy.exc.SQLAlchemyError) as exc:
            # Launchers that start at once on a new database (several nodes, or several
            # launchers of one folder) all create Optuna's tables; the losers of that race see
            # a duplicate table or row and simply open them on the next try.
            if not is_schema_race(exc) or attempt >= SCHEMA_RACE_RETRIES:
                raise _cannot_open(url, exc) from exc
            time.sleep(0.2 * (attempt + 1))


def _cannot_open(url: str, exc: Exception) -> UsageError:
    """The one-line error for a storage that cannot be opened."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for secret in url_secrets(url):
        reason = reason.replace(secret, "***")
    return UsageError(f"--storage {redact_url(url)!r} cannot be opened ({reason}); use "
                      "sqlite:///FILE, postgresql://USER@HOST:PORT/DB or journal:///FILE")


def lock_key(study_name: str) -> int:
    """A 32-bit advisory-lock key for one study (pure): studies of one database don't wait on
    each other."""
    return zlib.crc32(f"parallel_search:budget:{study_name}".encode())


@contextlib.contextmanager
def budget_lock(study: optuna.Study, url: str,
                cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold the study's budget lock for the block (see the module docstring). Waiting for it ends
    with StopRequested as soon as `cancelled()` is true, so a stop is never stuck behind it."""
    backend = rdb_backend(optuna_internals.storage(study))
    if backend is not None and rdb_engine(backend).name in ("postgresql", "mysql"):
        with _database_lock(backend, study.study_name, cancelled):
            yield
        return
    path = journal_path(url)
    if path is not None:
        # the link that Optuna's JournalFileSymlinkLock(path + ".budget") makes: one lock for all
        with locks.symlink_lock(path + ".budget.lock", path + ".budget", cancelled):
            yield
        return
    db = sqlite_path(url)
    if db is None:
        raise UsageError(f"--storage {redact_url(url)!r}: no budget lock for this storage; use a "
                         "SQLite file, PostgreSQL, MySQL or journal:///FILE")
    with locks.file_lock(db.with_name(db.name + ".budget.lock"), cancelled=cancelled,
                         waiting="Waiting for the study's budget lock (another process holds it)",
                         note_after_s=2.0):
        yield


@contextlib.contextmanager
def _database_lock(backend: optuna.storages.RDBStorage, study_name: str,
                   cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
    """A server-side lock on a connection of its own; the server releases it if we die. Taken
    by polling (try, then wait a moment) so that `cancelled()` is checked while waiting."""
    from sqlalchemy import text

    with rdb_engine(backend).connect() as conn:
        if rdb_engine(backend).name == "postgresql":
            with conn.begin():  # the advisory lock ends with this transaction
                key = {"key": lock_key(study_name)}
                locks.wait_for(lambda: bool(conn.execute(
                    text("SELECT pg_try_advisory_xact_lock(:key)"), key).scalar()), cancelled)
                yield
            return
        name = f"parallel_search_{lock_key(study_name)}"

        def get_lock() -> bool:
            got = conn.execute(text("SELECT GET_LOCK(:name, :timeout)"),
                               {"name": name, "timeout": GET_LOCK_TRY_S}).scalar()
            if got is None:
                raise RuntimeError(f"MySQL GET_LOCK({name}) failed")
            return got == 1

        locks.wait_for(get_lock, cancelled, poll_s=0)  # GET_LOCK itself waits GET_LOCK_TRY_S
        try:
            yield
        finally:
            conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})


# ---------------------------------------------------------------- what the user is told

def dashboard_command(url: str) -> str:
    """How to open this storage in optuna-dashboard: an RDB URL, or a journal's plain path (pure).

    Never with a password: the dashboard's libpq reads it from ~/.pgpass or PGPASSWORD.
    """
    path = journal_path(url)
    target = path if path is not None else without_password(driver_url(url))
    command = f"optuna-dashboard {shlex.quote(target)}"
    if url_secrets(url):
        command += "   (password from ~/.pgpass or PGPASSWORD, not the command line)"
    return command


def mount_of(path: str, mounts: str) -> tuple[str, str] | None:
    """(mount point, file-system type) holding `path`, from /proc/mounts text (pure)."""
    best: tuple[str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount(fields[1])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, fields[2])
    return best


def _unescape_mount(field: str) -> str:
    """/proc/mounts writes a space as \\040 (octal escapes) (pure)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def network_filesystem_warning(url: str, mounts: str) -> str | None:
    """A warning when the SQLite file of `url` sits on a network file system (pure)."""
    db = sqlite_path(url)
    if db is None:
        return None
    found = mount_of(str(db.resolve()), mounts)
    if found is None or found[1].lower() not in NETWORK_FILESYSTEMS:
        return None
    return (f"the SQLite study {db} is on a {found[1]} file system ({found[0]}): SQLite's locks "
            "are unreliable there and the database can be corrupted. With several nodes use "
            "--storage postgresql://USER@HOST:PORT/DB; otherwise journal:///PATH or a node-local "
            "--storage sqlite:////local/disk/study.db")


def read_mounts() -> str:
    """/proc/mounts, or '' where there is none."""
    try:
        return Path("/proc/mounts").read_text()
    except OSError:
        return ""
