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
import signal
import sys
import time
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from psearch.engine import cli, console, devices, layout, objectives, ownership, spawn, urls
from psearch.engine.spawn import (PREPARED_MARKER, child_environ, module_argv, summary_argv,
                                     summary_hint)
from psearch.engine.config import (SearchConfig, add_search_args, config_from_args, config_to_argv,
                                   space_in_force)
from psearch.engine.console import banner_head, banner_tail, file_log, say, setup_logging
from psearch.engine.errors import (EXIT_DISK_FULL, EXIT_FAILED, EXIT_OK, EXIT_USAGE, FailReason,
                                   UsageError, signal_exit)
from psearch.engine.objectives import ObjectiveKind
from psearch.engine.worker_env import WorkerIdentity
from psearch.engine.supervisor import Launch, Run, final_report, supervise
from psearch.engine.controller import Controller, Interrupts, Worker, run_child

if TYPE_CHECKING:  # loaded in launch(), after the launcher has limited its BLAS threads
    import optuna

    from psearch.engine import study as study_lib

logger = logging.getLogger("launcher")

DEMO_CPU_WORKERS = 2
# The preparation's progress lines are shown once it has checked everything, or after this long.
PREPARE_HOLD_S = 10.0


def build_parser(default: ObjectiveKind | None = None) -> argparse.ArgumentParser:
    """The worker's search flags (the default objective's among them) plus the launcher's own;
    every help states its default."""
    parser = cli.Parser(short_usage="--data_root D --checkpoint_dir C --n_trials N [options]"
                        if default is not None
                        else "--objective FILE.py:NAME --checkpoint_dir C --n_trials N [options]",
                        description="Parallel hyperparameter search: one worker per "
                                     "GPU sharing one Optuna study and one exact trial budget.")
    add_search_args(parser, default)
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
    a("--show_space", action="store_true", help="print the search space in force (the "
      "objective's default, or --space FILE's) as YAML ready to copy and edit, then exit "
      "(default: off)")
    if default is not None and default.demo_defaults:
        a("--demo", action="store_true", help="generate a small synthetic data set (if missing) "
          f"and run a short search: {' '.join(default.demo_defaults)}, {DEMO_CPU_WORKERS} CPU "
          "workers without a GPU; explicit flags win (default: off)")
    return parser


def with_demo_defaults(argv: Sequence[str], default: ObjectiveKind | None) -> list[str]:
    """argv with the demo's defaults in front when --demo is given (pure)."""
    if default is None or not default.demo_defaults:
        return list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--demo", action="store_true")
    known, _ = pre.parse_known_args(argv)
    return [*default.demo_defaults, *argv] if known.demo else list(argv)


# ---------------------------------------------------------------- the workers (pure)


def worker_argv(cfg: SearchConfig, threads: int, python: str = sys.executable) -> list[str]:
    """A worker's command line: the same flags (same --n_trials), the objective's fit to the
    `threads` cores each worker gets (the built-in one's data loaders)."""
    kind = cfg.objective_kind
    return [*module_argv(python, kind.worker_module), *config_to_argv(dataclasses.replace(
        cfg, options=kind.for_worker(cfg.options, threads)))]


def build_workers(cfg: SearchConfig, slots: Sequence[devices.WorkerSlot], stamp: str,
                  environ: Mapping[str, str], parent_pid: int, n_cores: int, host: str,
                  run: str) -> list[Worker]:
    """One Worker (argv, env, log file) per slot; no side effects."""
    threads = devices.threads_per_worker(n_cores, len(slots))
    argv = worker_argv(cfg, threads)
    log_dir = layout.logs_dir(cfg.checkpoint_dir)
    environ = child_environ(environ, cfg)
    return [Worker(slot=slot, argv=list(argv),
                   env=devices.worker_env(environ, slot, len(slots), parent_pid, threads, run),
                   log_path=log_dir / layout.log_name(f"worker_{slot.label}", host, stamp))
            for slot in slots]


# ---------------------------------------------------------------- helper processes

def _echo(line: str) -> None:
    """A helper's output line: to the terminal as it is, and into the launcher log."""
    with contextlib.suppress(OSError):  # a closed terminal
        sys.stdout.write(line)
        sys.stdout.flush()
    file_log.info("| %s", line.rstrip("\n"))


