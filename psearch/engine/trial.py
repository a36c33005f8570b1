"""One claimed trial: run the objective in the trial's folder, record how it ended, clean up.

Whatever the objective raises ends its trial, never the worker: an exception, and also a
KeyboardInterrupt or SystemExit of its own (only the worker's StopFlag, set by a signal, stops the
search; such a trial is 'interrupted' and runs again). A full disk is a fail reason of its own,
on which the worker stops. A storage that stayed unreachable longer than the objective's calls
waited (resilient_trial.py) is not the trial's fault: it runs again, from its last checkpoint. A
trial that another launcher took over meanwhile (this worker was frozen or cut off long enough
for its heartbeat to be judged stale) is left as the study holds it: its result is discarded,
and it is no failure of this worker. Never imports torch.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from psearch.engine import (atomic, faults, layout, storage as storage_lib, watchers,
                            study as study_lib)
from psearch.engine.config import SearchConfig
from psearch.engine.errors import FailReason
from psearch.engine.objectives import Objective, TrialFailed
from psearch.engine.stopping import StopFlag, StopRequested
from psearch.engine.watchers import TrialWatchdog

logger = logging.getLogger("worker")
TIMEOUT = FailReason.TIMEOUT
# What run_one_trial returns for a trial another launcher had already ended: never recorded.
TAKEN_OVER = FailReason.TAKEN_OVER


def run_one_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective,
                  cfg: SearchConfig, stop: StopFlag | None = None,
                  on_timeout: Callable[[], None] | None = None) -> tuple[TrialState, str | None]:
    """Run a claimed trial and record its end in the study; returns (state, fail reason).
    `on_timeout` (which must end the process) runs if the trial passes cfg.trial_timeout."""
    trial_dir = layout.trial_dir(cfg.checkpoint_dir, trial.number)
    started = time.time()
    state, reason, value = TrialState.FAIL, None, None
    with TrialWatchdog(cfg.trial_timeout if on_timeout else None, on_timeout or (lambda: None)), \
            watchers.Heartbeat(study, trial,
                                storage_lib.heartbeat_interval_s(cfg.heartbeat_grace)):
        try:
            trial_dir.mkdir(parents=True, exist_ok=True)
            value = objective(trial, trial_dir)
            if value is None or not math.isfinite(float(value)):
                raise ValueError(f"objective returned {value!r}, not a finite number")
            value, state = float(value), TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except StopRequested:
            reason = study_lib.INTERRUPTED
        except BaseException as exc:  # noqa: BLE001 - see the module docstring
            reason = (TAKEN_OVER if taken_over(exc) else
                      _failure_reason(exc, trial.number, trial_dir, stop))
        finally:
            _release_device_memory()
    outcome = ("unfinished" if reason == TAKEN_OVER else
               f"{state.name} with value {value:.4f}" if state == TrialState.COMPLETE else
               state.name + (f" ({reason})" if reason else ""))
    if reason == TAKEN_OVER or not record_end(study, trial, state, value, reason):
        logger.warning("Trial %d was taken over by another launcher while this worker was cut "
                       "off or frozen (its heartbeat was judged stale; the study holds it as %s "
                       "and runs it again): its result here (%s) is discarded", trial.number,
                       _stored_state(study, trial), outcome)
        return TrialState.FAIL, TAKEN_OVER
    logger.info("Trial %d %s in %.1f s", trial.number, outcome, time.time() - started)
    if ends_for_good(state, reason):
        drop_resume_checkpoints(study, trial.number, cfg)
    return state, reason


def taken_over(exc: BaseException) -> bool:
    """Whether the objective failed because its trial had been ended by someone else (pure)."""
    return any(isinstance(e, optuna.exceptions.UpdateFinishedTrialError)
               for e in faults.exception_chain(exc))


def _stored(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The trial as the study holds it now."""
    return study.get_trials(deepcopy=False)[trial.number]


