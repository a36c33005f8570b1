"""How a child process of the search starts: its command line and environment (`python -m` this
package's modules, the package on PYTHONPATH so they run from any folder, installed or not, the
storage URL in the environment, never on a command line), and starting a worker by fork.

Starting a child by fork instead of a new interpreter: it inherits what this process has already
imported (Optuna, SQLAlchemy, the worker's code), so eight workers start in milliseconds instead of
each paying an interpreter start and those imports (0.5 s alone, 2 s for eight on two cores).

A forked worker is made to look like one that `subprocess.Popen(argv, env=env, stdin=DEVNULL,
start_new_session=True)` started: its own session and process group, `env` as its environment
(set before anything in it can load CUDA or read the thread variables), stdin from /dev/null,
stdout and stderr on its log file, Python's default signal handlers and no wakeup fd, none of the
parent's logging handlers or exit handlers, a fresh NumPy seed, the inherited objects frozen
(`gc.freeze`), its own name in `ps`; it runs the module's `main(argv)` and ends with `os._exit`.
Only a single-threaded process may fork (the child gets only the calling thread, and any lock
another thread held stays locked forever): `fork_entry` says when, and otherwise the caller starts
a new interpreter as before. The parent's database connections are dropped in the child by the
storage's own at-fork hook (storage.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import shlex
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Mapping, NoReturn, Sequence

from psearch.engine import optuna_internals, procfs
from psearch.engine.config import SearchConfig, child_env, storage_argv
from psearch.engine.errors import EXIT_USAGE, UsageError
from psearch.engine.urls import redact_url

PACKAGE_PARENT = Path(__file__).resolve().parents[2]
SUMMARY_MODULE = "psearch.reports.summary"
# What the preparation step logs once the arguments, the data and the study are checked: from
# then on nothing can be refused, and the launcher shows its progress.
PREPARED_MARKER = "Arguments, data and study checked"


def module_argv(python: str, module: str) -> list[str]:
    """`python -m MODULE`."""
    return [python, "-m", module]


def child_environ(environ: Mapping[str, str], cfg: SearchConfig | None = None) -> dict[str, str]:
    """The environment of a helper process: `environ`, the package on PYTHONPATH, and the storage
    URL that `config_to_argv`'s `--storage env:…` points to."""
    path = [str(PACKAGE_PARENT), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path)),
            **(child_env(cfg) if cfg is not None else {})}


def summary_argv(cfg: SearchConfig, python: str) -> list[str]:
    """The summary of `cfg`'s study, as a helper process (run it with `child_environ`)."""
    return [*module_argv(python, SUMMARY_MODULE), "--checkpoint_dir", cfg.checkpoint_dir,
            "--study_name", cfg.study_name, *storage_argv(cfg)]


def summary_hint(cfg: SearchConfig, python: str) -> str:
    """The command a user can run to write the summary again (no password in it)."""
    return shlex.join([python, "summarize.py", "--checkpoint_dir", cfg.checkpoint_dir,
                       "--study_name", cfg.study_name, "--storage", redact_url(cfg.storage_url)])


# ---------------------------------------------------------------- a worker started by fork

PR_SET_NAME = 15
NAME_MAX = 15  # the kernel keeps 15 bytes of a process name (`ps -o comm`, top)


def fork_entry(argv: Sequence[str], python: str, loaded: Mapping[str, object],
               n_threads: int) -> str | None:
    """The module whose `main` a forked child can run instead of exec'ing `argv`, or None (pure):
    `argv` must be `python -m MODULE …` for this very interpreter, MODULE already imported here
    (else a fork saves nothing), and this process single-threaded."""
    if n_threads != 1 or len(argv) < 3 or argv[0] != python or argv[1] != "-m":
        return None
    module = loaded.get(argv[2])
    return argv[2] if callable(getattr(module, "main", None)) else None


def thread_count() -> int:
    """Threads of this process, C-level ones included (/proc), else as Python knows them."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def process_name(label: str) -> str:
    """The short name a worker shows in `ps -o comm` and top (pure)."""
    return f"psearch-{label}"[:NAME_MAX]


class Forked:
    """A forked child, with the part of `subprocess.Popen`'s interface the controller uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        """Reap the child; its exit code, negative when a signal killed it (as Popen has it)."""
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def start(module: str, argv: Sequence[str], env: Mapping[str, str], log_fd: int,
          name: str) -> Forked:
    """Fork a child that runs `module.main(argv[3:])` with its output on `log_fd`."""
    for stream in (sys.stdout, sys.stderr):  # else the child writes the parent's buffer again
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid == 0:
        _child(module, list(argv), dict(env), log_fd, name)
    return Forked(pid)


def _child(module: str, argv: list[str], env: dict[str, str], log_fd: int,
           name: str) -> NoReturn:
    code = 1
    try:
        _become_own_process(env, log_fd)
        _set_name(name, shlex.join(argv))
        main = sys.modules[module].main
        sys.argv = [getattr(sys.modules[module], "__file__", module), *argv[3:]]
        code = _run_main(main, argv[3:])
    except BaseException:  # noqa: BLE001 - whatever it is, it ends this child, with its traceback
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            optuna_internals.run_exit_functions()  # the child's own: the parent's were dropped at its start
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _become_own_process(env: Mapping[str, str], log_fd: int) -> None:
    """What a fresh interpreter in a new session would be (see the module docstring)."""
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    wakeup = signal.set_wakeup_fd(-1)
    if wakeup >= 0:
        os.close(wakeup)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    os.environ.clear()
    os.environ.update(env)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            logger.handlers = []  # the parent's, left open: they write to the parent's files
    optuna_internals.clear_exit_functions()  # the parent's exit handlers (its logging, its pools) are not ours to run
    # What the child inherited lives as long as it does: its garbage collections skip it (less
    # work per collection, and the pages stay shared with the parent instead of being copied).
    gc.freeze()
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # each worker draws its own random numbers, as a new process would
        numpy.random.seed()


def _set_name(name: str, title: str) -> None:
    """Name the process (`ps -o comm`, top) and show `title` as its command line (`ps`)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:NAME_MAX], 0, 0, 0)
    procfs.set_own_title(title)


def _run_main(main: Callable[[list[str]], object], args: list[str]) -> int:
    """`main(args)`'s exit code, as the interpreter would turn its result or SystemExit into one."""
    try:
        result = main(args)
    except SystemExit as exc:
        result = exc.code
    if result is None or isinstance(result, int):
        return result or 0
    print(result, file=sys.stderr)
    return 1


# ---------------------------------------------------------------- a check run in a child

def call_in_child(fn: Callable[..., object], *args: object) -> None:
    """Run `fn(*args)` in a forked child and raise its UsageError here (RuntimeError for anything
    else it raised): for code that must be checked without running in this process (a user's
    objective module, which may import anything). The child's output is dropped."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _check_child(fn, args, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == EXIT_USAGE:
        raise UsageError(message)
    if code != 0:
        raise RuntimeError(message or f"the check ended with exit code {code}")


def _check_child(fn: Callable[..., object], args: Sequence[object], write_end: int) -> NoReturn:
    code, message = 1, ""
    try:
        os.setpgid(0, 0)  # a Ctrl+C at the terminal is for the launcher, which asks on its own
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        fn(*args)
        code = 0
    except UsageError as exc:
        code, message = EXIT_USAGE, str(exc)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        message = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            os.write(write_end, message.encode())
        os._exit(code)
