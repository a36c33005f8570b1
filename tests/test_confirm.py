"""Confirmation (--confirm_top/--confirm_seeds): the pure decisions on plain trials, then real
launchers on a seeded objective (exact budget, other seeds, the choice by mean, Ctrl+C, reruns
that raise K or S)."""
import json
import signal
import time
from pathlib import Path

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from launcher_runs import ROOT, by_state, max_overlap, runs, trials  # noqa: F401 (fixture)
from psearch.engine import confirm, study as study_lib
from psearch.engine.study import Confirmation

SEEDED = ROOT / "tests" / "objectives" / "seeded.py"
ME = {"host": "h", "pid": 1, "run": "r", "worker": "cpu0"}


def _t(number, state, x, value=None, **attrs):
    t = create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                     params={"x": x}, distributions={"x": FloatDistribution(0, 1)},
                     user_attrs={"seed": 42, **attrs})
    t.number = number
    return t


def _search(values):
    return [_t(i, TrialState.COMPLETE, i / 10, v) for i, v in enumerate(values)]


def test_seeds_are_new_distinct_and_raising_s_keeps_the_first_ones():
    assert confirm.seeds_for(42, 3)[:2] == confirm.seeds_for(42, 2)
    assert len(set(confirm.seeds_for(42, 5))) == 5 and 42 not in confirm.seeds_for(42, 5)


def test_leaders_are_the_best_complete_search_trials_one_per_set():
    ts = _search([0.5, 0.9, 0.7]) + [_t(3, TrialState.PRUNED, 0.3),
                                     _t(4, TrialState.COMPLETE, 0.1, 0.95)]  # same x as trial 1
    assert [t.number for t in confirm.leaders(ts, 2, "maximize")] == [4, 2]
    assert [t.number for t in confirm.leaders(ts, 2, "minimize")] == [0, 2]
    run = _t(5, TrialState.COMPLETE, 0.0, 0.99, confirms=2)
    assert 5 not in [t.number for t in confirm.leaders([*ts, run], 3, "maximize")]


def test_no_confirmation_run_starts_before_the_search_is_over():
    want = Confirmation(2, 2, 42)
    running = [*_search([0.5, 0.9, 0.7]), _t(3, TrialState.RUNNING, 0.3, worker="cpu1")]
    assert study_lib.claim_step(running, ME, 4, want) == ("none", None)
    b = study_lib.budget(running, 4, want)
    assert (b.startable, b.total, b.done, b.complete) == (0, 8, 3, False)
    assert not b.confirming


def test_then_each_slot_is_claimed_once_best_set_first():
    want = Confirmation(2, 2, 42)
    ts = _search([0.5, 0.9, 0.7, 0.1])
    step, slot = study_lib.claim_step(ts, ME, 4, want)
    assert step == "confirm" and (slot.confirms, slot.seed) == (1, 1042)
    assert slot.params == {"x": 0.1}
    ts.append(_t(4, TrialState.RUNNING, 0.1, confirms=1, seed=1042, worker="cpu1"))
    assert study_lib.claim_step(ts, ME, 4, want)[1].seed == 2042
    ts += [_t(5, TrialState.COMPLETE, 0.1, 0.8, confirms=1, seed=2042),
           _t(6, TrialState.COMPLETE, 0.2, 0.6, confirms=2, seed=1042),
           _t(7, TrialState.FAIL, 0.2, confirms=2, seed=2042, fail_reason="ValueError: nan")]
    b = study_lib.budget(ts, 4, want)
    assert b.confirming and (b.confirm_planned, b.confirm_done, b.startable) == (4, 3, 0)
    assert study_lib.claim_step(ts, ME, 4, want) == ("none", None)  # all taken, one running
    ts[4] = _t(4, TrialState.COMPLETE, 0.1, 0.7, confirms=1, seed=1042)
    b = study_lib.budget(ts, 4, want)
    assert b.complete and b.done == b.total == 8  # a run that failed on its own merits is spent


