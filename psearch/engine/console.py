"""What the launcher shows a person: its logging (the terminal around the status line, and the
launcher log, each line naming the host), the banner, the one-line status (pure formatting, and
a small renderer that redraws it in place on a terminal, log lines scrolling above it, and logs
it at a calm interval otherwise) and the other human-facing lines. Pure formatting but for
`setup_logging`, `say` and the renderer."""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TextIO

from psearch.engine import devices, layout
from psearch.engine.config import SearchConfig
from psearch.engine.urls import redact_url
from psearch.engine.controller import Worker

if TYPE_CHECKING:
    from psearch.engine import study as study_lib

logger = logging.getLogger("launcher")
file_log = logging.getLogger("launcher.file")  # the launcher log only (banner, status lines)

TTY_REFRESH_S = 1.5
LOG_EVERY_S = 30.0
RULE = "=" * 80


class DeferredFileHandler(logging.handlers.MemoryHandler):
    """Keeps log records in memory until `open` names the file, then writes them all and every
    later one: a run refused before it starts leaves no log file (nor a logs/ folder) behind."""

    def __init__(self, formatter: logging.Formatter):
        super().__init__(capacity=1 << 20, flushLevel=logging.CRITICAL + 1, target=None)
        self._formatter = formatter

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return self.target is not None or len(self.buffer) >= self.capacity

    def open(self, path: Path) -> None:
        """Create the file (and its folder) and write what was kept."""
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(path)
        to_file.setFormatter(self._formatter)
        self.setTarget(to_file)
        self.flush()


def setup_logging(host: str) -> tuple[StatusLine, DeferredFileHandler]:
    """Launcher messages to the terminal (around the status line) and to the launcher log, which
    is written only once `open`ed; each line names the host, so the logs of several nodes can be
    told apart. A log line that cannot be written (a full disk) is dropped, never a traceback."""
    logging.raiseExceptions = False
    fmt = logging.Formatter(f"%(asctime)s [launcher@{host}] %(levelname)s: %(message)s")
    to_file = DeferredFileHandler(fmt)
    tty = sys.stdout.isatty()
    status = StatusLine(sys.stdout, tty, log=(file_log if tty else logger).info,
                                 log_every_s=LOG_EVERY_S)
    to_term = StatusAwareHandler(status)
    to_term.setFormatter(fmt)
    logging.basicConfig(level=logging.INFO, handlers=[to_term, to_file], force=True)
    file_log.handlers = [to_file]
    file_log.propagate = False
    import optuna

    optuna.logging.disable_default_handler()  # optuna's warnings go to both places too
    optuna.logging.enable_propagation()
    return status, to_file


def say(status: StatusLine, text: str) -> None:
    """Print a human-facing line (banner, interrupt notice) and keep it in the launcher log."""
    status.clear()
    with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) or a full disk
        print(text, flush=True)
    for line in text.splitlines():
        file_log.info("%s", line)
    status.redraw()


def banner_head(cfg: SearchConfig, slots: Sequence[devices.WorkerSlot], workers_per_gpu: int,
                counts: study_lib.Counts, threads: int, host: str) -> str:
    """The banner's first part: devices, trials, folders (pure)."""
    to_run = max(0, cfg.n_trials - counts.finished)
    gpus = list(dict.fromkeys(g for s in slots for g in s.gpus))
    per_trial = devices.per_trial_words(slots, cfg.gpus_per_trial)
    if per_trial:
        devices_line = (f"GPUs: {'; '.join(s.device for s in slots if s.device)} "
                        f"({per_trial}, {len(slots)} trial(s) at a time)" if gpus
                        else f"GPUs: none, {len(slots)} CPU worker(s) ({per_trial})")
    else:
        devices_line = (f"GPUs: {', '.join(gpus)} ({workers_per_gpu} worker(s) per GPU)"
                        if gpus else f"GPUs: none, {len(slots)} CPU worker(s)")
    return "\n".join([
        RULE, "PARALLEL HYPERPARAMETER SEARCH", RULE, devices_line,
        f"Total trials: {cfg.n_trials} ({counts.finished} already finished, {to_run} to run)",
        f"Trials per {'GPU' if gpus else 'worker'}: "
        f"~{trials_per_worker(to_run, len(gpus) or len(slots))} "
        "(one shared budget: a free worker takes the next trial)",
        *([f"Confirmation: then the {cfg.confirm_top} best sets again with {cfg.confirm_seeds} "
            f"other seed(s) each ({cfg.confirm_top * cfg.confirm_seeds} runs), chosen by mean"]
          if cfg.confirm_top else []),
        f"CPU threads per worker: {threads}",
        f"Checkpoint dir: {cfg.checkpoint_dir}",
        *cfg.objective_kind.banner_lines(cfg),
        f"Objective: {cfg.objective or cfg.objective_kind.description} ({cfg.direction})"
        + (f", space {cfg.space_file}" if cfg.space_file else ""),
        f"Study: {cfg.study_name} in {redact_url(cfg.storage_url)}",
        f"Host: {host} (other launchers may share the study and its "
        "budget)",
        RULE])


def banner_tail(workers: Sequence[Worker], cfg: SearchConfig, launcher_log: Path) -> str:
    """The banner's second part: each worker's PID and log, and where to monitor (pure)."""
    from psearch.engine import storage as storage_lib

    lines = [f"Started worker on {w.slot.describe()}: PID {w.pid}, log {w.log_path}"
             for w in workers]
    log_glob = shlex.quote(str(layout.logs_dir(cfg.checkpoint_dir))) + "/worker_*.log"
    lines += ["", "Monitor:", f"  tail -f {log_glob}",
              f"  launcher log: {launcher_log}",
              f"  {storage_lib.dashboard_command(cfg.storage_url)}",
              "Ctrl+C once stops gracefully (rerun the same command to resume); twice kills.", RULE]
    return "\n".join(lines)


def trials_per_worker(to_run: int, n_workers: int) -> str:
    """How many of the remaining trials each worker runs, roughly: '6' or '5-6' (pure)."""
    low, extra = divmod(max(0, to_run), max(1, n_workers))
    return str(low) if extra == 0 else f"{low}-{low + 1}"


# ---------------------------------------------------------------- the status line

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
