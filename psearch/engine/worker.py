"""The sequential search on one device, and the worker that the parallel launcher starts per GPU.

    python single_gpu_hyperparameter_search.py --data_root D --checkpoint_dir C \
        --n_trials 20 --use_all_writers

Trials run one after another on `cuda:0` (the launcher pins a GPU through CUDA_VISIBLE_DEVICES)
or on the CPU. The study is `sqlite:///C/optuna_study.db`; `--n_trials` is the study's total of
finished trials, so rerunning the same command resumes and a larger number runs the difference.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import logging
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from psearch.engine import (atomic, children, config, layout, ownership, storage as storage_lib,
                            study as study_lib)
from psearch.engine.config import SearchConfig, add_search_args, config_from_args
from psearch.engine.errors import EXIT_TOO_MANY_FAILURES, UsageError
from psearch.engine.stopping import StopFlag, StopRequested, die_with_parent, install_stop_handlers

logger = logging.getLogger("worker")
Objective = Callable[[optuna.Trial, Path], float]
# A run of trials failing on their own merits (not interrupts) means something is wrong with the
# setup (out of memory at any size, a broken objective): stop instead of burning the budget.
MAX_CONSECUTIVE_FAILURES = 5


@dataclasses.dataclass(frozen=True)
class WorkerIdentity:
    """Who this process is, as the launcher's environment says (defaults: a stand-alone run)."""

    label: str = "single"
    rank: int = 0
    n_workers: int = 1
    managed: bool = False
    parent_pid: int | None = None
    cpu_threads: int | None = None
    run: str = ""  # the launcher run this worker belongs to (its own identity when stand-alone)

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> "WorkerIdentity":
        """Read PARALLEL_SEARCH_* variables (pure)."""
        def _int(name: str) -> int | None:
            return int(env[name]) if env.get(name, "").strip() else None

        return cls(label=env.get("PARALLEL_SEARCH_WORKER", "single"),
                   rank=_int("PARALLEL_SEARCH_RANK") or 0,
                   n_workers=_int("PARALLEL_SEARCH_N_WORKERS") or 1,
                   managed=env.get("PARALLEL_SEARCH_MANAGED") == "1",
                   parent_pid=_int("PARALLEL_SEARCH_PARENT_PID"),
                   cpu_threads=_int("PARALLEL_SEARCH_CPU_THREADS"),
                   run=env.get("PARALLEL_SEARCH_RUN", ""))


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line: the shared search flags plus --prepare_only, --no_summary."""
    parser = argparse.ArgumentParser(
        description="Sequential hyperparameter search for writer identification on one device.")
    add_search_args(parser)
    parser.add_argument("--prepare_only", action="store_true", help="validate the arguments and the "
                        "data, create or load the study, build the image cache, check pretrained "
                        "weights, then exit (the launcher runs this once before its workers) "
                        "(default: off)")
    parser.add_argument("--no_summary", action="store_true", help="skip the summary (summary/ and "
                        "best_overall/) at the end of a stand-alone run (default: write it, as the "
                        "parallel launcher does)")
    return parser


# ---------------------------------------------------------------- objectives

def load_objective(spec: str) -> Objective:
    """Import NAME from `path/to/file.py:NAME` or `package.module:NAME`."""
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            module_spec = importlib.util.spec_from_file_location(f"objective_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except Exception as exc:
        raise UsageError(f"--objective {spec!r}: cannot import {target!r} "
                         f"({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--objective {spec!r}: {target!r} has no callable {name!r}")
    return fn


def prepare(cfg: SearchConfig, who: WorkerIdentity) -> optuna.Study:
    """Validate, create/load the study, check stored settings, then build the shared image
    cache: a refused setting stops the run before anything is written."""
    writers = None
    if cfg.builtin_objective:
        from psearch.writer_id import objective as writer_objective

        writers = writer_objective.check_data(cfg)
    else:
        load_objective(cfg.objective)
    study = study_lib.open_study(cfg, who.rank, who.n_workers)
    study_lib.check_or_store_settings(study, study_lib.search_settings(cfg, writers),
                                      config.redact_url(cfg.storage_url))
    study_lib.check_or_store_heartbeat(study, cfg.heartbeat_grace)
    if cfg.builtin_objective:
        writer_objective.build_cache(cfg)
    return study


def make_objective(cfg: SearchConfig, stop: StopFlag, who: WorkerIdentity) -> Objective:
    """The objective this worker runs: a custom one, or the built-in writer-identification one."""
    if not cfg.builtin_objective:
        user_fn = load_objective(cfg.objective)

        def objective(trial: optuna.Trial, trial_dir: Path) -> float:
            stop.raise_now = True  # a custom objective cannot poll the flag: interrupt it
            try:
                return user_fn(trial, trial_dir)
            finally:
                stop.raise_now = False

        return objective
    from psearch.writer_id import objective as writer_objective

    return writer_objective.WriterObjective(cfg, stop, cpu_threads=who.cpu_threads)


# ---------------------------------------------------------------- one trial

def run_one_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective,
                  cfg: SearchConfig, stop: StopFlag | None = None
                  ) -> tuple[TrialState, str | None]:
    """Run a claimed trial and record its end in the study; returns (state, fail reason)."""
    trial_dir = layout.trial_dir(cfg.checkpoint_dir, trial.number)
    trial_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    state, reason, value = TrialState.FAIL, None, None
    with study_lib.Heartbeat(study, trial, storage_lib.heartbeat_interval_s(cfg.heartbeat_grace)):
        try:
            value = objective(trial, trial_dir)
            if value is None or not math.isfinite(float(value)):
                raise ValueError(f"objective returned {value!r}, not a finite number")
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except (StopRequested, KeyboardInterrupt):
            reason = "interrupted"
        except Exception as exc:  # any failure ends this trial, never the search
            reason = _failure_reason(exc, trial.number, trial_dir, stop)
        finally:
            _release_device_memory()
    if reason is not None:
        trial.set_user_attr("fail_reason", reason[:1000])
    study.tell(trial, float(value) if state == TrialState.COMPLETE else None, state=state,
               skip_if_finished=True)
    logger.info("Trial %d %s%s in %.1f s", trial.number, state.name,
                f" with value {float(value):.4f}" if state == TrialState.COMPLETE else
                (f" ({reason})" if reason else ""), time.time() - started)
    return state, reason


def _failure_reason(exc: Exception, number: int, trial_dir: Path, stop: StopFlag | None) -> str:
    """The fail reason of a trial that raised; its traceback goes to trial_dir/error.log."""
    if stop is not None and stop.requested:
        # A consequence of the stop (SIGTERM also ends the data-loader processes, say): the
        # trial did not fail on its own merits, so it runs again like any interrupted trial.
        logger.info("Trial %d ended by the stop (%s: %s)", number, type(exc).__name__, exc)
        return "interrupted"
    atomic.write_text(trial_dir / "error.log", traceback.format_exc())
    reason = f"{type(exc).__name__}: {exc}"
    logger.error("Trial %d failed: %s (traceback in %s)", number, reason, trial_dir / "error.log")
    return reason


def _release_device_memory() -> None:
    """Free what a trial left on the GPU, so the next trial (or an OOM retry) starts clean."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the search loop