class HeldOutput:
    """The preparation's output, held back until it says the arguments, data and study are
    checked (or has talked for `hold_s` seconds): a refused run shows its one `error:` line, not
    the progress lines before it."""

    def __init__(self, hold_s: float = PREPARE_HOLD_S, clock: Callable[[], float] = time.monotonic):
        self.held: list[str] = []
        self.released = False
        self._clock = clock
        self._until = clock() + hold_s

    def __call__(self, line: str) -> None:
        if self.released:
            _echo(line)
            return
        self.held.append(line)
        if PREPARED_MARKER in line or self._clock() >= self._until:
            self.release()

    def release(self) -> None:
        """Show what was held, and everything from now on."""
        if not self.released:
            logger.info("Preparing: data, image cache, pretrained weights, study")
        self.released = True
        for line in self.held:
            _echo(line)
        self.held.clear()

    def finish(self, code: int) -> None:
        """The preparation ended: a refusal shows only its error line(s), anything else all."""
        if code == EXIT_USAGE and not self.released:
            self.released = True
            for line in self.held:
                if line.startswith("error:"):
                    _echo(line)
            self.held.clear()
        self.release()


def prepare(cfg: SearchConfig, environ: Mapping[str, str],
            interrupts: Interrupts) -> tuple[int, optuna.Study | None]:
    """Check everything and create or load the study before any worker starts (an exit code,
    and the study when it was opened here). A custom objective is prepared in this process;
    the built-in one in a helper process, which loads torch to check the pretrained weights and
    builds the image cache (this process never loads torch)."""
    if cfg.objective_kind.prepare_in_helper or spawn.thread_count() != 1:
        return prepare_in_helper(cfg, environ, interrupts), None
    code, study = prepare_here(cfg)
    if interrupts.count and code != EXIT_USAGE:
        logger.warning("Interrupted while preparing: no worker was started")
        return signal_exit(interrupts.signum), None
    return code, study


def prepare_here(cfg: SearchConfig) -> tuple[int, optuna.Study | None]:
    """A custom objective: import and check it in a forked child (a user's module may import
    anything, torch too: it never runs in this process), then create or load the study here,
    where Optuna is loaded already."""
    from psearch.engine import faults, worker

    def check_in_child(cfg: SearchConfig) -> dict:
        spawn.call_in_child(cfg.objective_kind.check, cfg)
        return {}

    check = check_in_child if cfg.objective_kind.check_in_child else None
    try:
        return 0, worker.open_checked_study(cfg, WorkerIdentity(), check)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)  # a refused run writes no log
        return EXIT_USAGE, None
    except RuntimeError as exc:  # the check itself ended badly (SystemExit at import, say)
        logger.error("Preparation failed: the objective %s could not be checked (%s); nothing "
                     "was started", cfg.objective, exc)
        return EXIT_FAILED, None
    except Exception as exc:  # noqa: BLE001 - a full disk or a storage error: one line
        if faults.is_disk_full(exc):
            logger.error("Preparation stopped: no space left on the device (%s); nothing was "
                         "started", faults.free_space_line(cfg.checkpoint_dir))
        elif faults.is_storage_error(exc):
            logger.error("Preparation failed: the study cannot be reached (%s); nothing was "
                         "started", faults.one_line(exc))
        else:
            raise
        return EXIT_FAILED, None


def prepare_in_helper(cfg: SearchConfig, environ: Mapping[str, str],
                      interrupts: Interrupts) -> int:
    """Run the worker once with --prepare_only: index data, build the cache, check weights,
    create or load the study and check its settings."""
    env = {**child_environ(environ, cfg),
           **WorkerIdentity(label="prepare", managed=True, parent_pid=os.getpid()).environ(),
           "PYTHONUNBUFFERED": "1"}
    output = HeldOutput()
    code = run_child([*module_argv(sys.executable, cfg.objective_kind.worker_module),
                      *config_to_argv(cfg), "--prepare_only"],
                     env, interrupts, echo=output)
    output.finish(code)
    if interrupts.count:
        logger.warning("Interrupted while preparing: no worker was started")
        return signal_exit(interrupts.signum)
    if code == EXIT_USAGE:  # its one `error:` line says it all; and a refused run writes no log
        file_log.info("Preparation refused the arguments; nothing was started")
    elif code == EXIT_DISK_FULL:
        logger.error("Preparation stopped: no space left on the device (see above); nothing was "
                     "started")
        return EXIT_FAILED
    elif code != 0:
        logger.error("Preparation failed with exit code %d (see the output above)", code)
        return EXIT_FAILED
    return code