def _stored_state(study: optuna.Study, trial: optuna.Trial) -> str:
    with contextlib.suppress(Exception):
        stored = _stored(study, trial)
        return f"{stored.state.name} ({stored.user_attrs.get('fail_reason', 'stale')})"
    return "ended"


def describe_failure(exc: BaseException) -> str:
    """A trial's fail reason for what its objective raised (pure)."""
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}) raised by the objective"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt raised by the objective"
    if isinstance(exc, TrialFailed):  # the objective's own words
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _failure_reason(exc: BaseException, number: int, trial_dir: Path,
                    stop: StopFlag | None) -> str:
    """The fail reason of a trial that raised; its traceback goes to trial_dir/error.log where
    the disk still takes it."""
    if stop is not None and stop.requested:
        # A consequence of the stop (SIGTERM also ends the data-loader processes, say): the
        # trial did not fail on its own merits, so it runs again like any interrupted trial.
        logger.info("Trial %d ended by the stop (%s: %s)", number, type(exc).__name__, exc)
        return study_lib.INTERRUPTED
    if faults.is_disk_full(exc):
        logger.error("Trial %d failed: no space left on the device (%s)", number,
                     faults.one_line(exc))
        return faults.DISK_FULL_REASON
    if faults.is_transient_storage_error(exc):
        logger.error("Trial %d stopped: the study stayed unreachable (%s); it runs again from "
                     "its last checkpoint", number, faults.one_line(exc))
        return study_lib.STORAGE_LOST
    reason = describe_failure(exc)
    error_log = trial_dir / "error.log"
    try:
        atomic.write_text(error_log, getattr(exc, "error_log", None) or traceback.format_exc())
        where = f"traceback in {error_log}"
    except OSError as write_error:
        where = f"no traceback written: {write_error.strerror}"
    logger.error("Trial %d failed: %s (%s)", number, reason, where)
    return reason


def record_end(study: optuna.Study, trial: optuna.Trial, state: TrialState,
               value: float | None, reason: str | None) -> bool:
    """Tell the study how the trial ended (its fail reason first), waiting out a storage outage
    (faults.outage_s()). False when someone else had already ended it (its heartbeat was judged
    stale and another launcher runs it again): the study keeps that, and this end is not told."""
    def tell() -> bool:
        try:
            if reason is not None:  # Optuna's own call: the retry around tell() does the waiting
                optuna.Trial.set_user_attr(trial, "fail_reason", reason[:1000])
            study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            return True
        except optuna.exceptions.UpdateFinishedTrialError:
            # Ended already: by an earlier try of ours whose answer was lost, or by another.
            stored = _stored(study, trial)
            return stored.state == state and stored.user_attrs.get("fail_reason") == reason

    return faults.retry(tell, f"Recording the end of trial {trial.number}",
                        faults.outage_delays())


def ends_for_good(state: TrialState, reason: str | None) -> bool:
    """True unless the trial runs again (pure)."""
    return state != TrialState.FAIL or reason not in study_lib.RETRYABLE_REASONS


def drop_resume_checkpoints(study: optuna.Study, number: int, cfg: SearchConfig) -> None:
    """Trial `number` has ended for good: remove its resume checkpoint (the objective's
    `resume_files`, last.pth for the built-in one) and those of the interrupted trials it
    continued (none of them runs again), unless --keep_last. Keeps disk use bounded; a failure
    here is only logged."""
    names = cfg.objective_kind.resume_files
    if cfg.keep_last or not names:
        return
    try:
        trials = study.get_trials(deepcopy=False)
        while number is not None:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    (layout.trial_dir(cfg.checkpoint_dir, number) / name).unlink()
            number = trials[number].user_attrs.get("resumed_from")
    except Exception as exc:  # noqa: BLE001 - cleaning up must not stop the search
        logger.warning("Could not remove the %s of trial %d: %s", ", ".join(names), number,
                       faults.one_line(exc))


def _release_device_memory() -> None:
    """Free what a trial left on the GPU, so the next trial (or an OOM retry) starts clean.
    Without torch there is no device memory to free: no full collection (~20 ms) per trial."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
