"""The launcher at work: watch its workers until they have all ended (restart the dead, forward
signals, recover their trials), then wait while other launchers' trials run, taking over when
their launcher dies; and the final report with its exit code. Decisions are pure functions
(`classify_exit`, `final_exit_code`, `after_workers`); the rest acts on one `Run`."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from psearch.engine import console, devices, errors, faults, layout, ownership
from psearch.engine.config import SearchConfig
from psearch.engine.urls import redact_url
from psearch.engine.console import LOG_EVERY_S, RULE, TTY_REFRESH_S, say
from psearch.engine.controller import Controller, Exit, Interrupts, Worker
from psearch.engine.errors import FailReason, WorkerEnd, classify_exit

if TYPE_CHECKING:  # loaded once the launcher runs, after it has limited its BLAS threads
    import optuna

    from psearch.engine import study as study_lib

logger = logging.getLogger("launcher")

POLL_S = 0.2
# How often a launcher whose workers are done looks at the study for other launchers' trials.
WAIT_POLL_S = 2.0


def describe_exit(returncode: int) -> str:
    """'exit code 1' or 'killed by SIGKILL' for a Popen return code (pure)."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def final_exit_code(finished: int, n_trials: int, usage_error: bool,
                    stop_signal: int | None, left_to_others: bool = False,
                    disk_full: bool = False) -> int:
    """2 for a usage error, 1 when the disk filled up, 128+signal after a stop, else 0 when the
    budget was reached or the rest was left to other launchers (--no_wait), 1 when the search
    cannot get there (pure)."""
    if usage_error:
        return errors.EXIT_USAGE
    if disk_full:
        return errors.EXIT_FAILED
    if stop_signal is not None:
        return errors.signal_exit(stop_signal)
    return errors.EXIT_OK if finished >= n_trials or left_to_others else errors.EXIT_FAILED


def after_workers(finished: int, running: int, n_trials: int, restartable: int,
                  no_wait: bool, startable: int | None = None) -> str:
    """What a launcher whose workers have all ended does next (pure). `running` trials are other
    launchers' (ours have ended); `restartable` workers ended only for want of budget;
    `startable`: trials that may start now (default: what n_trials leaves).

    'finished': the study holds n_trials; 'restart': budget opened again (a trial elsewhere failed
    or its launcher died, or confirmation runs can start) and we have workers to take it; 'wait'
    / 'leave' (--no_wait): other launchers' trials still run; 'stuck': nothing runs anywhere and
    we cannot start a trial.
    """
    if finished >= n_trials:
        return "finished"
    if startable is None:
        startable = n_trials - finished - running
    if startable > 0 and restartable:
        return "restart"
    if running == 0:
        return "stuck"
    return "leave" if no_wait else "wait"


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
        name = layout.log_name("launcher", self.host.name, self.stamp)
        return layout.logs_dir(self.cfg.checkpoint_dir) / name


@dataclasses.dataclass
class Run:
    """What the launcher tracks while its workers run."""

    job: Launch
    study: optuna.Study
    ctl: Controller
    interrupts: Interrupts
    status: console.StatusLine
    finished_at_start: int
    started: float = dataclasses.field(default_factory=time.monotonic)
    stop_signal: int | None = None
    usage_error: bool = False
    signals_seen: int = 0
    escalations_seen: int = 0
    next_refresh: float = 0.0
    next_check: float = 0.0
    done: list[Worker] = dataclasses.field(default_factory=list)  # ended for want of budget
    cut_off: list[Worker] = dataclasses.field(default_factory=list)  # gave up on the storage
    unreachable_since: float | None = None  # since when the study is down and no worker runs
    gave_up: list[Worker] = dataclasses.field(default_factory=list)  # too many failures in a row
    disk_full: bool = False  # a worker (or this launcher) found no space left: the run stops
    storage_trouble: str | None = None  # the storage error being retried, logged once
    waiting_for: int | None = None  # other launchers' trials this launcher waits for
    left_to_others: int = 0  # trials still running elsewhere when this launcher left (--no_wait)
    budget: Any = None  # study.Budget as last read (refresh_status)

    @property
    def cfg(self) -> SearchConfig:
        return self.job.cfg

    @property
    def stop_timeout(self) -> float:
        return self.job.ns.stop_timeout

    @property
    def stopping(self) -> bool:
        """A stop was asked for (a signal, a refused argument, a full disk)."""
        return self.stop_signal is not None or self.usage_error or self.disk_full


