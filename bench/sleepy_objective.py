"""A trial that only sleeps, like one whose work all happens on a device: BENCH_SLEEP_S seconds
(default 1). Callable by the launcher (`--objective bench/sleepy_objective.py:objective`) and by
plain Optuna (`objective(trial)`). Imports nothing heavy, so process start costs stay Optuna's."""
import os
import time


def objective(trial, trial_dir=None) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    time.sleep(float(os.environ.get("BENCH_SLEEP_S", "1")))
    return x
