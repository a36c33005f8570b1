"""Tiny custom objectives for the summary tests: instant, deterministic in their parameters.

Run one with the worker, e.g.
    python single_gpu_hyperparameter_search.py --checkpoint_dir C --n_trials 10 \
        --objective tests/objectives/summary_objectives.py:with_files
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import optuna

EPOCHS = 6


def _suggest(trial: optuna.Trial) -> float:
    """Four hyperparameters of every kind; the value peaks near lr=1e-2, width=3, act=gelu."""
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    width = trial.suggest_int("width", 1, 6)
    act = trial.suggest_categorical("act", ["relu", "gelu", "tanh"])
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    bonus = {"relu": 0.05, "gelu": 0.1, "tanh": 0.0}[act]
    return 0.8 - 0.1 * (math.log10(lr) + 2) ** 2 - 0.02 * (width - 3) ** 2 + bonus - 0.1 * dropout


def _report_curve(trial: optuna.Trial, final: float) -> None:
    """A rising validation curve that ends at `final`, one point per epoch."""
    for epoch in range(EPOCHS):
        trial.report(final * (1 - 0.5 ** (epoch + 1)) / (1 - 0.5 ** EPOCHS), epoch)


def with_files(trial: optuna.Trial, trial_dir: Path) -> float:
    """Writes what the built-in objective writes: best_model.pth, metrics.json, config.json."""
    value = _suggest(trial)
    _report_curve(trial, value)
    metrics = {"val_page_top1": value, "val_page_top5": min(1.0, value + 0.1),
               "val_page_map": value * 0.9, "best_epoch": EPOCHS - 1, "epochs_run": EPOCHS,
               "status": "complete"}
    (trial_dir / "best_model.pth").write_bytes(f"weights of trial {trial.number}".encode())
    (trial_dir / "metrics.json").write_text(json.dumps(metrics))
    (trial_dir / "config.json").write_text(json.dumps({"params": trial.params}))
    trial.set_user_attr("val_page_top1", value)
    return value


def no_files(trial: optuna.Trial, trial_dir: Path) -> float:
    """Writes nothing and sets no user attributes: the value is all there is."""
    value = _suggest(trial)
    _report_curve(trial, value)
    return value


def mixed(trial: optuna.Trial, trial_dir: Path) -> float:
    """Completes, prunes or fails by trial number: 0, 3, 6, ... complete; 1, 4, ... prune."""
    value = _suggest(trial)
    _report_curve(trial, value)
    if trial.number % 3 == 1:
        raise optuna.TrialPruned()
    if trial.number % 3 == 2:
        raise ValueError("diverged")
    return value
