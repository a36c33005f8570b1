"""The summary's figures, drawn from one snapshot of the study's trials (a list of FrozenTrial).

Used by `summarize.py`; matplotlib is imported inside the functions (Agg backend), so importing
this module stays cheap. Every figure is saved atomically; a figure that cannot be drawn is
replaced by a placeholder that says why, never left stale.
"""
from __future__ import annotations

import contextlib
import logging
import math
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from psearch.engine import atomic, study as study_lib

logger = logging.getLogger(__name__)

STATE_STYLE = {  # state -> (colour, legend name)
    TrialState.COMPLETE: ("#1f77b4", "complete"),
    TrialState.PRUNED: ("#ff7f0e", "pruned"),
    TrialState.FAIL: ("#d62728", "failed"),
    TrialState.RUNNING: ("#2ca02c", "running"),
    TrialState.WAITING: ("#7f7f7f", "waiting"),
}
BEST_COLOUR = "black"
# Past this many trials, tick labels per trial become unreadable: label ranks and the top 5.
MAX_LABELLED_TRIALS = 40
# Past this many, the validation curves merge into one band: draw an even sample along the ranks.
MAX_CURVES = 100
# Past this many points in one panel, markers shrink and fade so that dense regions still read.
MANY_POINTS = 200
# A box from one to three values draws quartiles that are not there: show the points alone.
MIN_BOX_POINTS = 4
# Importances from fewer completed trials rank noise as much as the parameters.
MIN_TRIALS_FOR_IMPORTANCES = 10
DPI = 110


def _pyplot() -> Any:
    """pyplot on the Agg backend (no display on a compute node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def _quiet_style() -> Iterator[None]:
    """Optuna's plots call plt.style.use("ggplot") and warn that they are experimental: keep
    both from leaking into our other figures and the log."""
    import matplotlib

    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _save(fig: Any, path: Path, tight_bbox: bool = False) -> None:
    # Our figures lay themselves out (tight_layout); a tight bounding box costs a second draw
    # and is needed only where a legend sits outside the axes (Optuna's history).
    atomic.save_figure(fig, path, dpi=DPI, **({"bbox_inches": "tight"} if tight_bbox else {}))
    _pyplot().close(fig)


def placeholder(path: Path, title: str, why: str) -> None:
    """A figure that says in words why the real one cannot be drawn yet."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.axis("off")
    ax.set_title(title, fontsize=14)
    ax.text(0.5, 0.5, textwrap.fill(why, 80), ha="center", va="center", fontsize=12,
            transform=ax.transAxes)
    fig.tight_layout()
    _save(fig, path)