def supervise(run: Run) -> None:
    """Poll the workers: restart the dead, stop on signals; once all have ended, wait for other
    launchers' trials (restarting ours if the budget opens again) unless --no_wait."""
    refresh_s = TTY_REFRESH_S if run.status.tty else LOG_EVERY_S
    while True:
        if run.interrupts.count > run.signals_seen:
            on_signal(run)
        try:
            for ended in run.ctl.poll():
                on_exit(run, ended)
            if run.cut_off and not run.stopping:
                restart_cut_off(run)
            if not run.ctl.active() and not run.cut_off and not keep_going(run):
                return
            reopen_while_busy(run)
            if time.monotonic() >= run.next_refresh:
                refresh_status(run)
                run.next_refresh = time.monotonic() + refresh_s
            run.storage_trouble = run.unreachable_since = None
        except Exception as exc:  # noqa: BLE001 - the storage or the disk, never a traceback
            on_storage_error(run, exc)
            if storage_lost(run):
                return
        run.interrupts.wait(POLL_S)  # woken at once when a worker ends or a signal comes


def restart_cut_off(run: Run) -> None:
    """Start the workers that gave up on the storage again as soon as the study answers (a
    read; raises the storage error while it does not)."""
    if time.monotonic() < run.next_check:
        return
    run.next_check = time.monotonic() + WAIT_POLL_S
    run.study.get_trials(deepcopy=False)
    for worker in run.cut_off:
        logger.info("The study answers again: restarting worker %s", worker.slot.label)
        run.ctl.start(worker)
    run.cut_off.clear()


def storage_lost(run: Run) -> bool:
    """The study is unreachable and no worker of ours has run for as long as a worker waits out
    an outage (they gave up; this launcher waited as long again to restart them): the search
    cannot go on from here (rerunning the same command resumes it)."""
    now = time.monotonic()
    if run.ctl.active() or run.stopping:
        run.unreachable_since = None
        return False
    if run.unreachable_since is None:
        run.unreachable_since = now
    if now - run.unreachable_since < faults.outage_s():
        return False
    logger.error("The study has not answered for %.0f s with no worker of this launcher "
                 "running (%s); stopping", now - run.unreachable_since, run.storage_trouble)
    return True


def on_storage_error(run: Run, exc: Exception) -> None:
    """The study could not be read or written: a full disk stops the run; anything else (a
    locked or dropped database) is logged once and tried again on the next round."""
    if faults.is_disk_full(exc):
        stop_for_full_disk(run, "this launcher")
        return
    if not faults.is_storage_error(exc):
        raise exc
    reason = faults.one_line(exc)
    if run.storage_trouble != reason:
        logger.warning("The study cannot be reached (%s); trying again", reason)
    run.storage_trouble = reason


def stop_for_full_disk(run: Run, who: str) -> None:
    """No space left: stop every worker (their trials are saved where they can be) once."""
    if run.disk_full:
        return
    run.disk_full = True
    logger.error("No space left on the device (found by %s): %s. Stopping all workers; free "
                 "space, then rerun the same command to resume", who,
                 faults.free_space_line(run.cfg.checkpoint_dir))
    run.ctl.request_stop(signal.SIGTERM, run.stop_timeout)


def keep_going(run: Run) -> bool:
    """Our workers have all ended: look at the study (at most every WAIT_POLL_S) and decide."""
    from psearch.engine import study as study_lib

    if run.stopping:
        return False
    if time.monotonic() < run.next_check:
        return True
    run.next_check = time.monotonic() + WAIT_POLL_S
    study_lib.recover_dead_trials(run.study, run.job.host, run.cfg.heartbeat_grace)
    trials = run.study.get_trials(deepcopy=False)
    counts = study_lib.count_trials(trials, run.cfg.direction)
    left = study_lib.budget(trials, run.cfg.n_trials, study_lib.Confirmation.of(run.cfg))
    step = after_workers(left.done, counts.running, left.total, len(run.done),
                         run.job.ns.no_wait, left.startable)
    if step == "restart":
        restart_done_workers(run, left.startable)
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


def reopen_while_busy(run: Run) -> None:
    """Some workers still run and others ended for want of budget: start those again when trials
    may start now (the search ended and confirmation runs can go on every free device)."""
    from psearch.engine import study as study_lib

    if run.stopping or not run.done or run.cfg.confirm_top <= 0:
        return
    if time.monotonic() < run.next_check:
        return
    run.next_check = time.monotonic() + WAIT_POLL_S
    left = study_lib.budget(run.study.get_trials(deepcopy=False), run.cfg.n_trials,
                            study_lib.Confirmation.of(run.cfg))
    if left.startable > 0:
        restart_done_workers(run, left.startable)


def restart_done_workers(run: Run, budget: int) -> None:
    """Start again (at most `budget` of) the workers that had ended for want of budget."""
    for worker in run.done[:budget]:
        logger.info("Budget open again (%d trial(s)): restarting worker %s", budget,
                    worker.slot.label)
        run.ctl.start(worker)
    del run.done[:budget]


