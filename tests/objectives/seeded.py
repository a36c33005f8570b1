"""A test objective whose value depends on its parameters and on its seed (the `seed` user
attribute the search gives every trial), like a real training run: `x` plus seed noise
(SEEDED_NOISE, default 0.1). It sleeps SLEEPY_SECONDS (default 0.2) while reporting a curve, and
writes `env.json` (its seed, parameters, `confirms` attribute, start and end times) and a
`best_model.pth` stand-in into its folder.
"""
import json
import os
import random
import time

import optuna


def objective(trial, trial_dir):
    x = trial.suggest_float("x", 0.0, 1.0)
    seed = trial.user_attrs["seed"]
    noise = random.Random(f"{seed}:{x}").gauss(0.0, float(os.environ.get("SEEDED_NOISE", "0.1")))
    record = {"seed": seed, "params": trial.params, "confirms": trial.user_attrs.get("confirms"),
              "start": time.time()}
    (trial_dir / "env.json").write_text(json.dumps(record))
    (trial_dir / "best_model.pth").write_text(f"model of trial {trial.number}")
    steps = 3
    for step in range(steps):
        time.sleep(float(os.environ.get("SLEEPY_SECONDS", "0.2")) / steps)
        trial.report(x + noise, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    record["end"] = time.time()
    (trial_dir / "env.json").write_text(json.dumps(record))
    return x + noise
