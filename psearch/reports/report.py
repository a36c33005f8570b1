"""The summary's report (summary/report.md, also printed): the trials by state and why they failed,
the time spent, the best trial and what became of best_overall/, the top trials as a narrow
Markdown table, and the files written. It only formats the text; `summary.py` writes it."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from psearch.engine import confirm, layout, study as study_lib
from psearch.engine.urls import redact_url
from psearch.reports import param_plots, plots
from psearch.reports.best_overall import BestOutcome
from psearch.reports.tables import (FIXED_COLUMNS, RUN_ATTRS, TOP_K, Snapshot, param_column,
                                    time_stats, top_table)
from psearch.writer_id.names import INTERVAL_KEYS

# report.md's top table stays narrow enough for a Markdown viewer; top5_trials.csv has it all.
REPORT_METRICS = 3
REPORT_WIDTH = 100
# The figures the summary draws and what each shows: listed in the report, and the text of the
# placeholder drawn instead of one that cannot be drawn.
FIGURES = {
    "all_trials_comparison.png": "every trial's value (best first) and all validation curves",
    "hyperparameter_relationships.png": "the value against each hyperparameter",
    "param_importances.png": "hyperparameter importances (Optuna, PED-ANOVA)",
    "optimization_history.png": "value per trial and best so far (Optuna)",
}


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
             f"{counts.failed} failed, {counts.running} running, {counts.waiting} waiting"
             + (f"; and {counts.warm} COMPLETE trial(s) of an earlier study added by --warm_start "
                "(the sampler learned from them; not counted, never the best)"
                if counts.warm else ""),
             *_fail_reasons(snap.trials),
             f"- wall time {_hms(wall)} (first start to last finish); "
             f"{device_hours:.2f} device-hours ({_hms(device_hours * 3600)}) in ended trials",
             ""]
    lines += _best_section(snap, outcome, checkpoint_dir)
    sets = confirm.set_results(snap.trials, snap.direction, study_lib.will_rerun)
    if sets:
        lines += ["", "## Confirmation: the leading sets over seeds", ""]
        lines += confirmation_section(sets, snap.direction, outcome.test_metrics)
    lines += ["", f"## Top {TOP_K} trials", ""]
    params = sorted({param_column(n, FIXED_COLUMNS) for t in snap.trials for n in t.params})
    top = top_table(table)
    lines += top_section(top, params)
    if not sets:
        lines += overlap_advice(top, snap.direction)
    lines += space_section(snap.settings)
    lines += ["", "## Files", ""]
    lines += _figure_lines(checkpoint_dir, counts.complete)
    lines += [f"- `{checkpoint_dir / 'summary' / 'all_trials.csv'}`, `top5_trials.csv`: tables, "
              "best first",
              f"- `{checkpoint_dir / 'best_overall'}`: the best completed trial's files"
              + ("" if (layout.best_dir(checkpoint_dir)).is_dir() else " (none yet)"), ""]
    return "\n".join(lines)


def space_section(settings: dict[str, Any]) -> list[str]:
    """The search space the study was run with, as the YAML a --space file holds."""
    data = settings.get("space")
    if not data:
        return []
    from psearch.engine import space as space_lib

    text = space_lib.from_data(data, "the stored space").to_yaml()
    return ["", "## Search space", "", "Stored with the study (a rerun with another is refused); "
            "as a `--space` file:", "", "```yaml", *text.rstrip("\n").splitlines(), "```"]


def _figure_lines(checkpoint_dir: Path, n_complete: int) -> list[str]:
    """One line per figure; the importances carry the figure's caution when trials are few."""
    # No completed trial: the figure is a placeholder, with nothing to caution about.
    caution = param_plots.importance_caution(n_complete) if n_complete else None
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
    intervals = has_intervals(top)
    header = ["#", "trial", "value", *(["95% interval"] if intervals else []), "duration",
              *(_short(m, 20) for m in metrics)]
    rows = [[str(rank), str(row["number"]), _cell(row["value"]),
             *([_interval_cell(row)] if intervals else []), _duration_cell(row["duration_s"]),
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
    skip = {*FIXED_COLUMNS, *params, *RUN_ATTRS, *INTERVAL_KEYS, "datetime_start",
            "datetime_complete"}
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


def _hms(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


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
    best = study_lib.best_answer(snap.trials, snap.direction)
    lines = ["## Best trial", ""]
    if best is None:
        return lines + [f"No completed trial yet. {outcome.message}"]
    low, high = (best.user_attrs.get(k) for k in INTERVAL_KEYS)
    interval = f" (95% interval {low:.4g}–{high:.4g})" if _finite(low, high) else ""
    how = ""
    if confirm.chosen_trial(snap.trials, snap.direction) is not None:
        origin = best.user_attrs.get(confirm.CONFIRMS)
        how = (", the best run of the set with the best mean over seeds ("
               + (f"a confirmation run of trial {origin}'s set, seed {best.user_attrs.get('seed')})"
                  if origin is not None else "the set's own search trial)"))
    lines += [f"Trial {best.number}: {snap.metric} = {best.value:.6g}{interval}{how}", ""]
    lines += [f"- `{name}`: {value!r}" for name, value in best.params.items()]
    lines += ["", outcome.message]
    if not outcome.has_model:
        held = sorted(p.name for p in layout.best_dir(checkpoint_dir).glob("*"))
        lines.append("best_overall/ holds the trial's own files (" + (", ".join(
            f"`{n}`" for n in held[:8]) + (" …" if len(held) > 8 else "") if held else "none")
            + "): no best_model.pth (the built-in objective's model file) among them.")
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



# ---------------------------------------------------------------- how sure the answer is

def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and v == v for v in values)


def has_intervals(top: pd.DataFrame) -> bool:
    """Whether the trials carry the value's interval (the built-in objective writes it)."""
    return all(k in top.columns for k in INTERVAL_KEYS) and top[INTERVAL_KEYS[0]].notna().any()


def _interval_cell(row: pd.Series) -> str:
    low, high = (row[k] for k in INTERVAL_KEYS)
    return f"{plots.compact_number(low)}–{plots.compact_number(high)}" if _finite(low, high) \
        else "-"


def overlapping_leaders(top: pd.DataFrame, direction: str) -> list[int]:
    """The top trials whose 95% interval reaches the leader's value's interval, the leader
    first (pure); one number (the leader alone) when none does, empty without intervals."""
    if not len(top) or not has_intervals(top):
        return []
    low, high = (top.iloc[0][k] for k in INTERVAL_KEYS)
    if not _finite(low, high):
        return []
    found = [int(top.iloc[0]["number"])]
    for _, row in top.iloc[1:].iterrows():
        other_low, other_high = row[INTERVAL_KEYS[0]], row[INTERVAL_KEYS[1]]
        if not _finite(other_low, other_high):
            continue
        reaches = other_high >= low if direction == "maximize" else other_low <= high
        if reaches:
            found.append(int(row["number"]))
    return found


def overlap_advice(top: pd.DataFrame, direction: str) -> list[str]:
    """One line when the leaders are within each other's intervals, and what to do about it."""
    leaders = overlapping_leaders(top, direction)
    if len(leaders) < 2:
        return [] if not leaders else [
            "", f"Trial {leaders[0]} leads beyond the 95% intervals (from resampling the "
            "validation pages) of the others; other seeds may still differ more than pages do."]
    k = min(len(leaders), 3)
    names = ", ".join(map(str, leaders[:-1])) + f" and {leaders[-1]}"
    return ["", f"**Trials {names} are within each other's 95% intervals** (from resampling "
            "the validation pages): their order may be noise. To choose by the mean over seeds, "
            f"rerun the same command with `--confirm_top {k} --confirm_seeds 2` "
            f"({2 * k} more trials)."]


def confirmation_section(sets: Sequence[confirm.SetResult], direction: str,
                         test_metrics: dict[str, Any] | None) -> list[str]:
    """The confirmed sets ranked by mean value over their runs, next to the search's order."""
    header = ["#", "set (trial)", "mean", "sd", "n", "runs", "search rank", "search value"]
    rows = [[str(i), str(r.origin), _cell(r.mean), _cell(r.sd), str(r.n),
             ", ".join(str(n) for n, _ in r.runs) + (f" (+{r.failed} without value)"
                                                    if r.failed else ""),
             str(r.original_rank), _cell(r.original_value)] for i, r in enumerate(sets, 1)]
    chosen = sets[0]
    lines = markdown_table(header, rows) + [""]
    text = (f"Chosen by mean over seeds: the set of trial {chosen.origin} ({_cell(chosen.mean)} "
            f"± {_cell(chosen.sd)} over {chosen.n} runs); best_overall/ holds its best run, "
            f"trial {chosen.best_run(direction)}.")
    search_best = min(sets, key=lambda r: r.original_rank)
    if search_best.origin != chosen.origin:
        text += (f" The single-run search had picked trial {search_best.origin}, whose set "
                 f"averages {_cell(search_best.mean)}.")
    lines += _wrapped(text, "")
    figures = (test_metrics or {}).get("set")
    if figures and figures.get("mean"):
        mean, sd = figures["mean"], figures["sd"]
        names = {"page_top1": "page top-1", "page_map": "mAP"}
        parts = [f"{names[key]} {mean[key]:.4f}" + (
            f" ± {sd[key]:.4f}" if sd.get(key) is not None else "")
            for key in ("page_top1", "page_map") if key in mean]
        lines += [""] + _wrapped(f"Held-out test split over the set's {figures['n']} models: "
                                 + ", ".join(parts) + ".", "")
    return lines