def on_signal(run: Run) -> None:
    """First signal: forward it and give the workers --stop_timeout; a second Ctrl+C: kill at
    once. A repeated SIGTERM/SIGHUP changes nothing (SLURM repeats them; see Interrupts)."""
    if run.signals_seen == 0:
        run.stop_signal = run.interrupts.signum
        say(run.status, "\n🛑 INTERRUPT RECEIVED - Gracefully stopping all workers...")
        for w in run.ctl.running():
            say(run.status, f"Stopping worker on {w.slot.describe()}...")
        say(run.status, f"(each saves its trial and stops; killed after {run.stop_timeout:g} s; "
            "press Ctrl+C again to kill now)")
        run.ctl.request_stop(run.stop_signal, run.stop_timeout)
    if run.interrupts.escalations > run.escalations_seen:
        say(run.status, "Second interrupt: killing all workers now")
        run.ctl.kill_all()
    elif run.interrupts.count > 1 and run.signals_seen > 0:
        logger.info("Signal received again: still stopping gracefully (workers are killed after "
                    "--stop_timeout %g s; Ctrl+C kills now)", run.stop_timeout)
    run.signals_seen = run.interrupts.count
    run.escalations_seen = run.interrupts.escalations


def on_exit(run: Run, ended: Exit) -> None:
    """A worker process ended: say why, recover its trial, decide whether it runs again."""
    from psearch.engine import study as study_lib

    w, code, kind = ended.worker, ended.returncode, classify_exit(ended.returncode)
    stopping = run.stopping
    if kind == WorkerEnd.DONE and not stopping:
        run.done.append(w)
    if stopping or kind == WorkerEnd.DONE:
        logger.info("Worker %s (pid %d) ended: %s", w.slot.label, ended.pid, describe_exit(code))
    elif kind == WorkerEnd.USAGE:
        logger.error("Worker %s refused its arguments (exit code 2, see %s); stopping the run",
                     w.slot.label, w.log_path)
        run.usage_error = True
        run.ctl.request_stop(signal.SIGTERM, run.stop_timeout)
    elif kind == WorkerEnd.FAILURES:
        run.gave_up.append(w)
        logger.warning("Worker %s stopped after too many failed trials in a row (see %s); it is "
                       "not restarted", w.slot.label, w.log_path)
    elif kind == WorkerEnd.NO_DEVICE:
        logger.error("Worker %s cannot use %s (CUDA does not see it; see %s): that slot is "
                     "stopped, it never trains on the CPU instead", w.slot.label,
                     w.slot.describe(), w.log_path)
    elif kind == WorkerEnd.TIMEOUT:
        logger.warning("Worker %s: its trial ran past --trial_timeout %g s and was failed; its "
                       "processes were killed and it starts again", w.slot.label,
                       run.cfg.trial_timeout or 0)
    elif kind == WorkerEnd.DISK_FULL:
        stop_for_full_disk(run, f"worker {w.slot.label}")
    elif kind == WorkerEnd.STORAGE:
        run.cut_off.append(w)
        logger.warning("Worker %s gave up on the study, unreachable for %.0f s (see %s); it starts "
                       "again once the study answers", w.slot.label, faults.outage_s(),
                       w.log_path)
    else:
        logger.warning("Worker %s (pid %d) died: %s (its log: %s)", w.slot.label, ended.pid,
                       describe_exit(code), w.log_path)
    if code != 0:  # a worker that did not end cleanly may have left its trial RUNNING
        reason = FailReason.INTERRUPTED if run.stopping else FailReason.WORKER_DIED
        try:
            failed = study_lib.fail_running_trials(run.study, reason, pid=ended.pid,
                                                   run=run.job.run)
        except Exception as exc:  # noqa: BLE001 - the study is down: recovered once it is back
            if not faults.is_transient_storage_error(exc):
                raise
            failed = []
            logger.warning("Worker %s's trial cannot be marked failed now (%s); it is recovered "
                           "as crashed once the study answers", w.slot.label, faults.one_line(exc))
        if failed:
            logger.warning("Trial(s) %s of worker %s marked failed (%s): they run again",
                           failed, w.slot.label, reason)
    if kind == WorkerEnd.TIMEOUT and not run.stopping:
        run.ctl.start(w)  # the hung trial is over; the slot itself is fine
    elif kind == WorkerEnd.DIED and not stopping and not run.ctl.schedule_restart(w):
        logger.warning("Dropping %s: its worker keeps dying soon after starting",
                       w.slot.describe())
        if not run.ctl.active():
            logger.error("No worker is left running; stopping")


