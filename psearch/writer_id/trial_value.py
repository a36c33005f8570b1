"""What a trial's value is, from its validation curve, and how sure it is (pure numpy).

A trial's value decides which hyperparameters win, which epoch's weights become `best_model.pth`,
what is reported to the pruner each epoch and when early stopping ends the trial: one definition
serves all four, so they never disagree. The maximum of a noisy per-epoch curve over few validation
pages is biased upwards and is often a lucky epoch (the winner's curse; an earlier version picked a
first-epoch spike whose model scored 0.25 on test). `bench/trial_value.py` measured which
definition best predicts what a set of hyperparameters reaches over several seeds; the winner is
`DEFAULT` (bench/RESULTS.md has the comparison).

Each definition is a per-epoch score computed from that epoch and the ones before it (so it can be
reported while training), and a pick: the best score over the epochs where the smoothing window is
full, or the last one. The interval comes from the validation pages themselves: the query pages are
resampled with replacement within each writer, every per-epoch figure is recomputed from the
resample, and the definition is applied again (the selection of the best epoch included), so the
interval is that of the value as defined, at no extra training.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from psearch.writer_id.names import DEFAULT_TRIAL_VALUE, LEGACY_TRIAL_VALUE, TRIAL_VALUES

BOOTSTRAP_DRAWS = 1000
INTERVAL_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Definition:
    """One way to turn per-epoch page retrieval figures into a trial value."""

    name: str
    metric: str        # "top1", "map" or "mix" (their mean)
    window: int = 1    # epochs in the trailing mean (1: the epoch alone)
    pick: str = "best"  # "best" over the epochs with a full window, or "last"
    summary: str = ""

    def per_epoch(self, top1: np.ndarray, mean_ap: np.ndarray) -> np.ndarray:
        """The score after each epoch (axis 0: epochs; more axes pass through, e.g. resamples)."""
        raw = {"top1": top1, "map": mean_ap, "mix": (np.asarray(top1) + mean_ap) / 2}[self.metric]
        return trailing_mean(np.asarray(raw, dtype=float), self.window)

    def choose(self, top1: np.ndarray, mean_ap: np.ndarray) -> tuple[float, int]:
        """(value, 0-based epoch index whose weights stand for it); NaN, -1 without epochs."""
        scores = self.per_epoch(np.asarray(top1, float), np.asarray(mean_ap, float))
        idx = chosen_epoch(scores, np.asarray(mean_ap, float), self.window, self.pick)
        return (float("nan"), -1) if idx < 0 else (float(scores[idx]), idx)


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each epoch and the `window - 1` before it (fewer at the start); NaN epochs skipped."""
    if window <= 1 or len(values) == 0:
        return values.copy()
    out = np.empty_like(values, dtype=float)
    for e in range(len(values)):
        chunk = values[max(0, e - window + 1):e + 1]
        with np.errstate(invalid="ignore"):
            out[e] = np.nanmean(chunk, axis=0) if np.isfinite(chunk).any() else np.nan
    return out


def eligible(n_epochs: int, window: int) -> int:
    """First 0-based epoch that may be picked: the first with a full window, or the last epoch
    of a trial that ran fewer epochs than the window (pruned, or a short run)."""
    return min(window, n_epochs) - 1


def chosen_epoch(scores: np.ndarray, tiebreak: np.ndarray, window: int, pick: str) -> int:
    """0-based epoch picked from per-epoch `scores` (-1 when none is finite). 'best': the highest
    score among eligible epochs, ties to the higher `tiebreak`, then the earlier epoch."""
    n = len(scores)
    if n == 0:
        return -1
    if pick == "last":
        return n - 1 if np.isfinite(scores[n - 1]) else -1
    first = eligible(n, window)
    best = -1
    for e in range(first, n):
        if not np.isfinite(scores[e]):
            continue
        tb = tiebreak[e] if np.isfinite(tiebreak[e]) else -np.inf
        if best < 0 or (scores[e], tb) > (scores[best], tiebreak_at(tiebreak, best)):
            best = e
    return best


