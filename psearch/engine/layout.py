"""The checkpoint folder: what lives where (the one place that names it), and the checks of the
folders and files a run will write, made before anything is created.

    CHECKPOINT_DIR/
        optuna_study.db        the study (SQLite, unless --storage names another)
        logs/                  launcher_HOST_STAMP.log, worker_LABEL_HOST_STAMP.log
        trial_NNN/             one folder per Optuna trial number
        cache/                 preprocessed images (unless --cache_dir)
        summary/               the report, tables and figures
        best_overall/          the best completed trial's files
        .summary.lock          serialises summaries of this folder

A bad `--checkpoint_dir` or a damaged study file is one clear error, never a traceback half-way
through: the checks read the file system and change nothing; each raises UsageError naming the
path and the fix.
"""
from __future__ import annotations

import os
from pathlib import Path

from psearch.engine.errors import UsageError
from psearch.engine.ownership import safe_host

STUDY_DB_NAME = "optuna_study.db"


def default_storage_url(checkpoint_dir: str | os.PathLike) -> str:
    """The SQLite file a search keeps inside its checkpoint folder, its path quoted for the URL
    (SQLAlchemy decodes %XX in it and ends it at a '?'): /runs/a?b stays /runs/a?b (pure)."""
    return "sqlite:///" + url_path(Path(checkpoint_dir).resolve() / STUDY_DB_NAME)


def url_path(path: str | os.PathLike) -> str:
    """A file path as the path of a database URL: '%', '?' and '#' escaped (pure)."""
    return str(path).replace("%", "%25").replace("?", "%3F").replace("#", "%23")


def trial_dir(checkpoint_dir: str | os.PathLike, number: int) -> Path:
    """CHECKPOINT_DIR/trial_NNN for an Optuna trial number."""
    return Path(checkpoint_dir) / f"trial_{int(number):03d}"


def logs_dir(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / "logs"


def cache_dir(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / "cache"


def summary_dir(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / "summary"


def best_dir(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / "best_overall"


def summary_lock(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / ".summary.lock"


def log_name(role: str, host: str, stamp: str) -> str:
    """'worker_gpu0_node1_20261128_101500.log': the host keeps the logs of several nodes that
    share a checkpoint folder apart (pure)."""
    return f"{role}_{safe_host(host)}_{stamp}.log"


# ---------------------------------------------------------------- checks before anything is written

SQLITE_MAGIC = b"SQLite format 3\x00"


def check_output_dir(flag: str, value: str) -> Path:
    """The absolute folder `value` names, if this process can create it or write in it."""
    if not value.strip():
        raise UsageError(f"{flag} is empty; name a folder, e.g. {flag} runs/search1")
    path = Path(value).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {value!r} is a file, not a folder; name a folder (it is "
                         "created if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {value!r}: {existing} is a file, so the folder cannot be "
                         "created; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write in" if existing == path else f"create {path} inside"
        raise UsageError(f"{flag} {value!r}: cannot {what} {existing} (no permission, or a "
                         "read-only file system); choose a folder you can write")
    return path


def check_sqlite_file(db: Path) -> None:
    """An existing SQLite study file must be a SQLite database this process can read and write
    (and its folder writable: SQLite writes its journal beside it)."""
    if not db.exists():
        return
    if not db.is_file():
        raise UsageError(f"the study file {db} is not a regular file; move it away or use "
                         "another --checkpoint_dir / --storage")
    if not os.access(db, os.R_OK | os.W_OK) or not os.access(db.parent, os.W_OK | os.X_OK):
        raise UsageError(f"the study file {db} is read-only (or its folder is); make it writable "
                         "(chmod u+w) or copy it to a writable --checkpoint_dir")
    try:
        with open(db, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise UsageError(f"the study file {db} cannot be read ({exc.strerror}); fix the file or "
                         "use another --checkpoint_dir") from None
    if head and head != SQLITE_MAGIC:
        raise UsageError(f"the study file {db} is not a SQLite database (damaged or another "
                         "file); move it away (or restore a backup) and rerun")
