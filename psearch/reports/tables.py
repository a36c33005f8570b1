"""The summary's tables, from one snapshot of the study: every trial best first (all_trials.csv),
the top k (top5_trials.csv), and the time the search took. Pure but for reading a trial's
metrics.json; `best_overall.py`, `report.py` and `summary.py` all build on it."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from psearch.engine import ownership
from psearch.engine.layout import trial_dir
from psearch.reports import trial_plots
from psearch.writer_id.names import TRIAL_RESULT_KEYS

# User attributes that say where and how a trial ran, kept in all_trials.csv after the metrics.
# A trial's run: who ran it, with which seed, and where it came from (a rerun, a confirmation
# run, a known set of --enqueue, a trial copied from an earlier study by --warm_start).
RUN_ATTRS = ("worker", "seed", "confirms", "attempt", "resumed_from", "enqueued", "warm_start_from",
             "fail_reason")
# Bookkeeping that identifies a process, not a trial's result: left out of tables and metrics.
PROCESS_ATTRS = (*ownership.OWNER_KEYS, "checkpoint_dir", "heartbeat_at", "heartbeat_n")
TOP_K = 5
# The columns every trial has, first in all_trials.csv.
FIXED_COLUMNS = ("number", "state", "value", "duration_s")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What one read of the study returned; everything in the summary is built from it."""

    study_name: str
    storage_url: str
    direction: str
    metric: str
    settings: dict[str, Any]
    trials: tuple[FrozenTrial, ...]
    taken_at: datetime


def trial_folder(t: FrozenTrial, checkpoint_dir: Path) -> Path:
    """The trial's folder: under this checkpoint folder, else under the one of the launcher that
    ran it (several nodes may each have their own, on a shared file system)."""
    here = trial_dir(checkpoint_dir, t.number)
    there = t.user_attrs.get("checkpoint_dir")
    if here.is_dir() or not there:
        return here
    return trial_dir(there, t.number)


def trial_metrics(t: FrozenTrial, checkpoint_dir: Path) -> dict[str, Any]:
    """The trial's key metrics: its user attributes, else its folder's metrics.json."""
    metrics = {k: t.user_attrs[k] for k in TRIAL_RESULT_KEYS if k in t.user_attrs}
    if len(metrics) < len(TRIAL_RESULT_KEYS):
        path = trial_folder(t, checkpoint_dir) / "metrics.json"
        with contextlib.suppress(OSError, ValueError):
            stored = json.loads(path.read_text())
            metrics.update({k: stored[k] for k in TRIAL_RESULT_KEYS if k in stored and k not in metrics})
    # A custom objective's own scalar attributes are its metrics.
    skip = set(TRIAL_RESULT_KEYS) | set(RUN_ATTRS) | set(PROCESS_ATTRS)
    metrics.update({k: v for k, v in t.user_attrs.items()
                    if k not in skip and isinstance(v, (int, float, str, bool))})
    return metrics


def _duration_s(t: FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def trials_table(trials: Sequence[FrozenTrial], direction: str,
                 checkpoint_dir: Path) -> pd.DataFrame:
    """One row per trial, best first: number, state, value, duration, params, metrics, run info."""
    fixed = list(FIXED_COLUMNS)
    param_names = list(dict.fromkeys(n for t in trials for n in sorted(t.params)))
    rows = []
    for t in sorted(trials, key=lambda t: trial_plots.rank_key(t, direction)):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "value": t.value,
                               "duration_s": _duration_s(t)}
        row.update({param_column(n, fixed): v for n, v in t.params.items()})
        # A user attribute never overwrites the number, state, value or a hyperparameter.
        row.update({k: v for k, v in trial_metrics(t, checkpoint_dir).items() if k not in row})
        row.update({k: t.user_attrs.get(k) for k in RUN_ATTRS})
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
        rows.append(row)
    head = fixed + [param_column(n, fixed) for n in param_names]
    tail = [*RUN_ATTRS, "datetime_start", "datetime_complete"]
    table = pd.DataFrame(rows)
    metrics = [c for c in table.columns if c not in head and c not in tail]
    return table.reindex(columns=head + metrics + tail)  # adds absent columns, empty


def param_column(name: str, fixed: Sequence[str]) -> str:
    """The hyperparameter's column: a name like a fixed column's keeps its value under another."""
    return f"param_{name}" if name in fixed else name


def top_table(table: pd.DataFrame, k: int = TOP_K) -> pd.DataFrame:
    """The k best COMPLETE trials of the search (the table is already best first); confirmation
    runs repeat them and are compared by set in the report; trials copied from an earlier study
    (--warm_start) are not this search's."""
    return table[(table["state"] == TrialState.COMPLETE.name) & table["confirms"].isna()
                 & table["warm_start_from"].isna()].head(k)


def time_stats(trials: Sequence[FrozenTrial]) -> tuple[float, float]:
    """(wall seconds from the first start to the last finish, device-hours of ended trials)."""
    ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                              TrialState.FAIL) and _duration_s(t) is not None]
    device_hours = sum(_duration_s(t) for t in ended) / 3600
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in ended]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    return max(wall, 0.0), device_hours
