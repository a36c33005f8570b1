"""What watches a running trial from beside it: its heartbeat (other launchers judge by it
whether it lives) and its time limit (`--trial_timeout`). Never imports torch.

## The heartbeat

Optuna's RDB storages keep the heartbeat themselves, on the database server's clock (ask/tell
does not record it: `Heartbeat` does, from a thread). The journal has none: `Heartbeat` writes a
counter there, and `BeatWatch` judges it by how long it stays unchanged on the reader's own
monotonic clock, so no host's clock skew can make a live trial look dead.

## The time limit

Python cannot interrupt the main thread's code from another thread, so a trial that runs past its
limit is ended from the outside: the watchdog thread calls the worker's `on_timeout`, which records
the trial FAIL ('timeout') and ends the process's work. A managed worker exits at once (its
launcher kills the process group: data loaders and whatever the objective started, then restarts
it); a stand-alone worker kills the processes the trial left and re-executes itself with the same
command line. This works for an objective that sleeps, waits on I/O or a lock, or computes in code
that releases the GIL (PyTorch's kernels do). A C extension that holds the GIL forever starves the
watchdog's thread too: nothing inside the process can help then, only a kill from outside.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping, NoReturn

import optuna

from psearch.engine import faults, optuna_internals

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
        self._store = optuna_internals.storage(study)
        self._id = optuna_internals.trial_id(trial)
        self._interval_s = interval_s
        self._rdb = optuna_internals.rdb_backend(self._store) is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")
        self._count = 0
        self._failing = False

    def _beat(self) -> None:
        if self._rdb:
            self._store.record_heartbeat(self._id)
        else:
            self._count += 1
            self._store.set_trial_user_attr(self._id, HEARTBEAT_COUNT, self._count)

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


# ---------------------------------------------------------------- the time limit

REAP_WAIT_S = 2.0


class TrialWatchdog:
    """Calls `on_timeout()` from a thread when the block runs longer than `limit_s` (None: no
    limit). `on_timeout` ends the process; a block that ends meanwhile waits for that, so a
    trial is recorded once: as it ended, or as timed out."""

    def __init__(self, limit_s: float | None, on_timeout: Callable[[], None]):
        self._limit_s, self._on_timeout = limit_s, on_timeout
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="trial-watchdog")

    def _run(self) -> None:
        if self._done.wait(self._limit_s):
            return
        with self._lock:
            if not self._done.is_set():
                self._on_timeout()

    def __enter__(self) -> "TrialWatchdog":
        if self._limit_s is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:  # held by a running on_timeout, which ends the process
            self._done.set()


def flush_output() -> None:
    """Flush every log handler and the standard streams (before _exit or exec, which skip it)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def exit_now(code: int) -> NoReturn:
    """End this process with `code` at once, waiting for no thread: a thread an objective left
    running (or one stuck in a timed-out trial) must not keep a worker alive."""
    flush_output()
    os._exit(code)


# ---------------------------------------------------------------- a stand-alone worker's restart

def trial_processes(me: int, table: Mapping[int, tuple[int, int, int]],
                    trial_started: int) -> list[int]:
    """The processes a trial of process `me` may have left: its descendants, and, when `me`
    leads its process group, the group's members started since the trial began (a child whose
    parent died is no descendant any more; a `| tee` of the same command line started before
    the trial and is spared) (pure)."""
    children = collections.defaultdict(list)
    for pid, (ppid, _, _) in table.items():
        children[ppid].append(pid)
    found, todo = set(), [me]
    while todo:
        for child in children[todo.pop()]:
            if child not in found:
                found.add(child)
                todo.append(child)
    if me in table and table[me][1] == me:
        found |= {pid for pid, (_, group, start) in table.items()
                  if group == me and start >= trial_started}
    found.discard(me)
    return sorted(found)


def kill_processes(pids: list[int]) -> None:
    """SIGKILL `pids`, then reap those that are our children (so no zombie outlives the exec)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + REAP_WAIT_S
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    pending.discard(pid)
            except ChildProcessError:  # not our child: init reaps it
                pending.discard(pid)
        time.sleep(0.02)


def restart_self(environ: Mapping[str, str], cwd: str) -> NoReturn:
    """Replace this process by a fresh run of its own command line (`python -m`, a script or an
    installed command alike), in `cwd`, with `environ` added to its environment."""
    flush_output()
    os.environ.update(environ)
    os.chdir(cwd)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
