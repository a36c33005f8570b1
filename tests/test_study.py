import multiprocessing as mp
import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from psearch.engine import ownership, procfs, storage as storage_lib, study as study_lib, watchers
from psearch.engine.config import SearchConfig
from psearch.writer_id.builtin import KIND, NAME


def _cfg(tmp_path, **kw):
    return SearchConfig(checkpoint_dir=str(tmp_path), n_trials=kw.pop("n", 4),
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


def test_a_study_from_before_trial_values_resumes_only_with_the_value_it_used(tmp_path):
    """Built-in studies stored no trial_value: their values were best-epoch page top-1."""
    builtin = {"objective": NAME, "direction": "maximize", "epochs": 8}
    legacy = KIND.legacy_settings(_cfg(tmp_path))
    study = study_lib.open_study(_cfg(tmp_path))
    study.set_user_attr("search_settings", builtin)
    with pytest.raises(study_lib.SettingsMismatch,
                       match="trial_value: stored 'top1_best', now 'map_smooth3'"):
        study_lib.check_or_store_settings(study, {**builtin, "trial_value": "map_smooth3"}, "x",
                                          legacy=legacy)
    study_lib.check_or_store_settings(study, {**builtin, "trial_value": "top1_best"}, "x",
                                      legacy=legacy)


def test_direction_mismatch_is_refused(tmp_path):
    study_lib.open_study(_cfg(tmp_path))
    with pytest.raises(study_lib.SettingsMismatch, match="set to maximize, not --direction"):
        study_lib.open_study(_cfg(tmp_path, direction="minimize"))


def _owner(worker, run="run-a", pid=None):
    return ownership.owner_attrs(ownership.Host.current(), run=run, worker=worker, pid=pid)


def test_claim_requeues_an_interrupted_trial_with_its_params(tmp_path):
    cfg = _cfg(tmp_path, n=3)
    study = study_lib.open_study(cfg)
    t = study_lib.claim_trial(study, cfg, _owner("cpu0"))
    x = t.suggest_float("x", -10, 10)
    t.set_user_attr("fail_reason", "interrupted")
    study.tell(t, state=TrialState.FAIL)
    again = study_lib.claim_trial(study, cfg, _owner("cpu1"))
    assert again.user_attrs["resumed_from"] == t.number
    assert again.suggest_float("x", -10, 10) == x
    assert again.user_attrs["worker"] == "cpu1"


def test_a_claimed_trial_is_running_with_its_whole_owner(tmp_path):
    cfg = _cfg(tmp_path)
    study = study_lib.open_study(cfg)
    trial = study_lib.claim_trial(study, cfg, _owner("gpu3", run="node7/12/20261128T101500"))
    stored = study.trials[trial.number]
    assert stored.state == TrialState.RUNNING
    me = ownership.Host.current()
    assert {k: stored.user_attrs[k] for k in ownership.OWNER_KEYS} == {
        "host": me.name, "boot_id": me.boot_id, "pid": os.getpid(),
        "pid_start": procfs.process_start(os.getpid()), "run": "node7/12/20261128T101500",
        "worker": "gpu3"}


def test_what_a_claim_does_with_the_trials_it_reads():
    me, other = _owner("cpu0"), _owner("cpu1")
    done = [_frozen(0, TrialState.COMPLETE, value=1.0)]
    assert study_lib.claim_step(done, me, 2) == ("create", None)
    assert study_lib.claim_step(done, me, 1) == ("none", None)
    mine = _frozen(1, TrialState.RUNNING, me)
    assert study_lib.claim_step([*done, mine], me, 2) == ("take", None)  # made, answer lost
    assert study_lib.claim_step([*done, _frozen(1, TrialState.RUNNING, other)], me, 2) == \
        ("none", None)  # a running trial holds its place in the budget
    assert study_lib.claim_step([*done, _frozen(1, TrialState.WAITING)], me, 2) == ("ask", None)
    stopped = _frozen(1, TrialState.FAIL, {"fail_reason": "interrupted"})
    assert study_lib.claim_step([*done, stopped], me, 3) == ("create", stopped)


def test_a_claim_is_one_new_running_trial_and_a_retried_claim_takes_it(tmp_path):
    cfg = _cfg(tmp_path, n=3)
    study = study_lib.open_study(cfg)
    first = study_lib.claim_trial(study, cfg, _owner("cpu0"))
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]  # never WAITING
    again = study_lib.claim_trial(study, cfg, _owner("cpu0"))  # the first answer was lost
    assert again.number == first.number and len(study.get_trials()) == 1
    study.enqueue_trial({"x": 0.25})  # by hand: taken before a new one, and made ours
    queued = study_lib.claim_trial(study, cfg, _owner("cpu1"))
    assert queued.suggest_float("x", -1, 1) == 0.25 and queued.user_attrs["worker"] == "cpu1"


