"""The trials compared, in one figure (all_trials_comparison.png): every trial's value ranked
best first, by state, beside the validation curves of all trials; and that ranking itself, which
the tables share (`rank_key`). The shared plumbing (pyplot, saving, colours, axes) is `plots.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from psearch.engine import study as study_lib
from psearch.reports import plots

# Past this many trials, tick labels per trial become unreadable: label ranks and the top 5.
MAX_LABELLED_TRIALS = 40
# Past this many, the validation curves merge into one band: draw an even sample along the ranks.
MAX_CURVES = 100


def shown_value(t: FrozenTrial) -> float | None:
    """The trial's value, else its last reported intermediate value (pruned, running, failed)."""
    if t.value is not None:
        return t.value
    if t.intermediate_values:
        return t.intermediate_values[max(t.intermediate_values)]
    return None


# Only a COMPLETE trial's value is its result; the others follow, ranked within their state.
STATE_ORDER = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2,
               TrialState.WAITING: 3, TrialState.FAIL: 4}


def rank_key(t: FrozenTrial, direction: str) -> tuple:
    """Sort key, best first: COMPLETE by value in the study's direction, then pruned, running,
    waiting and failed trials, each by their last reported value, then those without one."""
    value = shown_value(t)
    if value is None or value != value:
        return (STATE_ORDER[t.state], 1, 0.0, t.number)
    return (STATE_ORDER[t.state], 0, -value if direction == "maximize" else value, t.number)


def plot_all_trials(trials: Sequence[FrozenTrial], direction: str, metric: str, title: str,
                    path: Path) -> None:
    """Left: every trial's value, best first, by state. Right: all validation curves."""
    plt = plots.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(17, 6.5))
    _values_panel(left, trials, direction, metric)
    _curves_panel(right, trials, direction, metric)
    fig.suptitle(title, fontsize=15)
    fig.tight_layout()
    plots.save(fig, path)


def _values_panel(ax: Any, trials: Sequence[FrozenTrial], direction: str, metric: str) -> None:
    ranked = sorted((t for t in trials if shown_value(t) is not None),
                    key=lambda t: rank_key(t, direction))
    rank = {t.number: i + 1 for i, t in enumerate(ranked)}
    for state, (colour, name) in plots.STATE_STYLE.items():
        group = [t for t in ranked if t.state == state]
        if group:
            note = "" if state == TrialState.COMPLETE else ", last reported value"
            ax.scatter([rank[t.number] for t in group], [shown_value(t) for t in group],
                       color=colour, s=36 if len(ranked) <= plots.MANY_POINTS else 10, zorder=3,
                       label=f"{name} ({len(group)}{note})")
    _label_ranks(ax, ranked, direction)
    ax.set_title(f"Every trial's value, best first ({direction})")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    missing = [t for t in trials if shown_value(t) is None]
    if missing:
        counts = _count_by_state(missing)
        ax.text(0.99, 0.02, f"no value to show: {counts}", ha="right", va="bottom",
                transform=ax.transAxes, fontsize=9, color="dimgray")
    if ranked:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "No trial has reported a value yet", ha="center", va="center",
                transform=ax.transAxes, fontsize=12)


def _label_ranks(ax: Any, ranked: Sequence[FrozenTrial], direction: str) -> None:
    """Few trials: one tick per trial number. Many: ranks on the axis, the top 5 listed."""
    if len(ranked) <= MAX_LABELLED_TRIALS:
        ax.set_xticks(range(1, len(ranked) + 1))
        ax.set_xticklabels([str(t.number) for t in ranked], rotation=90 if len(ranked) > 20 else 0,
                           fontsize=8 if len(ranked) > 20 else 10)
        ax.set_xlabel("trial number (completed trials best first, then the others)")
        return
    ax.set_xlabel(f"rank of {len(ranked)} trials with a value (completed trials best first, "
                  "then the others)")
    plots.integer_axis(ax.xaxis)
    done = [t for t in ranked if t.state == TrialState.COMPLETE][:5]
    if not done:
        return
    top = "\n".join(f"{i + 1}. trial {t.number}: {t.value:.4g}" for i, t in enumerate(done))
    # The corner the sorted values leave empty: lower left when they fall, upper left otherwise.
    y = 0.03 if direction == "maximize" else 0.97
    ax.text(0.02, y, f"best completed\n{top}", transform=ax.transAxes, fontsize=9,
            family="monospace", va="bottom" if direction == "maximize" else "top",
            bbox={"facecolor": "white", "edgecolor": "lightgray"})


def _count_by_state(trials: Sequence[FrozenTrial]) -> str:
    names = [plots.STATE_STYLE[t.state][1] for t in trials]
    return ", ".join(f"{names.count(n)} {n}" for n in dict.fromkeys(names))


def thin_by_rank(ranked: Sequence[FrozenTrial], most: int) -> list[FrozenTrial]:
    """At most `most` trials, evenly spaced along the ranking (the first and the last kept), so
    that a sample still shows the spread from best to worst of every state (pure)."""
    if len(ranked) <= most:
        return list(ranked)
    picks = np.unique(np.linspace(0, len(ranked) - 1, most).round().astype(int))
    return [ranked[i] for i in picks]


def _curves_panel(ax: Any, trials: Sequence[FrozenTrial], direction: str, metric: str) -> None:
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    with_curves = sorted((t for t in trials if t.intermediate_values),
                         key=lambda t: rank_key(t, direction))
    drawn = thin_by_rank(with_curves, MAX_CURVES)
    many = len(drawn) > 50
    handles = []  # solid proxies: the faint lines themselves would vanish from the legend
    for state, (colour, name) in plots.STATE_STYLE.items():
        segments = [_curve(t) for t in drawn if t.state == state]
        if segments:
            ax.add_collection(LineCollection(segments, colors=colour, alpha=0.3 if many else 0.7,
                                             linewidths=0.7 if many else 1.3))
            dots = [xy[0] for xy in segments if len(xy) == 1]  # one step draws no line
            if dots:
                ax.scatter(*zip(*dots), color=colour, s=10, alpha=0.5 if many else 0.8)
            total = sum(t.state == state for t in with_curves)
            shown = f"{len(segments)} of {total}" if len(segments) < total else f"{total}"
            handles.append(Line2D([], [], color=colour, linewidth=2, label=f"{name} ({shown})"))
    best = study_lib.best_complete(trials, direction)
    if best is not None and best.intermediate_values:
        xy = np.asarray(_curve(best))
        handles += ax.plot(xy[:, 0], xy[:, 1], color=plots.BEST_COLOUR, linewidth=3, marker="o",
                           markersize=4, zorder=5,
                           label=f"best: trial {best.number} ({best.value:.4g})")
    plots.integer_axis(ax.xaxis)
    ax.set_title("Validation curves of all trials (intermediate values)" if drawn == with_curves
                 else f"Validation curves of {len(drawn)} of {len(with_curves)} trials, evenly "
                 "spaced by rank")
    ax.set_xlabel("epoch (reported step)")
    ax.set_ylabel(f"{metric} during training")
    ax.grid(alpha=0.3)
    if with_curves:
        ax.autoscale_view()
        ax.legend(handles=handles, loc="best")
    else:
        ax.text(0.5, 0.5, "No trial has reported intermediate values", ha="center",
                va="center", transform=ax.transAxes, fontsize=12)


def _curve(t: FrozenTrial) -> list[tuple[float, float]]:
    return [(step, t.intermediate_values[step]) for step in sorted(t.intermediate_values)]
