"""best_overall/: the files (model, config, metrics) of the trial the search hands back (the best
COMPLETE trial, or after confirmation the best run of the set with the best mean), replaced by an
atomic folder swap only when it changes, and that model's one evaluation on the held-out test
split; after confirmation also the mean and sd of the test figures over the set's models.

The evaluation is the built-in objective's (`psearch.writer_id.evaluate`), imported only when there
is a model and a test split to evaluate: it loads torch, which nothing else in the reports does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

import statistics

from psearch.engine import atomic, confirm, layout, study as study_lib
from psearch.reports.tables import Snapshot, trial_folder, trial_metrics
from psearch.engine.ranks import RANKS_DIR
from psearch.writer_id import builtin
from psearch.writer_id.names import RESUME_CHECKPOINT

logger = logging.getLogger("summarize")


@dataclasses.dataclass(frozen=True)
class BestOutcome:
    """What happened to best_overall/ and why, for the report."""

    message: str
    has_model: bool = False
    test_metrics: dict[str, Any] | None = None
    test_note: str | None = None
    retired: Path | None = None  # the previous best_overall/, deleted once the summary is done


# Not copied into best_overall/: the resume checkpoint (as big as the model and its optimizer
# state; nothing resumes from best_overall/) and the scratch folder of a trial's ranks.
SKIPPED = frozenset({RESUME_CHECKPOINT, RANKS_DIR})


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
    """Fill `staging` with the best trial's files (whatever its objective saved there, but for the
    built-in objective's resume checkpoint and the ranks' scratch); True when it holds a model
    checkpoint (best_model.pth)."""
    source = trial_folder(best, checkpoint_dir)
    staging.mkdir(parents=True)
    for path in sorted(source.rglob("*")) if source.is_dir() else []:
        relative = path.relative_to(source)
        if not path.is_file() or path.is_symlink() or relative.parts[0] in SKIPPED \
                or path.name in SKIPPED:
            continue
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        atomic.copy_durably(path, staging / relative)
    model = source / "best_model.pth"
    atomic.write_json(staging / "config.json", best_config(best, snap, source))
    try:
        metrics = json.loads((source / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {"value": best.value, **trial_metrics(best, checkpoint_dir)}
    atomic.write_json(staging / "metrics.json", metrics)
    return model.is_file()


def remove_leftovers(checkpoint_dir: Path) -> None:
    """Staging folders of a summariser that was killed mid-swap (call it holding the summary
    lock, so that no live summariser's are among them)."""
    for pattern in (".best_overall.new-*", ".best_overall.old-*"):
        for path in checkpoint_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def update_best_overall(snap: Snapshot, checkpoint_dir: Path) -> BestOutcome:
    """Copy the best COMPLETE trial into best_overall/ (atomic swap) if it changed."""
    target = layout.best_dir(checkpoint_dir)
    best = study_lib.best_answer(snap.trials, snap.direction)
    if best is None:
        state = "left as it was" if target.exists() else "not created"
        return BestOutcome(f"best_overall/ {state}: no trial has completed yet.")
    test_dir = held_out_split(snap.settings)
    models = set_models(snap, checkpoint_dir)
    if names_best(target, best, snap):
        outcome = BestOutcome(f"best_overall/ already holds trial {best.number}: unchanged.",
                              has_model=(target / "best_model.pth").is_file())
        return _test_existing(target, outcome, test_dir, snap.settings, models)
    staging = checkpoint_dir / f".best_overall.new-{atomic.process_tag()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        has_model = stage_best(staging, best, snap, checkpoint_dir)
        tested = (_evaluate_into(staging, snap.settings, models) if has_model and test_dir
                  else None)
        retired = atomic.swap_in_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # left only if staging or the swap failed
    return BestOutcome(f"best_overall/ updated from trial {best.number}.", has_model=has_model,
                       test_metrics=tested, test_note=_test_note(has_model, test_dir, tested),
                       retired=retired)


def _test_existing(target: Path, outcome: BestOutcome, test_dir: Path | None,
                   settings: dict[str, Any], models: dict[int, Path]) -> BestOutcome:
    """An unchanged best is evaluated on the test split only if that was never done (or, after
    confirmation, not over the set's models as they are now)."""
    if test_dir is None or not outcome.has_model:
        return dataclasses.replace(outcome, test_note=_test_note(outcome.has_model, test_dir, None))
    path = target / "test_metrics.json"
    with contextlib.suppress(OSError, ValueError):
        stored = json.loads(path.read_text())
        if (stored.get("set") or {}).get("trials", []) == sorted(models):
            return dataclasses.replace(outcome, test_metrics=stored)
    tested = _evaluate_into(target, settings, models)
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
    if settings.get("objective") != builtin.NAME or not settings.get("data_root"):
        return None
    test_dir = Path(settings["data_root"]) / "test"
    return test_dir if test_dir.is_dir() else None


def evaluate_on_test(model_path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Page top-1/top-5/mAP of a best_model.pth on the test split; None if unavailable."""
    try:
        # imports torch: only here, only when there is something to evaluate
        evaluate = importlib.import_module("psearch.writer_id.evaluate")
    except ImportError as exc:
        logger.warning("Test split not evaluated: the evaluate module is not available (%s)", exc)
        return None
    logger.info("Evaluating %s once on the held-out test split of %s", model_path,
                settings.get("data_root"))
    try:
        return dict(evaluate.evaluate_checkpoint(str(model_path), split="test",
                                                 data_root=settings.get("data_root")))
    except Exception as exc:  # the summary must still be written
        logger.warning("Test split not evaluated: %s: %s", type(exc).__name__, exc)
        return None


# The test figures averaged over a confirmed set's models.
SET_FIGURES = ("page_top1", "page_top5", "page_map", "page_cls_acc", "line_acc")


def set_models(snap: Snapshot, checkpoint_dir: Path) -> dict[int, Path]:
    """After confirmation: the chosen set's runs and their best_model.pth (trial number -> path),
    those that left one; empty without confirmation."""
    results = confirm.set_results(snap.trials, snap.direction, study_lib.will_rerun)
    if not results:
        return {}
    by_number = {t.number: t for t in snap.trials}
    paths = {n: trial_folder(by_number[n], checkpoint_dir) / "best_model.pth"
             for n, _ in results[0].runs}
    return {n: p for n, p in sorted(paths.items()) if p.is_file()}


def set_statistics(figures: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd over the set's models of each test figure (pure); sd needs two models."""
    mean, sd = {}, {}
    for key in SET_FIGURES:
        values = [float(f[key]) for f in figures.values()
                  if f.get(key) is not None and f[key] == f[key]]
        if values:
            mean[key] = statistics.fmean(values)
            sd[key] = statistics.stdev(values) if len(values) >= 2 else None
    return {"trials": sorted(figures), "n": len(figures), "mean": mean, "sd": sd,
            "per_trial": {str(n): {k: f.get(k) for k in SET_FIGURES} for n, f in
                          sorted(figures.items())}}


def _evaluate_into(best_dir: Path, settings: dict[str, Any],
                   models: dict[int, Path] | None = None) -> dict[str, Any] | None:
    result = evaluate_on_test(best_dir / "best_model.pth", settings)
    if result is None:
        return None
    record = {"split": "test", **result}
    if models:
        figures = {n: evaluate_on_test(path, settings) for n, path in models.items()}
        record["set"] = set_statistics({n: f for n, f in figures.items() if f is not None})
    atomic.write_json(best_dir / "test_metrics.json", record)
    return record
