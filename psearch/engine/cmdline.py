"""Hide a secret that a user typed on this process's own command line.

Everyone on a machine can read every process's command line (`ps`, /proc/PID/cmdline). A password
in `--storage postgresql://user:PASSWORD@host/db` would be there for the whole run, so the launcher
overwrites it in place with '*' as soon as it starts (as the mysql client does with -pPASSWORD).
That leaves a window of a fraction of a second; `--storage env:NAME` or ~/.pgpass leave none.
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
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5): 48, 49)
        current = Path("/proc/self/cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return False
    if end - start != len(current) or secret.encode() not in current:
        return False  # the argv area was moved or rewritten by someone else: leave it alone
    hidden = current.replace(secret.encode(), b"*" * len(secret.encode()))
    ctypes.memmove(start, hidden, len(hidden))
    return Path("/proc/self/cmdline").read_bytes() == hidden