def run_search(study: optuna.Study, cfg: SearchConfig, objective: Objective, stop: StopFlag,
               who: WorkerIdentity) -> int:
    """Claim and run trials until the budget is reached or a stop is asked for; an exit code."""
    failures_in_row = 0
    host = ownership.Host.current()
    # The checkpoint folder too: with one folder per node, the summary finds the trial's files.
    owner = {**ownership.owner_attrs(host, who.run or ownership.run_id(host), who.label),
             "checkpoint_dir": cfg.checkpoint_dir}
    while not stop.requested:
        try:
            trial = study_lib.claim_trial(study, cfg, owner)
        except StopRequested:
            break
        if trial is None:
            counts = study_lib.count_trials(study.get_trials(deepcopy=False), cfg.direction)
            logger.info("No budget left to start a trial (%d/%d finished, %d running here or on "
                        "other launchers): done", counts.finished, cfg.n_trials, counts.running)
            return 0
        logger.info("Trial %d started%s", trial.number,
                    f" (resumes trial {trial.user_attrs['resumed_from']})"
                    if "resumed_from" in trial.user_attrs else "")
        state, reason = run_one_trial(study, trial, objective, cfg, stop)
        failures_in_row = failures_in_row + 1 if state == TrialState.FAIL and \
            reason != "interrupted" else 0
        if failures_in_row >= MAX_CONSECUTIVE_FAILURES:
            logger.error("%d trials in a row failed (last: %s); stopping this worker. Fix the "
                         "cause (see trial_NNN/error.log) and rerun the same command to resume.",
                         failures_in_row, reason)
            return EXIT_TOO_MANY_FAILURES
    logger.warning("Stopped by signal; rerun the same command to resume")
    return stop.exit_code