def test_an_interrupted_confirmation_run_runs_again_with_its_seed():
    want = Confirmation(1, 1, 42)
    ts = [*_search([0.5, 0.9]),
          _t(2, TrialState.FAIL, 0.1, confirms=1, seed=1042, fail_reason="interrupted")]
    step, retry = study_lib.claim_step(ts, ME, 2, want)
    assert (step, retry.number) == ("create", 2)
    assert study_lib.retry_user_attrs(retry) == {"resumed_from": 2, "attempt": 1,
                                                 "confirms": 1, "seed": 1042}
    assert study_lib.budget(ts, 2, want).startable == 1


def test_raising_k_or_s_opens_only_the_new_slots():
    ts = [*_search([0.5, 0.9, 0.7]),
          _t(3, TrialState.COMPLETE, 0.1, 0.8, confirms=1, seed=1042)]
    assert study_lib.budget(ts, 3, Confirmation(1, 1, 42)).complete
    more_seeds = study_lib.budget(ts, 3, Confirmation(1, 2, 42))
    assert (more_seeds.confirm_planned, more_seeds.confirm_done, more_seeds.startable) == (2, 1, 1)
    more_sets = Confirmation(2, 1, 42)
    assert study_lib.claim_step(ts, ME, 3, more_sets)[1].confirms == 2


def test_sets_are_ranked_by_their_mean_and_the_chosen_model_is_the_best_run():
    ts = _search([0.5, 0.9, 0.7]) + [
        _t(3, TrialState.COMPLETE, 0.1, 0.5, confirms=1, seed=1042),
        _t(4, TrialState.COMPLETE, 0.1, 0.4, confirms=1, seed=2042),
        _t(5, TrialState.COMPLETE, 0.2, 0.75, confirms=2, seed=1042),
        _t(6, TrialState.COMPLETE, 0.2, 0.65, confirms=2, seed=2042)]
    first, second = confirm.set_results(ts, "maximize")
    assert (first.origin, first.n, first.original_rank) == (2, 3, 2)
    assert first.mean == pytest.approx(0.7) and first.sd == pytest.approx(0.05)
    assert (second.origin, second.mean) == (1, pytest.approx(0.6))
    assert study_lib.best_answer(ts, "maximize").number == 5
    assert study_lib.best_answer(_search([0.5, 0.9]), "maximize").number == 1  # no confirmation
    stopped = [*_search([0.5, 0.9]),
               _t(2, TrialState.FAIL, 0.1, confirms=1, seed=1042, fail_reason="interrupted")]
    assert confirm.set_results(stopped, "maximize") == []  # nothing confirmed yet


def test_a_confirmation_run_is_never_pruned():
    import optuna

    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(lower=10.0))
    plain, repeat = study.ask(), study.ask()
    repeat.set_user_attr("confirms", 0)
    for trial in (plain, repeat):
        trial.report(0.5, 1)
    assert confirm.never_pruned(plain).should_prune()
    assert not confirm.never_pruned(repeat).should_prune()


# ---------------------------------------------------------------- real launchers

FLAGS = ["--n_trials", "4", "--confirm_top", "2", "--confirm_seeds", "2", "--cpu_workers", "2"]


def _records(ckpt):
    """What each trial's objective wrote: trial number -> env.json (one being written skipped)."""
    found = {}
    for path in Path(ckpt).glob("trial_*/env.json"):
        try:
            found[int(path.parent.name.split("_")[1])] = json.loads(path.read_text())
        except ValueError:
            continue
    return found


