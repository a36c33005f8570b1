"""The checkpoint folder's layout: the one place that names what lives where.

    CHECKPOINT_DIR/
        optuna_study.db        the study (SQLite, unless --storage names another)
        logs/                  launcher_HOST_STAMP.log, worker_LABEL_HOST_STAMP.log
        trial_NNN/             one folder per Optuna trial number
        cache/                 preprocessed images (unless --cache_dir)
        summary/               the report, tables and figures
        best_overall/          the best completed trial's files
        .summary.lock          serialises summaries of this folder
"""
from __future__ import annotations

import os
from pathlib import Path

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
