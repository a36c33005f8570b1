"""A test objective that talks to the study all the time, like a training loop: it reports a
value and sets a user attribute every 0.2 s for SLEEPY_SECONDS (default 2), so a storage outage
always hits it mid-trial."""
import os
import time


def objective(trial, trial_dir):
    x = trial.suggest_float("x", 0.0, 1.0)
    (trial_dir / "env.json").write_text("{}")
    steps = max(1, int(float(os.environ.get("SLEEPY_SECONDS", "2")) / 0.2))
    for step in range(steps):
        time.sleep(0.2)
        trial.report(x * (step + 1) / steps, step)
        trial.set_user_attr("steps_done", step + 1)
        if trial.should_prune():
            import optuna
            raise optuna.TrialPruned()
    return x
