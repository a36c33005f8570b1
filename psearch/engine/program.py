"""Any training program as the objective (`--command`): a trial runs the program with its
parameters, reads its metrics from its output, reports them for pruning, and ends it on a prune,
a stop or a time-out, process group and all.

    python parallel_search.py --command "python train.py --data /d --epochs 30" \\
        --space space.yaml --metric val_acc --checkpoint_dir runs/x --n_trials 40

- Parameters in: appended as `--name value` (`--param_style hydra`: `name=value`), or put where
  the command has `{name}` placeholders (then nothing is appended). The environment carries
  PSEARCH_TRIAL_DIR, PSEARCH_TRIAL_NUMBER, PSEARCH_PARAMS (JSON) and, for the rerun of an
  interrupted trial, PSEARCH_RESUME_FROM (that trial's folder).
- Metrics out: lines `psearch: epoch=3 val_acc=0.71 loss=0.4` on stdout. A line with the metric is
  reported at its `epoch` (or `step`; else its count); every line goes to the trial's
  `metrics.jsonl`; the trial's value is the LAST value of the metric the program printed (print
  your own best or smoothed figure last if that is what should count).
- The program runs in the folder the search was started from (relative paths in the command
  work), in a process group of its own, dies with its worker; its stdout and stderr go to
  `trial_NNN/output.log`. A non-zero exit fails the trial with its last
  stderr line (the last 50 lines in `error.log`); so does exit 0 without the metric, or a metric
  that is not a number.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping, Sequence

from psearch.engine import layout, objectives, ranks, spawn
from psearch.engine.errors import UsageError
from psearch.engine.objectives import TrialFailed

if TYPE_CHECKING:
    import optuna

    from psearch.engine.config import SearchConfig
    from psearch.engine.space import Space
    from psearch.engine.stopping import StopFlag

PREFIX = "psearch:"
PARAM_STYLES = ("flags", "hydra")
TRIAL_DIR_VAR, NUMBER_VAR = "PSEARCH_TRIAL_DIR", "PSEARCH_TRIAL_NUMBER"
PARAMS_VAR, RESUME_VAR = "PSEARCH_PARAMS", "PSEARCH_RESUME_FROM"
OUTPUT_LOG, HISTORY, ERROR_LOG = "output.log", "metrics.jsonl", "error.log"
TAIL_LINES = 50
POLL_S = 0.05
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
# What the program runs under: it dies with its worker (even one killed outright), then execs.
_SHIM = ("import os, sys\nfrom psearch.engine.stopping import die_with_parent\n"
         "die_with_parent(int(sys.argv[1]))\nos.execvp(sys.argv[2], sys.argv[2:])\n")


@dataclass(frozen=True)
class CommandOptions:
    """--command, --metric, --param_style, resolved."""

    command: str
    metric: str
    param_style: str = "flags"

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command)


# ---------------------------------------------------------------- pure decisions

def placeholders(argv: Sequence[str]) -> list[str]:
    """The `{name}` placeholders of a command, in order, once each (pure)."""
    return list(dict.fromkeys(n for token in argv for n in _PLACEHOLDER.findall(token)))


def shown(value: Any) -> str:
    """A parameter value as the program gets it: true/false for bools, repr-exact floats (pure)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def program_argv(argv: Sequence[str], params: Mapping[str, Any], style: str) -> list[str]:
    """The command line of one trial (pure): placeholders filled in where the command has them,
    else every parameter appended as `--name value` (style flags) or `name=value` (hydra)."""
    if placeholders(argv):
        return [_PLACEHOLDER.sub(lambda m: shown(params[m.group(1)]), token) for token in argv]
    if style == "hydra":
        return [*argv, *(f"{name}={shown(v)}" for name, v in params.items())]
    return [*argv, *(part for name, v in params.items() for part in (f"--{name}", shown(v)))]


def parse_line(line: str) -> dict[str, Any] | None:
    """The metrics of a `psearch: key=value ...` line (numbers as floats, others as text), or
    None for any other line (pure)."""
    text = line.strip()
    if not text.startswith(PREFIX):
        return None
    found: dict[str, Any] = {}
    for token in text[len(PREFIX):].split():
        key, sep, raw = token.partition("=")
        if not sep or not _KEY.match(key):
            continue
        try:
            found[key] = float(raw)
        except ValueError:
            found[key] = raw
    return found


def metric_value(metrics: Mapping[str, Any], metric: str, line: str) -> float | None:
    """The metric of one parsed line (None when the line lacks it); TrialFailed when it is not a
    finite number (pure)."""
    if metric not in metrics:
        return None
    value = metrics[metric]
    if not isinstance(value, float) or not math.isfinite(value):
        raise TrialFailed(f"the program reported {metric}={value} (not a finite number): "
                          f"{line.strip()}")
    return value


def trial_env(base: Mapping[str, str], trial_dir: Path, number: int, params: Mapping[str, Any],
              resume_from: Path | None) -> dict[str, str]:
    """The program's environment (pure)."""
    env = {**base, TRIAL_DIR_VAR: str(trial_dir), NUMBER_VAR: str(number),
           PARAMS_VAR: json.dumps(dict(params))}
    if resume_from is not None:
        env[RESUME_VAR] = str(resume_from)
    else:
        env.pop(RESUME_VAR, None)
    return env