def test_fail_running_trials_only_of_the_given_worker_and_run(tmp_path):
    cfg = _cfg(tmp_path)
    study = study_lib.open_study(cfg)
    a = study_lib.claim_trial(study, cfg, _owner("cpu0", pid=999999))
    b = study_lib.claim_trial(study, cfg, _owner("cpu1"))
    other = study_lib.claim_trial(study, cfg, _owner("cpu0", run="run-b", pid=999999))
    # the same pid in another launcher's run (another host, say) is not ours to fail
    assert study_lib.fail_running_trials(study, "worker_died", pid=999999, run="run-a") == \
        [a.number]
    assert study_lib.fail_running_trials(study, "worker_died", run="run-c") == []
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {a.number: TrialState.FAIL, b.number: TrialState.RUNNING,
                      other.number: TrialState.RUNNING}
    assert study.trials[a.number].user_attrs["fail_reason"] == "worker_died"
    with pytest.raises(AssertionError):
        study_lib.fail_running_trials(study, "worker_died")  # never "every RUNNING trial"


HERE = ownership.Host(name="node1", boot_id="boot-1")


def _running(number, **attrs):
    t = _frozen(number, TrialState.RUNNING, attrs)
    t._trial_id = 100 + number
    return t


def test_dead_trials_are_judged_by_process_here_and_by_heartbeat_elsewhere():
    alive_pids = {10: 555, 11: 777}  # pid -> start time of the processes that live
    mine = dict(host="node1", boot_id="boot-1")
    trials = [
        _running(0, **mine, pid=10, pid_start=555),       # alive
        _running(1, **mine, pid=11, pid_start=111),       # pid reused by another process: dead
        _running(2, **mine, pid=12, pid_start=5),         # gone
        _running(3, host="node1", boot_id="boot-0", pid=10, pid_start=555),  # before a reboot
        _running(4, host="node2", boot_id="boot-9", pid=12, pid_start=5),    # elsewhere: live
        _running(5, host="node2", boot_id="boot-9", pid=10, pid_start=1),    # elsewhere: stale
        _running(6, host="node2", heartbeat_n=7),         # journal heartbeat, moved: live
        _running(7, host="node2", heartbeat_n=3),         # journal heartbeat, stuck: stale
        _running(8),                                      # no owner recorded: heartbeat only
        _running(9, **mine, pid=10, pid_start=555),       # alive here beats a stale heartbeat
        _frozen(10, TrialState.FAIL, dict(mine, pid=12, pid_start=5)),  # not RUNNING
    ]
    beats = watchers.BeatWatch()
    beats.unchanged_for(106, 6, 900.0)   # trial 6's counter was 6 150 s ago, now 7
    beats.unchanged_for(107, 3, 900.0)   # trial 7's was 3 then, and still is
    gone, stale = study_lib.dead_trials(trials, HERE, heartbeat_grace_s=90, now=1050.0,
                                        stale_ids={105, 109}, start_of=alive_pids.get,
                                        beats=beats)
    assert [t.number for t in gone] == [1, 2, 3]
    assert [t.number for t in stale] == [5, 7]


def test_a_journal_heartbeat_is_judged_on_the_readers_clock_only():
    """Whatever wall clock the writer has, a counter is stale only after the reader itself has
    watched it stand still for the grace period; a new reader watches first."""
    beats = watchers.BeatWatch()
    stuck = [_running(1, host="node2", heartbeat_n=5)]
    assert study_lib.dead_trials(stuck, HERE, 90, now=10.0, beats=beats)[1] == []
    assert study_lib.dead_trials(stuck, HERE, 90, now=99.0, beats=beats)[1] == []
    assert [t.number for t in study_lib.dead_trials(stuck, HERE, 90, now=101.0,
                                                    beats=beats)[1]] == [1]
    moving = [_running(1, host="node2", heartbeat_n=6)]
    assert study_lib.dead_trials(moving, HERE, 90, now=500.0, beats=beats)[1] == []


