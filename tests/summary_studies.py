"""Studies for the summary tests (test_summarize, test_best_overall, test_report): finished trials
made with Optuna directly, a study in a checkpoint folder, running the summary as its command."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from psearch.reports import summary as summarize

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = REPO / "tests" / "objectives" / "summary_objectives.py"
PNGS = ("all_trials_comparison.png", "hyperparameter_relationships.png", "param_importances.png",
        "optimization_history.png")
T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
DISTS = {"lr": FloatDistribution(1e-5, 1e-1, log=True), "width": IntDistribution(1, 8),
         "act": CategoricalDistribution(["relu", "gelu", "tanh"])}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial(number: int, state: TrialState = TrialState.COMPLETE, value: float | None = None,
          minutes: float = 10.0, curve: int = 4, **user_attrs) -> FrozenTrial:
    """A finished (or running) trial with parameters derived from its number."""
    params = {"lr": 10 ** -(1 + number % 4), "width": 1 + number % 8,
              "act": ["relu", "gelu", "tanh"][number % 3]}
    start = T0 + dt.timedelta(minutes=number)
    end = None if state in (TrialState.RUNNING, TrialState.WAITING) else \
        start + dt.timedelta(minutes=minutes)
    base = value if value is not None else 0.5
    return FrozenTrial(number=number, state=state, value=value, values=None, datetime_start=start,
                       datetime_complete=end, params=params, distributions=DISTS,
                       user_attrs=user_attrs, system_attrs={}, trial_id=number,
                       intermediate_values={e: base * (e + 1) / curve for e in range(curve)})


def make_study(ckpt: Path, trials=(), direction: str = "maximize", name: str = "writer_id_search",
               settings: dict | None = None) -> optuna.Study:
    """A study in CKPT/optuna_study.db holding `trials`."""
    ckpt.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{ckpt / 'optuna_study.db'}",
                                study_name=name, direction=direction)
    if settings is not None:
        study.set_user_attr("search_settings", settings)
    study.add_trials(list(trials))
    return study


def run(ckpt: Path, *extra: str) -> int:
    return summarize.main(["--checkpoint_dir", str(ckpt), *extra])


def read_csv(ckpt: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(ckpt / "summary" / name)


def assert_summary_files(ckpt: Path) -> None:
    for name in (*PNGS, "all_trials.csv", "top5_trials.csv", "report.md"):
        path = ckpt / "summary" / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert not list(ckpt.glob(".best_overall.*")), "a staging folder was left behind"


def with_params(t: FrozenTrial, params: dict, distributions: dict | None = None) -> FrozenTrial:
    """`t` with other hyperparameters (of DISTS unless `distributions` says otherwise)."""
    return FrozenTrial(number=t.number, state=t.state, value=t.value, values=None,
                       datetime_start=t.datetime_start, datetime_complete=t.datetime_complete,
                       params=params, distributions=distributions or DISTS,
                       user_attrs=t.user_attrs, system_attrs={}, trial_id=t.number,
                       intermediate_values=t.intermediate_values)
