"""The study: storage, sampler and pruner, stored settings, the exact trial budget, recovery.

Shared by the worker and the launcher; never imports torch. Every process builds the sampler and
pruner the same way (`load_study` without them would silently use Optuna's defaults).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import time
import warnings
import zlib
from typing import Any, Callable, Collection, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from psearch.engine import (confirm, optuna_internals, ownership, prior_trials, procfs,
                            space as space_lib, storage as storage_lib, watchers)
from psearch.engine.config import SearchConfig, absolute_objective
from psearch.engine.urls import redact_url
from psearch.engine import errors
from psearch.engine.errors import FailReason, UsageError
from psearch.engine.resilient_trial import ResilientTrial
from psearch.engine.stopping import StopRequested

logger = logging.getLogger(__name__)

# The fail reasons (errors.FailReason) the rest of the engine names through the study.
INTERRUPTED, STORAGE_LOST = FailReason.INTERRUPTED, FailReason.STORAGE_LOST
RETRYABLE_REASONS, NOT_ATTEMPTS = errors.RETRYABLE_REASONS, errors.NOT_ATTEMPTS
# Reasons that count as an attempt (an interrupt does not): a trial that keeps killing its worker
# stops being retried after this many attempts.
MAX_ATTEMPTS = 3
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


class Step(str, enum.Enum):
    """What a claim does (claim_step decides it from the study's trials)."""

    TAKE = "take"        # the RUNNING trial this owner already holds (its answer was lost)
    NONE = "none"        # no budget left
    ASK = "ask"          # a trial enqueued (--enqueue, or by hand): ask() takes the oldest
    CREATE = "create"    # a new trial, or the rerun of a FAIL one that runs again
    CONFIRM = "confirm"  # a confirmation run of an open (set, seed) slot


class SettingsMismatch(UsageError):
    """The stored study was made with settings that change what a trial's value means."""


# ---------------------------------------------------------------- sampler, pruner, study

def sampler_seed(base_seed: int, worker_rank: int, trials_so_far: int) -> int:
    """A seed per worker and per start, so workers (and resumed runs) don't repeat suggestions."""
    return zlib.crc32(f"{base_seed}:{worker_rank}:{trials_so_far}".encode()) & 0x7FFFFFFF


def make_sampler(seed: int, n_workers: int = 1) -> optuna.samplers.BaseSampler:
    """TPE with constant liar; at least one random start-up trial per worker."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True,
            n_startup_trials=max(10, n_workers))


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner `--pruner` names; each judges a trial by its reported epochs (1..epochs).

    median: no pruning in the first fifth of the epochs, nor before 5 trials have finished;
    asha: successive halving from 1 epoch with reduction factor 3; hyperband: brackets of it.
    """
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5,
                                           n_warmup_steps=max(2, epochs // 5), interval_steps=1)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs,
                                              reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UsageError(f"--pruner {name!r} is not one of median, asha, hyperband, none")


def open_study(cfg: SearchConfig, worker_rank: int = 0, n_workers: int = 1,
               create: bool = True) -> optuna.Study:
    """Create or load the study with this project's sampler and pruner."""
    storage = storage_lib.make_storage(cfg.storage_url, cfg.heartbeat_grace)
    pruner = make_pruner(cfg.pruner, cfg.epochs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        existing = optuna.load_study(study_name=cfg.study_name, storage=storage, pruner=pruner)
    except KeyError:
        if not create:
            raise UsageError(f"no study {cfg.study_name!r} in {redact_url(cfg.storage_url)}; run "
                             "the search once to create it, or pass the right --study_name"
                             ) from None
        existing = None
    if existing is not None and existing.direction.name.lower() != cfg.direction:
        raise SettingsMismatch(f"the study {cfg.study_name!r} is set to "
                               f"{existing.direction.name.lower()}, not --direction {cfg.direction}"
                               "; rerun with the original --direction or another --study_name")
    n_before = len(existing.get_trials(deepcopy=False)) if existing is not None else 0
    sampler = make_sampler(sampler_seed(cfg.seed, worker_rank, n_before), n_workers)
    if existing is not None:
        existing.sampler = sampler
        return existing
    return optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=sampler,
                               pruner=pruner, direction=cfg.direction, load_if_exists=True)


# ---------------------------------------------------------------- settings stored with the study

def search_settings(cfg: SearchConfig, objective: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that change what a trial's value means; rerunning with others is refused.
    `objective`: the objective kind's own (its data's fingerprint, say: ObjectiveKind.check)."""
    return {"objective": cfg.objective_kind.stored_name(cfg), "direction": cfg.direction,
            **objective, "space": cfg.space.to_data() if cfg.space is not None else None}


def settings_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any],
                         prefix: str = "") -> list[str]:
    """Human-readable differences between stored and wanted settings (empty when equal); nested
    settings (the data's fingerprint) by their path, e.g. 'data.val.pages: stored 48, now 49'."""
    diffs = []
    for key in sorted(set(stored) | set(wanted)):
        old, new = stored.get(key), wanted.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            diffs += settings_differences(old, new, f"{prefix}{key}.")
            continue
        key = prefix + key
        if old != new:
            if isinstance(old, list) and isinstance(new, list) and len(old) + len(new) > 6:
                old, new = _list_summary(old), _list_summary(new)
            diffs.append(f"{key}: stored {old!r}, now {new!r}")
    return diffs


def _list_summary(values: list) -> str:
    """'4 values: a, b, …, d' for a long list in a one-line message (pure)."""
    shown = values if len(values) <= 3 else [*values[:2], "…", values[-1]]
    return f"{len(values)} values: {', '.join(map(str, shown))}"


def check_or_store_settings(study: optuna.Study, settings: Mapping[str, Any], where: str,
                            heartbeat_grace_s: int | None = None,
                            legacy: Mapping[str, Any] | None = None) -> None:
    """Refuse (changing nothing) when the stored settings, or the heartbeat grace period, differ
    from these; then store what the study does not hold yet (a new study: all of it). `legacy`:
    what a study made before a setting was stored measured (compared in its place)."""
    stored = study.user_attrs.get("search_settings")
    if stored is not None:
        old = _comparable({**(legacy or {}), **stored})
        diffs = settings_differences(old, {k: v for k, v in _comparable(settings).items()
                                           if k in old})
        if diffs:
            raise SettingsMismatch(
                f"the study in {where} was made with other settings ({'; '.join(diffs)}); rerun "
                "with the original values, or start a new study (another --checkpoint_dir or "
                "--study_name)")
    if heartbeat_grace_s is not None:
        _check_heartbeat(study, heartbeat_grace_s)
    if stored is None:
        study.set_user_attr("search_settings", dict(settings))
    elif set(settings) - set(stored):
        study.set_user_attr("search_settings", {**settings, **stored})
    if heartbeat_grace_s is not None:
        check_or_store_heartbeat(study, heartbeat_grace_s)


def legacy_settings(cfg: SearchConfig) -> dict[str, Any]:
    """What a study made by an earlier version, which lacks settings added since, was run with:
    the objective kind's own, and the default space (there was no other)."""
    default = cfg.objective_kind.default_space(cfg.options)
    return {**cfg.objective_kind.legacy_settings(cfg),
            "space": default.to_data() if default is not None else None}


def _comparable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as this version writes them: a custom objective's file made absolute (older
    versions stored the path as typed, so `obj.py:f` then and `/abs/obj.py:f` now are the same
    objective); a search space as one line of YAML per parameter."""
    objective = settings.get("objective")
    settings = dict(settings)
    if isinstance(settings.get("space"), Mapping):  # compared, and named, parameter by parameter
        settings["space"] = space_lib.texts(settings["space"])
    if not isinstance(objective, str):
        return settings
    return {**settings, "objective": absolute_objective(objective)}


def check_or_store_heartbeat(study: optuna.Study, grace_s: int) -> None:
    """Every launcher of a study must judge heartbeats alike: with a shorter grace period one
    could fail another's live trials. The first run stores it; a different value is refused."""
    _check_heartbeat(study, grace_s)
    if study.user_attrs.get("heartbeat_grace") is None:
        study.set_user_attr("heartbeat_grace", int(grace_s))


def _check_heartbeat(study: optuna.Study, grace_s: int) -> None:
    stored = study.user_attrs.get("heartbeat_grace")
    if stored is not None and int(stored) != int(grace_s):
        raise SettingsMismatch(f"--heartbeat_grace {grace_s} differs from the {stored} s this "
                               f"study's launchers use; pass --heartbeat_grace {stored}")


# ---------------------------------------------------------------- counting and the budget

@dataclasses.dataclass(frozen=True)
class Counts:
    """Trials by state, and the best finished value."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    warm: int = 0  # trials copied from an earlier study (--warm_start): counted apart
    best_value: float | None = None
    best_number: int | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def count_trials(trials: Sequence[FrozenTrial], direction: str = "maximize") -> Counts:
    """Count trials by state and find the best COMPLETE one (pure); trials copied from an earlier
    study (--warm_start) are counted apart, as `warm`."""
    by_state = {s: 0 for s in TrialState}
    warm = 0
    for t in trials:
        if prior_trials.is_warm_start(t):
            warm += 1
            continue
        by_state[t.state] += 1
    best = best_complete(trials, direction)
    return Counts(complete=by_state[TrialState.COMPLETE], pruned=by_state[TrialState.PRUNED],
                  failed=by_state[TrialState.FAIL], running=by_state[TrialState.RUNNING],
                  waiting=by_state[TrialState.WAITING], warm=warm,
                  best_value=best.value if best else None, best_number=best.number if best else None)


def best_complete(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The best COMPLETE trial of this search (lowest number on ties; never one copied from an
    earlier study, whose model was trained under other settings), or None (pure)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
            and not prior_trials.is_warm_start(t)]
    if not done:
        return None
    sign = -1 if direction == "maximize" else 1
    return min(done, key=lambda t: (sign * t.value, t.number))


def best_answer(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The trial the search hands back: after confirmation, the best run of the set with the best
    mean over its runs; otherwise the best COMPLETE trial (pure)."""
    return confirm.chosen_trial(trials, direction) or best_complete(trials, direction)


def budget_left(counts: Counts, n_trials: int) -> int:
    """Trials that may still start: running ones count, since each may finish (pure)."""
    return max(0, n_trials - counts.finished - counts.running)


@dataclasses.dataclass(frozen=True)
class Confirmation:
    """What --confirm_top/--confirm_seeds ask for (top 0: none)."""

    top: int = 0
    seeds: int = 0
    base_seed: int = 42
    direction: str = "maximize"

    @classmethod
    def of(cls, cfg: SearchConfig) -> "Confirmation":
        return cls(cfg.confirm_top, cfg.confirm_seeds, cfg.seed, cfg.direction)

    def slots(self, trials: Sequence[FrozenTrial]) -> list[confirm.Slot]:
        return confirm.planned_slots(trials, self.top, self.seeds, self.base_seed, self.direction)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Where the study stands against what was asked: the search's --n_trials, then the
    confirmation runs (pure data, from `budget`)."""

    n_trials: int
    finished: int          # the search's finished trials
    startable: int         # trials that may start now (the search's, else confirmation's)
    confirm_planned: int = 0   # confirmation runs wanted (K x S until the leaders are known)
    confirm_done: int = 0      # of them, over (finished, or failed for good)
    confirming: bool = False   # the search is over and confirmation runs

    @property
    def total(self) -> int:
        return self.n_trials + self.confirm_planned

    @property
    def done(self) -> int:
        return min(self.finished, self.n_trials) + self.confirm_done

    @property
    def complete(self) -> bool:
        return self.finished >= self.n_trials and self.confirm_done >= self.confirm_planned


def budget(trials: Sequence[FrozenTrial], n_trials: int,
           confirmation: Confirmation = Confirmation()) -> Budget:
    """The study's budget: the search first, then confirmation once the search is over (pure)."""
    own = confirm.search_trials(trials)
    counts = count_trials(own)
    left = budget_left(counts, n_trials)
    if confirmation.top <= 0:
        return Budget(n_trials, counts.finished, left)
    if not confirm.search_over(trials, n_trials):
        return Budget(n_trials, counts.finished, left, confirmation.top * confirmation.seeds)
    slots = confirmation.slots(trials)
    retries, open_slots = confirmation_work(trials, slots)
    return Budget(n_trials, counts.finished, len(retries) + len(open_slots), len(slots),
                  confirm.resolved(trials, slots, will_rerun), confirming=True)


def confirmation_work(trials: Sequence[FrozenTrial], slots: Sequence[confirm.Slot]
                      ) -> tuple[list[FrozenTrial], list[confirm.Slot]]:
    """What confirmation may start now (pure): its interrupted runs to rerun, oldest first, and
    the planned `slots` no run has taken yet."""
    return (pending_retries(confirm.confirmation_trials(trials)),
            confirm.open_slots(trials, slots))


def claim_trial(study: optuna.Study, cfg: SearchConfig, owner: Mapping[str, Any],
                cancelled: Callable[[], bool] | None = None) -> optuna.Trial | None:
    """Start the next trial if the budget allows (None when it does not).

    Under the study's budget lock (storage.budget_lock, shared by every launcher of the study):
    read the trials (Optuna's cached storage reads only those not yet finished), fail those whose
    owner is provably dead, count, then create the trial already RUNNING with its owner's
    attributes (and, for an interrupted/crashed trial that runs again, its hyperparameters) in
    one write. So the study never exceeds `cfg.n_trials` finished trials however many workers,
    launchers or nodes race, and no trial is ever RUNNING without an owner. A trial someone
    enqueued by hand (WAITING) is taken first. When `cancelled()` turns true while waiting for
    the lock, StopRequested is raised and no trial is made. Safe to call again after a storage
    error: a trial it created is taken, not created twice.
    """
    with storage_lib.budget_lock(study, cfg.storage_url, cancelled):
        if cancelled is not None and cancelled():
            raise StopRequested("stopped while claiming a trial")
        trials = study.get_trials(deepcopy=False)
        if recover_dead_trials(study, ownership.Host.current(), cfg.heartbeat_grace, trials):
            trials = study.get_trials(deepcopy=False)
        step, retry = claim_step(trials, owner, cfg.n_trials, Confirmation.of(cfg))
        seeded = {**owner, confirm.SEED: cfg.seed}  # a search trial trains with --seed
        if step == Step.NONE:
            return None
        if step == Step.ASK:  # a trial enqueued by hand: ask() takes the oldest
            trial = study.ask()
            if not _owned_by(trial, owner):
                for key, value in seeded.items():
                    trial.set_user_attr(key, value)
            return trial
        if step == Step.CREATE:
            trial_id = optuna_internals.create_running_trial(study, _template(seeded, retry))
            if retry is not None:
                logger.info("Trial %d (%s) runs again as a new trial with the same "
                            "hyperparameters", retry.number, _reason(retry))
        elif step == Step.CONFIRM:
            trial_id = optuna_internals.create_running_trial(study, _confirm_template(owner, retry))
            logger.info("Confirming trial %d's hyperparameters with seed %d", retry.confirms,
                        retry.seed)
        else:  # an earlier call created our trial, then lost the answer to a storage error
            trial_id = next(optuna_internals.trial_id(t) for t in trials if t.state == TrialState.RUNNING
                            and _owned_by(t, owner))
    # What ask() does once it has the trial (its cache of trials would be one trial old); the
    # trial is ours already, so the lock is not held while the sampler reads the study.
    optuna_internals.forget_cached_trials(study)
    return confirm.never_pruned(ResilientTrial(study, trial_id, cancelled))


def claim_step(trials: Sequence[FrozenTrial], owner: Mapping[str, Any], n_trials: int,
               confirmation: Confirmation = Confirmation()) -> tuple[str, Any]:
    """What a claim does with these trials (pure): 'take' the RUNNING trial this owner already
    holds, 'none' when no budget is left, 'ask' for a trial enqueued by hand, 'create' a new
    one (rerunning the returned FAIL trial, if any), or, once the search is over, 'create' the
    rerun of a confirmation run or 'confirm' the returned open confirm.Slot."""
    if any(t.state == TrialState.RUNNING and _owned_by(t, owner) for t in trials):
        return Step.TAKE, None
    own = confirm.search_trials(trials)
    if budget_left(count_trials(own), n_trials) > 0:
        if any(t.state == TrialState.WAITING for t in own):
            return Step.ASK, None
        return Step.CREATE, next_retry(own)
    if confirmation.top <= 0 or not confirm.search_over(trials, n_trials):
        return Step.NONE, None
    retries, open_slots = confirmation_work(trials, confirmation.slots(trials))
    if retries:
        return Step.CREATE, retries[0]
    return (Step.CONFIRM, open_slots[0]) if open_slots else (Step.NONE, None)


def _confirm_template(owner: Mapping[str, Any], slot: confirm.Slot) -> FrozenTrial:
    """A confirmation run: RUNNING from now, the set's hyperparameters fixed, its seed."""
    return optuna.trial.create_trial(
        state=TrialState.RUNNING, system_attrs={"fixed_params": dict(slot.params)},
        user_attrs={**owner, confirm.CONFIRMS: slot.confirms, confirm.SEED: slot.seed})


def _template(owner: Mapping[str, Any], retry: FrozenTrial | None) -> FrozenTrial:
    """The new trial: RUNNING from now, its owner's attributes; a rerun's hyperparameters fixed
    as `enqueue_trial` fixes them."""
    if retry is None:
        return optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=dict(owner))
    return optuna.trial.create_trial(state=TrialState.RUNNING,
                                     system_attrs={"fixed_params": dict(retry.params)},
                                     user_attrs={**owner, **retry_user_attrs(retry)})


def _owned_by(t: FrozenTrial | optuna.Trial, owner: Mapping[str, Any]) -> bool:
    return all(t.user_attrs.get(key) == value for key, value in owner.items())


def _reason(t: FrozenTrial) -> str:
    # A FAIL without a reason was failed by Optuna's heartbeat check: its worker vanished.
    return str(t.user_attrs.get("fail_reason", FailReason.STALE))


def next_retry(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The oldest FAIL trial that should run again and is not yet queued or rerun (pure)."""
    pending = pending_retries(trials)
    return pending[0] if pending else None


def pending_retries(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The FAIL trials that should run again and are not yet rerun, oldest first (pure)."""
    taken = {t.user_attrs.get("resumed_from") for t in trials}
    return [t for t in sorted(trials, key=lambda t: t.number)
            if t.state == TrialState.FAIL and t.number not in taken and will_rerun(t)]


def will_rerun(t: FrozenTrial) -> bool:
    """Whether a FAIL trial runs again: it failed for a reason not its own, and has attempts left."""
    return _reason(t) in RETRYABLE_REASONS and retry_user_attrs(t)["attempt"] <= MAX_ATTEMPTS


def retry_user_attrs(t: FrozenTrial) -> dict[str, Any]:
    """User attributes of the trial that reruns `t`: its origin and attempt count, and what makes
    it the same run (its seed, the set a confirmation run repeats) (pure)."""
    attempt = int(t.user_attrs.get("attempt", 1))
    if _reason(t) not in NOT_ATTEMPTS:
        attempt += 1
    same = {k: t.user_attrs[k] for k in (confirm.CONFIRMS, confirm.SEED) if k in t.user_attrs}
    return {"resumed_from": t.number, "attempt": attempt, **same}


def failures_in_row(trials: Sequence[FrozenTrial], run: str, worker: str) -> int:
    """How many of the latest ended trials of worker `worker` in run `run` failed in a row on
    their own merits (pure): a worker restarted after a timeout goes on counting."""
    mine = sorted((t for t in trials if t.state.is_finished() and t.user_attrs.get("run") == run
                   and t.user_attrs.get("worker") == worker), key=lambda t: -t.number)
    count = 0
    for t in mine:
        if t.state != TrialState.FAIL or _reason(t) in RETRYABLE_REASONS:
            break
        count += 1
    return count


# ---------------------------------------------------------------- recovery

def fail_running_trials(study: optuna.Study, reason: str, pid: int | None = None,
                        run: str | None = None) -> list[int]:
    """Mark the RUNNING trials of worker `pid` or of launcher run `run` FAIL with `reason`.

    Only for owners known to be gone (the caller's own workers, after they ended).
    """
    assert pid is not None or run is not None, "never fail every RUNNING trial: others may own them"
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
              if (pid is None or t.user_attrs.get("pid") == pid)
              and (run is None or t.user_attrs.get("run") == run)]
    return _fail(study, trials, reason)


def _fail(study: optuna.Study, trials: Sequence[FrozenTrial], reason: str) -> list[int]:
    """Mark `trials` FAIL with `reason`; ones that finished meanwhile are left as they are."""
    failed = []
    for t in trials:
        with contextlib.suppress(RuntimeError, ValueError):
            optuna_internals.set_trial_user_attr(study, t, "fail_reason", reason)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(t.number)
    return failed


def dead_trials(trials: Sequence[FrozenTrial], here: ownership.Host, heartbeat_grace_s: int,
                now: float, stale_ids: Collection[int] = (),
                start_of=procfs.process_start,
                beats: watchers.BeatWatch | None = None) -> tuple[list, list]:
    """RUNNING trials that are provably dead, as (owner gone from this host, heartbeat stale).

    An owner on this host is judged by its process (pid and start time), at once and above any
    heartbeat; one elsewhere only by its heartbeat: Optuna's (`stale_ids`, RDB storages: judged
    on the database server's clock), or where the storage has none the `heartbeat_n` counter
    that `Heartbeat` writes, judged by `beats` on this process's monotonic clock `now` (pure but
    for `start_of` and what `beats` remembers).
    """
    beats = watchers.BEATS if beats is None else beats
    gone, stale = [], []
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        verdict = ownership.judge(t.user_attrs, here, start_of)
        count = t.user_attrs.get(watchers.HEARTBEAT_COUNT)
        if verdict == ownership.Verdict.DEAD:
            gone.append(t)
        elif verdict == ownership.Verdict.UNKNOWN and (
                optuna_internals.trial_id(t) in stale_ids
                or (count is not None
                    and beats.unchanged_for(optuna_internals.trial_id(t), count, now)
                    > heartbeat_grace_s)):
            stale.append(t)
    return gone, stale


def recover_dead_trials(study: optuna.Study, here: ownership.Host, heartbeat_grace_s: int,
                        trials: Sequence[FrozenTrial] | None = None) -> list[int]:
    """Fail the RUNNING trials whose owner is provably dead, so they run again: owners on this
    host that no longer exist (pid and start time), and trials whose heartbeat is stale. A live
    trial of another launcher, on this host or any other, is never touched. `trials`: the
    study's trials as just read, if the caller has them."""
    if trials is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not any(t.state == TrialState.RUNNING for t in trials):
        return []
    stale_ids = optuna_internals.stale_trial_ids(study)
    gone, stale = dead_trials(trials, here, heartbeat_grace_s, time.monotonic(), set(stale_ids))
    crashed = _fail(study, gone, FailReason.CRASHED)
    if crashed:
        logger.warning("Trials %s were left RUNNING by processes of %s that no longer exist: "
                       "they run again", crashed, here.name)
    silent = _fail(study, stale, FailReason.STALE)
    if silent:
        logger.warning("Trials %s sent no heartbeat for %d s (their host or worker died): they "
                       "run again", silent, heartbeat_grace_s)
    return [*crashed, *silent]