def summarize(cfg: SearchConfig, environ: Mapping[str, str], interrupts: Interrupts) -> None:
    """Write the summary; a failure is logged, never changes the exit code."""
    logger.info("Summarizing results into %s", cfg.checkpoint_dir)
    code = run_child(summary_argv(cfg, sys.executable), child_environ(environ, cfg), interrupts,
                     echo=_echo)
    if code != 0:
        logger.warning("Summary failed (exit code %d); rerun it with: %s", code,
                       summary_hint(cfg, sys.executable))


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

    Nothing is written before the preparation has accepted the arguments: the launcher log is
    kept in memory until then, so a refused run leaves no folder and no file behind. Other
    launchers may use the same study at the same time (other nodes, a requeued job, more GPUs):
    this one fails only trials that are provably dead, never a live one of theirs.
    """
    # The worker's module too: workers forked from here start with everything loaded.
    from psearch.engine import storage as storage_lib, study as study_lib, worker  # noqa: F401

    status, log_file = setup_logging(job.host.name)
    interrupts = Interrupts()
    interrupts.install()
    file_log.info("Launcher run %s", job.run)
    warning = storage_lib.network_filesystem_warning(job.cfg.storage_url, storage_lib.read_mounts())
    if warning:
        logger.warning("%s", warning)
    code, study = prepare(job.cfg, job.environ, interrupts)
    if code not in (EXIT_OK, EXIT_FAILED):  # refused or interrupted: nothing was created, nothing is written
        return code
    log_file.open(job.launcher_log)
    if code != 0:
        return code
    if study is None:
        study = study_lib.open_study(job.cfg, create=False)
    study_lib.recover_dead_trials(study, job.host, job.cfg.heartbeat_grace)
    code, disk_full = run_workers(job, study, interrupts, status)
    if job.ns.no_summary:
        return code
    if disk_full:
        logger.warning("No summary: the disk is full. Once there is space: %s",
                       summary_hint(job.cfg, sys.executable))
        return code
    seen = interrupts.count
    summarize(job.cfg, job.environ, interrupts)
    if interrupts.count > seen and code == 0:  # a stop during the summary: say so in the code
        return signal_exit(interrupts.signum)
    return code


def run_workers(job: Launch, study: optuna.Study, interrupts: Interrupts,
                status: console.StatusLine) -> tuple[int, bool]:
    """Start the workers (unless the budget is already reached), supervise them, report; the
    exit code, and whether the disk filled up."""
    from psearch.engine import confirm, faults, study as study_lib

    trials = study.get_trials(deepcopy=False)
    counts = study_lib.count_trials(trials, job.cfg.direction)
    left = study_lib.budget(trials, job.cfg.n_trials, study_lib.Confirmation.of(job.cfg))
    if left.complete:
        say(status, f"The study already holds {left.finished}/{job.cfg.n_trials} finished "
            "trials" + (f" and {left.confirm_done}/{left.confirm_planned} confirmation runs"
                        if job.cfg.confirm_top else "")
            + ": nothing to run (raise --n_trials or --confirm_top/--confirm_seeds to run more)")
        return 0, False
    if interrupts.count:
        return signal_exit(interrupts.signum), False
    ctl = start_workers(job, status, study_lib.count_trials(confirm.search_trials(trials)))
    run = Run(job=job, study=study, ctl=ctl, interrupts=interrupts, status=status,
              finished_at_start=left.done)
    supervise(run)
    # Every worker of ours has ended: a trial of this run still RUNNING has no one behind it.
    try:
        study_lib.fail_running_trials(study, FailReason.INTERRUPTED if run.stopping
                                      else FailReason.WORKER_DIED,
                                      run=job.run)
    except Exception as exc:  # noqa: BLE001 - a full disk: the rerun recovers them as crashed
        if not (faults.is_disk_full(exc) or faults.is_storage_error(exc)):
            raise
        logger.warning("Could not record the end of this run's trials (%s); the next run "
                       "recovers them", faults.one_line(exc))
    return final_report(run, job.argv), run.disk_full


def start_workers(job: Launch, status: console.StatusLine,
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


def check_devices(ns: argparse.Namespace, slots: Sequence[devices.WorkerSlot],
                  environ: Mapping[str, str], kind: ObjectiveKind) -> None:
    """Refuse more workers than the machine can run, and GPU ids the driver does not report."""
    n_cores = len(os.sched_getaffinity(0))
    memory = devices.total_memory_bytes()
    limit = devices.max_workers(n_cores, memory, kind.worker_memory)
    gpus = list(dict.fromkeys(g for s in slots for g in s.gpus))
    flag = (f"--cpu_workers {ns.cpu_workers}" if ns.cpu_workers is not None
            else f"{len(gpus)} GPU(s) x --workers_per_gpu {ns.workers_per_gpu}")
    if ns.gpus_per_trial > 1:  # each worker runs a trial as that many processes
        flag += f" x --gpus_per_trial {ns.gpus_per_trial}"
    devices.check_worker_count(len(slots) * ns.gpus_per_trial, limit, n_cores, memory, flag,
                               "workers" if ns.gpus_per_trial == 1 else "training processes")
    if gpus and (ns.gpus is not None or "CUDA_VISIBLE_DEVICES" in environ):
        source = (f"--gpus {ns.gpus}" if ns.gpus is not None
                  else f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}")
        inventory = devices.probe_inventory()
        if inventory is None and ns.gpus is not None:
            raise UsageError(f"--gpus {ns.gpus}: this machine has no nvidia-smi, so no NVIDIA "
                             "driver to run GPU workers; use --cpu_workers N")
        devices.check_gpus_exist(gpus, inventory, source)


def main(argv: Sequence[str] | None = None, default: ObjectiveKind | None = None) -> int:
    """Entry point: parse and validate, then launch; exit 0 only when the budget was reached.
    `default`: the objective without --objective (the entry point's: the built-in one)."""
    urls.hide_url_passwords(sys.argv[1:])  # if not done yet (a console script): `ps` shows argv
    environ = dict(os.environ)  # what workers and helpers get: as it was, not as limited here
    limit_own_threads()  # before the checks load optuna (the search space) and numpy
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser(default).parse_args(with_demo_defaults(argv, default))
    demo = bool(getattr(ns, "demo", False))
    try:
        kind = objectives.choose(ns, default)
        if ns.show_space:
            return show_space(ns, kind)
        if ns.stop_timeout < 0:
            raise UsageError(f"--stop_timeout must be 0 or more seconds, got {ns.stop_timeout:g}")
        slots = devices.choose_workers(ns.gpus, ns.cpu_workers, ns.workers_per_gpu, os.environ,
                                       devices.probe_gpus,
                                       cpu_fallback=DEMO_CPU_WORKERS if demo else None,
                                       gpus_per_trial=ns.gpus_per_trial)
        check_devices(ns, slots, os.environ, kind)
        if demo and kind is default:
            kind.make_demo_data(ns)
        cfg = config_from_args(ns, kind)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl+C while the demo data is generated: nothing started yet
        return signal_exit(signal.SIGINT)
    host = ownership.Host.current()
    return launch(Launch(cfg=cfg, ns=ns, slots=tuple(slots), argv=tuple(argv),
                         environ=environ, stamp=time.strftime("%Y%m%d_%H%M%S"),
                         host=host, run=ownership.run_id(host)))


def show_space(ns: argparse.Namespace, kind: ObjectiveKind) -> int:
    """--show_space: the space in force as YAML on stdout (nothing is written)."""
    space = space_in_force(kind, kind.space_options(ns), ns.space_file)
    if space is None:
        print(f"# {ns.objective}: no search space (the objective suggests its own parameters); "
              "write one and pass it with --space FILE.yaml")
        return 0
    print(space.to_yaml(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
