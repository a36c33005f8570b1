"""Summarise a search: plots, tables, a report, and `best_overall/` with the best trial's files.

    python summarize.py --checkpoint_dir C [--storage URL --study_name S]

Safe at any time, also while workers run: it reads one snapshot of the study's trials (a single
query, no transaction of its own) and builds everything from it. Writes C/summary/ (plots, CSVs,
report.md) and replaces C/best_overall/ atomically when the best COMPLETE trial changes; the
launcher runs it at the end of every run. Never imports torch, except to evaluate the best model
on the held-out test split (built-in objective only).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shutil
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from psearch.engine import (atomic, cli, cmdline, layout, locks, ownership, storage as storage_lib,
                            study as study_lib)
from psearch.engine.config import DEFAULT_STUDY_NAME, redact_url, resolve_storage
from psearch.engine.errors import UsageError
from psearch.engine.layout import STUDY_DB_NAME, default_storage_url, trial_dir
from psearch.reports import plots
from psearch.writer_id.names import TRIAL_RESULT_KEYS

logger = logging.getLogger("summarize")

# User attributes that say where and how a trial ran, kept in all_trials.csv after the metrics.
RUN_ATTRS = ("worker", "attempt", "resumed_from", "fail_reason")
# Bookkeeping that identifies a process, not a trial's result: left out of tables and metrics.
PROCESS_ATTRS = (*ownership.OWNER_KEYS, "checkpoint_dir", "heartbeat_at")
TOP_K = 5
# The columns every trial has, first in all_trials.csv.
FIXED_COLUMNS = ("number", "state", "value", "duration_s")
# report.md's top table stays narrow enough for a Markdown viewer; top5_trials.csv has it all.
REPORT_METRICS = 3
REPORT_WIDTH = 100
FIGURES = {
    "all_trials_comparison.png": "every trial's value (best first) and all validation curves",
    "hyperparameter_relationships.png": "the value against each hyperparameter",
    "param_importances.png": "hyperparameter importances (Optuna, PED-ANOVA)",
    "optimization_history.png": "value per trial and best so far (Optuna)",
}


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


# ---------------------------------------------------------------- opening the study

def resolve_storage_url(checkpoint_dir: Path, storage: str | None) -> str:
    """`--storage` (a URL or env:NAME), else the SQLite file the search writes inside the
    checkpoint folder."""
    return resolve_storage(storage, os.environ) or default_storage_url(checkpoint_dir)


def _check_storage_exists(url: str) -> None:
    """Refuse a file storage that is not there (opening it would create an empty one)."""
    # Parsed as study.make_storage does: sqlite:///rel or sqlite:////abs; journal:///abs.
    for prefix, cut in (("sqlite:///", len("sqlite:///")), ("journal:///", len("journal://"))):
        if url.startswith(prefix):
            path = Path(url[cut:])
            if not path.is_file():
                raise UsageError(f"no study database at {path}; run the search first, or pass "
                                 "--checkpoint_dir/--storage of an existing one")


def pick_study_name(names: Sequence[str], wanted: str | None, url: str) -> str:
    """`--study_name`, else the only study in the storage, else the default name (pure)."""
    if wanted is not None:
        if wanted not in names:
            raise UsageError(f"no study {wanted!r} in {redact_url(url)}; it holds {sorted(names)}")
        return wanted
    if len(names) == 1:
        return names[0]
    if DEFAULT_STUDY_NAME in names:
        return DEFAULT_STUDY_NAME
    if not names:
        raise UsageError(f"{redact_url(url)} holds no study; run the search first")
    raise UsageError(f"{redact_url(url)} holds {len(names)} studies {sorted(names)}; pick one with "
                     "--study_name")


def open_study(url: str, study_name: str | None) -> optuna.Study:
    """Load the study for reading (a cheap sampler: we never ask for trials)."""
    _check_storage_exists(url)
    storage = storage_lib.make_storage(url)
    name = pick_study_name(optuna.get_all_study_names(storage), study_name, url)
    return optuna.load_study(study_name=name, storage=storage,
                             sampler=optuna.samplers.RandomSampler())


def take_snapshot(study: optuna.Study, url: str) -> Snapshot:
    """One read of all trials, plus the study's small, fixed attributes."""
    trials = tuple(study.get_trials(deepcopy=False))
    names = study.metric_names
    return Snapshot(study_name=study.study_name, storage_url=url,
                    direction=study.direction.name.lower(),
                    metric=names[0] if names else "objective value",
                    settings=dict(study.user_attrs.get("search_settings") or {}),
                    trials=trials, taken_at=datetime.now())


