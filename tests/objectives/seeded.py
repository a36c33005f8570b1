"""A test objective whose value depends on its parameters and on its seed (the `seed` user
attribute the search gives every trial), like a real training run: `x` plus seed noise. It
sleeps SLEEPY_SECONDS (default 0.2), reports a curve, and writes `seed.json` (its seed, its
parameters and the `confirms` attribute) and a `best_model.pth` stand-in into its folder.
"""
import json
import os
import random
import time


def objective(trial, trial_dir):
    x = trial.suggest_float("x", 0.0, 1.0)
    seed = trial.user_attrs["seed"]
    noise = random.Random(f"{seed}:{x}").gauss(0.0, float(os.environ.get("SEEDED_NOISE", "0.1")))
    (trial_dir / "seed.json").write_text(json.dumps(
        {"seed": seed, "params": trial.params, "confirms": trial.user_attrs.get("confirms")}))
    (trial_dir / "best_model.pth").write_text(f"model of trial {trial.number}")
    for step in range(3):
        trial.report(x + noise, step)
        if trial.should_prune():
            import optuna
            raise optuna.TrialPruned()
        time.sleep(float(os.environ.get("SLEEPY_SECONDS", "0.2")) / 3)
    return x + noise
