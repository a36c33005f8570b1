"""Shared test set-up: the project root on sys.path, so tests import the flat modules; and what a
server fixture does when the machine lacks its server."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Fixtures shared by several modules: launchers run as a user would, and real servers started for
# the session (throw-away PostgreSQL and MariaDB servers, a one-machine SLURM).
pytest_plugins = ["launcher_runs", "mysql_server", "pg_server", "slurm_cluster"]


@pytest.fixture(scope="session")
def missing_server():
    """`missing_server(reason)`: the server fixtures' answer to a machine without their server.
    A skip with the reason; but a failure under CI (CI=true, where `make system-deps` installed
    the servers), since a CI run that skipped every cluster test would pass proving nothing."""
    def missing(reason: str):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the server tests must run, not skip; "
                        "`make system-deps` installs the servers)", pytrace=False)
        pytest.skip(reason)
    return missing
