"""The launcher's children and signals: start the workers, watch them, forward Ctrl+C/SIGTERM
(`Interrupts`: the launcher's own signal handling), kill, restart; `run_child` for a helper.

Each worker is an argv list (`python -m MODULE …`, no shell) in its own session and process
group, so a terminal's Ctrl+C reaches only the launcher, which forwards it, and killing a group
also ends the worker's data-loader processes. A worker whose module this process has already
imported is forked rather than exec'd (spawn.py: no interpreter start, no imports), whenever this
process is single-threaded; otherwise it gets a new interpreter. Nothing here knows about Optuna
or trials.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from psearch.engine import spawn, stopping
from psearch.engine.devices import WorkerSlot

logger = logging.getLogger(__name__)

# A worker that ran this long before dying did not fail "at start": its failure count restarts.
HEALTHY_AFTER_S = 60.0
# Restarts in a row of a worker that dies soon after starting; then its device is dropped.
MAX_EARLY_FAILURES = 3
MAX_BACKOFF_S = 30.0
HELPER_POLL_S = 0.2


@dataclasses.dataclass
class Worker:
    """One worker slot and its current process (a restart replaces the process, not the slot)."""

    slot: WorkerSlot
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | spawn.Forked | None = None
    started_at: float = 0.0
    early_failures: int = 0
    restart_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@dataclasses.dataclass(frozen=True)
class Exit:
    """A worker process that ended: its pid and exit code (negative: killed by that signal)."""

    worker: Worker
    pid: int
    returncode: int


def backoff_s(early_failures: int) -> float:
    """Seconds to wait before restart number `early_failures` (1, 2, 4, … capped)."""
    return min(MAX_BACKOFF_S, 2.0 ** max(0, early_failures - 1))


class Controller:
    """Starts, polls, signals and restarts a fixed set of worker slots."""

    def __init__(self, workers: list[Worker], clock: Callable[[], float] = time.monotonic):
        self.workers = workers
        self._clock = clock
        self._kill_deadline: float | None = None

    def start(self, worker: Worker) -> None:
        """Start (or restart) one worker, appending its output to its log file: forked when
        this process has its module loaded and no other thread, else a new interpreter."""
        worker.log_path.parent.mkdir(parents=True, exist_ok=True)
        module = spawn.fork_entry(worker.argv, sys.executable, sys.modules,
                                   spawn.thread_count())
        with open(worker.log_path, "ab", buffering=0) as log:
            log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {worker.slot.label}"
                      f"{'' if module else ' (new interpreter)'} =====\n".encode())
            if module is not None:
                worker.proc = spawn.start(module, worker.argv, worker.env, log.fileno(),
                                           spawn.process_name(worker.slot.label))
            else:
                worker.proc = subprocess.Popen(worker.argv, env=worker.env,
                                               stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
        worker.started_at = self._clock()
        worker.restart_at = None

    def start_all(self) -> None:
        """Start every worker."""
        for worker in self.workers:
            self.start(worker)

    def running(self) -> list[Worker]:
        """The workers whose process is alive."""
        return [w for w in self.workers if w.running]

    def active(self) -> bool:
        """True while a worker runs or waits for its restart."""
        return any(w.running or w.restart_at is not None for w in self.workers)

    def poll(self) -> list[Exit]:
        """Reap workers that ended (and whatever is left of their process group), start the
        restarts that are due, and kill everything once a stop's deadline has passed."""
        now = self._clock()
        if self._kill_deadline is not None and now >= self._kill_deadline and self.running():
            logger.warning("Workers still running after the stop timeout: killing them")
            self.kill_all()
        exits = []
        for worker in self.workers:
            if worker.running and _has_exited(worker.proc.pid):
                _kill_group(worker.proc.pid)  # its loaders; the zombie keeps the pgid ours
                exits.append(Exit(worker, worker.proc.pid, worker.proc.wait()))
            elif worker.restart_at is not None and now >= worker.restart_at:
                logger.info("Restarting worker %s on %s", worker.slot.label,
                            worker.slot.describe())
                self.start(worker)
        return exits

    def schedule_restart(self, worker: Worker) -> bool:
        """Restart a dead worker after a back-off; False (and the slot dropped) when it keeps
        dying soon after starting."""
        if self._clock() - worker.started_at >= HEALTHY_AFTER_S:
            worker.early_failures = 0
        worker.early_failures += 1
        if worker.early_failures > MAX_EARLY_FAILURES:
            worker.restart_at = None
            return False
        delay = backoff_s(worker.early_failures)
        worker.restart_at = self._clock() + delay
        logger.warning("Restarting worker %s in %.0f s (restart %d of at most %d in a row)",
                       worker.slot.label, delay, worker.early_failures, MAX_EARLY_FAILURES)
        return True

    def request_stop(self, sig: int, timeout_s: float) -> None:
        """Forward `sig` to every worker's process group; kill what is left after timeout_s."""
        for worker in self.workers:
            worker.restart_at = None
        self.signal_all(sig)
        self._kill_deadline = self._clock() + timeout_s

    def signal_all(self, sig: int) -> None:
        """Send `sig` to the process group of every running worker."""
        for worker in self.running():
            _signal_group(worker.proc.pid, sig)

    def kill_all(self) -> None:
        """SIGKILL every worker's whole process group (data-loader processes included)."""
        for worker in self.workers:
            worker.restart_at = None
        self.signal_all(signal.SIGKILL)