def check_program(argv: Sequence[str], path_env: str | None = None) -> None:
    """UsageError unless the command's first word is a program on the PATH or an executable file."""
    if not argv:
        raise UsageError("--command is empty; give the program to run, e.g. --command "
                         "\"python train.py --epochs 30\"")
    first = argv[0]
    if os.sep in first:
        if not os.path.isfile(first):
            raise UsageError(f"--command: {first!r} does not exist; give the path of the program")
        if not os.access(first, os.X_OK):
            raise UsageError(f"--command: {first!r} is not executable; chmod +x it, or run it "
                             f"through its interpreter (python {first})")
    elif shutil.which(first, path=path_env) is None:
        raise UsageError(f"--command: {first!r} is not a program on the PATH; give its full path "
                         "or install it")
    script = _python_script(argv)
    if script is not None and not os.path.isfile(script):
        raise UsageError(f"--command: the script {script!r} does not exist (the program runs in "
                         f"{os.getcwd()}); give its path from there, or an absolute one")


def _python_script(argv: Sequence[str]) -> str | None:
    """The script of `python [-u …] SCRIPT.py …`, the file a typo most often misses (pure)."""
    if not os.path.basename(argv[0]).startswith("python"):
        return None
    for word in argv[1:]:
        if word in ("-m", "-c"):
            return None
        if not word.startswith("-"):
            return word if word.endswith(".py") else None
    return None


# ---------------------------------------------------------------- the objective kind

