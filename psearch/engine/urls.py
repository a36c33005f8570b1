"""Storage URLs as text, the one place that reads them: which file a URL names, its password
hidden wherever a URL is shown (`redact_url`, the one rule for banner, logs, report, errors,
files) and in this process's own command line (`hide_url_passwords`), `--storage env:NAME`, and
the driver a bare postgresql:// gets. Imports neither optuna nor torch (SQLAlchemy's URL parser
only when a SQLite URL is read)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Mapping, Sequence

from psearch.engine import procfs
from psearch.engine.errors import UsageError

# `--storage env:NAME` reads the URL from the environment; the launcher hands the URL to its
# workers this way (a password in a URL must never be on a command line: `ps` shows those).
STORAGE_ENV_PREFIX = "env:"
JOURNAL_PREFIX = "journal:///"


def redact_url(url: str) -> str:
    """The URL with its password hidden: postgresql://user:***@host:5432/db (pure).

    The one rule for every place that shows a storage URL: banner, logs, report, errors, files.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, question, query = rest.partition("?")
    userinfo, at, host_and_path = head.rpartition("@")
    if at and ":" in userinfo:
        head = f"{userinfo.split(':', 1)[0]}:***@{host_and_path}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", query)
    return f"{scheme}{sep}{head}{question}{query}"


def url_secrets(url: str) -> list[str]:
    """The passwords written in a URL, as typed: after 'user:' and in 'password=' (pure)."""
    found = []
    scheme, sep, rest = url.partition("://")
    head, _, query = rest.partition("?")
    userinfo, at, _ = head.rpartition("@")
    if sep and at and ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    found += re.findall(r"(?i)(?:^|&)password=([^&]*)", query)
    return [secret for secret in found if secret]


def without_password(url: str) -> str:
    """The URL with no password at all, for commands to copy (libpq then reads ~/.pgpass or
    PGPASSWORD) (pure)."""
    bare = redact_url(url).replace(":***@", "@", 1)
    return re.sub(r"(?i)([?&])password=\*\*\*(&|$)", lambda m: m.group(1) if m.group(2) else "",
                  bare).rstrip("?&")


def resolve_storage(spec: str | None, environ: Mapping[str, str]) -> str | None:
    """`--storage` as given: a URL, or env:NAME naming the environment variable that holds one."""
    if spec is None or not spec.startswith(STORAGE_ENV_PREFIX):
        return spec
    name = spec[len(STORAGE_ENV_PREFIX):]
    url = environ.get(name, "").strip() if name else ""
    if not url:
        raise UsageError(f"--storage {spec}: the environment variable {name or '(none)'} is not "
                         f"set; export {name or 'NAME'}=postgresql://USER@HOST:PORT/DB first")
    return url


def hide_url_passwords(argv: Sequence[str]) -> None:
    """Hide the password of every URL among this process's arguments (`--storage URL`): the
    launcher does it first of all (a window of a fraction of a second is left; `--storage
    env:NAME` or ~/.pgpass leave none)."""
    for arg in argv:
        if "://" in arg:
            for secret in url_secrets(arg.split("=", 1)[1] if arg.startswith("--") else arg):
                procfs.hide_in_own_cmdline(secret)


def driver_url(url: str, have_psycopg2: bool | None = None) -> str:
    """`postgresql://` (or `postgres://`) with the psycopg 3 driver this project installs, unless
    psycopg2 is there (SQLAlchemy's default for a bare `postgresql://`) (pure but for the check)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    if have_psycopg2 is None:
        have_psycopg2 = importlib.util.find_spec("psycopg2") is not None
    return url if have_psycopg2 and scheme == "postgresql" else f"postgresql+psycopg://{rest}"


def journal_path(url: str) -> str | None:
    """The journal file of a `journal:///PATH` URL, else None (pure)."""
    return url[len(JOURNAL_PREFIX) - 1:] if url.startswith(JOURNAL_PREFIX) else None


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other storages or an in-memory one) (pure)."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def file_path(url: str) -> Path | None:
    """The file a SQLite or journal URL names (None for a server or an in-memory database)."""
    journal = journal_path(url)
    return Path(journal) if journal is not None else sqlite_path(url)
