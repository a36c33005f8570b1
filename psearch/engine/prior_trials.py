"""What a search starts from: known parameter sets run first (`--enqueue`), and the finished trials
of an earlier study that the sampler learns from (`--warm_start`).

Both are added once per study, under the study's budget lock (storage.budget_lock), so however
many launchers start together and however often the command is rerun, a set is enqueued once and
an earlier trial is added once. An enqueued set is a WAITING trial that the next claim takes
before any sampled one (study.claim_step 'ask'); it counts in --n_trials like any trial. A
warm-start trial is a COMPLETE trial with the user attribute `warm_start_from`: the sampler sees
it, but it is not one of this search's trials (not counted, never rerun, never handed back).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from psearch.engine import layout, storage as storage_lib, urls
from psearch.engine.config import SearchConfig
from psearch.engine.urls import redact_url
from psearch.engine.errors import UsageError
from psearch.engine.space import Space

logger = logging.getLogger(__name__)

ENQUEUED = "enqueued"  # user attribute of an enqueued set's trial: the set, as set_key writes it
WARM_START_FROM = "warm_start_from"  # user attribute of a warm-start trial: where it came from


def is_warm_start(t: FrozenTrial) -> bool:
    """Whether `t` was copied from an earlier study (--warm_start) (pure)."""
    return WARM_START_FROM in t.user_attrs


def set_key(params: Mapping[str, Any]) -> str:
    """One parameter set as a string, equal for equal sets whatever their order (pure)."""
    return json.dumps(dict(params), sort_keys=True)


def sets_to_enqueue(trials: Sequence[FrozenTrial], sets: Sequence[Mapping[str, Any]]
                    ) -> list[dict[str, Any]]:
    """The sets no trial of the study was enqueued with yet, in their order (pure)."""
    done = {t.user_attrs.get(ENQUEUED) for t in trials}
    return [dict(s) for s in sets if set_key(s) not in done]


@dataclass(frozen=True)
class Source:
    """The earlier study of --warm_start: its label in `warm_start_from` and its COMPLETE trials."""

    label: str
    trials: tuple[FrozenTrial, ...]


def warm_trials(source: Source, space: Space | None, have: Sequence[FrozenTrial]
                ) -> tuple[list[FrozenTrial], int]:
    """The trials to add (pure): the source's COMPLETE trials whose parameters fit `space`
    (with no space: as they are), not added before; and how many did not fit."""
    added = {t.user_attrs.get(WARM_START_FROM) for t in have}
    new, misfits = [], 0
    for t in source.trials:
        origin = f"{source.label}#{t.number}"
        if origin in added or t.value is None:
            continue
        if space is not None and space.check_values(t.params, partial=False) is not None:
            misfits += 1
            continue
        distributions = space.distributions(t.params) if space is not None else t.distributions
        new.append(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=t.value, params=dict(t.params),
            distributions=distributions, user_attrs={WARM_START_FROM: origin}))
    return new, misfits


def source_url(source: str) -> str:
    """--warm_start as a storage URL: a URL as it is, a checkpoint folder's own study file."""
    if "://" in source:
        return source
    if not os.path.isfile(os.path.join(source, layout.STUDY_DB_NAME)):
        raise UsageError(f"--warm_start {source}: no {layout.STUDY_DB_NAME} in that folder; give"
                         " the checkpoint folder of an earlier search, or its storage URL")
    return layout.default_storage_url(source)


def read_source(cfg: SearchConfig) -> Source | None:
    """The earlier study's COMPLETE trials (UsageError when it cannot be read, holds no such
    study, is this very study, or was made to the other direction); None without --warm_start."""
    if cfg.warm_start is None:
        return None
    url = source_url(cfg.warm_start)
    path = urls.file_path(url)
    if path is not None and not path.is_file():  # opening it would create an empty one
        raise UsageError(f"--warm_start {cfg.warm_start}: no study database at {path}; give an "
                         "earlier search's folder or storage URL")
    if url == cfg.storage_url and (cfg.warm_start_study or cfg.study_name) == cfg.study_name:
        raise UsageError(f"--warm_start {cfg.warm_start} is this study itself; give an earlier "
                         "search's folder (or another --warm_start_study)")
    try:
        storage = storage_lib.make_storage(url, cfg.heartbeat_grace)
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # noqa: BLE001 - any reason the source cannot be read: one line
        raise UsageError(f"--warm_start {redact_url(url)}: cannot read it ({type(exc).__name__}:"
                         f" {str(exc).splitlines()[0] if str(exc) else ''})") from None
    name = _study_name(cfg.warm_start_study, names, url)
    study = optuna.load_study(study_name=name, storage=storage)
    if study.direction.name.lower() != cfg.direction:
        raise UsageError(f"--warm_start: the study {name!r} was made to "
                         f"{study.direction.name.lower()}, this one to {cfg.direction}; its "
                         "values cannot teach this search")
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    label = f"{redact_url(url)}:{name}"
    return Source(label, tuple(t for t in trials if not is_warm_start(t)))


def _study_name(wanted: str | None, names: Sequence[str], url: str) -> str:
    """The study to warm start from: the one named, else the storage's only one."""
    listed = ", ".join(sorted(names)) or "none"
    if wanted is not None:
        if wanted not in names:
            raise UsageError(f"--warm_start_study {wanted}: no such study in {redact_url(url)} "
                             f"(it holds: {listed})")
        return wanted
    if len(names) != 1:
        raise UsageError(f"--warm_start {redact_url(url)} holds {len(names)} studies ({listed});"
                         " name one with --warm_start_study NAME")
    return names[0]


def add(study: optuna.Study, cfg: SearchConfig, source: Source | None) -> None:
    """Enqueue --enqueue's sets and add --warm_start's trials that the study lacks, under the
    budget lock (so once however many launchers start together)."""
    if not cfg.enqueue and source is None:
        return
    with storage_lib.budget_lock(study, cfg.storage_url):
        trials = study.get_trials(deepcopy=False)
        new_sets = sets_to_enqueue(trials, cfg.enqueue)
        for params in new_sets:
            study.enqueue_trial(params, user_attrs={ENQUEUED: set_key(params)})
        if cfg.enqueue:
            logger.info("Known sets from %s: %d enqueued now, %d already in the study",
                        os.path.basename(cfg.enqueue_file or ""), len(new_sets),
                        len(cfg.enqueue) - len(new_sets))
        if source is not None:
            new, misfits = warm_trials(source, cfg.space, trials)
            study.add_trials(new)
            logger.info("Warm start from %s: %d COMPLETE trial(s) added now, %d added before, "
                        "%d that do not fit the space left out", source.label, len(new),
                        len(source.trials) - len(new) - misfits, misfits)
