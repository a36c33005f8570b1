"""A throw-away MariaDB (MySQL) server for tests: the other multi-node database Optuna supports.

Load as a plugin (`pytest_plugins = ["mysql_server"]` in conftest.py), then ask for `mysql_url`
(a fresh database per test on one server per session). Needs Debian's `mariadb-server` and the
`pymysql` driver; tests skip without them, and fail without them under CI
(conftest.missing_server).
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

HOST = "127.0.0.1"
INSTALL = "apt-get install mariadb-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mysql_server(missing_server):
    """(host, port) of a MariaDB server with no grant checks, stopped after the session."""
    try:
        import pymysql  # noqa: F401
    except ImportError:
        missing_server("pymysql missing: pip install pymysql")
    daemon, install_db = shutil.which("mariadbd") or shutil.which("mysqld"), \
        shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if not daemon or not install_db:
        missing_server(f"no MariaDB server binaries: {INSTALL}")
    root = Path(tempfile.mkdtemp(prefix="mysql_test_"))
    user = ["--user=root"] if os.geteuid() == 0 else []
    subprocess.run([install_db, "--no-defaults", f"--datadir={root / 'data'}",
                    "--auth-root-authentication-method=normal", "--skip-test-db", *user],
                   check=True, capture_output=True)
    port = _free_port()
    log = root / "server.log"
    proc = subprocess.Popen(
        [daemon, "--no-defaults", f"--datadir={root / 'data'}", f"--socket={root / 'sock'}",
         f"--port={port}", f"--bind-address={HOST}", "--skip-grant-tables",
         f"--pid-file={root / 'pid'}", f"--log-error={log}", "--innodb-flush-log-at-trx-commit=0",
         *user], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_ready(port, proc, log)
        yield HOST, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(port: int, proc: subprocess.Popen, log: Path) -> None:
    import pymysql

    deadline = time.monotonic() + 60
    while True:
        try:
            pymysql.connect(host=HOST, port=port, user="root").close()
            return
        except pymysql.err.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                pytest.fail(f"MariaDB did not start on port {port}:\n{tail}")
            time.sleep(0.2)


@pytest.fixture
def mysql_url(mysql_server):
    """A fresh database on the session's server, as an Optuna storage URL."""
    import pymysql

    host, port = mysql_server
    name = f"test_{uuid.uuid4().hex[:12]}"
    with pymysql.connect(host=host, port=port, user="root", autocommit=True) as conn:
        conn.cursor().execute(f"CREATE DATABASE {name}")
    yield f"mysql+pymysql://root@{host}:{port}/{name}"
    with pymysql.connect(host=host, port=port, user="root", autocommit=True) as conn:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {name}")
