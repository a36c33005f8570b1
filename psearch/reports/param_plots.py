"""What the search learnt about its hyperparameters: the value against each one
(hyperparameter_relationships.png), and Optuna's own plots, drawn from an in-memory copy of the
snapshot: the hyperparameters' importances (param_importances.png) and the optimisation history
(optimization_history.png). The shared plumbing (pyplot, saving, colours, axes) is `plots.py`.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from psearch.engine import study as study_lib
from psearch.reports import plots

# A box from one to three values draws quartiles that are not there: show the points alone.
MIN_BOX_POINTS = 4
# Importances from fewer completed trials rank noise as much as the parameters.
MIN_TRIALS_FOR_IMPORTANCES = 10


# ---------------------------------------------------------------- value against each hyperparameter

def plot_hyperparameters(trials: Sequence[FrozenTrial], direction: str, metric: str,
                         path: Path) -> None:
    """The value against each hyperparameter, one panel each, from finished trials."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and t.value is not None and t.params]
    names = sorted({name for t in finished for name in t.params})
    title = "Value against each hyperparameter"
    if not names:
        plots.placeholder(path, title, "No finished trial with hyperparameters yet: this figure "
                          "appears once a trial completes or is pruned.")
        return
    plt = plots.pyplot()
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
    plots.save(fig, path)


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
            plots.log_axis(ax.xaxis)
        elif isinstance(dist, IntDistribution):
            plots.integer_axis(ax.xaxis)
        ax.set_xlabel(name + (" (log scale)" if getattr(dist, "log", False) else ""))
    small = len(having) <= plots.MANY_POINTS
    for state, face in ((TrialState.COMPLETE, plots.STATE_STYLE[TrialState.COMPLETE][0]),
                        (TrialState.PRUNED, "none")):
        group = [t for t in having if t.state == state]
        if not group:
            continue
        label = "complete" if state == TrialState.COMPLETE else "pruned (last reported value)"
        ax.scatter([position[t.number] for t in group], [t.value for t in group],
                   facecolors=face, edgecolors=plots.STATE_STYLE[state][0], s=30 if small else 10,
                   alpha=0.85 if small else 0.5, label=label, zorder=3)
    if best is not None and name in best.params:
        ax.scatter([position[best.number]], [best.value], marker="*", s=260, color="gold",
                   edgecolors=plots.BEST_COLOUR, zorder=5, label=f"best (trial {best.number})")
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

@contextlib.contextmanager
def _quiet_style() -> Iterator[None]:
    """Optuna's plots call plt.style.use("ggplot") and warn that they are experimental: keep
    both from leaking into our other figures and the log."""
    import matplotlib

    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


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
        plots.placeholder(path, title,
                          "No trial has completed yet, so there is no history to show.")
        return
    with _quiet_style():
        ax = optuna.visualization.matplotlib.plot_optimization_history(
            _study_copy(trials, direction), target_name=metric)
        ax.set_title(title)
        ax.set_xlabel("trial number")
        plots.integer_axis(ax.xaxis)
        if n > plots.MANY_POINTS:  # Optuna's large dots would merge into a solid band
            for points in ax.collections:
                points.set_sizes([12])
                points.set_alpha(0.6)
        ax.figure.set_size_inches(10, 6)
        plots.save(ax.figure, path, tight_bbox=True)


def plot_importances(trials: Sequence[FrozenTrial], direction: str, metric: str,
                     path: Path) -> None:
    """Optuna's hyperparameter importances (PED-ANOVA by default)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    title = f"Hyperparameter importances for {metric} ({len(done)} completed trials)"
    if len(done) < 2:
        plots.placeholder(path, title, f"Importances need at least 2 completed trials; the study "
                          f"has {len(done)}.")
        return
    varied = varied_params(done)
    if not varied:
        plots.placeholder(path, title, "No hyperparameter that every completed trial has took two "
                          "or more values, so there is nothing to rank yet.")
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
        plots.save(ax.figure, path, tight_bbox=True)


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
