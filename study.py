"""The study: storage, sampler and pruner, stored settings, the exact trial budget, recovery.

Shared by the worker and the launcher; never imports torch. Every process builds the sampler and
pruner the same way (`load_study` without them would silently use Optuna's defaults).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

import locks
from config import SearchConfig, UsageError

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 20
HEARTBEAT_GRACE_S = 90
# Trials failed for these reasons did not fail on their own merits: they run again.
RETRYABLE_REASONS = frozenset({"interrupted", "worker_died", "crashed", "stale"})
# Reasons that count as an attempt (an interrupt does not): a trial that keeps killing its worker
# stops being retried after this many attempts.
MAX_ATTEMPTS = 3
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
BUILTIN_OBJECTIVE = "builtin:writer_identification"  # how stored settings name it


class SettingsMismatch(UsageError):
    """The stored study was made with settings that change what a trial's value means."""


# ---------------------------------------------------------------- storage, sampler, pruner

def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Storage behind one URL: sqlite/postgresql/mysql (with heartbeat) or journal:///path."""
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal://"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # We record heartbeats ourselves (ask/tell, see Heartbeat): Optuna's notes on that are noise.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    warnings.filterwarnings("ignore", message=".*heartbeat_interval.*experimental")
    warnings.filterwarnings("ignore", message=".*grace_period.*experimental")
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=HEARTBEAT_GRACE_S)
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as exc:
        raise UsageError(f"--storage {url!r} cannot be opened ({exc}); use sqlite:///FILE, "
                         "postgresql://USER@HOST/DB or journal:///FILE") from exc


def sampler_seed(base_seed: int, worker_rank: int, trials_so_far: int) -> int:
    """A seed per worker and per start, so workers (and resumed runs) don't repeat suggestions."""
    return zlib.crc32(f"{base_seed}:{worker_rank}:{trials_so_far}".encode()) & 0x7FFFFFFF


def make_sampler(seed: int, n_workers: int = 1) -> optuna.samplers.BaseSampler:
    """TPE with constant liar; at least one random start-up trial per worker."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True,
            n_startup_trials=max(10, n_workers))


def make_pruner(epochs: int) -> optuna.pruners.BasePruner:
    """Median pruner whose warm-up scales with the epoch budget (no pruning in the first fifth)."""
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(2, epochs // 5),
                                       interval_steps=1)


def open_study(cfg: SearchConfig, worker_rank: int = 0, n_workers: int = 1,
               create: bool = True) -> optuna.Study:
    """Create or load the study with this project's sampler and pruner."""
    storage = make_storage(cfg.storage_url)
    pruner = make_pruner(cfg.epochs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        existing = optuna.load_study(study_name=cfg.study_name, storage=storage, pruner=pruner)
    except KeyError:
        if not create:
            raise UsageError(f"no study {cfg.study_name!r} in {cfg.storage_url}; run the search "
                             "once to create it, or pass the right --study_name") from None
        existing = None
    if existing is not None and existing.direction.name.lower() != cfg.direction:
        raise SettingsMismatch(f"the study {cfg.study_name!r} is set to "
                               f"{existing.direction.name.lower()}, not --direction {cfg.direction}"
                               "; rerun with the original --direction or another --study_name")
    n_before = len(existing.get_trials(deepcopy=False)) if existing is not None else 0
    sampler = make_sampler(sampler_seed(cfg.seed, worker_rank, n_before), n_workers)
    return optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=sampler,
                               pruner=pruner, direction=cfg.direction, load_if_exists=True)


# ---------------------------------------------------------------- settings stored with the study

def search_settings(cfg: SearchConfig, writers: Sequence[str] | None) -> dict[str, Any]:
    """The settings that change what a trial's value means; rerunning with others is refused."""
    if not cfg.builtin_objective:
        return {"objective": cfg.objective, "direction": cfg.direction}
    return {"objective": BUILTIN_OBJECTIVE, "direction": cfg.direction,
            "data_root": cfg.data_root, "writers": list(writers or []),
            "img_height": cfg.img_height, "img_width": cfg.img_width, "epochs": cfg.epochs,
            "models": list(cfg.models),
            "max_val_pages_per_writer": cfg.max_val_pages_per_writer}