def setup_logging(cfg: SearchConfig, who: WorkerIdentity) -> None:
    """Log lines carry the worker, host and pid; a stand-alone run also logs to
    CHECKPOINT_DIR/logs (its file named by host too: several nodes may share the folder)."""
    host = socket.gethostname()
    fmt = f"%(asctime)s [{who.label}@{host} pid %(process)d] %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if not who.managed:  # the launcher already sends a managed worker's output to its log file
        log_dir = layout.logs_dir(cfg.checkpoint_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_dir / f"single_gpu_{ownership.safe_host(host)}_"
                                            f"{time.strftime('%Y%m%d_%H%M%S')}.log"))
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def _open_for_run(cfg: SearchConfig, who: WorkerIdentity) -> optuna.Study:
    """A managed worker loads the launcher's study; a stand-alone run prepares it and recovers
    the trials of earlier runs that provably died (other users' live trials are left alone)."""
    if who.managed:
        return study_lib.open_study(cfg, who.rank, who.n_workers, create=False)
    study = prepare(cfg, who)
    study_lib.recover_dead_trials(study, ownership.Host.current(), cfg.heartbeat_grace)
    return study


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, prepare, run the search loop; exit codes 0, 2, 3, 130/143."""
    who = WorkerIdentity.from_environ(os.environ)
    stop = StopFlag()
    install_stop_handlers(stop)
    if who.parent_pid is not None:
        die_with_parent(who.parent_pid)
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns)
        setup_logging(cfg, who)
        if ns.prepare_only:
            prepare(cfg, who)
            return 0
        study = _open_for_run(cfg, who)
        objective = make_objective(cfg, stop, who)
        code = run_search(study, cfg, objective, stop, who)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StopRequested:
        code = stop.exit_code
    if not who.managed and not ns.no_summary:  # the launcher writes it for its workers
        summarize(cfg)
    return code


def summarize(cfg: SearchConfig) -> None:
    """End a stand-alone search as the launcher ends one: summary/ and best_overall/. A failure is
    logged, never changes the exit code."""
    logger.info("Summarizing results into %s", cfg.checkpoint_dir)
    try:
        code = subprocess.run(children.summary_argv(cfg, sys.executable),
                              env=children.child_environ(os.environ, cfg)).returncode
    except (KeyboardInterrupt, StopRequested):  # Ctrl+C during it: the search itself is saved
        code = 130
    if code != 0:
        logger.warning("Summary failed (exit code %d); rerun it with: %s", code,
                       children.summary_hint(cfg, sys.executable))


if __name__ == "__main__":
    raise SystemExit(main())