def tiebreak_at(tiebreak: np.ndarray, e: int) -> float:
    return float(tiebreak[e]) if np.isfinite(tiebreak[e]) else -np.inf


DEFINITIONS: dict[str, Definition] = {d.name: d for d in (
    Definition("top1_best", "top1", 1, "best",
               "page top-1 of the best epoch (ties: mAP) - the value before this choice was made"),
    Definition("map_best", "map", 1, "best", "page mAP of the best epoch"),
    Definition("top1_smooth3", "top1", 3, "best",
               "best mean page top-1 over 3 consecutive epochs"),
    Definition("map_smooth3", "map", 3, "best", "best mean page mAP over 3 consecutive epochs"),
    Definition("mix_smooth3", "mix", 3, "best",
               "best mean of (page top-1 + page mAP) / 2 over 3 consecutive epochs"),
    Definition("map_last3", "map", 3, "last", "mean page mAP of the last 3 epochs"),
)}
assert set(DEFINITIONS) == set(TRIAL_VALUES), "names.TRIAL_VALUES lists every definition"
# Chosen by bench/trial_value.py (bench/RESULTS.md): the definition whose single-seed value best
# picks the set of hyperparameters that is best over seeds.
DEFAULT = DEFAULT_TRIAL_VALUE
# How a study made before trial values were defined here measured them.
LEGACY = LEGACY_TRIAL_VALUE


def get(name: str) -> Definition:
    """The definition called `name` (KeyError names the choices)."""
    try:
        return DEFINITIONS[name]
    except KeyError:
        raise KeyError(f"unknown trial value {name!r}; choose from "
                       f"{', '.join(DEFINITIONS)}") from None


# ---------------------------------------------------------------- the interval

def bootstrap_interval(definition: Definition, query_top1: np.ndarray, query_ap: np.ndarray,
                       query_writers: Sequence, draws: int = BOOTSTRAP_DRAWS, seed: int = 0,
                       level: float = INTERVAL_LEVEL) -> tuple[float, float]:
    """(low, high) of the value under resampling of the query pages within each writer.

    `query_top1`, `query_ap`: [epochs, queries] per-query figures of every epoch (the same
    queries each epoch: the validation pages are fixed); `query_writers`: [queries]. Each epoch's
    figures are macro means over writers, as in metrics.retrieval_metrics. NaN, NaN when there is
    no epoch or no query.
    """
    top1 = np.asarray(query_top1, dtype=float)
    ap = np.asarray(query_ap, dtype=float)
    writers = np.asarray(query_writers)
    if top1.ndim != 2 or top1.shape[0] == 0 or top1.shape[1] == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # [epochs, draws] macro means of each resample: each writer's queries drawn with replacement
    sums_t = np.zeros((top1.shape[0], draws))
    sums_a = np.zeros_like(sums_t)
    groups = [np.flatnonzero(writers == w) for w in np.unique(writers)]
    for members in groups:
        pick = members[rng.integers(0, len(members), size=(draws, len(members)))]
        sums_t += top1[:, pick].mean(axis=2)
        sums_a += ap[:, pick].mean(axis=2)
    top1_b, ap_b = sums_t / len(groups), sums_a / len(groups)
    values = resampled_values(definition, top1_b, ap_b)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def resampled_values(definition: Definition, top1: np.ndarray, mean_ap: np.ndarray) -> np.ndarray:
    """The value of each resample ([epochs, draws] figures -> [draws]), the pick included."""
    scores = definition.per_epoch(top1, mean_ap)
    n = scores.shape[0]
    if definition.pick == "last":
        return scores[n - 1]
    first = eligible(n, definition.window)
    with np.errstate(invalid="ignore"):
        masked = np.where(np.isfinite(scores[first:]), scores[first:], -np.inf)
        best = masked.max(axis=0)
    return np.where(np.isfinite(best), best, np.nan)
