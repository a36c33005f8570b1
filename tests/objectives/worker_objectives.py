"""Tiny custom objectives for the worker's process tests (no torch, no GPU)."""
import json
import os
import time
from pathlib import Path


def quadratic(trial, trial_dir):
    """Sleeps a little like a real trial; records what it saw."""
    x = trial.suggest_float("x", -5, 5)
    time.sleep(float(os.environ.get("TEST_SLEEP", "0.05")))
    (trial_dir / "seen.json").write_text(json.dumps({"x": x, "pid": os.getpid()}))
    return -(x - 1) ** 2


def fails_first(trial, trial_dir):
    """Raises on the very first call of the study (a marker file says it already did)."""
    marker = Path(trial_dir).parent / "failed_once"
    x = trial.suggest_float("x", -5, 5)
    if not marker.exists():
        marker.write_text("1")
        raise RuntimeError("CUDA out of memory (simulated)")
    return x


def always_fails(trial, trial_dir):
    trial.suggest_float("x", -5, 5)
    raise RuntimeError("broken objective")


def returns_nan(trial, trial_dir):
    trial.suggest_float("x", -5, 5)
    return float("nan")


def stop_breaks_it(trial, trial_dir):
    """Like a trial whose data-loader processes a SIGTERM killed: the stop surfaces as an error."""
    trial.suggest_float("x", -5, 5)
    try:
        time.sleep(60)
    except BaseException as exc:
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated.") from exc
    return 0.0
