"""Confirmation (`--confirm_top K --confirm_seeds S`): once the search's --n_trials have finished,
the K best hyperparameter sets run S more times with other seeds, and the choice is made by the
mean over each set's runs (pure decisions on plain trial lists).

A confirmation run is an ordinary trial of the same study, created with the original's parameters
fixed and two user attributes: `confirms` (the original trial's number) and `seed`. Each (set,
seed) pair is a slot; a slot is taken by at most one trial at a time and finished at most once,
so confirmation has an exact budget of K x S trials however many launchers share the study, and a
rerun with a larger K or S runs only the new slots. Every trial carries a `seed` user attribute
(the search's trials `--seed`); an objective trains with it.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable, Sequence

from optuna.trial import FrozenTrial, TrialState

from psearch.engine.prior_trials import is_warm_start

CONFIRMS = "confirms"  # user attribute: the number of the trial whose set this run repeats
SEED = "seed"          # user attribute: the training seed of the trial


def is_confirmation(t: FrozenTrial) -> bool:
    return t.user_attrs.get(CONFIRMS) is not None


def never_pruned(trial):
    """The trial, whose `should_prune()` always says no if it is a confirmation run: a run cut
    short would pull its set's mean down for the pruner's sake, not the set's."""
    if trial.user_attrs.get(CONFIRMS) is not None:
        trial.should_prune = lambda: False
    return trial


def search_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The search's own trials (the ones --n_trials counts): not confirmation runs, nor trials
    copied from an earlier study (--warm_start)."""
    return [t for t in trials if not is_confirmation(t) and not is_warm_start(t)]


def confirmation_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if is_confirmation(t)]


def seeds_for(base_seed: int, n_seeds: int) -> list[int]:
    """The confirmation seeds: distinct from the search's own seed and from each other, and the
    same first ones whatever `n_seeds` is (raising it adds seeds) (pure)."""
    return [base_seed + 1000 * (j + 1) for j in range(n_seeds)]


def leaders(trials: Sequence[FrozenTrial], top: int, direction: str) -> list[FrozenTrial]:
    """The `top` best COMPLETE trials of the search (best first, lowest number on ties), one per
    hyperparameter set (pure)."""
    sign = -1 if direction == "maximize" else 1
    done = sorted((t for t in search_trials(trials) if t.state == TrialState.COMPLETE
                   and t.value is not None and math.isfinite(t.value)),
                  key=lambda t: (sign * t.value, t.number))
    chosen, seen = [], []
    for t in done:
        if t.params in seen:
            continue
        seen.append(t.params)
        chosen.append(t)
        if len(chosen) == top:
            break
    return chosen


@dataclasses.dataclass(frozen=True)
class Slot:
    """One confirmation run to make: the set of trial `confirms`, trained with `seed`."""

    confirms: int
    seed: int
    params: dict[str, Any]


def search_over(trials: Sequence[FrozenTrial], n_trials: int) -> bool:
    """Whether the search's --n_trials have finished and none of its trials still runs (pure)."""
    own = search_trials(trials)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in own)
    busy = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in own)
    return finished >= n_trials and not busy


def planned_slots(trials: Sequence[FrozenTrial], top: int, seeds: int, base_seed: int,
                  direction: str) -> list[Slot]:
    """Every slot confirmation wants, best set first (pure). Valid once `search_over`."""
    return [Slot(t.number, seed, dict(t.params)) for t in leaders(trials, top, direction)
            for seed in seeds_for(base_seed, seeds)]


def open_slots(trials: Sequence[FrozenTrial], slots: Sequence[Slot]) -> list[Slot]:
    """The planned slots no trial has taken yet (pure). A slot whose run failed for a reason
    that reruns it is the retry's (study.next_retry), not a new slot's; one that failed on its
    own merits is spent: the set's mean is then over fewer runs, and the report says so."""
    taken = {(t.user_attrs.get(CONFIRMS), t.user_attrs.get(SEED))
             for t in confirmation_trials(trials)}
    return [s for s in slots if (s.confirms, s.seed) not in taken]


def resolved(trials: Sequence[FrozenTrial], slots: Sequence[Slot], retryable) -> int:
    """How many planned slots are over: their run finished, or failed for good (pure).
    `retryable(t)` tells a FAIL trial that will run again."""
    done = set()
    for t in confirmation_trials(trials):
        key = (t.user_attrs.get(CONFIRMS), t.user_attrs.get(SEED))
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                t.state == TrialState.FAIL and not retryable(t)):
            done.add(key)
    return sum((s.confirms, s.seed) in done for s in slots)


# ---------------------------------------------------------------- the choice by mean

@dataclasses.dataclass(frozen=True)
class SetResult:
    """One confirmed hyperparameter set: its original trial and every run's value."""

    origin: int                  # the search trial whose set it is
    original_value: float
    original_rank: int           # 1 = the search's best
    runs: tuple[tuple[int, float], ...]   # (trial number, value) of each COMPLETE run
    failed: int                  # runs that ended without a value (pruned or failed for good)

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return statistics.fmean(v for _, v in self.runs) if self.runs else float("nan")

    @property
    def sd(self) -> float:
        return statistics.stdev(v for _, v in self.runs) if self.n >= 2 else float("nan")

    def best_run(self, direction: str) -> int:
        """The number of the set's best run (its model goes to best_overall/)."""
        sign = -1 if direction == "maximize" else 1
        return min(self.runs, key=lambda r: (sign * r[1], r[0]))[0]


def set_results(trials: Sequence[FrozenTrial], direction: str,
                will_rerun: Callable[[FrozenTrial], bool] = lambda t: False) -> list[SetResult]:
    """The confirmed sets, best mean first (ties: the search's order) (pure). A set is one whose
    trial some confirmation run repeats (so a summary needs no flags); it counts its original
    trial and its COMPLETE reruns, and as failed the runs that ended without a value for good
    (`will_rerun(t)`: a FAIL trial that runs again). Empty until a confirmation run completes."""
    confirms = confirmation_trials(trials)
    if not any(t.state == TrialState.COMPLETE for t in confirms):
        return []
    ranked = leaders(trials, len(trials), direction)
    origins = {t.user_attrs[CONFIRMS] for t in confirms}
    results = []
    for rank, lead in enumerate(ranked, start=1):
        if lead.number not in origins:
            continue
        mine = [t for t in confirms if t.user_attrs.get(CONFIRMS) == lead.number]
        runs = [(lead.number, float(lead.value))] + [
            (t.number, float(t.value)) for t in mine
            if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
        failed = sum(t.state == TrialState.PRUNED
                     or (t.state == TrialState.FAIL and not will_rerun(t)) for t in mine)
        results.append(SetResult(lead.number, float(lead.value), rank, tuple(runs), failed))
    sign = -1 if direction == "maximize" else 1
    return sorted(results, key=lambda r: (sign * r.mean, r.original_rank))


def chosen_trial(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The trial whose model the search hands back after confirmation: the best run of the set
    with the best mean; None without confirmation runs (then: the best COMPLETE trial) (pure)."""
    results = set_results(trials, direction)
    if not results:
        return None
    number = results[0].best_run(direction)
    return next(t for t in trials if t.number == number)
