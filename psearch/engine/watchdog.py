"""`--trial_timeout`, and how a worker process ends without waiting for what a trial left running.

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
from pathlib import Path
from typing import Callable, Mapping, NoReturn

logger = logging.getLogger(__name__)
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

def boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat gives a process's start in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def read_processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, process group, start in clock ticks since boot), from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


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
