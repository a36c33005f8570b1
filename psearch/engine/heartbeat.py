"""A running trial's heartbeat, and how a reader judges one it cannot ask the database about.

Optuna's RDB storages keep the heartbeat themselves, on the database server's clock (ask/tell
does not record it: `Heartbeat` does, from a thread). The journal has none: `Heartbeat` writes a
counter there, and `BeatWatch` judges it by how long it stays unchanged on the reader's own
monotonic clock, so no host's clock skew can make a live trial look dead. Never imports torch.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import optuna

from psearch.engine import faults, storage as storage_lib

logger = logging.getLogger(__name__)

HEARTBEAT_COUNT = "heartbeat_n"  # user attribute: the journal heartbeat's counter


class BeatWatch:
    """When this process last saw each trial's journal heartbeat counter change, on its own
    monotonic clock. A heartbeat judged by wall-clock times written on another host breaks
    under clock skew (a host 200 s ahead failed every live trial of the others); a counter that
    has not moved for the grace period, as this process measured it, is stale whatever the
    clocks say. A process that has just started must watch a full grace period first."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[Any, float]] = {}

    def unchanged_for(self, trial_id: int, count: Any, now: float) -> float:
        """Seconds `count` has stayed the same for `trial_id` as of monotonic `now`."""
        last = self._seen.get(trial_id)
        if last is None or last[0] != count:
            self._seen[trial_id] = (count, now)
            return 0.0
        return now - last[1]


BEATS = BeatWatch()  # this process's observations (kept across claims and polls)


class Heartbeat:
    """Records a trial's heartbeat from a thread (ask/tell does not do it for us): Optuna's for an
    RDB storage, a `heartbeat_n` counter user attribute for the journal, which has none (readers
    judge it by how long it stays unchanged on their own clock: BeatWatch)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval_s: float):
        self._storage = study._storage
        self._trial_id = trial._trial_id
        self._interval_s = interval_s
        self._rdb = storage_lib.rdb_backend(self._storage) is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")
        self._count = 0
        self._failing = False

    def _beat(self) -> None:
        if self._rdb:
            self._storage.record_heartbeat(self._trial_id)
        else:
            self._count += 1
            self._storage.set_trial_user_attr(self._trial_id, HEARTBEAT_COUNT, self._count)

    def _run(self) -> None:
        # The first beat too: the objective starts without waiting for its write. After a beat
        # that failed (the storage is down) the next is tried within a second, so that a trial
        # beats again as soon as the storage is back, before others could judge it stale.
        ok = self._run_once()
        while not self._stop.wait(self._interval_s if ok else min(1.0, self._interval_s)):
            ok = self._run_once()

    def _run_once(self) -> bool:
        try:
            self._beat()
            if self._failing:
                logger.info("heartbeat recorded again")
            self._failing = False
            return True
        except Exception as exc:  # noqa: BLE001 - a lost heartbeat must not kill the trial
            if not self._failing:
                logger.warning("heartbeat not recorded: %s", faults.one_line(exc))
            self._failing = True
            return False

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
