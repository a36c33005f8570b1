"""Custom objectives that misbehave as user code can, for the fault tests (no torch, no GPU).

FAULT_MARK names a file that the `*_first` objectives create on their first call: that call
misbehaves, later ones (in this process or a restarted one) return at once.
"""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from psearch.engine import atomic


def _first_call() -> bool:
    mark = Path(os.environ["FAULT_MARK"])
    if mark.exists():
        return False
    mark.write_text("1")
    return True


def raises_keyboard_interrupt(trial, trial_dir):
    trial.suggest_float("x", 0, 1)
    raise KeyboardInterrupt


def exits(trial, trial_dir):
    """sys.exit(0) in trial 0, sys.exit(3) in trial 1; later trials complete."""
    x = trial.suggest_float("x", 0, 1)
    if trial.number < 2:
        sys.exit({0: 0, 1: 3}[trial.number])
    return x


def leaves_a_thread(trial, trial_dir):
    """Starts a non-daemon thread that never ends (a forgotten background logger, say), then
    sleeps TEST_SLEEP seconds."""
    threading.Thread(target=threading.Event().wait, name=f"forgotten-{trial.number}").start()
    (trial_dir / "started").write_text("1")
    time.sleep(float(os.environ.get("TEST_SLEEP", "0")))
    return trial.suggest_float("x", 0, 1)


def hangs_first(trial, trial_dir):
    """The first call starts a child process, writes its pid to `child.pid`, then blocks."""
    x = trial.suggest_float("x", 0, 1)
    if _first_call():
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (trial_dir / "child.pid").write_text(str(child.pid))
        time.sleep(600)
    return x


def fills_the_disk_first(trial, trial_dir):
    """The first call keeps a good best_model.pth, then fails to replace it: the disk is full.
    With FAULT_LEAVE_FULL, it leaves the disk full (a filler file) and returns normally."""
    x = trial.suggest_float("x", 0, 1)
    if not _first_call():
        return x
    atomic.write_bytes(trial_dir / "best_model.pth", b"good weights")
    if os.environ.get("FAULT_LEAVE_FULL"):
        with open(trial_dir.parent / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 16))
                    fh.flush()
            except OSError:
                return x
    atomic.write_bytes(trial_dir / "best_model.pth", b"\1" * (64 << 20))
    return x


def writes_last(trial, trial_dir):
    """Saves a resume checkpoint like the built-in objective; prunes trial 1; sleeps TEST_SLEEP."""
    import optuna

    x = trial.suggest_float("x", 0, 1)
    (trial_dir / "last.pth").write_bytes(b"resume state")
    time.sleep(float(os.environ.get("TEST_SLEEP", "0")))
    if trial.number == 1:
        raise optuna.TrialPruned()
    return x


def one_arg(trial):
    return trial.suggest_float("x", 0, 1)
