"""What Linux's /proc says about processes (the one reader of /proc/PID/stat), and this process's
own command line in memory.

Everyone on a machine can read every process's command line (`ps`, /proc/PID/cmdline): the
launcher overwrites a password typed in `--storage` in place (urls.hide_url_passwords), and a
worker forked from the launcher writes its own title over the launcher's (`set_own_title`).
Linux only: elsewhere the readers find nothing and nothing is written.
"""
from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

# Fields of /proc/PID/stat after the command name, counted from 0 (proc(5) numbers them from 3).
STATE, PARENT, GROUP, START = 0, 1, 2, 19
ARG_START, ARG_END = 45, 46


def stat_fields(pid: int | str = "self") -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and ')'), or
    None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None


def process_start(pid: int) -> int | None:
    """Start of process `pid` in clock ticks since boot; None when no such process lives (a
    zombie counts as dead: it will never do anything again)."""
    fields = stat_fields(int(pid))
    if fields is None or fields[STATE] in ("Z", "X"):
        return None
    return int(fields[START])


def boot_ticks() -> int:
    """Now, in the clock ticks since boot that /proc/PID/stat gives a process's start in."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def read_processes() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, process group, start in clock ticks since boot), for every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(entry.name)
            if fields is not None:  # else it ended meanwhile
                table[int(entry.name)] = (int(fields[PARENT]), int(fields[GROUP]),
                                          int(fields[START]))
    return table


def hide_in_own_cmdline(secret: str) -> bool:
    """Overwrite every occurrence of `secret` in this process's argv memory; True when done."""
    if not secret:
        return False
    found = _argv_area()
    if found is None or secret.encode() not in found[1]:
        return False
    hidden = found[1].replace(secret.encode(), b"*" * len(secret.encode()))
    ctypes.memmove(found[0], hidden, len(hidden))
    return Path("/proc/self/cmdline").read_bytes() == hidden


def set_own_title(title: str) -> bool:
    """Show `title` (cut to fit) as this process's command line in `ps`; True when done."""
    found = _argv_area()
    if found is None:
        return False
    size = len(found[1])
    text = title.encode(errors="replace")[:size - 1]
    ctypes.memmove(found[0], text + b"\0" * (size - len(text)), size)
    return True


def _argv_area() -> tuple[int, bytes] | None:
    """Where this process's argv memory starts, and what it holds (None where unknown)."""
    fields = stat_fields()
    try:
        start, end = int(fields[ARG_START]), int(fields[ARG_END])
        current = Path("/proc/self/cmdline").read_bytes()
    except (OSError, IndexError, ValueError, TypeError):
        return None
    if end - start != len(current) or not current:
        return None  # the argv area was moved or rewritten by someone else: leave it alone
    return start, current
