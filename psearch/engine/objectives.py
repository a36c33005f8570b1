"""The objective seam: all the engine knows of what a trial runs.

An objective kind says which flags it adds, the settings that define what a trial's value means
(stored with the study: a rerun with others is refused), what it checks and prepares once before
any worker starts, the memory one worker of it needs, its default search space and the names a
space may use, and how one trial runs. The engine imports no objective: the entry points hand it
the built-in one (`psearch/writer_id/builtin.py`), and `--objective FILE.py:NAME` is the kind
`PythonFunction` below.

    kind = choose(ns, default)               # --objective, else the entry point's default
    cfg = config_from_args(ns, kind)         # kind.options(ns): its own flags, checked
    settings = kind.settings(cfg)            # checks its data; writes nothing
    kind.prepare(cfg)                        # once per launcher: caches, downloads checked
    objective = kind.make(cfg, stop, cpu_threads)   # objective(trial, trial_dir) -> float
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from psearch.engine.errors import UsageError

if TYPE_CHECKING:  # the launcher loads optuna only once it runs
    import optuna

    from psearch.engine.config import SearchConfig
    from psearch.engine.space import Space
    from psearch.engine.stopping import StopFlag

Objective = Callable[["optuna.Trial", Path], float]
ENGINE_WORKER_MODULE = "psearch.engine.worker"
RESUME_CHECKPOINT = "last.pth"
# What one worker of an objective that says nothing of itself needs: Python, Optuna, SQLAlchemy
# and a user's small function.
SMALL_WORKER_MEMORY = 192 << 20


class TrialFailed(RuntimeError):
    """An objective's own account of why its trial failed: `str(exc)` is the fail reason as it
    stands (no exception name), `error_log` what goes to the trial's error.log (default: the
    traceback)."""

    def __init__(self, reason: str, error_log: str | None = None):
        super().__init__(reason)
        self.error_log = error_log


class ObjectiveKind:
    """What the engine asks of an objective; every method has the answer of an objective that
    needs nothing (override what yours does)."""

    name = "objective"            # how stored settings name it (see `stored_name`)
    description = "an objective"  # the banner's 'Objective:' line
    worker_module = ENGINE_WORKER_MODULE  # `python -m` this to start a worker with this default
    worker_memory = SMALL_WORKER_MEMORY   # bytes one worker needs: bounds the workers per machine
    prepare_in_helper = False  # True: checked and prepared in a helper process (it loads torch)
    check_in_child = False  # True: `check` runs user code (imports it): never in the launcher
    parameters: frozenset[str] | None = None  # the names a space may use (None: any)
    implicit_parameters: tuple[str, ...] = ()  # names a `when` may use though no file has them
    # A trial folder's files only a rerun reads, removed once it ended for good (--keep_last
    # keeps them): by convention, any objective's last.pth.
    resume_files: tuple[str, ...] = (RESUME_CHECKPOINT,)
    demo_defaults: tuple[str, ...] = ()  # --demo's flags (none: no --demo)

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        """Add this objective's own flags."""

    def options(self, ns: argparse.Namespace) -> Any:
        """This objective's own settings from its flags, checked (UsageError), frozen."""
        return None

    def options_argv(self, options: Any) -> list[str]:
        """The flags that rebuild `options` in a worker (the inverse of `options`)."""
        return []

    def for_worker(self, options: Any, cpu_threads: int) -> Any:
        """`options` for one worker that gets `cpu_threads` cores."""
        return options

    def stored_name(self, cfg: SearchConfig) -> str:
        """The `objective` of the stored settings: a rerun with another objective is refused."""
        return self.name

    def check(self, cfg: SearchConfig) -> dict[str, Any]:
        """Check what the trials will need (data, files) without writing anything; the settings
        that define what a trial's value means, stored with the study."""
        return {}

    def legacy_settings(self, cfg: SearchConfig) -> dict[str, Any]:
        """What a study made before a setting was stored measured: compared in its place."""
        return {}

    def prepare(self, cfg: SearchConfig) -> None:
        """Once per launcher, after the checks and before any worker: caches and the like."""

    def space_options(self, ns: argparse.Namespace) -> Any:
        """The options the space depends on, without the checks only a run needs (its data):
        what --show_space needs."""
        return self.options(ns)

    def default_space(self, options: Any) -> Space | None:
        """The search space when no --space is given (None: the objective suggests itself)."""
        return None

    def complete_space(self, space: Space, options: Any) -> Space:
        """A user's --space as this objective runs it (add what the file may leave out)."""
        return space

    def make(self, cfg: SearchConfig, stop: StopFlag, cpu_threads: int | None) -> Objective:
        """The callable objective(trial, trial_dir) -> value a worker runs."""
        raise NotImplementedError

    def banner_lines(self, cfg: SearchConfig) -> list[str]:
        """Lines about this objective for the launcher's banner."""
        return []

    def make_demo_data(self, ns: argparse.Namespace) -> None:
        """--demo: make the demo's data if missing."""


class PythonFunction(ObjectiveKind):
    """`--objective path/to/file.py:NAME` or `package.module:NAME`, called NAME(trial, trial_dir).

    It may import anything (torch too): the launcher checks it in a forked child, never here."""

    description = "a Python function"
    check_in_child = True

    def __init__(self, spec: str):
        self.spec = spec
        self.name = spec

    def stored_name(self, cfg: SearchConfig) -> str:
        return cfg.objective or self.spec

    def check(self, cfg: SearchConfig) -> dict[str, Any]:
        load_function(cfg.objective or self.spec)
        return {}

    def make(self, cfg: SearchConfig, stop: StopFlag, cpu_threads: int | None) -> Objective:
        user_fn = load_function(cfg.objective or self.spec)

        def objective(trial: optuna.Trial, trial_dir: Path) -> float:
            stop.raise_now = True  # a custom objective cannot poll the flag: interrupt it
            try:
                return user_fn(trial, trial_dir)
            finally:
                stop.raise_now = False

        return objective


def choose(ns: argparse.Namespace, default: ObjectiveKind | None) -> ObjectiveKind:
    """The objective kind the flags ask for: --objective, --command, else the entry point's
    default."""
    objective, command = getattr(ns, "objective", None), getattr(ns, "command", None)
    if objective and command:
        raise UsageError("--objective and --command both name what a trial runs; pass one")
    if command is not None:
        from psearch.engine.program import Command

        return Command()
    for flag in ("metric",):
        if getattr(ns, flag, None) is not None:
            raise UsageError(f"--{flag} {getattr(ns, flag)} is for a training program: add "
                             "--command \"python train.py ...\"")
    if objective:
        return PythonFunction(ns.objective)
    if default is None:
        raise UsageError("no objective: pass --objective path/to/file.py:NAME (a function "
                         "NAME(trial, trial_dir) -> float)")
    return default


def load_function(spec: str) -> Objective:
    """Import NAME from `path/to/file.py:NAME` or `package.module:NAME`, and check that it can be
    called as NAME(trial, trial_dir)."""
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            module_spec = importlib.util.spec_from_file_location(f"objective_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except Exception as exc:
        raise UsageError(f"--objective {spec!r}: cannot import {target!r} "
                         f"({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--objective {spec!r}: {target!r} has no callable {name!r}")
    _check_signature(spec, name, fn)
    return fn


def _check_signature(spec: str, name: str, fn: Callable) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (a builtin): the first trial tells
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise UsageError(f"--objective {spec!r}: {name}{signature} cannot be called as "
                         f"{name}(trial, trial_dir); define it as def {name}(trial, trial_dir) "
                         "-> float") from None