def refresh_status(run: Run, force_log: bool = False) -> study_lib.Counts:
    """Read the study (cheap: Optuna's cached storage reads only what changed), show the line."""
    from psearch.engine import study as study_lib

    trials = run.study.get_trials(deepcopy=False)
    counts = study_lib.count_trials(trials, run.cfg.direction)
    left = study_lib.budget(trials, run.cfg.n_trials, study_lib.Confirmation.of(run.cfg))
    elapsed = time.monotonic() - run.started
    eta = console.eta_s(left.done, run.finished_at_start, left.total, elapsed)
    line = console.status_line(
        counts, run.cfg.n_trials, elapsed, eta,
        devices.per_trial_words(run.job.slots, run.cfg.gpus_per_trial),
        finished=left.finished,
        confirming=(left.confirm_done, left.confirm_planned) if left.confirming else None)
    if run.waiting_for is not None:
        line += f" | waiting for {run.waiting_for} trial(s) of other launchers"
    run.status.update(line, force_log)
    run.budget = left
    return counts


def final_report(run: Run, user_argv: Sequence[str]) -> int:
    """Print the outcome (and how to resume) and return the exit code."""
    try:
        counts = refresh_status(run, force_log=True)
    except Exception as exc:  # noqa: BLE001 - a study that stayed down: one line, no traceback
        if not faults.is_transient_storage_error(exc):
            raise
        run.status.close()
        code = (errors.signal_exit(run.stop_signal) if run.stop_signal is not None
                else errors.EXIT_FAILED)
        say(run.status, "\n".join([
            RULE, f"Search stopped: the study cannot be reached ({faults.one_line(exc)}). "
            "Nothing is lost: rerun the same command to resume once it answers again:",
            "  " + resume_command(user_argv), RULE]))
        return code
    run.status.close()
    n, left = run.cfg.n_trials, run.budget
    code = final_exit_code(left.done, left.total, run.usage_error, run.stop_signal,
                           left_to_others=run.left_to_others > 0, disk_full=run.disk_full)
    best = (f"best value {counts.best_value:.6g} (trial {counts.best_number})"
            if counts.best_value is not None else "no completed trial yet")
    lines = [RULE, f"{min(left.finished, n)}/{n} trials finished ({counts.complete} complete, "
             f"{counts.pruned} pruned; {counts.failed} failed runs); {best}"]
    if run.cfg.confirm_top:
        lines.append(f"Confirmation: {left.confirm_done}/{left.confirm_planned} runs over "
                     f"(the {run.cfg.confirm_top} best sets x {run.cfg.confirm_seeds} seeds)"
                     + chosen_by_mean(run))
    if code == 0 and not left.complete:
        lines.append(f"{run.left_to_others} trial(s) still run on other launchers: they finish "
                     "the search (--no_wait)")
    if code == 2:
        lines.append("Search stopped (exit code 2): a worker refused its arguments; fix them (see "
                     "its log) and rerun")
    elif run.disk_full:
        lines += [f"Search stopped: no space left on the device "
                  f"({faults.free_space_line(run.cfg.checkpoint_dir)}). Free space, then rerun "
                  "the same command to resume:", "  " + resume_command(user_argv)]
    elif code != 0:
        if run.gave_up and run.stop_signal is None:
            lines.append(f"{len(run.gave_up)} worker(s) stopped after {errors.MAX_CONSECUTIVE_FAILURES} failed "
                         "trials in a row: fix the cause first (trial_NNN/error.log, the "
                         "fail_reason in trials.csv, the worker logs)")
        why = next((words for sig, words in errors.SIGNAL_WORDS.items()
                    if code == errors.signal_exit(sig)), "not all trials finished")
        lines += [f"Search stopped ({why}, exit code {code}). Rerun the same command to resume:",
                  "  " + resume_command(user_argv)]
    lines.append(RULE)
    say(run.status, "\n".join(lines))
    return code


def chosen_by_mean(run: Run) -> str:
    """'; chosen by mean: the set of trial 3 (0.812 over 3 runs), its best run trial 9' once a
    confirmation run has completed (details in summary/report.md)."""
    from psearch.engine import confirm

    sets = confirm.set_results(run.study.get_trials(deepcopy=False), run.cfg.direction)
    if not sets:
        return ""
    best = sets[0]
    return (f"; chosen by mean: the set of trial {best.origin} ({best.mean:.4g} over {best.n} "
            f"runs), its best run trial {best.best_run(run.cfg.direction)} "
            "(summary/report.md)")


def resume_command(user_argv: Sequence[str], program: str | None = None,
                   python: str = sys.executable) -> str:
    """The command that resumes this run as the user started it: `python parallel_search.py …`
    or the console script `parallel-search …`, the flags as typed but for a password (pure but
    for the defaults: this process's argv[0] and interpreter)."""
    program = sys.argv[0] if program is None else program
    prefix = [python, program] if program.endswith(".py") else [program]
    return shlex.join([*prefix, *(redact_url(arg) for arg in user_argv)])