def test_recover_dead_trials_spares_live_owners_here_and_elsewhere(tmp_path):
    cfg = _cfg(tmp_path, n=10)
    study = study_lib.open_study(cfg)
    victim, survivor = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
                        for _ in range(2))
    try:
        dead = study_lib.claim_trial(study, cfg, _owner("cpu0", pid=victim.pid))
        live = study_lib.claim_trial(study, cfg, _owner("cpu1", pid=survivor.pid))
        remote = study_lib.claim_trial(study, cfg, {**_owner("gpu0", pid=victim.pid),
                                                    "host": "elsewhere"})
        victim.kill()
        victim.wait()
        here = ownership.Host.current()
        assert study_lib.recover_dead_trials(study, here, 90) == [dead.number]
        states = {t.number: t.state for t in study.get_trials()}
        assert states == {dead.number: TrialState.FAIL, live.number: TrialState.RUNNING,
                          remote.number: TrialState.RUNNING}
        assert study.trials[dead.number].user_attrs["fail_reason"] == "crashed"
    finally:
        for proc in (victim, survivor):
            proc.kill()
            proc.wait()


def test_a_stale_heartbeat_elsewhere_fails_the_trial(tmp_path):
    cfg = _cfg(tmp_path, n=10, heartbeat_grace=5)
    study = study_lib.open_study(cfg)
    remote = study_lib.claim_trial(study, cfg, {**_owner("gpu0"), "host": "elsewhere"})
    study._storage.record_heartbeat(remote._trial_id)
    assert study_lib.recover_dead_trials(study, ownership.Host.current(), 5) == []
    time.sleep(6.5)
    assert study_lib.recover_dead_trials(study, ownership.Host.current(), 5) == [remote.number]
    assert study.trials[remote.number].user_attrs["fail_reason"] == "stale"


def test_heartbeat_grace_is_stored_once_and_must_match(tmp_path):
    study = study_lib.open_study(_cfg(tmp_path))
    study_lib.check_or_store_heartbeat(study, 90)
    study_lib.check_or_store_heartbeat(study, 90)
    with pytest.raises(study_lib.SettingsMismatch, match="pass --heartbeat_grace 90"):
        study_lib.check_or_store_heartbeat(study, 30)


def _race(args):
    checkpoint_dir, storage, n_trials = args
    cfg = SearchConfig(checkpoint_dir=checkpoint_dir, n_trials=n_trials,
                       objective="x.py:f", storage=storage)
    study = study_lib.open_study(cfg)
    owner = _owner("w", run=f"race-{os.getpid()}")
    done = 0
    while (trial := study_lib.claim_trial(study, cfg, owner)) is not None:
        trial.suggest_float("x", 0, 1)
        study.tell(trial, 1.0)
        done += 1
    return done


@pytest.mark.parametrize("url", ["sqlite", "journal", "postgresql", "mysql"])
def test_budget_holds_exactly_when_processes_of_different_folders_race(tmp_path, url, request):
    # The lock belongs to the storage, not to a checkpoint folder: each racer has its own folder.
    storage = {"sqlite": lambda: f"sqlite:///{tmp_path / 'shared.db'}",
               "journal": lambda: f"journal:///{tmp_path / 'shared.log'}",
               "postgresql": lambda: request.getfixturevalue("postgres_url"),
               "mysql": lambda: request.getfixturevalue("mysql_url")}[url]()
    study_lib.open_study(_cfg(tmp_path, storage=storage))  # created once, before the racers
    with mp.get_context("fork").Pool(6) as pool:
        done = pool.map(_race, [(str(tmp_path / f"folder{i}"), storage, 7) for i in range(6)])
    trials = optuna.load_study(study_name=_cfg(tmp_path).study_name,
                               storage=storage_lib.make_storage(storage)).get_trials()
    assert sum(done) == 7
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 7 and len(trials) == 7


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


@pytest.mark.parametrize("name,kind", [("median", optuna.pruners.MedianPruner),
                                       ("asha", optuna.pruners.SuccessiveHalvingPruner),
                                       ("hyperband", optuna.pruners.HyperbandPruner),
                                       ("none", optuna.pruners.NopPruner)])
def test_each_pruner_flag_builds_that_pruner_and_prunes_a_bad_curve(tmp_path, name, kind):
    study = study_lib.open_study(_cfg(tmp_path, pruner=name, epochs=9))
    assert isinstance(study.pruner, kind)
    for good in range(6):  # six good curves, then a bad one
        t = study.ask()
        for epoch in range(1, 10):
            t.report(0.9, epoch)
            t.should_prune()  # successive halving records its rungs here
        study.tell(t, 0.9)
    bad = study.ask()
    pruned_at = None
    for epoch in range(1, 10):
        bad.report(0.1, epoch)
        if bad.should_prune():
            pruned_at = epoch
            break
    assert (pruned_at is None) == (name == "none")
