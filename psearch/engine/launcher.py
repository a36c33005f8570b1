"""Parallel hyperparameter search: one worker per GPU, all drawing trials from one Optuna study.

    python parallel_search.py --data_root D --checkpoint_dir C --n_trials 24 --use_all_writers
    CUDA_VISIBLE_DEVICES=0,1,3 python parallel_search.py ...      # workers on GPUs 0, 1 and 3
    python parallel_search.py ... --cpu_workers 2                  # no GPU: two CPU workers
    python parallel_search.py --demo                               # synthetic data, a few minutes

The study ends with exactly --n_trials finished trials however the workers race. Ctrl+C (or
SIGTERM) stops every worker at its next safe point; rerun the same command to resume. Logs:
C/logs/launcher_*.log and one C/logs/worker_*.log per worker. This process never imports torch,
and it loads optuna (and numpy) only once it runs, single-threaded (see `limit_own_threads`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from psearch.engine import cmdline, devices, layout, ownership, progress
from psearch.engine.children import (SYNTHETIC_MODULE, WORKER_MODULE, child_environ, module_argv,
                                     summary_argv, summary_hint)
from psearch.engine.config import (SearchConfig, add_search_args, config_from_args, config_to_argv,
                                   redact_url)
from psearch.engine.errors import UsageError
from psearch.engine.workers import Controller, Exit, Interrupts, Worker, run_child

if TYPE_CHECKING:  # loaded in launch(), after the launcher has limited its BLAS threads
    import optuna

    from psearch.engine import study as study_lib

logger = logging.getLogger("launcher")
file_log = logging.getLogger("launcher.file")  # the launcher log only (banner, status lines)

POLL_S = 0.2
# How often a launcher whose workers are done looks at the study for other launchers' trials.
WAIT_POLL_S = 2.0
TTY_REFRESH_S = 1.5
LOG_EVERY_S = 30.0
RULE = "=" * 80
# --demo fills these in front of the user's flags, so any flag given explicitly wins.
DEMO_DEFAULTS = ("--data_root", "demo_data", "--checkpoint_dir", "demo_runs", "--n_trials", "6",
                 "--models", "small", "--epochs", "8", "--img_height", "64", "--img_width", "640",
                 "--lines_per_writer", "40", "--no_pretrained")
DEMO_CPU_WORKERS = 2
# Writers of one shared script in fairly similar hands: hard enough that trials differ (with
# distinct alphabets every trial reaches page top-1 = 1 and the search has nothing to show).
DEMO_SIMILARITY = 0.75


def build_parser() -> argparse.ArgumentParser:
    """The worker's search flags plus the launcher's own; every help states its default."""
    parser = argparse.ArgumentParser(description="Parallel hyperparameter search: one worker per "
                                     "GPU sharing one Optuna study and one exact trial budget.")
    add_search_args(parser)
    a = parser.add_argument
    a("--gpus", default=None, help="comma list of GPU ids to use, as CUDA_VISIBLE_DEVICES names "
      "them (default: CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi finds)")
    a("--cpu_workers", type=int, default=None, help="run N workers on the CPU instead of GPUs, "
      "splitting the cores among them (default: off)")
    a("--workers_per_gpu", type=int, default=1, help="workers sharing each GPU (default: 1)")
    a("--stop_timeout", type=float, default=60.0, help="seconds workers get to stop after Ctrl+C "
      "or SIGTERM before they are killed (default: 60)")
    a("--no_wait", action="store_true", help="when this launcher's workers find no budget left "
      "while other launchers' trials still run, exit 0 and leave the rest to them (default: wait "
      "for them, and take over trials whose launcher dies)")
    a("--no_summary", action="store_true", help="skip the summary step at the end (default: run "
      "summarize.py)")
    a("--demo", action="store_true", help="generate a small synthetic data set (if missing) and "
      f"run a short search: {' '.join(DEMO_DEFAULTS)}, {DEMO_CPU_WORKERS} CPU workers without a "
      "GPU; explicit flags win (default: off)")
    return parser


def with_demo_defaults(argv: Sequence[str]) -> list[str]:
    """argv with the demo's defaults in front when --demo is given (pure)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--demo", action="store_true")
    known, _ = pre.parse_known_args(argv)
    return [*DEMO_DEFAULTS, *argv] if known.demo else list(argv)


# ---------------------------------------------------------------- pure decisions