# ---------------------------------------------------------------- tables

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
    for t in sorted(trials, key=lambda t: plots.rank_key(t, direction)):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "value": t.value,
                               "duration_s": _duration_s(t)}
        row.update({_param_column(n, fixed): v for n, v in t.params.items()})
        # A user attribute never overwrites the number, state, value or a hyperparameter.
        row.update({k: v for k, v in trial_metrics(t, checkpoint_dir).items() if k not in row})
        row.update({k: t.user_attrs.get(k) for k in RUN_ATTRS})
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["datetime_complete"] = t.datetime_complete.isoformat() if t.datetime_complete else None
        rows.append(row)
    head = fixed + [_param_column(n, fixed) for n in param_names]
    tail = [*RUN_ATTRS, "datetime_start", "datetime_complete"]
    table = pd.DataFrame(rows)
    metrics = [c for c in table.columns if c not in head and c not in tail]
    return table.reindex(columns=head + metrics + tail)  # adds absent columns, empty


def _param_column(name: str, fixed: Sequence[str]) -> str:
    # A hyperparameter named like a fixed column keeps its value under another name.
    return f"param_{name}" if name in fixed else name


def top_table(table: pd.DataFrame, k: int = TOP_K) -> pd.DataFrame:
    """The k best COMPLETE trials (the table is already best first)."""
    return table[table["state"] == TrialState.COMPLETE.name].head(k)


# ---------------------------------------------------------------- time

def time_stats(trials: Sequence[FrozenTrial]) -> tuple[float, float]:
    """(wall seconds from the first start to the last finish, device-hours of ended trials)."""
    ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                              TrialState.FAIL) and _duration_s(t) is not None]
    device_hours = sum(_duration_s(t) for t in ended) / 3600
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in ended]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    return max(wall, 0.0), device_hours


