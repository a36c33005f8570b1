"""What every summary figure shares: pyplot on the Agg backend, atomic saving, the placeholder
drawn instead of a figure that cannot be drawn, the trial states' colours, and short numbers and
ticks on the axes.

The figures themselves are `trial_plots.py` (the trials compared) and `param_plots.py` (the
hyperparameters, and Optuna's own plots); `summary.py` draws them. matplotlib is imported inside
the functions (Agg backend), so importing these modules stays cheap. Every figure is saved
atomically; a figure that cannot be drawn is replaced by a placeholder that says why, never left
stale.
"""
from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

from optuna.trial import TrialState

from psearch.engine import atomic

logger = logging.getLogger(__name__)

STATE_STYLE = {  # state -> (colour, legend name)
    TrialState.COMPLETE: ("#1f77b4", "complete"),
    TrialState.PRUNED: ("#ff7f0e", "pruned"),
    TrialState.FAIL: ("#d62728", "failed"),
    TrialState.RUNNING: ("#2ca02c", "running"),
    TrialState.WAITING: ("#7f7f7f", "waiting"),
}
BEST_COLOUR = "black"
# Past this many points in one panel, markers shrink and fade so that dense regions still read.
MANY_POINTS = 200
DPI = 110


def pyplot() -> Any:
    """pyplot on the Agg backend (no display on a compute node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, tight_bbox: bool = False) -> None:
    """Write `fig` to `path` atomically and close it."""
    # Our figures lay themselves out (tight_layout); a tight bounding box costs a second draw
    # and is needed only where a legend sits outside the axes (Optuna's history).
    atomic.save_figure(fig, path, dpi=DPI, **({"bbox_inches": "tight"} if tight_bbox else {}))
    pyplot().close(fig)


def placeholder(path: Path, title: str, why: str) -> None:
    """A figure that says in words why the real one cannot be drawn yet."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.axis("off")
    ax.set_title(title, fontsize=14)
    ax.text(0.5, 0.5, textwrap.fill(why, 80), ha="center", va="center", fontsize=12,
            transform=ax.transAxes)
    fig.tight_layout()
    save(fig, path)


def draw_or_explain(path: Path, title: str, draw: Callable[[Path], None]) -> None:
    """Run `draw(path)`; if it raises, write a placeholder naming the error instead."""
    try:
        draw(path)
    except Exception as exc:  # a figure must never end the summary or stay stale
        logger.warning("%s: not drawn (%s: %s)", path.name, type(exc).__name__, exc)
        pyplot().close("all")
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


def log_axis(axis: Any) -> None:
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


def integer_axis(axis: Any) -> None:
    """Trial numbers, ranks and epochs are whole: never a tick at 2.5."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 5, 10], integer=True))

