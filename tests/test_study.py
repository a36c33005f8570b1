import multiprocessing as mp

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

import study as study_lib
from config import SearchConfig


def _cfg(tmp_path, **kw):
    return SearchConfig(data_root=None, checkpoint_dir=str(tmp_path), n_trials=kw.pop("n", 4),
                        objective="x.py:f", **kw)


def _frozen(number, state, attrs=None, value=None):
    t = create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                     params={"x": float(number)},
                     distributions={"x": FloatDistribution(-100, 100)}, user_attrs=attrs or {})
    t.number = number
    return t


def test_counts_and_budget_arithmetic():
    trials = [_frozen(0, TrialState.COMPLETE, value=0.5), _frozen(1, TrialState.PRUNED),
              _frozen(2, TrialState.FAIL), _frozen(3, TrialState.RUNNING),
              _frozen(4, TrialState.COMPLETE, value=0.9)]
    c = study_lib.count_trials(trials, "maximize")
    assert (c.complete, c.pruned, c.failed, c.running, c.finished) == (2, 1, 1, 1, 3)
    assert (c.best_number, c.best_value) == (4, 0.9)
    assert study_lib.count_trials(trials, "minimize").best_number == 0
    # failed trials don't count, running ones do (each may still finish)
    assert study_lib.budget_left(c, 5) == 1
    assert study_lib.budget_left(c, 4) == 0
    assert study_lib.budget_left(c, 3) == 0


def test_next_retry_picks_interrupted_and_crashed_but_not_errors_or_taken():
    trials = [_frozen(0, TrialState.FAIL, {"fail_reason": "ValueError: bad"}),
              _frozen(1, TrialState.FAIL, {"fail_reason": "interrupted"}),
              _frozen(2, TrialState.FAIL, {"fail_reason": "interrupted"}),
              _frozen(3, TrialState.RUNNING, {"resumed_from": 1})]
    assert study_lib.next_retry(trials).number == 2
    assert study_lib.next_retry(trials[:1]) is None


def test_interrupts_do_not_use_up_attempts_but_crashes_do():
    interrupted = _frozen(0, TrialState.FAIL, {"fail_reason": "interrupted", "attempt": 2})
    died = _frozen(1, TrialState.FAIL, {"fail_reason": "worker_died", "attempt": 2})
    assert study_lib.retry_user_attrs(interrupted) == {"resumed_from": 0, "attempt": 2}
    assert study_lib.retry_user_attrs(died) == {"resumed_from": 1, "attempt": 3}
    exhausted = _frozen(2, TrialState.FAIL, {"fail_reason": "worker_died",
                                            "attempt": study_lib.MAX_ATTEMPTS})
    assert study_lib.next_retry([exhausted]) is None
    # a FAIL without a reason was failed by Optuna's heartbeat: retried as stale
    assert study_lib.next_retry([_frozen(5, TrialState.FAIL)]).number == 5


def test_settings_differences_and_refusal(tmp_path):
    cfg = _cfg(tmp_path)
    study = study_lib.open_study(cfg)
    settings = {"epochs": 8, "models": ["small"], "data_root": "/d"}
    study_lib.check_or_store_settings(study, settings, cfg.storage_url)
    study_lib.check_or_store_settings(study, dict(settings), cfg.storage_url)  # same: fine
    with pytest.raises(study_lib.SettingsMismatch, match="epochs: stored 8, now 9"):
        study_lib.check_or_store_settings(study, {**settings, "epochs": 9}, cfg.storage_url)
    assert optuna.load_study(study_name=cfg.study_name, storage=cfg.storage_url
                             ).user_attrs["search_settings"] == settings


def test_direction_mismatch_is_refused(tmp_path):
    study_lib.open_study(_cfg(tmp_path))
    with pytest.raises(study_lib.SettingsMismatch, match="set to maximize, not --direction"):
        study_lib.open_study(_cfg(tmp_path, direction="minimize"))


def test_claim_requeues_an_interrupted_trial_with_its_params(tmp_path):
    cfg = _cfg(tmp_path, n=3)
    study = study_lib.open_study(cfg)
    t = study_lib.claim_trial(study, 3, tmp_path, "cpu0")
    x = t.suggest_float("x", -10, 10)
    t.set_user_attr("fail_reason", "interrupted")
    study.tell(t, state=TrialState.FAIL)
    again = study_lib.claim_trial(study, 3, tmp_path, "cpu1")
    assert again.user_attrs["resumed_from"] == t.number
    assert again.suggest_float("x", -10, 10) == x
    assert again.user_attrs["worker"] == "cpu1"


def test_fail_running_trials_of_one_pid(tmp_path):
    study = study_lib.open_study(_cfg(tmp_path))
    a = study_lib.claim_trial(study, 4, tmp_path, "cpu0")
    study._storage.set_trial_user_attr(a._trial_id, "pid", 999999)
    b = study_lib.claim_trial(study, 4, tmp_path, "cpu1")
    assert study_lib.fail_running_trials(study, "worker_died", pid=999999) == [a.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {a.number: TrialState.FAIL, b.number: TrialState.RUNNING}
    assert study.trials[a.number].user_attrs["fail_reason"] == "worker_died"


def _race(args):
    checkpoint_dir, n_trials = args
    cfg = SearchConfig(data_root=None, checkpoint_dir=checkpoint_dir, n_trials=n_trials,
                       objective="x.py:f")
    study = study_lib.open_study(cfg)
    done = 0
    while (trial := study_lib.claim_trial(study, n_trials, checkpoint_dir, "w")) is not None:
        trial.suggest_float("x", 0, 1)
        study.tell(trial, 1.0)
        done += 1
    return done


def test_budget_holds_exactly_when_processes_race(tmp_path):
    study_lib.open_study(_cfg(tmp_path))  # created once, before the racers
    with mp.get_context("fork").Pool(6) as pool:
        done = pool.map(_race, [(str(tmp_path), 7)] * 6)
    trials = optuna.load_study(study_name=_cfg(tmp_path).study_name,
                               storage=_cfg(tmp_path).storage_url).get_trials()
    assert sum(done) == 7
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 7


def test_exclusive_lock_is_exclusive(tmp_path):
    first, second = study_lib.ExclusiveLock(tmp_path), study_lib.ExclusiveLock(tmp_path)
    assert first.acquire()
    assert not second.acquire()
    assert "pid" in second.holder()
    first.release()
    assert second.acquire()
    second.release()


def test_sampler_seed_differs_per_worker_and_per_start():
    seeds = {study_lib.sampler_seed(42, rank, n) for rank in range(4) for n in (0, 5)}
    assert len(seeds) == 8
    assert study_lib.sampler_seed(42, 1, 0) == study_lib.sampler_seed(42, 1, 0)


def test_best_complete_breaks_ties_by_the_lower_trial_number():
    trials = [_frozen(3, TrialState.COMPLETE, value=0.9), _frozen(1, TrialState.COMPLETE, value=0.9),
              _frozen(2, TrialState.PRUNED), _frozen(0, TrialState.COMPLETE, value=0.1)]
    assert study_lib.best_complete(trials, "maximize").number == 1
    assert study_lib.best_complete(trials, "minimize").number == 0
    assert study_lib.best_complete(trials[2:3], "maximize") is None