def _hms(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


# ---------------------------------------------------------------- best_overall/

@dataclasses.dataclass(frozen=True)
class BestOutcome:
    """What happened to best_overall/ and why, for the report."""

    message: str
    has_model: bool = False
    test_metrics: dict[str, Any] | None = None
    test_note: str | None = None
    retired: Path | None = None  # the previous best_overall/, deleted once the summary is done


def best_config(best: FrozenTrial, snap: Snapshot, folder: Path) -> dict[str, Any]:
    """The trial's own config.json (if any) plus what names it: trial number, value, params."""
    config: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        config = dict(json.loads((folder / "config.json").read_text()))
    config.update({"trial_number": best.number, "value": best.value, "params": best.params,
                   "direction": snap.direction, "study_name": snap.study_name})
    return config


def names_best(best_dir: Path, best: FrozenTrial, snap: Snapshot) -> bool:
    """True when best_overall/ already holds this trial with this value."""
    try:
        config = json.loads((best_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("trial_number") == best.number and config.get("value") == best.value
            and config.get("study_name", snap.study_name) == snap.study_name)


def stage_best(staging: Path, best: FrozenTrial, snap: Snapshot, checkpoint_dir: Path) -> bool:
    """Fill `staging` with the best trial's files; True when it holds a model checkpoint."""
    source = trial_folder(best, checkpoint_dir)
    staging.mkdir(parents=True)
    model = source / "best_model.pth"
    if model.is_file():
        atomic.copy_durably(model, staging / "best_model.pth")
    atomic.write_json(staging / "config.json", best_config(best, snap, source))
    try:
        metrics = json.loads((source / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {"value": best.value, **trial_metrics(best, checkpoint_dir)}
    atomic.write_json(staging / "metrics.json", metrics)
    return model.is_file()


def _remove_leftovers(checkpoint_dir: Path) -> None:
    """Staging folders of a summariser that was killed mid-swap (we hold the lock now)."""
    for pattern in (".best_overall.new-*", ".best_overall.old-*"):
        for path in checkpoint_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def update_best_overall(snap: Snapshot, checkpoint_dir: Path) -> BestOutcome:
    """Copy the best COMPLETE trial into best_overall/ (atomic swap) if it changed."""
    target = layout.best_dir(checkpoint_dir)
    best = study_lib.best_complete(snap.trials, snap.direction)
    if best is None:
        state = "left as it was" if target.exists() else "not created"
        return BestOutcome(f"best_overall/ {state}: no trial has completed yet.")
    test_dir = held_out_split(snap.settings)
    if names_best(target, best, snap):
        outcome = BestOutcome(f"best_overall/ already holds trial {best.number}: unchanged.",
                              has_model=(target / "best_model.pth").is_file())
        return _test_existing(target, outcome, test_dir, snap.settings)
    staging = checkpoint_dir / f".best_overall.new-{atomic.process_tag()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        has_model = stage_best(staging, best, snap, checkpoint_dir)
        tested = _evaluate_into(staging, snap.settings) if has_model and test_dir else None
        retired = atomic.swap_in_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # left only if staging or the swap failed
    return BestOutcome(f"best_overall/ updated from trial {best.number}.", has_model=has_model,
                       test_metrics=tested, test_note=_test_note(has_model, test_dir, tested),
                       retired=retired)


def _test_existing(target: Path, outcome: BestOutcome, test_dir: Path | None,
                   settings: dict[str, Any]) -> BestOutcome:
    """An unchanged best is evaluated on the test split only if that was never done."""
    if test_dir is None or not outcome.has_model:
        return dataclasses.replace(outcome, test_note=_test_note(outcome.has_model, test_dir, None))
    path = target / "test_metrics.json"
    with contextlib.suppress(OSError, ValueError):
        return dataclasses.replace(outcome, test_metrics=json.loads(path.read_text()))
    tested = _evaluate_into(target, settings)
    return dataclasses.replace(outcome, test_metrics=tested,
                               test_note=_test_note(True, test_dir, tested))


def _test_note(has_model: bool, test_dir: Path | None, tested: dict | None) -> str | None:
    if test_dir is None:
        return None
    if not has_model:
        return "not evaluated on the test split: the best trial left no best_model.pth"
    return None if tested else "not evaluated on the test split (see the log for why)"


# ---------------------------------------------------------------- held-out test split

def held_out_split(settings: dict[str, Any]) -> Path | None:
    """DATA_ROOT/test when the built-in objective ran and the data set has one (pure-ish)."""
    if settings.get("objective") != study_lib.BUILTIN_OBJECTIVE or not settings.get("data_root"):
        return None
    test_dir = Path(settings["data_root"]) / "test"
    return test_dir if test_dir.is_dir() else None


def evaluate_on_test(best_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Page top-1/top-5/mAP of best_dir/best_model.pth on the test split; None if unavailable."""
    try:
        # imports torch: only here, only when there is something to evaluate
        evaluate = importlib.import_module("psearch.writer_id.evaluate")
    except ImportError as exc:
        logger.warning("Test split not evaluated: the evaluate module is not available (%s)", exc)
        return None
    logger.info("Evaluating the best model once on the held-out test split of %s",
                settings.get("data_root"))
    try:
        return dict(evaluate.evaluate_checkpoint(str(best_dir / "best_model.pth"), split="test",
                                                 data_root=settings.get("data_root")))
    except Exception as exc:  # the summary must still be written
        logger.warning("Test split not evaluated: %s: %s", type(exc).__name__, exc)
        return None


def _evaluate_into(best_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    result = evaluate_on_test(best_dir, settings)
    if result is not None:
        atomic.write_json(best_dir / "test_metrics.json", {"split": "test", **result})
    return result


# ---------------------------------------------------------------- report

def render_report(snap: Snapshot, table: pd.DataFrame, outcome: BestOutcome,
                  checkpoint_dir: Path) -> str:
    """The human-facing report (markdown): counts, best trial, top 5, time, files."""
    counts = study_lib.count_trials(snap.trials, snap.direction)
    wall, device_hours = time_stats(snap.trials)
    lines = [f"# Search summary: study `{snap.study_name}`", "",
             f"Snapshot of {snap.taken_at:%Y-%m-%d %H:%M:%S} from `{redact_url(snap.storage_url)}`; "
             f"goal: {snap.direction} {snap.metric}.", "", "## Trials", "",
             f"- {len(snap.trials)} trial{'' if len(snap.trials) == 1 else 's'}: "
             f"{counts.complete} complete, {counts.pruned} pruned, "
             f"{counts.failed} failed, {counts.running} running, {counts.waiting} waiting",
             *_fail_reasons(snap.trials),
             f"- wall time {_hms(wall)} (first start to last finish); "
             f"{device_hours:.2f} device-hours ({_hms(device_hours * 3600)}) in ended trials",
             ""]
    lines += _best_section(snap, outcome, checkpoint_dir)
    lines += ["", f"## Top {TOP_K} trials", ""]
    params = sorted({_param_column(n, FIXED_COLUMNS) for t in snap.trials for n in t.params})
    lines += top_section(top_table(table), params)
    lines += ["", "## Files", ""]
    lines += _figure_lines(checkpoint_dir, counts.complete)
    lines += [f"- `{checkpoint_dir / 'summary' / 'all_trials.csv'}`, `top5_trials.csv`: tables, "
              "best first",
              f"- `{checkpoint_dir / 'best_overall'}`: the best completed trial's files"
              + ("" if (layout.best_dir(checkpoint_dir)).is_dir() else " (none yet)"), ""]
    return "\n".join(lines)


def _figure_lines(checkpoint_dir: Path, n_complete: int) -> list[str]:
    """One line per figure; the importances carry the figure's caution when trials are few."""
    caution = plots.importance_caution(n_complete) if n_complete else None  # none: a placeholder
    return [f"- `{checkpoint_dir / 'summary' / name}`: {what}"
            + (f" — **{caution}**" if caution and name == "param_importances.png" else "")
            for name, what in FIGURES.items()]


def top_section(top: pd.DataFrame, params: Sequence[str]) -> list[str]:
    """The top trials in Markdown: a narrow table of numbers, then each trial's hyperparameters
    on wrapped lines (a table with one column per parameter is too wide to read)."""
    if not len(top):
        return ["No completed trial yet."]
    params = [p for p in params if p in top.columns and top[p].notna().any()]
    metrics = _report_metrics(top, params)
    header = ["#", "trial", "value", "duration", *(_short(m, 20) for m in metrics)]
    rows = [[str(rank), str(row["number"]), _cell(row["value"]), _duration_cell(row["duration_s"]),
             *(_cell(row[m]) for m in metrics)] for rank, (_, row) in enumerate(top.iterrows(), 1)]
    shared = [p for p in params if top[p].notna().all()
              and top[p].map(_cell).nunique() == 1] if len(top) > 1 else []
    intro = "Hyperparameters, best first." + (
        f" Shared by all {len(top)}: {_settings(top.iloc[0], shared)}." if shared else "")
    lines = markdown_table(header, rows) + [""] + _wrapped(intro, "") + [""]
    for _, row in top.iterrows():
        own = _settings(row, [p for p in params if p not in shared]) or "(only the shared ones)"
        lines += _wrapped(f"- trial {row['number']}: {own}", "  ")
    return lines + ["", "Every column, at full precision: `top5_trials.csv`, `all_trials.csv`."]


def _report_metrics(top: pd.DataFrame, params: Sequence[str]) -> list[str]:
    """The first few numeric metric columns that the top trials have (the objective's key
    metrics come first in the table)."""
    skip = {*FIXED_COLUMNS, *params, *RUN_ATTRS, "datetime_start", "datetime_complete"}
    numeric = [c for c in top.columns if c not in skip and top[c].notna().any()
               and pd.api.types.is_numeric_dtype(top[c])]
    return numeric[:REPORT_METRICS]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A right-aligned Markdown table, padded so that the raw text lines up too (pure)."""
    widths = [max(map(len, column)) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
            *map(line, rows)]


def _settings(row: pd.Series, params: Sequence[str]) -> str:
    """`lr=3.04e-4, model_type=convnext`: the parameters this trial has (conditional ones
    are missing in some)."""
    return ", ".join(f"{p}={_cell(row[p])}" for p in params if not _missing(row[p]))


def _wrapped(text: str, indent: str) -> list[str]:
    # Markdown joins the lines again; the raw file stays readable too.
    return textwrap.wrap(text, REPORT_WIDTH, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def _cell(value: Any) -> str:
    """A value in a few characters: floats to 4 significant digits, long text cut."""
    if _missing(value):
        return "-"
    if isinstance(value, float):
        return plots.compact_number(value)
    return _short(str(value), 40)


def _duration_cell(seconds: Any) -> str:
    """Under a minute in seconds (a quick objective's trial), else as the wall time is."""
    if _missing(seconds):
        return "-"
    return f"{seconds:.1f} s" if seconds < 59.95 else _hms(seconds)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _short(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most - 1] + "…"


def _fail_reasons(trials: Sequence[FrozenTrial]) -> list[str]:
    reasons = [str(t.user_attrs.get("fail_reason", "stale (no heartbeat)"))[:80]
               for t in trials if t.state == TrialState.FAIL]
    if not reasons:
        return []
    tally = ", ".join(f"{reasons.count(r)}× {r}" for r in dict.fromkeys(reasons))
    return [f"- failed because: {tally}"]


def _best_section(snap: Snapshot, outcome: BestOutcome, checkpoint_dir: Path) -> list[str]:
    best = study_lib.best_complete(snap.trials, snap.direction)
    lines = ["## Best trial", ""]
    if best is None:
        return lines + [f"No completed trial yet. {outcome.message}"]
    lines += [f"Trial {best.number}: {snap.metric} = {best.value:.6g}", ""]
    lines += [f"- `{name}`: {value!r}" for name, value in best.params.items()]
    lines += ["", outcome.message]
    if not outcome.has_model:
        lines.append("best_overall/ has no best_model.pth: the objective wrote none for this "
                     "trial (config.json and metrics.json are there).")
    if outcome.test_metrics:
        lines.append(_test_line(outcome.test_metrics,
                                layout.best_dir(checkpoint_dir) / "test_metrics.json"))
    elif outcome.test_note:
        lines.append(f"Test split: {outcome.test_note}.")
    return lines


def _test_line(m: dict[str, Any], path: Path) -> str:
    """The held-out figures in one sentence; says why retrieval is missing when it is."""
    def fmt(key: str) -> str:
        value = m.get(key)
        return "n/a" if value is None or value != value else f"{value:.4f}"

    if m.get("retrieval_queries") == 0:
        return (f"Held-out test split: page retrieval is undefined (no writer has two test "
                f"pages); page classification accuracy {fmt('page_cls_acc')}, line accuracy "
                f"{fmt('line_acc')} (`{path}`).")
    return (f"Held-out test split: page top-1 {fmt('page_top1')}, page top-5 {fmt('page_top5')}"
            f", mAP {fmt('page_map')}, page classification accuracy {fmt('page_cls_acc')} "
            f"(`{path}`).")


# ---------------------------------------------------------------- the whole summary

def summary_lock(checkpoint_dir: Path):
    """One summariser at a time per checkpoint folder (the launcher's and a user's)."""
    return locks.file_lock(layout.summary_lock(checkpoint_dir), waiting=f"Another summary of "
                           f"{checkpoint_dir} is being written; waiting for it")


def write_figures(snap: Snapshot, out: Path) -> None:
    """The four figures, each replaced by a placeholder if it cannot be drawn."""
    counts = study_lib.count_trials(snap.trials, snap.direction)
    title = (f"Study {snap.study_name}: {len(snap.trials)} trials ({counts.complete} complete, "
             f"{counts.pruned} pruned, {counts.failed} failed, {counts.running} running)")
    args = (snap.trials, snap.direction, snap.metric)
    jobs = {"all_trials_comparison.png": lambda p: plots.plot_all_trials(*args, title, p),
            "hyperparameter_relationships.png": lambda p: plots.plot_hyperparameters(*args, p),
            "param_importances.png": lambda p: plots.plot_importances(*args, p),
            "optimization_history.png": lambda p: plots.plot_history(*args, p)}
    for name, draw in jobs.items():
        plots.draw_or_explain(out / name, FIGURES[name], draw)


def summarize(checkpoint_dir: Path, storage: str | None = None,
              study_name: str | None = None) -> str:
    """Write summary/ and best_overall/ for one study; returns the report."""
    if not checkpoint_dir.is_dir():
        raise UsageError(f"--checkpoint_dir {str(checkpoint_dir)!r} is not a folder")
    url = resolve_storage_url(checkpoint_dir, storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(url, study_name)
    out = layout.summary_dir(checkpoint_dir)
    # The snapshot is taken under the lock: a summariser that waited must not publish an older
    # best than the one that went before it.
    with summary_lock(checkpoint_dir):
        started = time.monotonic()
        snap = take_snapshot(study, url)
        _remove_leftovers(checkpoint_dir)
        table = trials_table(snap.trials, snap.direction, checkpoint_dir)
        atomic.write_text(out / "all_trials.csv", table.to_csv(index=False))
        atomic.write_text(out / "top5_trials.csv", top_table(table).to_csv(index=False))
        outcome = update_best_overall(snap, checkpoint_dir)
        try:
            write_figures(snap, out)
            report = render_report(snap, table, outcome, checkpoint_dir)
            atomic.write_text(out / "report.md", report)
        finally:
            # Deleted only now: a reader that was listing or opening the old folder during
            # the swap has had the seconds the figures took to finish.
            if outcome.retired is not None:
                shutil.rmtree(outcome.retired, ignore_errors=True)
    logger.info("Summary of %d trials written to %s in %.1f s", len(snap.trials), out,
                time.monotonic() - started)
    return report


def build_parser() -> argparse.ArgumentParser:
    """The command line; every help states its default."""
    parser = cli.Parser(short_usage="--checkpoint_dir C [options]", description="Plots, tables, a report and best_overall/ "
                                     "for a hyperparameter search (safe while it runs).")
    parser.add_argument("--checkpoint_dir", required=True, help="the search's checkpoint folder "
                        "(required)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL, or env:NAME to read "
                        "it from the environment variable NAME (default: "
                        f"sqlite:///CHECKPOINT_DIR/{STUDY_DB_NAME})")
    parser.add_argument("--study_name", default=None, help="study name (default: the storage's "
                        f"only study, else {DEFAULT_STUDY_NAME})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on a missing folder, database or study."""
    cmdline.hide_url_passwords(sys.argv[1:])  # if not done yet (a console script): `ps` shows argv
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [summarize pid %(process)d] %(levelname)s: %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    try:
        report = summarize(Path(ns.checkpoint_dir), ns.storage, ns.study_name)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