def _has_exited(pid: int) -> bool:
    """True when the child ended; WNOWAIT leaves it a zombie so its pid cannot be reused yet."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)


# ---------------------------------------------------------------- signals and helper processes

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """Counts SIGINT/SIGTERM/SIGHUP; the main loop acts on them (no work inside the handler).

    SIGHUP (the terminal was closed, outside tmux/screen) stops the run like SIGTERM; the
    terminal is gone, so from then on output goes to /dev/null (the launcher log still gets it)
    instead of failing with EIO.

    Only a person pressing Ctrl+C again means "kill now" (`escalations`): SLURM and process
    managers repeat SIGTERM (slurmd signals every process of a job, some send it twice), and a
    repeated SIGTERM or SIGHUP must not turn a graceful stop into lost work. `sigints` counts
    Ctrl+C presses (one keypress reaching us twice counts once): a helper that has nothing to
    save (preparation, summary) is killed on one.
    """

    def __init__(self) -> None:
        self.count = 0
        self.signum: int | None = None
        self.escalations = 0
        self.sigints = 0
        self._first_at = 0.0
        self._last_sigint = -1e9
        self._wakeup: int | None = None  # read end of the pipe that signals are written to

    def handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            _detach_from_terminal()
        now = time.monotonic()
        self.count += 1
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif stopping.is_escalation(signum, now - self._first_at):
            self.escalations += 1
        if signum == signal.SIGINT and now - self._last_sigint >= stopping.ESCALATION_MIN_GAP_S:
            self.sigints += 1
            self._last_sigint = now

    def install(self) -> None:
        """Handle the stop signals, and wake `wait` at once on any signal: a stop, or SIGCHLD
        from a worker that ended (so the launcher reacts at once, not at its next poll)."""
        # Installed explicitly: a launcher started in the background inherits SIGINT ignored.
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to be woken
        self._wakeup = read_end

    def wait(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, less if a signal arrives."""
        if self._wakeup is None:
            time.sleep(timeout_s)
            return
        if select.select([self._wakeup], [], [], timeout_s)[0]:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wakeup, 512):
                    pass


def _detach_from_terminal() -> None:
    """Point stdout and stderr at /dev/null."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)


def run_child(argv: list[str], env: Mapping[str, str], interrupts: Interrupts,
              echo: Callable[[str], None]) -> int:
    """Run a helper (preparation, summary) in its own process group, its output shown and logged;
    a new Ctrl+C kills it at once: it has nothing to save (a SIGTERM lets it finish)."""
    seen = interrupts.sigints
    proc = subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    reader = threading.Thread(target=_pump, args=(proc.stdout, echo), daemon=True)
    reader.start()
    while True:
        try:
            code = proc.wait(timeout=HELPER_POLL_S)
            break
        except subprocess.TimeoutExpired:
            if interrupts.sigints > seen:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=5)
    return code


def _pump(stream, echo: Callable[[str], None]) -> None:
    """Hand each line of a helper's output to `echo` until it closes."""
    for line in stream:
        echo(line)
