"""Summarise a search: plots, tables, a report, and `best_overall/` with the best trial's files.

    python summarize.py --checkpoint_dir C [--storage URL --study_name S]

Safe at any time, also while workers run: it reads one snapshot of the study's trials (a single
query, no transaction of its own) and builds everything from it. Writes C/summary/ (plots, CSVs,
report.md) and replaces C/best_overall/ atomically when the best COMPLETE trial changes; the
launcher runs it at the end of every run. This module opens the study and writes it all, one
summariser at a time; the tables are `tables.py`, best_overall/ and its held-out test evaluation
`best_overall.py` (the only place torch is loaded, and only then), the report `report.py`.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

import optuna

from psearch.engine import (atomic, cli, layout, locks, storage as storage_lib,
                            study as study_lib, urls)
from psearch.engine.config import DEFAULT_STUDY_NAME
from psearch.engine.errors import EXIT_USAGE, UsageError
from psearch.engine.urls import redact_url, resolve_storage
from psearch.engine.layout import STUDY_DB_NAME, default_storage_url
from psearch.reports import param_plots, plots, trial_plots
from psearch.reports.best_overall import remove_leftovers, update_best_overall
from psearch.reports.report import FIGURES, render_report
from psearch.reports.tables import Snapshot, top_table, trials_table

logger = logging.getLogger("summarize")


# ---------------------------------------------------------------- opening the study

def resolve_storage_url(checkpoint_dir: Path, storage: str | None) -> str:
    """`--storage` (a URL or env:NAME), else the SQLite file the search writes inside the
    checkpoint folder."""
    return resolve_storage(storage, os.environ) or default_storage_url(checkpoint_dir)


def _check_storage_exists(url: str) -> None:
    """Refuse a file storage that is not there (opening it would create an empty one)."""
    path = urls.file_path(url)
    if path is not None and not path.is_file():
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
    jobs = {"all_trials_comparison.png": lambda p: trial_plots.plot_all_trials(*args, title, p),
            "hyperparameter_relationships.png":
                lambda p: param_plots.plot_hyperparameters(*args, p),
            "param_importances.png": lambda p: param_plots.plot_importances(*args, p),
            "optimization_history.png": lambda p: param_plots.plot_history(*args, p)}
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
        remove_leftovers(checkpoint_dir)
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
    urls.hide_url_passwords(sys.argv[1:])  # if not done yet (a console script): `ps` shows argv
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [summarize pid %(process)d] %(levelname)s: %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    try:
        report = summarize(Path(ns.checkpoint_dir), ns.storage, ns.study_name)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