def classify_exit(returncode: int) -> str:
    """What a worker's exit code means: done, usage, failures or died (pure)."""
    if returncode == 0:
        return "done"  # no budget left for it to start a trial
    if returncode == 2:
        return "usage"
    if returncode == 3:
        return "failures"  # too many failed trials in a row: something is wrong with the setup
    return "died"  # any other code, or killed by a signal (negative)


def describe_exit(returncode: int) -> str:
    """'exit code 1' or 'killed by SIGKILL' for a Popen return code (pure)."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def final_exit_code(finished: int, n_trials: int, usage_error: bool,
                    stop_signal: int | None, left_to_others: bool = False) -> int:
    """2 for a usage error, 128+signal after a stop, else 0 when the budget was reached or the
    rest was left to other launchers (--no_wait), 1 when the search cannot get there (pure)."""
    if usage_error:
        return 2
    if stop_signal is not None:
        return 128 + stop_signal
    return 0 if finished >= n_trials or left_to_others else 1


def after_workers(finished: int, running: int, n_trials: int, restartable: int,
                  no_wait: bool) -> str:
    """What a launcher whose workers have all ended does next (pure). `running` trials are other
    launchers' (ours have ended); `restartable` workers ended only for want of budget.

    'finished': the study holds n_trials; 'restart': budget opened again (a trial elsewhere failed
    or its launcher died) and we have workers to take it; 'wait' / 'leave' (--no_wait): other
    launchers' trials still run; 'stuck': nothing runs anywhere and we cannot start a trial.
    """
    if finished >= n_trials:
        return "finished"
    if n_trials - finished - running > 0 and restartable:
        return "restart"
    if running == 0:
        return "stuck"
    return "leave" if no_wait else "wait"


def trials_per_worker(to_run: int, n_workers: int) -> str:
    """How many of the remaining trials each worker runs, roughly: '6' or '5-6' (pure)."""
    low, extra = divmod(max(0, to_run), max(1, n_workers))
    return str(low) if extra == 0 else f"{low}-{low + 1}"


def worker_argv(cfg: SearchConfig, loaders: int, python: str = sys.executable) -> list[str]:
    """A worker's command line: the same flags (same --n_trials) with its data-loader count."""
    return [*module_argv(python, WORKER_MODULE),
            *config_to_argv(dataclasses.replace(cfg, num_workers=loaders))]


def log_name(role: str, host: str, stamp: str) -> str:
    """'worker_gpu0_node1_20261128_101500.log': the host keeps the logs of several nodes that
    share a checkpoint folder apart (pure)."""
    return f"{role}_{ownership.safe_host(host)}_{stamp}.log"


def build_workers(cfg: SearchConfig, slots: Sequence[devices.WorkerSlot], stamp: str,
                  environ: Mapping[str, str], parent_pid: int, n_cores: int, host: str,
                  run: str) -> list[Worker]:
    """One Worker (argv, env, log file) per slot; no side effects."""
    threads = devices.threads_per_worker(n_cores, len(slots))
    argv = worker_argv(cfg, devices.loader_processes(cfg.num_workers, threads))
    log_dir = layout.logs_dir(cfg.checkpoint_dir)
    environ = child_environ(environ, cfg)
    return [Worker(slot=slot, argv=list(argv),
                   env=devices.worker_env(environ, slot, len(slots), parent_pid, threads, run),
                   log_path=log_dir / log_name(f"worker_{slot.label}", host, stamp))
            for slot in slots]


# ---------------------------------------------------------------- helper processes

def _echo(line: str) -> None:
    """A helper's output line: to the terminal as it is, and into the launcher log."""
    sys.stdout.write(line)
    sys.stdout.flush()
    file_log.info("| %s", line.rstrip("\n"))


def prepare(cfg: SearchConfig, environ: Mapping[str, str], interrupts: Interrupts) -> int:
    """Run the worker once with --prepare_only: index data, build the cache, check weights,
    create or load the study and check its settings, before any worker starts."""
    env = {**child_environ(environ, cfg), "PARALLEL_SEARCH_WORKER": "prepare",
           "PARALLEL_SEARCH_MANAGED": "1", "PARALLEL_SEARCH_PARENT_PID": str(os.getpid()),
           "PYTHONUNBUFFERED": "1"}
    logger.info("Preparing: data, image cache, pretrained weights, study")
    code = run_child([*module_argv(sys.executable, WORKER_MODULE), *config_to_argv(cfg),
                      "--prepare_only"],
                     env, interrupts, echo=_echo)
    if interrupts.count:
        logger.warning("Interrupted while preparing: no worker was started")
        return 128 + interrupts.signum
    if code == 2:
        logger.error("Preparation refused the arguments (the error is above); nothing was started")
    elif code != 0:
        logger.error("Preparation failed with exit code %d (see the output above)", code)
        return 1
    return code


