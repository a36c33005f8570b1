"""How the search starts its helper processes (the workers, the preparation step, the summary,
an objective's own helpers): `python -m` this package's modules, with the package on PYTHONPATH so
they run from any folder, installed or not, and the storage URL in the environment, never on a
command line. Pure functions."""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Mapping

from psearch.engine.config import SearchConfig, child_env, redact_url, storage_argv

PACKAGE_PARENT = Path(__file__).resolve().parents[2]
SUMMARY_MODULE = "psearch.reports.summary"
# What the preparation step logs once the arguments, the data and the study are checked: from
# then on nothing can be refused, and the launcher shows its progress.
PREPARED_MARKER = "Arguments, data and study checked"


def module_argv(python: str, module: str) -> list[str]:
    """`python -m MODULE`."""
    return [python, "-m", module]


def child_environ(environ: Mapping[str, str], cfg: SearchConfig | None = None) -> dict[str, str]:
    """The environment of a helper process: `environ`, the package on PYTHONPATH, and the storage
    URL that `config_to_argv`'s `--storage env:…` points to."""
    path = [str(PACKAGE_PARENT), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path)),
            **(child_env(cfg) if cfg is not None else {})}


def summary_argv(cfg: SearchConfig, python: str) -> list[str]:
    """The summary of `cfg`'s study, as a helper process (run it with `child_environ`)."""
    return [*module_argv(python, SUMMARY_MODULE), "--checkpoint_dir", cfg.checkpoint_dir,
            "--study_name", cfg.study_name, *storage_argv(cfg)]


def summary_hint(cfg: SearchConfig, python: str) -> str:
    """The command a user can run to write the summary again (no password in it)."""
    return shlex.join([python, "summarize.py", "--checkpoint_dir", cfg.checkpoint_dir,
                       "--study_name", cfg.study_name, "--storage", redact_url(cfg.storage_url)])