def draw_or_explain(path: Path, title: str, draw: Callable[[Path], None]) -> None:
    """Run `draw(path)`; if it raises, write a placeholder naming the error instead."""
    try:
        draw(path)
    except Exception as exc:  # a figure must never end the summary or stay stale
        logger.warning("%s: not drawn (%s: %s)", path.name, type(exc).__name__, exc)
        _pyplot().close("all")
        placeholder(path, title, f"This figure could not be drawn: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- numbers and ticks

def compact_number(v: float, digits: int = 4, scientific: bool | None = None) -> str:
    """`digits` significant digits, short: 0.5, 0.003104, 3.04e-4, 1.5e6 (pure). Scientific
    notation when the number is small or large, unless `scientific` says otherwise."""
    if scientific is None:
        scientific = v != 0 and not 1e-3 <= abs(v) < 1e4
    text = f"{v:.{digits - 1}e}" if scientific else f"{v:.{digits}g}"
    if "e" not in text:  # also nan and inf
        return text
    mantissa, exponent = text.split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def log_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Major tick values for a log axis over [lo, hi], at most `most` of them (pure).

    The densest series that fits: 1..9, 1-2-5, 1 per decade, 1 per 2, 3, ... decades.
    Matplotlib's own locator labels the minor ticks as well when the span is about a decade
    (a learning rate between 3e-4 and 3e-3), and those labels run into each other."""
    if not 0 < lo <= hi:
        return []
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    series = [(range(1, 10), 1), ((1, 2, 3, 5), 1), ((1, 2, 5), 1), ((1, 3), 1)]
    series += [((1,), step) for step in range(1, last - first + 2)]
    for mantissas, step in series:
        ticks = [m * 10.0 ** e for e in range(first, last + 1, step) for m in mantissas
                 if lo <= m * 10.0 ** e <= hi]
        if len(ticks) <= most:
            break
    if len(ticks) >= 2:
        return ticks
    # Too short a span for two round values (one trial, or all alike): even linear steps.
    from matplotlib.ticker import MaxNLocator

    return [float(t) for t in MaxNLocator(nbins=3).tick_values(lo, hi) if lo <= t <= hi]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Short labels in one notation for the whole axis: 1e-4, 1e-3, 1e-2, not 1e-4, 0.001 (pure)."""
    scientific = any(v != 0 and not 1e-3 <= abs(v) < 1e4 for v in ticks)
    return [compact_number(v, scientific=scientific) for v in ticks]


def _log_axis(axis: Any) -> None:
    """Few, short, non-overlapping labels on a log axis; unlabelled minor ticks between them.
    Chosen at draw time, from the limits the axis ends up with."""
    from matplotlib.ticker import Formatter, Locator, NullFormatter

    class FewTicks(Locator):
        def __call__(self) -> list[float]:
            return self.tick_values(*self.axis.get_view_interval())

        def tick_values(self, vmin: float, vmax: float) -> list[float]:
            return log_ticks(min(vmin, vmax), max(vmin, vmax))

    class ShortLabels(Formatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return compact_number(x)

        def format_ticks(self, values: Sequence[float]) -> list[str]:
            return tick_labels(values)

    axis.set_major_locator(FewTicks())
    axis.set_major_formatter(ShortLabels())
    axis.set_minor_formatter(NullFormatter())


def _integer_axis(axis: Any) -> None:
    """Trial numbers, ranks and epochs are whole: never a tick at 2.5."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 5, 10], integer=True))


# ---------------------------------------------------------------- all trials

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
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(17, 6.5))
    _values_panel(left, trials, direction, metric)
    _curves_panel(right, trials, direction, metric)
    fig.suptitle(title, fontsize=15)
    fig.tight_layout()
    _save(fig, path)


def _values_panel(ax: Any, trials: Sequence[FrozenTrial], direction: str, metric: str) -> None:
    ranked = sorted((t for t in trials if shown_value(t) is not None),
                    key=lambda t: rank_key(t, direction))
    rank = {t.number: i + 1 for i, t in enumerate(ranked)}
    for state, (colour, name) in STATE_STYLE.items():
        group = [t for t in ranked if t.state == state]
        if group:
            note = "" if state == TrialState.COMPLETE else ", last reported value"
            ax.scatter([rank[t.number] for t in group], [shown_value(t) for t in group],
                       color=colour, s=36 if len(ranked) <= MANY_POINTS else 10, zorder=3,
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
    _integer_axis(ax.xaxis)
    done = [t for t in ranked if t.state == TrialState.COMPLETE][:5]
    if not done:
        return
    top = "\n".join(f"{i + 1}. trial {t.number}: {t.value:.4g}" for i, t in enumerate(done))
    # The corner the sorted values leave empty: lower left when they fall, upper left otherwise.
    y = 0.03 if direction == "maximize" else 0.97
    ax.text(0.02, y, f"best completed\n{top}", transform=ax.transAxes, fontsize=9, family="monospace",
            va="bottom" if direction == "maximize" else "top",
            bbox={"facecolor": "white", "edgecolor": "lightgray"})


def _count_by_state(trials: Sequence[FrozenTrial]) -> str:
    names = [STATE_STYLE[t.state][1] for t in trials]
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
    for state, (colour, name) in STATE_STYLE.items():
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
        handles += ax.plot(xy[:, 0], xy[:, 1], color=BEST_COLOUR, linewidth=3, marker="o",
                           markersize=4, zorder=5,
                           label=f"best: trial {best.number} ({best.value:.4g})")
    _integer_axis(ax.xaxis)
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


# ---------------------------------------------------------------- hyperparameters

def plot_hyperparameters(trials: Sequence[FrozenTrial], direction: str, metric: str,
                         path: Path) -> None:
    """The value against each hyperparameter, one panel each, from finished trials."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and t.value is not None and t.params]
    names = sorted({name for t in finished for name in t.params})
    title = "Value against each hyperparameter"
    if not names:
        placeholder(path, title, "No finished trial with hyperparameters yet: this figure "
                    "appears once a trial completes or is pruned.")
        return
    plt = _pyplot()
    ncols = min(3, math.ceil(math.sqrt(len(names))))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows + 1.1),
                             squeeze=False)
    best = study_lib.best_complete(finished, direction)
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        _param_panel(ax, name, finished, best)
        ax.set_ylabel(metric if i % ncols == 0 else "")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    legend = {}  # label -> handle, across panels: a state may be missing from some of them
    for ax in axes.flat[:len(names)]:
        handles, labels = ax.get_legend_handles_labels()
        legend.update(zip(labels, handles))
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncols=3, fontsize=11)
    fig.suptitle(f"{title} ({len(finished)} finished trials, {direction})", fontsize=15)
    height = fig.get_figheight()  # inches: keep 0.5" for the legend below, 0.45" for the title
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1 - 0.45 / height))
    _save(fig, path)


