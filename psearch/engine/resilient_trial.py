"""The trial an objective gets: an `optuna.Trial` whose calls to the study's storage wait out an
outage (a database restarted or down for maintenance, up to faults.outage_s()) instead of
failing the trial for the storage's sake. Optuna gives the storage one try per call; a dropped
connection then surfaced as a trial that failed for good (and lost its resume checkpoint).

A stop (Ctrl+C, SIGTERM) ends the waiting at once: the call raises, and the trial is recorded as
interrupted like any stopped trial.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import optuna

from psearch.engine import faults


class ResilientTrial(optuna.Trial):
    """optuna.Trial with report, should_prune, set_user_attr and suggest_* retried on a
    transient storage error with back-off, for up to faults.outage_s()."""

    def __init__(self, study: optuna.Study, trial_id: int,
                 cancelled: Callable[[], bool] | None = None) -> None:
        self._cancelled = cancelled
        self._waits = faults.outage_delays()
        faults.retry(lambda: optuna.Trial.__init__(self, study, trial_id),
                     f"Opening trial id {trial_id}", self._waits, cancelled=cancelled)

    def _retry(self, call: Callable[[], Any], what: str) -> Any:
        return faults.retry(call, f"{what} (trial {self.number})", self._waits,
                            cancelled=self._cancelled)

    def report(self, value: float, step: int) -> None:
        self._retry(lambda: optuna.Trial.report(self, value, step), "Reporting a value")

    def should_prune(self) -> bool:
        return self._retry(lambda: optuna.Trial.should_prune(self), "Asking the pruner")

    def set_user_attr(self, key: str, value: Any) -> None:
        self._retry(lambda: optuna.Trial.set_user_attr(self, key, value),
                    f"Setting user attribute {key!r}")

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        return self._retry(lambda: optuna.Trial.suggest_float(self, name, low, high, step=step,
                                                              log=log), f"Suggesting {name!r}")

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1,
                    log: bool = False) -> int:
        return self._retry(lambda: optuna.Trial.suggest_int(self, name, low, high, step=step,
                                                            log=log), f"Suggesting {name!r}")

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._retry(lambda: optuna.Trial.suggest_categorical(self, name, choices),
                           f"Suggesting {name!r}")
