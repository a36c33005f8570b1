"""Optuna's private names this project relies on (engine/optuna_internals.py), checked on the
installed Optuna: an upgrade that renames one fails here, naming it, not somewhere silently."""
import atexit

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from psearch.engine import optuna_internals as oi

# The heartbeat the fixture's storage keeps (for stale_trial_ids) is experimental in Optuna 5.
pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage")]


@pytest.fixture
def study(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=60,
                                         grace_period=120)
    return optuna.create_study(storage=storage, study_name="s")


def test_every_private_name_exists_on_the_installed_optuna(study):
    for name in oi.STUDY_ATTRS:
        assert hasattr(study, name), f"optuna.Study has no {name}: update optuna_internals.py"
    study.get_trials()
    assert hasattr(study._thread_local, "cached_all_trials"), \
        "optuna.Study._thread_local.cached_all_trials is gone: update optuna_internals.py"
    trial = study.ask()
    for name in oi.TRIAL_ATTRS:
        assert hasattr(trial, name) and hasattr(study.get_trials()[0], name), name
    backend = oi.rdb_backend(oi.storage(study))
    assert isinstance(backend, optuna.storages.RDBStorage), "no RDBStorage behind _backend"
    assert hasattr(backend, "engine") and hasattr(backend, "_get_stale_trial_ids")
    assert callable(getattr(atexit, "_run_exitfuncs", None))
    assert callable(getattr(atexit, "_clear", None))


def test_they_do_what_this_project_needs(study):
    study.get_trials()  # fills the cache
    number_before = len(study.get_trials())
    new_id = oi.create_running_trial(study, create_trial(state=TrialState.RUNNING,
                                                         user_attrs={"owner": "me"}))
    oi.forget_cached_trials(study)
    trials = study.get_trials()
    assert len(trials) == number_before + 1  # the cache did not hide the new trial
    made = trials[-1]
    assert oi.trial_id(made) == new_id and made.user_attrs == {"owner": "me"}
    assert made.state == TrialState.RUNNING
    oi.set_trial_user_attr(study, made, "fail_reason", "crashed")
    oi.forget_cached_trials(study)
    assert study.get_trials()[-1].user_attrs["fail_reason"] == "crashed"
    assert oi.stale_trial_ids(study) == []  # no trial has missed its heartbeat
    assert oi.rdb_engine(oi.rdb_backend(oi.storage(study))).name == "sqlite"


def test_a_cache_that_moved_is_refused_loudly(study, monkeypatch):
    class Elsewhere:
        pass
    monkeypatch.setattr(study, "_thread_local", Elsewhere())
    with pytest.raises(RuntimeError, match="cached_all_trials"):
        oi.forget_cached_trials(study)
