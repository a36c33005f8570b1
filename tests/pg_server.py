"""A throw-away PostgreSQL server for tests: the multi-machine storage, not SQLite's one file.

Load as a plugin (`pytest_plugins = ["pg_server"]` in conftest.py), then ask for
`postgres_server` (one server per session) or `postgres_url` (a fresh database per test).
Needs the server binaries (`apt-get install postgresql`, or a folder of them named by $PG_BINDIR)
and psycopg; tests skip without them, and fail without them under CI (conftest.missing_server).
"""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
INSTALL = "apt-get install postgresql"
# The server binaries' folder, where they are not found by themselves; a folder without them
# (e.g. PG_BINDIR=/nonexistent) makes the tests behave as on a machine without PostgreSQL.
BINDIR_VAR = "PG_BINDIR"


@dataclass(frozen=True)
class PostgresServer:
    """A running server on HOST:port; the superuser `postgres` logs in without a password."""
    host: str
    port: int

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> None:
        self._admin(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        # FORCE: a test that forgot to close its connections must not block the drop
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self, statement: str) -> None:
        import psycopg

        # CREATE/DROP DATABASE cannot run inside a transaction, hence autocommit
        with psycopg.connect(host=self.host, port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(statement)


def find_bindir() -> Path | None:
    """$PG_BINDIR when set (only there), else the newest Debian-style install, else what
    pg_config names, else the PATH."""
    if BINDIR_VAR in os.environ:
        return _with_server([os.environ[BINDIR_VAR]])

    def version(d):
        return int(Path(d).parent.name) if Path(d).parent.name.isdigit() else -1
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    if shutil.which("pg_config"):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout
        candidates.append(bindir.strip())
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    return _with_server(candidates)


def _with_server(candidates: list[str]) -> Path | None:
    # pg_config also comes with libpq-dev alone, so the server binaries must really be there
    return next((Path(d) for d in candidates
                 if all((Path(d) / b).is_file() for b in ("initdb", "pg_ctl", "postgres"))), None)


def run_as(missing_server) -> tuple[list[str], pwd.struct_passwd]:
    """The argv prefix and user that run the server: postgres refuses to run as root."""
    if os.geteuid() != 0:
        return [], pwd.getpwuid(os.geteuid())
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        missing_server(f"no 'postgres' user to run the server as (not as root); {INSTALL} "
                       "makes it")
    prefix = ["runuser", "-u", "postgres", "--"]
    works = shutil.which("runuser") and not subprocess.run([*prefix, "true"],
                                                           capture_output=True).returncode
    if not works:
        missing_server("running as root but `runuser -u postgres` does not work "
                       "(apt-get install util-linux)")
    return prefix, user


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(bindir: Path, prefix: list[str], folder: Path) -> int:
    """initdb and start the server in `folder`; its port. Fails with the log's tail."""
    data, log = folder / "data", folder / "server.log"
    initdb = subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                             "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                            cwd=folder, capture_output=True, text=True)
    if initdb.returncode:
        pytest.fail(f"initdb failed:\n{initdb.stdout}{initdb.stderr}")
    for _ in range(3):      # the free port may be taken before the server binds it
        port = free_port()
        options = (f"-p {port} -k {folder} -c listen_addresses={HOST} -c max_connections=200 "
                   "-c fsync=off")
        started = subprocess.run([*prefix, str(bindir / "pg_ctl"), "start", "-w", "-t", "60",
                                  "-D", str(data), "-l", str(log), "-o", options],
                                 cwd=folder, capture_output=True, text=True)
        if started.returncode == 0:
            return port
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no server log)"
        if "Address already in use" not in tail:
            break
    pytest.fail(f"PostgreSQL did not start ({bindir}):\n{started.stdout}{started.stderr}\n"
                f"--- {log}:\n{tail}")


@pytest.fixture(scope="session")
def postgres_server(missing_server):
    """One PostgreSQL server for the session, in a temp folder removed afterwards."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing_server("psycopg missing: pip install 'psycopg[binary]'")
    bindir = find_bindir()
    if bindir is None:
        where = (f"in ${BINDIR_VAR}={os.environ[BINDIR_VAR]}" if BINDIR_VAR in os.environ
                 else f"({INSTALL}, or name their folder in ${BINDIR_VAR})")
        missing_server(f"no PostgreSQL server binaries (initdb, pg_ctl, postgres) {where}")
    prefix, user = run_as(missing_server)
    # not pytest's tmp_path: its parents are private to root, and the socket path must stay short
    folder = Path(tempfile.mkdtemp(prefix="pg_test_"))
    os.chown(folder, user.pw_uid, user.pw_gid)
    try:
        port = start(bindir, prefix, folder)
        try:
            yield PostgresServer(HOST, port)
        finally:
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "stop", "-w", "-m", "immediate",
                            "-D", str(folder / "data")], cwd=folder, capture_output=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """The SQLAlchemy URL of a new, empty database, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name)
    yield postgres_server.url(name)
    postgres_server.drop_database(name)
