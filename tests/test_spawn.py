"""Workers forked from the launcher (engine/spawn.py): when a fork is allowed (pure), and real
forked children: their own session, environment, signals, output and name; exit codes and
signals as Popen reports them; a check run in a child; a storage taken over by the child."""
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import optuna
import pytest

from psearch.engine import spawn, storage as storage_lib
from psearch.engine.errors import UsageError
from psearch.engine.objectives import load_function as load_objective

PY = sys.executable
HERE = sys.modules[__name__]


# ---------------------------------------------------------------- when to fork (pure)

def test_a_worker_is_forked_only_for_a_loaded_module_in_a_single_threaded_process():
    loaded = {"pkg.worker": HERE, "pkg.nomain": json}
    argv = [PY, "-m", "pkg.worker", "--n_trials", "3"]
    assert spawn.fork_entry(argv, PY, loaded, n_threads=1) == "pkg.worker"
    assert spawn.fork_entry(argv, PY, loaded, n_threads=2) is None  # another thread: exec
    assert spawn.fork_entry(argv, "/other/python", loaded, 1) is None
    assert spawn.fork_entry([PY, "-m", "pkg.absent"], PY, loaded, 1) is None  # not loaded
    assert spawn.fork_entry([PY, "-m", "pkg.nomain"], PY, loaded, 1) is None
    assert spawn.fork_entry([PY, "script.py", "-m", "pkg.worker"], PY, loaded, 1) is None
    assert spawn.fork_entry(["torchrun", "-m", "pkg.worker"], PY, loaded, 1) is None


def test_process_names_fit_the_kernels_15_bytes():
    assert spawn.process_name("cpu3") == "psearch-cpu3"
    assert spawn.process_name("gpu-MIG-4f2a-77") == "psearch-gpu-MIG"


# ---------------------------------------------------------------- real forked children

def main(argv):
    """What a forked test child runs: report what it sees, then act as argv[1] says."""
    report, action = Path(argv[0]), argv[1]
    print("hello from the child")
    logging.getLogger("launcher").warning("a line the parent's handler must not get")
    report.write_text(json.dumps({
        "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
        "environ": dict(os.environ), "argv": sys.argv,
        "stdin": os.readlink("/proc/self/fd/0"),
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "sigint_python": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        "handlers": len(logging.getLogger().handlers),
        "comm": Path("/proc/self/comm").read_text().strip(),
        "cmdline": Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode(),
    }))
    if action == "sleep":
        time.sleep(60)
    if action == "exit":
        sys.exit("stopped with a message")
    return 7


def _fork(tmp_path, action, env=None):
    log = tmp_path / "child.log"
    argv = [PY, "-m", __name__, str(tmp_path / "report.json"), action]
    with open(log, "ab") as out:
        child = spawn.start(__name__, argv, env or {"ONLY": "this"}, out.fileno(), "psearch-test")
    return child, log


def _report(tmp_path, timeout=20):
    path = tmp_path / "report.json"
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, "the forked child never reported"
        time.sleep(0.02)
    return json.loads(path.read_text())


def test_a_forked_child_is_its_own_process_with_its_own_env_output_and_name(tmp_path):
    parent_lines = tmp_path / "parent.log"
    handler = logging.FileHandler(parent_lines)
    logging.getLogger().addHandler(handler)
    try:
        child, log = _fork(tmp_path, "return")
        assert child.wait() == 7
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    seen = _report(tmp_path)
    assert seen["pid"] == child.pid == seen["pgid"] == seen["sid"]  # a session of its own
    assert seen["environ"] == {"ONLY": "this"}
    assert seen["argv"][1:] == [str(tmp_path / "report.json"), "return"]
    assert seen["stdin"] == "/dev/null" and seen["sigterm_default"] and seen["sigint_python"]
    assert seen["handlers"] == 0
    assert seen["comm"] == "psearch-test"
    # what `ps` shows: the worker's own command line, cut to the argv area it inherited (as long
    # as this process's command line, which depends on how pytest was started)
    area = len(Path("/proc/self/cmdline").read_bytes())
    title = shlex.join([PY, "-m", __name__, str(tmp_path / "report.json"), "return"])
    assert seen["cmdline"] == title[:area - 1]
    assert "hello from the child" in log.read_text()
    assert "must not get" not in parent_lines.read_text()
    assert os.environ.get("ONLY") is None  # the parent's environment is untouched


def test_a_forked_child_ends_as_popen_reports_it(tmp_path):
    child, log = _fork(tmp_path, "exit")
    assert child.wait() == 1 and "stopped with a message" in log.read_text()
    (tmp_path / "report.json").unlink()
    child, _ = _fork(tmp_path, "sleep")
    _report(tmp_path)
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGTERM)  # its group: what the launcher signals
    assert child.wait() == -signal.SIGTERM


# ---------------------------------------------------------------- a check run in a child

def test_a_users_objective_is_checked_in_a_child_and_never_runs_here(tmp_path):
    module = tmp_path / "user objective.py"
    module.write_text("import os\nos.environ['IMPORTED_HERE'] = '1'\n"
                      "def good(trial, trial_dir):\n    return 1.0\n"
                      "def bad(trial):\n    return 1.0\n")
    spawn.call_in_child(load_objective, f"{module}:good")
    assert "IMPORTED_HERE" not in os.environ
    with pytest.raises(UsageError, match=r"cannot be called as bad\(trial, trial_dir\)"):
        spawn.call_in_child(load_objective, f"{module}:bad")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        spawn.call_in_child(lambda: 1 / 0)


def test_a_forked_child_takes_over_the_parents_storage_with_connections_of_its_own(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = storage_lib.make_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 1.0})  # the parent's pool holds a connection now

    def in_child():
        inherited = storage_lib.make_storage(url)
        if inherited is not storage:
            raise UsageError("the child opened the storage again")
        optuna.load_study(study_name="s", storage=inherited).enqueue_trial({"x": 2.0})

    spawn.call_in_child(in_child)
    assert storage_lib.make_storage(url) is not storage  # never reused by the process itself
    study.enqueue_trial({"x": 3.0})  # the parent's connections still work
    assert [t.system_attrs["fixed_params"]["x"] for t in study.get_trials()] == [1.0, 2.0, 3.0]
