"""Who owns a trial, and whether that owner provably still lives.

Several launchers (one per node of a SLURM job, a requeued job overlapping its predecessor, a second
launcher that adds GPUs) share one study, so no launcher may treat a RUNNING trial it did not start
as an orphan. Each trial records its owner: the host, the worker process (pid and that process's
start time, since pids are reused), the kernel's boot id and the launcher run. A process can judge
an owner on its own host at once through /proc; an owner on another host only through the study's
heartbeat (see study.recover_dead_trials). Reading /proc is the only side effect here.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from psearch.engine.procfs import process_start

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# The user attributes of a trial that name its owner.
OWNER_KEYS = ("host", "boot_id", "pid", "pid_start", "run", "worker")


class Verdict(enum.Enum):
    """What this host can say about a trial's owner."""

    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"  # another host, or a trial that names no owner: only a heartbeat can tell


@dataclasses.dataclass(frozen=True)
class Host:
    """This machine as a trial records it: its name and the boot it is in."""

    name: str
    boot_id: str

    @classmethod
    def current(cls) -> "Host":
        return cls(name=socket.gethostname(), boot_id=read_boot_id())


def read_boot_id() -> str:
    """The kernel's boot id ('' where there is none): a pid is meaningful only within one boot."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def owner_attrs(host: Host, run: str, worker: str, pid: int | None = None) -> dict[str, Any]:
    """The user attributes that name the owner of a trial started by process `pid` (or this one)."""
    pid = os.getpid() if pid is None else pid
    return {"host": host.name, "boot_id": host.boot_id, "pid": pid,
            "pid_start": process_start(pid), "run": run, "worker": worker}


def judge(attrs: Mapping[str, Any], here: Host,
          start_of: Callable[[int], int | None] = process_start) -> Verdict:
    """Is the owner named by a trial's user attributes alive? Decided only on its own host (pure
    but for `start_of`, which reads /proc)."""
    pid, started = attrs.get("pid"), attrs.get("pid_start")
    if attrs.get("host") != here.name or pid is None or started is None:
        return Verdict.UNKNOWN
    if attrs.get("boot_id") != here.boot_id:
        # Same host name, other boot: the machine restarted since, so the process is gone. (An
        # unknown boot id on either side proves nothing.)
        return Verdict.DEAD if attrs.get("boot_id") and here.boot_id else Verdict.UNKNOWN
    return Verdict.ALIVE if start_of(int(pid)) == int(started) else Verdict.DEAD


def run_id(host: Host, pid: int | None = None, started: float | None = None) -> str:
    """An identity for one launcher run: 'host/pid/YYYYmmddTHHMMSS' (unique across hosts)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(time.time() if started is None
                                                           else started))
    return f"{host.name}/{os.getpid() if pid is None else pid}/{stamp}"


def safe_host(name: str) -> str:
    """A host name fit for a file name: letters, digits, '.', '-' (pure)."""
    cleaned = "".join(c if c.isalnum() or c in ".-" else "-" for c in name)
    return cleaned.strip(".-") or "host"
