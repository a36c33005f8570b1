"""The sequential search on one device, and the worker that the parallel launcher starts per GPU.

    python single_gpu_hyperparameter_search.py --data_root D --checkpoint_dir C \
        --n_trials 20 --use_all_writers

Trials run one after another on `cuda:0` (the launcher pins a GPU through CUDA_VISIBLE_DEVICES)
or on the CPU. The study is `sqlite:///C/optuna_study.db`; `--n_trials` is the study's total of
finished trials, so rerunning the same command resumes and a larger number runs the difference.
A fault ends a trial with a reason, never the search (trial.py); the exit codes that end a worker
are in errors.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

import optuna
from optuna.trial import TrialState

from psearch.engine import (cli, config, faults, layout, objectives, ownership, procfs,
                            prior_trials, ranks, space as space_lib, spawn, study as study_lib, urls,
                            watchers)
from psearch.engine.config import SearchConfig, add_search_args, config_from_args
from psearch.engine.console import DeferredFileHandler
from psearch.engine.errors import (EXIT_DISK_FULL, EXIT_NO_DEVICE, EXIT_OK, EXIT_STORAGE,
                                   EXIT_TOO_MANY_FAILURES, EXIT_TRIAL_TIMEOUT, EXIT_USAGE,
                                   MAX_CONSECUTIVE_FAILURES, DeviceUnavailable, UsageError)
from psearch.engine.stopping import StopFlag, StopRequested, die_with_parent, install_stop_handlers
from psearch.engine.worker_env import RUN_VAR, WorkerIdentity
from psearch.engine.trial import (TAKEN_OVER, TIMEOUT, Objective, drop_resume_checkpoints,
                                  record_end, run_one_trial)

logger = logging.getLogger("worker")


class WorkerExit(Exception):
    """End the worker with `code`; the reason was logged where it was found."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def build_parser(default: objectives.ObjectiveKind | None = None) -> argparse.ArgumentParser:
    """The worker's command line: the shared search flags (the default objective's among them)
    plus --prepare_only, --no_summary."""
    parser = cli.Parser(
        short_usage="--data_root D --checkpoint_dir C --n_trials N [options]"
        if default is not None else "--objective FILE.py:NAME --checkpoint_dir C --n_trials N",
        description="Sequential hyperparameter search on one device.")
    add_search_args(parser, default)
    parser.add_argument("--prepare_only", action="store_true", help="validate the arguments and the "
                        "data, create or load the study, build the image cache, check pretrained "
                        "weights, then exit (the launcher runs this once before its workers) "
                        "(default: off)")
    parser.add_argument("--no_summary", action="store_true", help="skip the summary (summary/ and "
                        "best_overall/) at the end of a stand-alone run (default: write it, as the "
                        "parallel launcher does)")
    return parser


def open_checked_study(cfg: SearchConfig, who: WorkerIdentity,
                       check: Callable[[SearchConfig], dict] | None = None) -> optuna.Study:
    """Check, then create or load the study: the objective's data (or a custom objective itself,
    through `check`), the storage and the settings stored with an existing study are checked
    before anything is created, so a refused run leaves no trace; a new study gets its settings;
    then the known sets of --enqueue and the trials of --warm_start are added once."""
    kind = cfg.objective_kind
    objective_settings = (check or kind.check)(cfg)
    prior = prior_trials.read_source(cfg)  # an unreadable source refuses the run here
    study = study_lib.open_study(cfg, who.rank, who.n_workers)
    study_lib.check_or_store_settings(study, study_lib.search_settings(cfg, objective_settings),
                                      urls.redact_url(cfg.storage_url), cfg.heartbeat_grace,
                                      study_lib.legacy_settings(cfg))
    prior_trials.add(study, cfg, prior)
    return study


def prepare(cfg: SearchConfig, who: WorkerIdentity,
            log_file: DeferredFileHandler | None = None) -> optuna.Study:
    """Check everything, then write (`open_checked_study`); then the log file and what the
    objective prepares once (the built-in one: its shared image cache)."""
    study = open_checked_study(cfg, who)
    if log_file is not None:
        log_file.open(layout.logs_dir(cfg.checkpoint_dir) / layout.log_name(
            "single_gpu", socket.gethostname(), time.strftime("%Y%m%d_%H%M%S")))
    logger.info("%s", spawn.PREPARED_MARKER)
    cfg.objective_kind.prepare(cfg)
    return study


def make_objective(cfg: SearchConfig, who: WorkerIdentity, stop: StopFlag) -> Objective:
    """The objective this worker runs (WorkerExit EXIT_NO_DEVICE when pinned to a GPU that CUDA
    cannot use)."""
    os.environ[ranks.WORLD_SIZE_VAR] = str(cfg.gpus_per_trial)  # ranks.run_ranks' default
    if cfg.space_file is not None:
        os.environ[space_lib.SPACE_VAR] = cfg.space_file  # space.given() in a user's objective
    try:
        return cfg.objective_kind.make(cfg, stop, who.cpu_threads)
    except DeviceUnavailable as exc:
        logger.error("%s", exc)
        raise WorkerExit(EXIT_NO_DEVICE) from None