def _param_panel(ax: Any, name: str, finished: Sequence[FrozenTrial],
                 best: FrozenTrial | None) -> None:
    having = [t for t in finished if name in t.params]
    dist = having[-1].distributions[name]  # the latest trial says how the parameter is searched
    if isinstance(dist, CategoricalDistribution):
        position = _categorical_axis(ax, name, dist, having)
    else:
        position = {t.number: t.params[name] for t in having}
        if getattr(dist, "log", False):
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
        elif isinstance(dist, IntDistribution):
            _integer_axis(ax.xaxis)
        ax.set_xlabel(name + (" (log scale)" if getattr(dist, "log", False) else ""))
    small = len(having) <= MANY_POINTS
    for state, face in ((TrialState.COMPLETE, STATE_STYLE[TrialState.COMPLETE][0]),
                        (TrialState.PRUNED, "none")):
        group = [t for t in having if t.state == state]
        if not group:
            continue
        label = "complete" if state == TrialState.COMPLETE else "pruned (last reported value)"
        ax.scatter([position[t.number] for t in group], [t.value for t in group],
                   facecolors=face, edgecolors=STATE_STYLE[state][0], s=30 if small else 10,
                   alpha=0.85 if small else 0.5, label=label, zorder=3)
    if best is not None and name in best.params:
        ax.scatter([position[best.number]], [best.value], marker="*", s=260, color="gold",
                   edgecolors=BEST_COLOUR, zorder=5, label=f"best (trial {best.number})")
    # A conditional parameter (e.g. one model's) is set in only some trials: say how many.
    ax.set_title(name if len(having) == len(finished) else f"{name} ({len(having)} trials)")
    ax.grid(alpha=0.3)


def box_groups(name: str, labels: Sequence[str],
               having: Sequence[FrozenTrial]) -> list[tuple[int, list[float]]]:
    """(choice index, completed values) of the choices with enough values for a box (pure);
    the others are shown by their points alone."""
    groups = [(i, [t.value for t in having if t.state == TrialState.COMPLETE
                   and str(t.params[name]) == label]) for i, label in enumerate(labels)]
    return [(i, values) for i, values in groups if len(values) >= MIN_BOX_POINTS]


def _categorical_axis(ax: Any, name: str, dist: CategoricalDistribution,
                      having: Sequence[FrozenTrial]) -> dict[int, float]:
    """Boxes of the completed values per choice; returns jittered x positions for the strip."""
    labels = [str(c) for c in dist.choices]
    index = {label: i for i, label in enumerate(labels)}
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(having))
    position = {t.number: index.get(str(t.params[name]), 0) + j for t, j in zip(having, jitter)}
    boxes = box_groups(name, labels, having)
    if boxes:
        ax.boxplot([v for _, v in boxes], positions=[i for i, _ in boxes], widths=0.5,
                   showfliers=False, medianprops={"color": "dimgray"})
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30 if max(map(len, labels)) > 8 else 0)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_xlabel(f"{name} (categorical)")
    return position