def summarize(cfg: SearchConfig, environ: Mapping[str, str], interrupts: Interrupts) -> None:
    """Write the summary; a failure is logged, never changes the exit code."""
    logger.info("Summarizing results into %s", cfg.checkpoint_dir)
    code = run_child(summary_argv(cfg, sys.executable), child_environ(environ, cfg), interrupts,
                     echo=_echo)
    if code != 0:
        logger.warning("Summary failed (exit code %d); rerun it with: %s", code,
                       summary_hint(cfg, sys.executable))


def ensure_demo_data(ns: argparse.Namespace) -> None:
    """Generate the demo's synthetic data set if it is missing."""
    if ns.objective is not None or os.path.isdir(ns.data_root):
        return
    print(f"Generating the demo data set in {ns.data_root} ...", flush=True)
    result = subprocess.run([*module_argv(sys.executable, SYNTHETIC_MODULE), "make-synthetic",
                             ns.data_root, "--writers", "8", "--similarity", str(DEMO_SIMILARITY)],
                            env=child_environ(os.environ), check=False)
    if result.returncode != 0:
        raise UsageError(f"could not generate the demo data in {ns.data_root!r} (exit code "
                         f"{result.returncode}); see the output above")


# ---------------------------------------------------------------- output

def setup_logging(log_path: Path, host: str) -> progress.StatusLine:
    """Launcher messages to the terminal (around the status line) and to the launcher log; each
    line names the host, so the logs of several nodes can be told apart."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [launcher@{host}] %(levelname)s: %(message)s")
    to_file = logging.FileHandler(log_path)
    to_file.setFormatter(fmt)
    tty = sys.stdout.isatty()
    status = progress.StatusLine(sys.stdout, tty, log=(file_log if tty else logger).info,
                                 log_every_s=LOG_EVERY_S)
    to_term = progress.StatusAwareHandler(status)
    to_term.setFormatter(fmt)
    logging.basicConfig(level=logging.INFO, handlers=[to_term, to_file], force=True)
    file_log.handlers = [to_file]
    file_log.propagate = False
    import optuna

    optuna.logging.disable_default_handler()  # optuna's warnings go to both places too
    optuna.logging.enable_propagation()
    return status


def say(status: progress.StatusLine, text: str) -> None:
    """Print a human-facing line (banner, interrupt notice) and keep it in the launcher log."""
    status.clear()
    print(text, flush=True)
    for line in text.splitlines():
        file_log.info("%s", line)
    status.redraw()


def banner_head(cfg: SearchConfig, slots: Sequence[devices.WorkerSlot], workers_per_gpu: int,
                counts: study_lib.Counts, threads: int, host: str = "") -> str:
    """The banner's first part: devices, trials, folders (pure)."""
    to_run = max(0, cfg.n_trials - counts.finished)
    gpus = list(dict.fromkeys(s.device for s in slots if s.device is not None))
    devices_line = (f"GPUs: {', '.join(gpus)} ({workers_per_gpu} worker(s) per GPU)"
                    if gpus else f"GPUs: none, {len(slots)} CPU worker(s)")
    return "\n".join([
        RULE, "PARALLEL HYPERPARAMETER SEARCH", RULE, devices_line,
        f"Total trials: {cfg.n_trials} ({counts.finished} already finished, {to_run} to run)",
        f"Trials per {'GPU' if gpus else 'worker'}: "
        f"~{trials_per_worker(to_run, len(gpus) or len(slots))} "
        "(one shared budget: a free worker takes the next trial)",
        f"CPU threads per worker: {threads}",
        f"Checkpoint dir: {cfg.checkpoint_dir}",
        f"Data root: {cfg.data_root or '(not used by this objective)'}",
        f"Objective: {cfg.objective or 'built-in writer identification'} ({cfg.direction})",
        f"Study: {cfg.study_name} in {redact_url(cfg.storage_url)}",
        f"Host: {host or socket.gethostname()} (other launchers may share the study and its "
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


# ---------------------------------------------------------------- supervising the workers

@dataclasses.dataclass(frozen=True)
class Launch:
    """What one launcher run was asked to do, resolved before anything starts."""

    cfg: SearchConfig
    ns: argparse.Namespace
    slots: tuple[devices.WorkerSlot, ...]
    argv: tuple[str, ...]  # the user's flags, for the resume hint
    environ: Mapping[str, str]  # the environment the launcher was started with
    stamp: str  # YYYYmmdd_HHMMSS of this run's log files
    host: ownership.Host
    run: str  # this launcher run's identity, recorded in every trial its workers start

    @property
    def launcher_log(self) -> Path:
        return layout.logs_dir(self.cfg.checkpoint_dir) / log_name("launcher", self.host.name,
                                                                 self.stamp)


@dataclasses.dataclass
class Run:
    """What the launcher tracks while its workers run."""

    job: Launch
    study: optuna.Study
    ctl: Controller
    interrupts: Interrupts
    status: progress.StatusLine
    finished_at_start: int
    started: float = dataclasses.field(default_factory=time.monotonic)
    stop_signal: int | None = None
    usage_error: bool = False
    signals_seen: int = 0
    next_refresh: float = 0.0
    next_check: float = 0.0
    done: list[Worker] = dataclasses.field(default_factory=list)  # ended for want of budget
    waiting_for: int | None = None  # other launchers' trials this launcher waits for
    left_to_others: int = 0  # trials still running elsewhere when this launcher left (--no_wait)

    @property
    def cfg(self) -> SearchConfig:
        return self.job.cfg

    @property
    def stop_timeout(self) -> float:
        return self.job.ns.stop_timeout


def supervise(run: Run) -> None:
    """Poll the workers: restart the dead, stop on signals; once all have ended, wait for other
    launchers' trials (restarting ours if the budget opens again) unless --no_wait."""
    refresh_s = TTY_REFRESH_S if run.status.tty else LOG_EVERY_S
    while True:
        if run.interrupts.count > run.signals_seen:
            on_signal(run)
        for ended in run.ctl.poll():
            on_exit(run, ended)
        if not run.ctl.active() and not keep_going(run):
            return
        if time.monotonic() >= run.next_refresh:
            refresh_status(run)
            run.next_refresh = time.monotonic() + refresh_s
        time.sleep(POLL_S)


def keep_going(run: Run) -> bool:
    """Our workers have all ended: look at the study (at most every WAIT_POLL_S) and decide."""
    from psearch.engine import study as study_lib

    if run.stop_signal is not None or run.usage_error:
        return False
    if time.monotonic() < run.next_check:
        return True
    run.next_check = time.monotonic() + WAIT_POLL_S
    study_lib.recover_dead_trials(run.study, run.job.host, run.cfg.heartbeat_grace)
    counts = study_lib.count_trials(run.study.get_trials(deepcopy=False), run.cfg.direction)
    step = after_workers(counts.finished, counts.running, run.cfg.n_trials, len(run.done),
                         run.job.ns.no_wait)
    if step == "restart":
        restart_done_workers(run, study_lib.budget_left(counts, run.cfg.n_trials))
    elif step == "wait":
        if run.waiting_for is None:
            logger.info("This launcher's workers are done; waiting for %d trial(s) of other "
                        "launchers (their trials run again here if their launcher dies; "
                        "--no_wait leaves them instead)", counts.running)
        run.waiting_for = counts.running
        return True
    elif step == "leave":
        run.left_to_others = counts.running
    elif step == "stuck":
        logger.error("No trial runs anywhere and this launcher has no worker left to start one")
    run.waiting_for = None
    return step == "restart"


def restart_done_workers(run: Run, budget: int) -> None:
    """Start again (at most `budget` of) the workers that had ended for want of budget."""
    for worker in run.done[:budget]:
        logger.info("Budget open again (%d trial(s)): restarting worker %s", budget,
                    worker.slot.label)
        run.ctl.start(worker)
    del run.done[:budget]


def on_signal(run: Run) -> None:
    """First signal: forward it and give the workers --stop_timeout; second: kill at once."""
    if run.signals_seen == 0:
        run.stop_signal = run.interrupts.signum
        say(run.status, "\n🛑 INTERRUPT RECEIVED - Gracefully stopping all workers...")
        for w in run.ctl.running():
            say(run.status, f"Stopping worker on {w.slot.describe()}...")
        say(run.status, f"(each saves its trial and stops; killed after {run.stop_timeout:g} s; "
            "press Ctrl+C again to kill now)")
        run.ctl.request_stop(run.stop_signal, run.stop_timeout)
    if run.interrupts.count > 1:
        say(run.status, "Second interrupt: killing all workers now")
        run.ctl.kill_all()
    run.signals_seen = run.interrupts.count


def on_exit(run: Run, ended: Exit) -> None:
    """A worker process ended: say why, recover its trial, decide whether it runs again."""
    from psearch.engine import study as study_lib

    w, code, kind = ended.worker, ended.returncode, classify_exit(ended.returncode)
    stopping = run.stop_signal is not None or run.usage_error
    if kind == "done" and not stopping:
        run.done.append(w)
    if stopping or kind == "done":
        logger.info("Worker %s (pid %d) ended: %s", w.slot.label, ended.pid, describe_exit(code))
    elif kind == "usage":
        logger.error("Worker %s refused its arguments (exit code 2, see %s); stopping the run",
                     w.slot.label, w.log_path)
        run.usage_error = True
        run.ctl.request_stop(signal.SIGTERM, run.stop_timeout)
    elif kind == "failures":
        logger.warning("Worker %s stopped after too many failed trials in a row (see %s); it is "
                       "not restarted", w.slot.label, w.log_path)
    else:
        logger.warning("Worker %s (pid %d) died: %s (its log: %s)", w.slot.label, ended.pid,
                       describe_exit(code), w.log_path)
    if code != 0:  # a worker that did not end cleanly may have left its trial RUNNING
        reason = "interrupted" if stopping else "worker_died"
        failed = study_lib.fail_running_trials(run.study, reason, pid=ended.pid, run=run.job.run)
        if failed:
            logger.warning("Trial(s) %s of worker %s marked failed (%s): they run again",
                           failed, w.slot.label, reason)
    if kind == "died" and not stopping and not run.ctl.schedule_restart(w):
        logger.warning("Dropping %s: its worker keeps dying soon after starting",
                       w.slot.describe())
        if not run.ctl.active():
            logger.error("No worker is left running; stopping")


def refresh_status(run: Run, force_log: bool = False) -> study_lib.Counts:
    """Read the study (cheap: Optuna's cached storage reads only what changed), show the line."""
    from psearch.engine import study as study_lib

    counts = study_lib.count_trials(run.study.get_trials(deepcopy=False), run.cfg.direction)
    elapsed = time.monotonic() - run.started
    eta = progress.eta_s(counts.finished, run.finished_at_start, run.cfg.n_trials, elapsed)
    line = progress.status_line(counts, run.cfg.n_trials, elapsed, eta)
    if run.waiting_for is not None:
        line += f" | waiting for {run.waiting_for} trial(s) of other launchers"
    run.status.update(line, force_log)
    return counts


def final_report(run: Run, user_argv: Sequence[str]) -> int:
    """Print the outcome (and how to resume) and return the exit code."""
    counts = refresh_status(run, force_log=True)
    run.status.close()
    n = run.cfg.n_trials
    code = final_exit_code(counts.finished, n, run.usage_error, run.stop_signal,
                           left_to_others=run.left_to_others > 0)
    best = (f"best value {counts.best_value:.6g} (trial {counts.best_number})"
            if counts.best_value is not None else "no completed trial yet")
    lines = [RULE, f"{counts.finished}/{n} trials finished ({counts.complete} complete, "
             f"{counts.pruned} pruned; {counts.failed} failed runs); {best}"]
    if code == 0 and counts.finished < n:
        lines.append(f"{run.left_to_others} trial(s) still run on other launchers: they finish "
                     "the search (--no_wait)")
    if code == 2:
        lines.append("Search stopped (exit code 2): a worker refused its arguments; fix them (see "
                     "its log) and rerun")
    elif code != 0:
        why = {130: "interrupted", 143: "terminated"}.get(code, "not all trials finished")
        lines += [f"Search stopped ({why}, exit code {code}). Rerun the same command to resume:",
                  "  " + shlex.join([sys.executable, _script_path(),
                                     *(redact_url(arg) for arg in user_argv)])]
    lines.append(RULE)
    say(run.status, "\n".join(lines))
    return code


def _script_path() -> str:
    """This script's path as a user would type it: relative when under the current folder."""
    rel = os.path.relpath(__file__)
    return str(Path(__file__).resolve()) if rel.startswith("..") else rel


# ---------------------------------------------------------------- the run, start to end

def limit_own_threads() -> None:
    """Keep the launcher single-threaded: no BLAS helper threads (set before numpy loads).

    Linux sends a worker's PR_SET_PDEATHSIG again each time the dying launcher hands it on to
    another of its threads; a second SIGTERM would make the worker abandon its clean stop.
    Workers and helpers get the environment as it was (Launch.environ), not this.
    """
    os.environ.update({name: "1" for name in devices.THREAD_VARS})


def launch(job: Launch) -> int:
    """Prepare once, recover dead trials, run the workers, report, summarize.

    Other launchers may use the same study at the same time (other nodes, a requeued job, more
    GPUs): this one fails only trials that are provably dead, never a live one of theirs.
    """
    limit_own_threads()
    from psearch.engine import storage as storage_lib, study as study_lib

    status = setup_logging(job.launcher_log, job.host.name)
    interrupts = Interrupts()
    interrupts.install()
    logger.info("Launcher run %s", job.run)
    warning = storage_lib.network_filesystem_warning(job.cfg.storage_url, storage_lib.read_mounts())
    if warning:
        logger.warning("%s", warning)
    code = prepare(job.cfg, job.environ, interrupts)
    if code != 0:
        return code
    study = study_lib.open_study(job.cfg, create=False)
    study_lib.recover_dead_trials(study, job.host, job.cfg.heartbeat_grace)
    code = run_workers(job, study, interrupts, status)
    if not job.ns.no_summary:
        summarize(job.cfg, job.environ, interrupts)
    return code


def run_workers(job: Launch, study: optuna.Study, interrupts: Interrupts,
                status: progress.StatusLine) -> int:
    """Start the workers (unless the budget is already reached), supervise them, report."""
    from psearch.engine import study as study_lib

    counts = study_lib.count_trials(study.get_trials(deepcopy=False), job.cfg.direction)
    if counts.finished >= job.cfg.n_trials:
        say(status, f"The study already holds {counts.finished}/{job.cfg.n_trials} finished "
            "trials: nothing to run (raise --n_trials to run more)")
        return 0
    if interrupts.count:
        return 128 + interrupts.signum
    ctl = start_workers(job, status, counts)
    run = Run(job=job, study=study, ctl=ctl, interrupts=interrupts, status=status,
              finished_at_start=counts.finished)
    supervise(run)
    # Every worker of ours has ended: a trial of this run still RUNNING has no one behind it.
    study_lib.fail_running_trials(study, "interrupted" if run.stop_signal else "worker_died",
                                  run=job.run)
    return final_report(run, job.argv)


def start_workers(job: Launch, status: progress.StatusLine,
                  counts: study_lib.Counts) -> Controller:
    """Print the banner and start one worker per slot."""
    n_cores = len(os.sched_getaffinity(0))
    workers = build_workers(job.cfg, job.slots, job.stamp, job.environ, os.getpid(), n_cores,
                            job.host.name, job.run)
    say(status, banner_head(job.cfg, job.slots, job.ns.workers_per_gpu, counts,
                            devices.threads_per_worker(n_cores, len(job.slots)), job.host.name))
    ctl = Controller(workers)
    ctl.start_all()
    say(status, banner_tail(workers, job.cfg, job.launcher_log))
    return ctl


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse and validate, then launch; exit 0 only when the budget was reached."""
    cmdline.hide_url_passwords(sys.argv[1:])  # if not done yet (a console script): `ps` shows argv
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(with_demo_defaults(argv))
    try:
        if ns.stop_timeout < 0:
            raise UsageError(f"--stop_timeout must be 0 or more seconds, got {ns.stop_timeout:g}")
        slots = devices.choose_workers(ns.gpus, ns.cpu_workers, ns.workers_per_gpu, os.environ,
                                       devices.probe_gpus,
                                       cpu_fallback=DEMO_CPU_WORKERS if ns.demo else None)
        if ns.demo:
            ensure_demo_data(ns)
        cfg = config_from_args(ns)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C while the demo data is generated: nothing started yet
        return 128 + signal.SIGINT
    host = ownership.Host.current()
    return launch(Launch(cfg=cfg, ns=ns, slots=tuple(slots), argv=tuple(argv),
                         environ=dict(os.environ), stamp=time.strftime("%Y%m%d_%H%M%S"),
                         host=host, run=ownership.run_id(host)))


if __name__ == "__main__":
    raise SystemExit(main())