# ---------------------------------------------------------------- the search loop

def run_search(study: optuna.Study, cfg: SearchConfig, objective: Objective, stop: StopFlag,
               who: WorkerIdentity) -> int:
    """Claim and run trials until the budget is reached or a stop is asked for; an exit code."""
    cwd = os.getcwd()  # where a stand-alone worker restarts after a timeout
    # The checkpoint folder too: with one folder per node, the summary finds the trial's files.
    owner = {**ownership.owner_attrs(ownership.Host.current(), who.run, who.label),
             "checkpoint_dir": cfg.checkpoint_dir}
    failures_in_row = study_lib.failures_in_row(study.get_trials(deepcopy=False), who.run,
                                                who.label)
    while not stop.requested:
        try:
            trial = faults.retry(lambda: study_lib.claim_trial(
                study, cfg, owner, cancelled=lambda: stop.requested), "Claiming a trial",
                faults.outage_delays(), cancelled=lambda: stop.requested)
        except StopRequested:
            break
        except Exception:  # noqa: BLE001 - the storage, given up on because of a stop
            if stop.requested:
                break
            raise
        if trial is None:
            trials = study.get_trials(deepcopy=False)
            left = study_lib.budget(trials, cfg.n_trials, study_lib.Confirmation.of(cfg))
            confirming = (f", confirmation {left.confirm_done}/{left.confirm_planned}"
                          if cfg.confirm_top else "")
            logger.info("No budget left to start a trial (%d/%d finished%s, %d running here or "
                        "on other launchers): done", min(left.finished, cfg.n_trials),
                        cfg.n_trials, confirming, study_lib.count_trials(trials).running)
            return EXIT_OK
        if stop.requested:  # it came while the trial was being claimed: the trial must not run
            record_end(study, trial, TrialState.FAIL, None, study_lib.INTERRUPTED)
            break
        logger.info("Trial %d started%s%s", trial.number,
                    f" (resumes trial {trial.user_attrs['resumed_from']})"
                    if "resumed_from" in trial.user_attrs else "",
                    f" (confirms trial {trial.user_attrs['confirms']} with seed "
                    f"{trial.user_attrs.get('seed')})" if "confirms" in trial.user_attrs else "")
        on_timeout = functools.partial(_time_out, study, trial, cfg, who, stop,
                                       procfs.boot_ticks(), cwd)
        state, reason = run_one_trial(study, trial, objective, cfg, stop, on_timeout)
        if reason == faults.DISK_FULL_REASON:
            return _disk_full(cfg)
        if reason != TAKEN_OVER:  # another launcher's now: neither a failure nor a success
            failures_in_row = failures_in_row + 1 if state == TrialState.FAIL and \
                reason not in study_lib.RETRYABLE_REASONS else 0
        if failures_in_row >= MAX_CONSECUTIVE_FAILURES:
            logger.error("%d trials in a row failed (last: %s); stopping this worker. Fix the "
                         "cause (see trial_NNN/error.log) and rerun the same command to resume.",
                         failures_in_row, reason)
            return EXIT_TOO_MANY_FAILURES
    logger.warning("Stopped by signal; rerun the same command to resume")
    return stop.exit_code


def _time_out(study: optuna.Study, trial: optuna.Trial, cfg: SearchConfig, who: WorkerIdentity,
              stop: StopFlag, trial_started: int, cwd: str) -> None:
    """On the watchdog's thread, for a trial past --trial_timeout: record it FAIL ('timeout'),
    then end what runs it. A managed worker exits (its launcher kills the process group and
    restarts it); a stand-alone one kills what the trial started and starts itself afresh."""
    logger.error("Trial %d ran past --trial_timeout %g s: it fails with reason %r%s",
                 trial.number, cfg.trial_timeout, TIMEOUT,
                 "" if who.managed else "; restarting this worker")
    try:
        record_end(study, trial, TrialState.FAIL, None, TIMEOUT)
        drop_resume_checkpoints(study, trial.number, cfg)
    except Exception as exc:  # noqa: BLE001 - the restarted worker records it (_open_for_run)
        logger.error("Could not record the timeout of trial %d: %s", trial.number,
                     faults.one_line(exc))
    try:
        # What the trial started, also in process groups of its own (a training program's):
        # the launcher's kill of this worker's group would not reach those.
        watchers.kill_processes(watchers.trial_processes(
            os.getpid(), procfs.read_processes(), trial_started))
        if not who.managed and not stop.requested:
            watchers.restart_self({RUN_VAR: who.run}, cwd)
    except Exception as exc:  # noqa: BLE001 - then this process ends all the same
        logger.error("Could not restart this worker: %s", faults.one_line(exc))
    watchers.exit_now(stop.exit_code if stop.requested else EXIT_TRIAL_TIMEOUT)


def _disk_full(cfg: SearchConfig) -> int:
    logger.error("No space left on the device (%s): stopping this worker. Free space, then rerun "
                 "the same command to resume", faults.free_space_line(cfg.checkpoint_dir))
    return EXIT_DISK_FULL


