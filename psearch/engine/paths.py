"""Checks of the folders and files a run will write, made before anything is created: a bad
`--checkpoint_dir` or a damaged study file is one clear error, never a traceback half-way through.
They read the file system and change nothing; each raises UsageError naming the path and the fix."""
from __future__ import annotations

import os
from pathlib import Path

from psearch.engine.errors import UsageError

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
