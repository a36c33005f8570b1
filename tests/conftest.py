"""Shared test set-up: the project root on sys.path, so tests import the flat modules."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Fixtures shared by several modules: launchers run as a user would, and real servers started for
# the session (throw-away PostgreSQL and MariaDB servers, a one-machine SLURM).
pytest_plugins = ["launcher_runs", "mysql_server", "pg_server", "slurm_cluster"]