def setup_logging(cfg: SearchConfig, who: WorkerIdentity) -> DeferredFileHandler | None:
    """Log lines carry the worker, host and pid. A stand-alone run also logs to CHECKPOINT_DIR/logs
    (the file named by host: several nodes may share the folder), kept in memory until `prepare`
    has checked everything: a refused run leaves no file behind."""
    host = socket.gethostname()
    fmt = logging.Formatter(f"%(asctime)s [{who.label}@{host} pid %(process)d] %(levelname)s "
                            "%(name)s: %(message)s")
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(fmt)
    # the launcher already sends a managed worker's output to its log file
    log_file = None if who.managed else DeferredFileHandler(fmt)
    logging.basicConfig(level=logging.INFO, handlers=[to_stderr, *filter(None, [log_file])],
                        force=True)
    logging.raiseExceptions = False  # a line that cannot be written (full disk) is dropped
    logging.getLogger("PIL").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    return log_file


def _open_for_run(cfg: SearchConfig, who: WorkerIdentity,
                  log_file: DeferredFileHandler | None) -> optuna.Study:
    """A managed worker loads the launcher's study; a stand-alone run prepares it and recovers
    the trials of earlier runs that provably died (other users' live trials are left alone)."""
    if who.managed:
        return study_lib.open_study(cfg, who.rank, who.n_workers, create=False)
    study = prepare(cfg, who, log_file)
    # A trial still RUNNING under this very process and run was timed out before this process
    # restarted itself, and its end could not be recorded then.
    study_lib.fail_running_trials(study, TIMEOUT, pid=os.getpid(), run=who.run)
    study_lib.recover_dead_trials(study, ownership.Host.current(), cfg.heartbeat_grace)
    return study


def main(argv: Sequence[str] | None = None,
         default: objectives.ObjectiveKind | None = None) -> int:
    """Entry point: parse, prepare, run the search loop; the exit codes of errors.py, 1 when the
    study stayed unreachable, 128+N after signal N. `default`: the objective without
    --objective (the entry point's: the built-in one)."""
    who = WorkerIdentity.from_environ(os.environ)
    stop = StopFlag()
    install_stop_handlers(stop)
    if who.parent_pid is not None:
        die_with_parent(who.parent_pid)
    ns = build_parser(default).parse_args(argv)
    if not who.run:  # a stand-alone run is a run of its own (kept across a restart: RUN_VAR)
        who = dataclasses.replace(who, run=ownership.run_id(ownership.Host.current()))
    code = _run(ns, default, who, stop)
    _exit_if_threads_linger(code)
    return code


def _run(ns: argparse.Namespace, default: objectives.ObjectiveKind | None, who: WorkerIdentity,
         stop: StopFlag) -> int:
    try:
        cfg = config_from_args(ns, objectives.choose(ns, default))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log_file = setup_logging(cfg, who)
    try:
        if ns.prepare_only:
            prepare(cfg, who, log_file)
            return EXIT_OK
        objective = make_objective(cfg, who, stop)
        code = run_search(_open_for_run(cfg, who, log_file), cfg, objective, stop, who)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WorkerExit as exc:
        return exc.code
    except StopRequested:
        code = stop.exit_code
    except Exception as exc:  # noqa: BLE001 - a full disk or a lost study: one line, no traceback
        return _fatal(exc, cfg)
    if not who.managed and not ns.no_summary:  # the launcher writes it for its workers
        summarize(cfg)
    return stop.exit_code if stop.requested else code  # a Ctrl+C during the summary too


def _fatal(exc: Exception, cfg: SearchConfig) -> int:
    """The exit code for an error that ends the worker: a full disk, a study that stayed
    unreachable through every retry (its trial is recovered on the next run); a bug re-raises."""
    if faults.is_disk_full(exc):
        return _disk_full(cfg)
    if not faults.is_storage_error(exc):
        raise exc
    logger.error("The study cannot be reached (%s); stopping this worker. Rerun the same "
                 "command to resume", faults.one_line(exc))
    return EXIT_STORAGE


def _exit_if_threads_linger(code: int) -> None:
    """A thread that an objective started and left running would keep this process alive after
    main() forever (past its launcher's death too): then exit without waiting for it."""
    stray = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if stray:
        logger.warning("Exiting without waiting for thread(s) the objective left running: %s",
                       ", ".join(stray))
        logging.shutdown()
        watchers.exit_now(code)


def summarize(cfg: SearchConfig) -> None:
    """End a stand-alone search as the launcher ends one: summary/ and best_overall/. A failure is
    logged, never changes the exit code (a Ctrl+C during it does: the caller sees the StopFlag)."""
    logger.info("Summarizing results into %s", cfg.checkpoint_dir)
    try:
        code = subprocess.run(spawn.summary_argv(cfg, sys.executable),
                              env=spawn.child_environ(os.environ, cfg)).returncode
    except (KeyboardInterrupt, StopRequested):  # a second Ctrl+C: the search itself is saved
        code = 130
    if code != 0:
        logger.warning("Summary failed (exit code %d); rerun it with: %s", code,
                       spawn.summary_hint(cfg, sys.executable))


if __name__ == "__main__":
    raise SystemExit(main())