def test_the_best_sets_run_again_with_new_seeds_and_the_choice_is_by_mean(tmp_path, runs):
    run = runs(tmp_path / "c", FLAGS, sleep=1.0, objective=SEEDED, summary=True)
    assert run.wait(120) == 0, run.output()
    ts = trials(tmp_path / "c")
    assert len(by_state(ts, TrialState.COMPLETE)) == 8 and len(ts) == 8
    search = [t for t in ts if "confirms" not in t.user_attrs]
    repeats = [t for t in ts if "confirms" in t.user_attrs]
    best_two = sorted(search, key=lambda t: -t.value)[:2]
    assert sorted(t.user_attrs["confirms"] for t in repeats) == sorted(
        [t.number for t in best_two] * 2)
    for origin in best_two:
        mine = [t for t in repeats if t.user_attrs["confirms"] == origin.number]
        assert all(t.params == origin.params for t in mine)
        assert len({t.user_attrs["seed"] for t in mine} | {42}) == 3  # two new, distinct seeds
    records = _records(tmp_path / "c")
    assert all(records[t.number]["seed"] == t.user_attrs["seed"] for t in ts)
    # the confirmation runs used both workers at once
    assert max_overlap([records[t.number] for t in repeats]) == 2
    chosen = max(confirm.set_results(ts, "maximize"), key=lambda r: r.mean)
    best = json.loads((tmp_path / "c" / "best_overall" / "config.json").read_text())
    assert best["trial_number"] == chosen.best_run("maximize")
    report = (tmp_path / "c" / "summary" / "report.md").read_text()
    assert "## Confirmation: the leading sets over seeds" in report
    assert f"Chosen by mean over seeds: the set of trial {chosen.origin}" in report
    assert "confirming 4/4" in run.output()


def test_ctrl_c_during_confirmation_then_the_same_command_finishes_exactly(tmp_path, runs):
    ckpt = tmp_path / "c"
    run = runs(ckpt, FLAGS, sleep=3.0, objective=SEEDED)
    deadline = time.monotonic() + 120
    while not any(r["confirms"] is not None and "end" not in r for r in _records(ckpt).values()):
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output()
        time.sleep(0.2)
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(60) == 130, run.output()
    stopped = [t for t in trials(ckpt) if t.user_attrs.get("fail_reason") == "interrupted"]
    assert stopped and all("confirms" in t.user_attrs for t in stopped)
    again = runs(ckpt, FLAGS, sleep=0.3, objective=SEEDED)
    assert again.wait(120) == 0, again.output()
    ts = trials(ckpt)
    finished = by_state(ts, TrialState.COMPLETE)
    assert len(finished) == 8
    keys = [(t.user_attrs["confirms"], t.user_attrs["seed"]) for t in finished
            if "confirms" in t.user_attrs]
    assert len(keys) == len(set(keys)) == 4
    for t in stopped:  # each stopped run went on under its own seed
        (rerun,) = [r for r in ts if r.user_attrs.get("resumed_from") == t.number]
        assert rerun.user_attrs["seed"] == t.user_attrs["seed"]


def test_a_rerun_with_more_seeds_or_sets_runs_only_the_difference(tmp_path, runs):
    ckpt = tmp_path / "c"
    assert runs(ckpt, FLAGS, sleep=0.1, objective=SEEDED).wait(120) == 0
    more = [*FLAGS[:-4], "--confirm_seeds", "3", "--cpu_workers", "2"]
    assert runs(ckpt, more, sleep=0.1, objective=SEEDED).wait(120) == 0
    assert len(by_state(trials(ckpt), TrialState.COMPLETE)) == 4 + 2 * 3
    wider = ["--n_trials", "4", "--confirm_top", "3", "--confirm_seeds", "3", "--cpu_workers", "2"]
    assert runs(ckpt, wider, sleep=0.1, objective=SEEDED).wait(120) == 0
    ts = trials(ckpt)
    assert len(by_state(ts, TrialState.COMPLETE)) == 4 + 3 * 3
    same = runs(ckpt, wider, sleep=0.1, objective=SEEDED)
    assert same.wait(60) == 0 and "nothing to run" in same.output()
    assert len(trials(ckpt)) == len(ts)
