"""A test objective that needs a moment to stop cleanly, like a trial saving its checkpoint:
it runs until stopped, then takes SLOW_STOP_SECONDS (default 1.5) to write `saved.txt` into its
folder. A worker killed instead of stopped leaves no `saved.txt`."""
import os
import time


def objective(trial, trial_dir):
    trial.suggest_float("x", 0.0, 1.0)
    (trial_dir / "env.json").write_text("{}")
    try:
        time.sleep(600)
    finally:
        time.sleep(float(os.environ.get("SLOW_STOP_SECONDS", "1.5")))
        (trial_dir / "saved.txt").write_text("saved")
    return 0.0
