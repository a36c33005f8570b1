"""Hide a secret that a user typed on this process's own command line; show another one.

Everyone on a machine can read every process's command line (`ps`, /proc/PID/cmdline). A password
in `--storage postgresql://user:PASSWORD@host/db` would be there for the whole run, so the launcher
overwrites it in place with '*' as soon as it starts (as the mysql client does with -pPASSWORD).
That leaves a window of a fraction of a second; `--storage env:NAME` or ~/.pgpass leave none.
A worker forked from the launcher (forked.py) would show the launcher's command line in `ps`;
`set_own_title` writes its own over it, cut to the length the launcher's takes.
Linux only: elsewhere nothing happens.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

from psearch.engine.config import url_secrets


def hide_url_passwords(argv: Sequence[str]) -> None:
    """Hide the password of every URL among this process's arguments (`--storage URL`)."""
    for arg in argv:
        if "://" in arg:
            for secret in url_secrets(arg.split("=", 1)[1] if arg.startswith("--") else arg):
                hide_in_own_cmdline(secret)


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
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5): 48, 49)
        current = Path("/proc/self/cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return None
    if end - start != len(current) or not current:
        return None  # the argv area was moved or rewritten by someone else: leave it alone
    return start, current