# ---------------------------------------------------------------- Optuna's own plots

def _study_copy(trials: Sequence[FrozenTrial], direction: str) -> optuna.Study:
    """An in-memory copy of the snapshot: Optuna's plots read a Study, and this one cannot
    change under them while a search runs. All trials are copied, in order, so that the copy's
    trial numbers are the study's (Optuna renumbers added trials from 0)."""
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler())
    study.add_trials(sorted(trials, key=lambda t: t.number))
    return study


def plot_history(trials: Sequence[FrozenTrial], direction: str, metric: str, path: Path) -> None:
    """Optuna's optimisation history (value per trial and best so far)."""
    n = sum(t.state == TrialState.COMPLETE for t in trials)
    title = f"Optimization history ({n} completed trials, {direction})"
    if n == 0:
        placeholder(path, title, "No trial has completed yet, so there is no history to show.")
        return
    with _quiet_style():
        ax = optuna.visualization.matplotlib.plot_optimization_history(
            _study_copy(trials, direction), target_name=metric)
        ax.set_title(title)
        ax.set_xlabel("trial number")
        _integer_axis(ax.xaxis)
        if n > MANY_POINTS:  # Optuna's large dots would merge into a solid band
            for points in ax.collections:
                points.set_sizes([12])
                points.set_alpha(0.6)
        ax.figure.set_size_inches(10, 6)
        _save(ax.figure, path, tight_bbox=True)


def plot_importances(trials: Sequence[FrozenTrial], direction: str, metric: str,
                     path: Path) -> None:
    """Optuna's hyperparameter importances (PED-ANOVA by default)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    title = f"Hyperparameter importances for {metric} ({len(done)} completed trials)"
    if len(done) < 2:
        placeholder(path, title, f"Importances need at least 2 completed trials; the study has "
                    f"{len(done)}.")
        return
    varied = varied_params(done)
    if not varied:
        placeholder(path, title, "No hyperparameter that every completed trial has took two or "
                    "more values, so there is nothing to rank yet.")
        return
    with _quiet_style():
        ax = optuna.visualization.matplotlib.plot_param_importances(
            _study_copy(trials, direction), params=varied, target_name=metric)
        caution = importance_caution(len(done))
        # Optuna's own title is left-aligned: this replaces it. A caution goes between the
        # title and the bars, where no bar can hide it.
        ax.set_title(title, loc="left", pad=30 if caution else 6)
        if caution:
            ax.text(0, 1.015, caution[:1].upper() + caution[1:], transform=ax.transAxes,
                    va="bottom", fontsize=12, color="firebrick",
                    bbox={"facecolor": "white", "edgecolor": "firebrick"})
        ax.set_xlabel("importance (normalised to sum to 1)")
        if ax.get_legend() is not None:  # one objective: its legend says nothing new
            ax.get_legend().remove()
        ax.figure.set_size_inches(10, max(4, 0.5 * len(varied) + 2))
        _save(ax.figure, path, tight_bbox=True)


def importance_caution(n_complete: int) -> str | None:
    """The warning a figure and the report carry when importances rest on few trials (pure)."""
    if n_complete >= MIN_TRIALS_FOR_IMPORTANCES:
        return None
    return (f"only {n_complete} completed trial{'' if n_complete == 1 else 's'}: importances "
            f"are rough (trust them from about {MIN_TRIALS_FOR_IMPORTANCES})")


def varied_params(done: Sequence[FrozenTrial]) -> list[str]:
    """Parameters set in every given trial that took at least two values (pure): Optuna ranks
    only parameters common to all trials, and a constant one would get a meaningless share."""
    if not done:
        return []
    common = set.intersection(*(set(t.params) for t in done))
    return sorted(n for n in common if len({repr(t.params[n]) for t in done}) > 1)