def add_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a training program as the objective."""
    a = parser.add_argument
    a("--command", default=None, help="tune a training program: the command line each trial "
      "runs, its parameters appended (or put where it has {name} placeholders); it prints lines "
      "'psearch: epoch=3 val_acc=0.71' (needs --space and --metric) (default: none)")
    a("--metric", default=None, help="with --command: the key of its 'psearch:' lines whose last "
      "value is the trial's value, reported each epoch for pruning (default: none)")
    a("--param_style", default="flags", choices=PARAM_STYLES, help="with --command: pass "
      "parameters as '--name value' (flags) or as 'name=value' overrides (hydra) "
      "(default: flags)")


class Command(objectives.ObjectiveKind):
    """Trials run a training program (`--command`)."""

    name = "command"
    description = "a training program"
    worker_memory = 1 << 30  # a training program: torch and a model, as the built-in objective

    def options(self, ns: argparse.Namespace) -> CommandOptions:
        if ns.metric is None or not _KEY.match(ns.metric):
            raise UsageError(f"--command needs --metric NAME: the key of its 'psearch:' lines "
                             f"whose value counts (got {ns.metric!r})")
        if ns.space_file is None:
            raise UsageError("--command needs --space FILE.yaml: the parameters to pass it "
                             "(see --show_space for the format)")
        options = CommandOptions(ns.command, ns.metric, ns.param_style)
        try:
            argv = options.argv
        except ValueError as exc:
            raise UsageError(f"--command {ns.command!r}: {exc} (unbalanced quotes?)") from None
        check_program(argv)
        return options

    def space_options(self, ns: argparse.Namespace) -> None:
        return None

    def options_argv(self, options: CommandOptions) -> list[str]:
        return ["--command", options.command, "--metric", options.metric,
                "--param_style", options.param_style]

    def complete_space(self, space: Space, options: CommandOptions | None) -> Space:
        missing = [n for n in placeholders(options.argv) if n not in space.names] if options else []
        if missing:
            raise UsageError(f"--command has the placeholder {{{missing[0]}}}, but {space.source} "
                             f"has no parameter {missing[0]!r}; add it or fix the placeholder")
        return space

    def check(self, cfg: SearchConfig) -> dict[str, Any]:
        o = cfg.options
        return {"command": o.command, "metric": o.metric, "param_style": o.param_style}

    def make(self, cfg: SearchConfig, stop: StopFlag, cpu_threads: int | None):
        return ProgramObjective(cfg, stop)

    def banner_lines(self, cfg: SearchConfig) -> list[str]:
        return [f"Command: {cfg.options.command} (value: last {cfg.options.metric})"]


# ---------------------------------------------------------------- one trial

class ProgramObjective:
    """objective(trial, trial_dir): run the program, report its metric, return its last value."""

    def __init__(self, cfg: SearchConfig, stop: StopFlag):
        self.cfg, self.stop, self.options = cfg, stop, cfg.options

    def __call__(self, trial: optuna.Trial, trial_dir: Path) -> float:
        params = self.cfg.space.suggest(trial)
        argv = program_argv(self.options.argv, params, self.options.param_style)
        resumed = trial.user_attrs.get("resumed_from")
        resume = layout.trial_dir(self.cfg.checkpoint_dir, int(resumed)) if resumed is not None \
            else None
        env = trial_env(spawn.child_environ(os.environ), trial_dir, trial.number, params,
                        resume)
        with Running(argv, env, trial_dir, self.cfg.gpus_per_trial) as running:
            return Watch(trial, self.options.metric, trial_dir).run(running, self.stop)


class Running:
    """The program's processes (one per rank), each in a process group of its own that dies with
    this worker, their output in the trial folder; ended (SIGTERM, then SIGKILL after a grace
    period, whole groups) on leaving."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], trial_dir: Path, world: int):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        self._logs: list[IO[str]] = []
        port = ranks.free_port() if world > 1 else 0
        for rank in range(world):
            rank_env = (ranks.rank_env(env, rank, world, port, trial_dir / ranks.RANKS_DIR,
                                       os.getpid()) if world > 1 else dict(env))
            self._start(argv, rank_env, trial_dir / (OUTPUT_LOG if rank == 0
                                                      else f"output_rank{rank}.log"), rank == 0)

    def _start(self, argv: Sequence[str], env: Mapping[str, str], log: Path, main: bool) -> None:
        out = open(log, "a", buffering=1, errors="replace")  # noqa: SIM115 - closed in end()
        self._logs.append(out)
        # In the folder the search was started from, as the command was typed there (relative
        # paths in it work); the trial's folder is in PSEARCH_TRIAL_DIR.
        proc = subprocess.Popen([sys.executable, "-c", _SHIM, str(os.getpid()), *argv],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(env),
                                start_new_session=True, text=True, errors="replace", bufsize=1)
        self.procs.append(proc)
        lock = threading.Lock()
        for stream, parsed in ((proc.stdout, main), (proc.stderr, False)):
            reader = threading.Thread(target=self._read, daemon=True, name="program-output",
                                      args=(stream, out, lock, parsed, stream is proc.stderr
                                            and main))
            reader.start()
            self.readers.append(reader)

    def _read(self, stream: IO[str], out: IO[str], lock: threading.Lock, parsed: bool,
              tail: bool) -> None:
        for line in stream:
            with lock, contextlib.suppress(OSError, ValueError):
                out.write(line)
            if tail:
                self.stderr_tail.append(line.rstrip("\n"))
            if parsed and line.lstrip().startswith(PREFIX):
                self.lines.put(line)

    def codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def drained(self) -> None:
        """Wait (briefly) for the readers to reach the end of the output of exited programs."""
        for reader in self.readers:
            reader.join(timeout=2.0)

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    def end(self, grace_s: float = ranks.STOP_GRACE_S) -> None:
        """SIGTERM every live group, SIGKILL what is left after `grace_s`; close the logs."""
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:  # the group too: what the program started and left behind
            _signal_group(p, signal.SIGKILL)
            p.wait()
        self.drained()
        for out in self._logs:
            out.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class Watch:
    """Read the metric lines as they come: history, reports, pruning; the trial's end."""

    def __init__(self, trial: optuna.Trial, metric: str, trial_dir: Path):
        self.trial, self.metric, self.trial_dir = trial, metric, trial_dir
        self.value: float | None = None
        self.last: dict[str, Any] = {}
        self.count = 0

    def run(self, running: Running, stop: StopFlag) -> float:
        while True:
            stop.check()
            self._take(running)
            codes = running.codes()
            failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                running.drained()
                self._take(running)
                return self._end(running, failed)
            time.sleep(POLL_S)

    def _take(self, running: Running) -> None:
        import optuna

        while True:
            try:
                line = running.lines.get_nowait()
            except queue.Empty:
                return
            metrics = parse_line(line)
            if not metrics:
                continue
            self.count += 1
            self.last.update(metrics)
            _append_history(self.trial_dir / HISTORY, metrics)
            value = metric_value(metrics, self.metric, line)
            if value is None:
                continue
            self.value = value
            step = int(metrics.get("epoch", metrics.get("step", self.count)))
            self.trial.report(value, step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} ({self.metric} {value:.4g})")

    def _end(self, running: Running, failed: list[tuple[int, int]]) -> float:
        for key, v in self.last.items():
            if isinstance(v, float) and math.isfinite(v):
                self.trial.set_user_attr(key, v)
        if failed:
            rank, code = ranks.culprit([(r, c, None) for r, c in failed])
            last = next((line for line in reversed(running.stderr_tail) if line.strip()), None)
            why = exit_reason(code, last if rank == 0 else None)
            if len(running.procs) > 1:
                why = f"rank {rank} of {len(running.procs)} failed: {why}"
            raise TrialFailed(why, error_log="\n".join(running.stderr_tail) + "\n")
        if self.value is None:
            raise TrialFailed(f"the program reported no {self.metric} (print a line like "
                              f"'{PREFIX} {self.metric}=0.71')",
                              error_log="\n".join(running.stderr_tail) + "\n")
        return self.value


def exit_reason(code: int, last_stderr_line: str | None) -> str:
    """A failed program's fail reason: its last stderr line, else how it ended (pure)."""
    if last_stderr_line:
        return last_stderr_line.strip()
    if code < 0:
        return ranks.exit_reason(code, None)
    return f"exit code {code} (nothing on stderr; see {OUTPUT_LOG})"


def _append_history(path: Path, metrics: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                            for k, v in metrics.items()}) + "\n")
