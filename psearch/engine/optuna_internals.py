"""Every use of Optuna's private API (and of CPython's two private names), in one place.

Optuna has no public way to do these; each is a small, stable detail of Optuna 5 (`optuna>=5.0,<6`
in pyproject.toml). `tests/test_optuna_internals.py` checks every name below on the installed
Optuna, so that an upgrade that renames one fails there, loudly, instead of silently working
differently (an assignment to a renamed attribute would only create a new one).

- `study._storage`, `study._study_id`, `trial._trial_id`: a study's storage and ids, to create a
  trial already RUNNING with its attributes in one write (`create_running_trial`), to fail a trial
  of another process, to record a heartbeat.
- `study._thread_local.cached_all_trials`: the study's cache of its trials, stale after a trial
  was created outside `ask()`.
- `_CachedStorage._backend`: the RDBStorage behind the cache Optuna wraps it in.
- `RDBStorage.engine`: SQLAlchemy's engine, for the budget lock's advisory locks and for a
  forked child to drop its parent's connections; `RDBStorage._get_stale_trial_ids`: the trials
  whose heartbeat is stale, judged on the database server's clock.
- CPython's `atexit._clear` and `atexit._run_exitfuncs`: a forked worker drops its parent's exit
  handlers and runs its own before `os._exit`.
"""
from __future__ import annotations

import atexit
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded by whoever holds a study; the launcher's spawn.py must not load it
    import optuna
    from optuna.trial import FrozenTrial

# Checked by tests/test_optuna_internals.py: (what holds it, attribute).
STUDY_ATTRS = ("_storage", "_study_id", "_thread_local")
TRIAL_ATTRS = ("_trial_id",)


def storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study reads and writes through."""
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """A trial's id in its storage (not its number)."""
    return trial._trial_id


def create_running_trial(study: optuna.Study, template: FrozenTrial) -> int:
    """Create `template` (a RUNNING trial with its attributes) in one write; its id."""
    return study._storage.create_new_trial(study._study_id, template_trial=template)


def set_trial_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Set a user attribute of a trial this process holds no Trial object for."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def forget_cached_trials(study: optuna.Study) -> None:
    """What `ask()` does once it has made a trial: the study's cache of its trials is stale."""
    local = study._thread_local
    if not hasattr(local, "cached_all_trials"):
        raise RuntimeError("optuna.Study._thread_local has no cached_all_trials: this Optuna "
                           "caches trials otherwise; see psearch/engine/optuna_internals.py")
    local.cached_all_trials = None


def rdb_backend(storage_: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | None:
    """The RDBStorage behind a storage (Optuna wraps it in a cache), or None."""
    import optuna

    backend = getattr(storage_, "_backend", storage_)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def rdb_engine(backend: optuna.storages.RDBStorage) -> Any:
    """The SQLAlchemy engine of an RDBStorage."""
    return backend.engine


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Ids of the study's RUNNING trials whose heartbeat is stale (RDB storages; else none)."""
    backend = rdb_backend(study._storage)
    return list(backend._get_stale_trial_ids(study._study_id)) if backend is not None else []


def clear_exit_functions() -> None:
    """Drop this process's atexit handlers (a forked child: its parent's are not its own)."""
    atexit._clear()


def run_exit_functions() -> None:
    """Run this process's atexit handlers now (a forked child, before `os._exit`)."""
    atexit._run_exitfuncs()
