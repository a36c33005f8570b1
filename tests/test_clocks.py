"""Clocks: launchers on one journal storage whose hosts disagree on the time. A heartbeat or a
lock judged by wall-clock times written on another host breaks under skew (one launcher 200 s
ahead failed every live trial of the other and broke the budget lock held by live processes);
both are now judged on the reader's own monotonic clock. `faketime` (Debian's libfaketime)
moves one launcher's clock, `unshare --uts` makes it another node."""
import os
import signal
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from launcher_runs import _descendants_by_env, by_state, can_pose_as_another_host, runs  # noqa: F401
from psearch.engine import storage as storage_lib

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
needs_hosts = pytest.mark.skipif(not can_pose_as_another_host(),
                                 reason="needs `unshare --uts` (root) to pose as other nodes")


@pytest.fixture
def faketime(missing_server):
    """Debian's libfaketime, which moves a process's clock (skipped without it; under CI it
    must be there)."""
    if not FAKETIME_LIB.is_file():
        missing_server(f"needs Debian's faketime ({FAKETIME_LIB}); `make system-deps` installs it")


def trials(storage):
    import optuna

    return optuna.load_study(study_name="writer_id_search",
                             storage=storage_lib.make_storage(storage)).get_trials()


def _skewed(seconds):
    """The environment that moves a process's (and its children's) clock by `seconds`."""
    return {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": f"{seconds:+d}s",
            "FAKETIME_DONT_RESET": "1"}


def _nodes(runs, tmp_path, url, n_trials, sleep, skews, extra=()):
    flags = ["--n_trials", str(n_trials), "--cpu_workers", "2", "--storage", url,
             "--heartbeat_grace", "6", *extra]
    return [runs(tmp_path / f"node{i}", flags, sleep=sleep, host=f"node{i}",
                 out=tmp_path / f"node{i}.out", env=_skewed(skew) if skew else None)
            for i, skew in enumerate(skews, start=1)]


@needs_hosts
def test_a_launcher_200_s_ahead_fails_no_live_trial_and_the_budget_stays_exact(tmp_path, runs,
                                                                              faketime):
    url = f"journal:///{tmp_path / 'study.journal'}"
    nodes = _nodes(runs, tmp_path, url, n_trials=12, sleep=2.0, skews=[0, 200])
    for node in nodes:
        assert node.wait(180) == 0, node.output()
    ts = trials(storage=url)
    assert not by_state(ts, TrialState.FAIL), [
        (t.number, t.user_attrs.get("host"), t.user_attrs.get("fail_reason")) for t in ts]
    assert len(by_state(ts, TrialState.COMPLETE)) == 12 and len(ts) == 12
    assert {t.user_attrs["host"] for t in ts} == {"node1", "node2"}
    for node in nodes:
        assert "its holder died" not in node.output()


@needs_hosts
def test_on_a_journal_a_dead_nodes_trials_still_run_again(tmp_path, runs):
    """The heartbeat counter still finds a node that really died: it stops moving."""
    url = f"journal:///{tmp_path / 'study.journal'}"
    victim, survivor = _nodes(runs, tmp_path, url, n_trials=6, sleep=3.0, skews=[0, 0])
    victim.wait_until_started(2)
    time.sleep(1)
    for pid in [*_descendants_by_env(victim), victim.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    victim.proc.wait()
    orphans = [t.number for t in trials(storage=url)
               if t.state == TrialState.RUNNING and t.user_attrs["host"] == "node1"]
    assert orphans, "the victim had no trial running when it died"
    assert survivor.wait(240) == 0, survivor.output()
    ts = trials(storage=url)
    assert len(by_state(ts, TrialState.COMPLETE)) == 6
    failed = by_state(ts, TrialState.FAIL)
    assert sorted(t.number for t in failed) == sorted(orphans)
    assert {t.user_attrs["fail_reason"] for t in failed} == {"stale"}
