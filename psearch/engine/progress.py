"""The launcher's one-line status: pure formatting, and a small renderer that redraws it in place
on a terminal (log lines scroll above it) and logs it at a calm interval otherwise."""
from __future__ import annotations

import logging
import shutil
import time
from typing import Any, Callable, TextIO

CLEAR_LINE = "\r\x1b[K"


def format_duration(seconds: float | None) -> str:
    """H:MM:SS (or M:SS under an hour); '--' when unknown."""
    if seconds is None:
        return "--"
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_s(finished: int, finished_at_start: int, n_trials: int, elapsed_s: float) -> float | None:
    """Seconds left at the throughput of the trials finished since this launcher started."""
    done_here = finished - finished_at_start
    remaining = max(0, n_trials - finished)
    if remaining == 0:
        return 0.0
    if done_here <= 0 or elapsed_s <= 0:
        return None
    return remaining * elapsed_s / done_here


def status_line(counts: Any, n_trials: int, elapsed_s: float, eta: float | None,
                per_trial: str = "", finished: int | None = None,
                confirming: tuple[int, int] | None = None) -> str:
    """'7/24 finished | 4 running | 1 pruned | 0 failed | best 0.8123 (trial 5) | …' (pure);
    'running (2 GPUs per trial)' when each trial holds several devices (`per_trial`);
    'confirming 3/6' once the search is over and confirmation runs (`confirming`: runs over,
    runs planned). `finished`: the search's finished trials (default counts.finished); '12
    warm-start' counts the trials copied from an earlier study (--warm_start) apart.

    `counts` is a study.Counts (finished, running, pruned, failed, best_value, best_number).
    """
    best = "best --"
    if counts.best_value is not None:
        best = f"best {counts.best_value:.4g} (trial {counts.best_number})"
    running = f"{counts.running} running" + (f" ({per_trial})" if per_trial else "")
    done = counts.finished if finished is None else min(finished, n_trials)
    confirm = f" | confirming {confirming[0]}/{confirming[1]}" if confirming else ""
    warm = getattr(counts, "warm", 0)
    return (f"{done}/{n_trials} finished{confirm} | {running} | "
            f"{counts.pruned} pruned | {counts.failed} failed | "
            + (f"{warm} warm-start | " if warm else "") + f"{best} | "
            f"{format_duration(elapsed_s)} elapsed | ETA {format_duration(eta)}")


class StatusLine:
    """The status drawn in place on a terminal; `log` gets it every `log_every_s` seconds."""

    def __init__(self, stream: TextIO, tty: bool, log: Callable[[str], None],
                 log_every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.tty = tty
        self._log = log
        self._log_every_s = log_every_s
        self._clock = clock
        self._last_logged: float | None = None
        self._text = ""

    def update(self, text: str, force_log: bool = False) -> None:
        """Show a new status; log it when the interval has passed (or when forced)."""
        self._text = text
        self.redraw()
        now = self._clock()
        if force_log or self._last_logged is None or now - self._last_logged >= self._log_every_s:
            self._last_logged = now
            self._log(text)

    def redraw(self) -> None:
        if self.tty and self._text:
            width = shutil.get_terminal_size((120, 20)).columns
            self._write(CLEAR_LINE + self._text[:max(20, width - 1)])

    def clear(self) -> None:
        if self.tty and self._text:
            self._write(CLEAR_LINE)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:  # the terminal is gone (closed window): stop drawing on it
            self.tty = False

    def close(self) -> None:
        """Leave the terminal on a fresh line."""
        self.clear()
        self._text = ""


class StatusAwareHandler(logging.StreamHandler):
    """A stream handler that lifts the status line out of the way of each log line."""

    def __init__(self, status: StatusLine):
        super().__init__(status.stream)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        self.status.clear()
        super().emit(record)
        self.status.redraw()
