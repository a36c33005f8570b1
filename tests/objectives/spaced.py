"""A custom objective that takes its parameters from the --space file, as docs/SEARCH.md shows:
`space.given().suggest(trial)`. It writes what it got to `params.json` and a `best_model.pth`
stand-in, sleeps SLEEPY_SECONDS (default 0.1) and returns `x` plus a tenth of `width` (when the
space has them), so that a test can tell good sets from bad ones."""
import json
import os
import time

from psearch.engine import space

SPACE = space.given()


def objective(trial, trial_dir):
    params = SPACE.suggest(trial)
    (trial_dir / "params.json").write_text(json.dumps(params))
    (trial_dir / "best_model.pth").write_text(f"model of trial {trial.number}")
    time.sleep(float(os.environ.get("SLEEPY_SECONDS", "0.1")))
    return float(params.get("x", 0.0)) + 0.1 * float(params.get("width", 0))