def settings_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between stored and wanted settings (empty when equal)."""
    diffs = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key), wanted.get(key)
        if old != new:
            if isinstance(old, list) and isinstance(new, list) and len(old) + len(new) > 6:
                old, new = _list_summary(old), _list_summary(new)
            diffs.append(f"{key}: stored {old!r}, now {new!r}")
    return diffs


def _list_summary(values: list) -> str:
    """'4 values: a, b, …, d' for a long list in a one-line message (pure)."""
    shown = values if len(values) <= 3 else [*values[:2], "…", values[-1]]
    return f"{len(values)} values: {', '.join(map(str, shown))}"


def check_or_store_settings(study: optuna.Study, settings: Mapping[str, Any], where: str) -> None:
    """Store settings in a new study; refuse (changing nothing) if an existing one differs."""
    stored = study.user_attrs.get("search_settings")
    if stored is None:
        study.set_user_attr("search_settings", dict(settings))
        return
    diffs = settings_differences(stored, settings)
    if diffs:
        raise SettingsMismatch(
            f"the study in {where} was made with other settings ({'; '.join(diffs)}); rerun with the original values, "
            "or use another --checkpoint_dir or --study_name")


# ---------------------------------------------------------------- counting and the budget

@dataclasses.dataclass(frozen=True)
class Counts:
    """Trials by state, and the best finished value."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    best_value: float | None = None
    best_number: int | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def count_trials(trials: Sequence[FrozenTrial], direction: str = "maximize") -> Counts:
    """Count trials by state and find the best COMPLETE one (pure)."""
    by_state = {s: 0 for s in TrialState}
    for t in trials:
        by_state[t.state] += 1
    best = best_complete(trials, direction)
    return Counts(complete=by_state[TrialState.COMPLETE], pruned=by_state[TrialState.PRUNED],
                  failed=by_state[TrialState.FAIL], running=by_state[TrialState.RUNNING],
                  waiting=by_state[TrialState.WAITING],
                  best_value=best.value if best else None, best_number=best.number if best else None)


def best_complete(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The best COMPLETE trial (lowest number on ties), or None (pure)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not done:
        return None
    sign = -1 if direction == "maximize" else 1
    return min(done, key=lambda t: (sign * t.value, t.number))


def budget_left(counts: Counts, n_trials: int) -> int:
    """Trials that may still start: running ones count, since each may finish (pure)."""
    return max(0, n_trials - counts.finished - counts.running)


def budget_lock(checkpoint_dir: str | os.PathLike):
    """Serialise 'count, then start a trial' across the processes of one node."""
    return locks.file_lock(Path(checkpoint_dir) / ".budget.lock")


def claim_trial(study: optuna.Study, n_trials: int, checkpoint_dir: str | os.PathLike,
                worker: str) -> optuna.Trial | None:
    """Start the next trial if the budget allows (None when it does not).

    Under the budget lock: fail stale trials, count, queue one interrupted/crashed trial to run
    again with its hyperparameters, then ask. So the study never exceeds `n_trials` finished
    trials however many workers race.
    """
    with budget_lock(checkpoint_dir):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a no-op for storages without heartbeat
        trials = study.get_trials(deepcopy=False)
        if budget_left(count_trials(trials, study.direction.name.lower()), n_trials) <= 0:
            return None
        retry = next_retry(trials)
        if retry is not None:
            study.enqueue_trial(retry.params, user_attrs=retry_user_attrs(retry))
            logger.info("Trial %d (%s) runs again as a new trial with the same hyperparameters",
                        retry.number, retry.user_attrs.get("fail_reason", "stale"))
        trial = study.ask()
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        return trial


def _reason(t: FrozenTrial) -> str:
    # A FAIL without a reason was failed by Optuna's heartbeat check: its worker vanished.
    return str(t.user_attrs.get("fail_reason", "stale"))


def next_retry(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The oldest FAIL trial that should run again and is not yet queued or rerun (pure)."""
    taken = {t.user_attrs.get("resumed_from") for t in trials}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != TrialState.FAIL or t.number in taken or _reason(t) not in RETRYABLE_REASONS:
            continue
        if retry_user_attrs(t)["attempt"] > MAX_ATTEMPTS:
            continue
        return t
    return None


def retry_user_attrs(t: FrozenTrial) -> dict[str, Any]:
    """User attributes of the trial that reruns `t`: its origin and attempt count (pure)."""
    attempt = int(t.user_attrs.get("attempt", 1))
    if _reason(t) != "interrupted":
        attempt += 1
    return {"resumed_from": t.number, "attempt": attempt}


# ---------------------------------------------------------------- recovery

def fail_running_trials(study: optuna.Study, reason: str, pid: int | None = None) -> list[int]:
    """Mark RUNNING trials (all, or only those of worker `pid`) FAIL with `reason`."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if pid is not None and t.user_attrs.get("pid") != pid:
            continue
        with contextlib.suppress(RuntimeError, ValueError):
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
    return failed


class ExclusiveLock:
    """A non-blocking exclusive lock on the checkpoint folder: held by the one process that
    drives the study (the launcher, or a stand-alone worker). Whoever holds it knows that every
    RUNNING trial it did not start itself is an orphan of a crashed run."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.path = Path(checkpoint_dir) / ".search.lock"
        self._fh = None

    def acquire(self) -> bool:
        """Take the lock if free; False when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return True

    def holder(self) -> str:
        """Who holds the lock, as written in the lock file."""
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        """Release the lock (also released by the OS when the process dies)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Heartbeat:
    """Records a trial's heartbeat from a thread (ask/tell does not do it for us)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial):
        self._storage = study._storage
        self._trial_id = trial._trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception as exc:  # a lost heartbeat must not kill the trial
                logger.warning("heartbeat not recorded: %s", exc)

    def __enter__(self) -> "Heartbeat":
        if isinstance(self._storage, optuna.storages.RDBStorage):
            self._storage.record_heartbeat(self._trial_id)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
