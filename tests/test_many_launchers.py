"""Several launchers on one study, as on a cluster: a second launcher on the same folder, two
"nodes" (launchers under their own host names) on a real PostgreSQL server with a shared or
separate checkpoint folders, and a node that dies mid-trial. Every launcher must exit 0 with the
study holding exactly --n_trials finished trials, none RUNNING, and no launcher may fail a live
trial of another."""
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from optuna.trial import TrialState

from launcher_runs import _descendants_by_env, by_state, can_pose_as_another_host, trials

needs_hosts = pytest.mark.skipif(not can_pose_as_another_host(),
                                 reason="needs `unshare --uts` (root) to pose as other nodes")


def no_tracebacks(*folders_and_runs):
    """Every launcher output and every log under the given checkpoint folders is free of them."""
    texts = []
    for item in folders_and_runs:
        if isinstance(item, Path):
            texts += [p.read_text(errors="replace") for p in (item / "logs").glob("*.log")]
        else:
            texts.append(item.output())
    assert texts and not [t for t in texts if "Traceback" in t], \
        "\n----\n".join(t for t in texts if "Traceback" in t)


def test_a_second_launcher_on_the_same_folder_never_fails_the_first_ones_trials(tmp_path, runs):
    ckpt = tmp_path / "c"
    flags = ["--n_trials", "6", "--cpu_workers", "1"]
    # Ordered by events, not by sleeps (SLEEPY_WAIT_FOR=N: a trial first waits until N trials of
    # the folder have started). The first launcher's first trial holds until the second launcher
    # has started a trial, so the second one starts beside a live trial of the first; its one
    # trial holds until all 6 have started, then outlasts the first launcher's last trial (8 s
    # against 1.2), so the first launcher finishes its share and must wait for it.
    fast = runs(ckpt, flags, sleep=1.2, env={"SLEEPY_WAIT_FOR": "2"}, out=tmp_path / "a.out")
    fast.wait_until_started(1)
    slow = runs(ckpt, flags, sleep=8, env={"SLEEPY_WAIT_FOR": "6"}, out=tmp_path / "b.out")
    assert fast.wait(120) == 0, fast.output()
    assert slow.wait(120) == 0, slow.output()
    ts = trials(ckpt)
    assert len(by_state(ts, TrialState.COMPLETE)) == 6 and len(ts) == 6, \
        [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in ts]
    shares = Counter(t.user_attrs["run"] for t in ts)
    assert sorted(shares.values()) == [1, 5]  # the first launcher ran 5 trials, the second 1
    # the fast one finished its share first and waited for the slow one's trial
    assert "waiting for 1 trial(s) of other launchers" in fast.output()
    assert "6/6 trials finished" in fast.output() and "6/6 trials finished" in slow.output()
    no_tracebacks(ckpt, fast, slow)


def test_no_wait_leaves_the_rest_to_the_other_launcher_and_exits_0(tmp_path, runs):
    ckpt = tmp_path / "c"
    slow = runs(ckpt, ["--n_trials", "2", "--cpu_workers", "1"], sleep=8, out=tmp_path / "b.out")
    slow.wait_until_started(1)
    fast = runs(ckpt, ["--n_trials", "2", "--cpu_workers", "1", "--no_wait"], sleep=0.2,
                out=tmp_path / "a.out")
    assert fast.wait(60) == 0, fast.output()
    assert "1 trial(s) still run on other launchers" in fast.output()
    assert slow.proc.poll() is None  # the other launcher goes on
    assert slow.wait(60) == 0, slow.output()
    assert len(by_state(trials(ckpt), TrialState.COMPLETE)) == 2


def test_a_waiting_launcher_takes_over_the_trial_of_a_launcher_killed_on_its_host(tmp_path,
                                                                                    runs):
    ckpt = tmp_path / "c"
    flags = ["--n_trials", "2", "--cpu_workers", "1"]
    doomed = runs(ckpt, flags, sleep=120, out=tmp_path / "a.out")
    doomed.wait_until_started(1)
    waiter = runs(ckpt, flags, sleep=0.5, out=tmp_path / "b.out")
    deadline = time.monotonic() + 60
    while "waiting for 1 trial(s)" not in waiter.output():
        assert waiter.proc.poll() is None and time.monotonic() < deadline, waiter.output()
        time.sleep(0.2)
    for pid in [*_descendants_by_env(doomed), doomed.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    doomed.proc.wait()
    t0 = time.monotonic()
    assert waiter.wait(60) == 0, waiter.output()
    assert time.monotonic() - t0 < 20  # judged by pid at once, not after a heartbeat grace
    assert "restarting worker cpu0" in waiter.output()
    ts = trials(ckpt)
    assert len(by_state(ts, TrialState.COMPLETE)) == 2
    (dead,) = by_state(ts, TrialState.FAIL)
    assert dead.user_attrs["fail_reason"] == "crashed"
    assert any(t.user_attrs.get("resumed_from") == dead.number for t in ts)


def _two_nodes(runs, tmp_path, url, folders, n_trials=14, sleep=1.0, extra=()):
    flags = ["--n_trials", str(n_trials), "--cpu_workers", "2", "--storage", url, *extra]
    return [runs(folder, flags, sleep=sleep, host=f"node{i}", out=tmp_path / f"node{i}.out")
            for i, folder in enumerate(folders, start=1)]


def _check_exact(url, n_trials):
    ts = trials(storage=url)
    assert len(by_state(ts, TrialState.COMPLETE)) == n_trials, \
        [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in ts]
    assert not by_state(ts, TrialState.RUNNING)
    return ts


@needs_hosts
@pytest.mark.parametrize("layout", ["shared folder", "separate folders"])
def test_two_nodes_on_postgresql_share_one_exact_budget(tmp_path, runs, postgres_url, layout):
    folders = ([tmp_path / "shared"] * 2 if layout == "shared folder"
               else [tmp_path / "node1", tmp_path / "node2"])
    nodes = _two_nodes(runs, tmp_path, postgres_url, folders)
    for node in nodes:
        assert node.wait(150) == 0, node.output()
    ts = _check_exact(postgres_url, 14)
    assert len(ts) == 14  # nothing failed, nothing ran twice
    assert {t.user_attrs["host"] for t in ts} == {"node1", "node2"}
    assert len({(t.user_attrs["host"], t.user_attrs["pid"]) for t in ts}) >= 4
    for i, node in enumerate(nodes, start=1):
        assert f"[launcher@node{i}]" in node.output()
    logs = {p.name for folder in set(folders) for p in (folder / "logs").glob("worker_*.log")}
    assert len(logs) == 4 and {name.split("_")[2] for name in logs} == {"node1", "node2"}
    no_tracebacks(*set(folders), *nodes)


@needs_hosts
def test_when_a_node_dies_the_other_reruns_its_trials_and_finishes(tmp_path, runs,
                                                                  postgres_url):
    victim, survivor = _two_nodes(runs, tmp_path, postgres_url,
                                  [tmp_path / "node1", tmp_path / "node2"], sleep=3,
                                  extra=["--heartbeat_grace", "6"])
    victim.wait_until_started(2)
    time.sleep(1)
    for pid in [*_descendants_by_env(victim), victim.proc.pid]:
        os.kill(pid, signal.SIGKILL)  # the whole node, at once: no one gets to clean up
    victim.proc.wait()
    orphans = [t for t in trials(storage=postgres_url)
               if t.state == TrialState.RUNNING and t.user_attrs["host"] == "node1"]
    assert orphans, "the victim had no trial running when it died"
    assert survivor.wait(240) == 0, survivor.output()
    ts = _check_exact(postgres_url, 14)
    failed = by_state(ts, TrialState.FAIL)
    assert {t.number for t in failed} == {t.number for t in orphans}
    assert {t.user_attrs["fail_reason"] for t in failed} == {"stale"}
    rerun = {t.user_attrs.get("resumed_from"): t for t in by_state(ts, TrialState.COMPLETE)}
    for t in orphans:  # each ran again on the survivor, with its hyperparameters
        assert rerun[t.number].user_attrs["host"] == "node2" and rerun[t.number].params == t.params
    no_tracebacks(tmp_path / "node2", survivor)


@needs_hosts
def test_a_frozen_worker_whose_trial_was_taken_over_discards_its_result(tmp_path, runs,
                                                                       postgres_url):
    """SIGSTOP past the grace period: another node judges the trial stale and runs it again.
    When the frozen worker wakes up, its trial is not its own any more: it says so, discards its
    result (no 'COMPLETE' for a trial the study holds as FAIL) and counts no failure."""
    reporting = Path(__file__).resolve().parent / "objectives" / "reporting.py"
    flags = ["--n_trials", "3", "--cpu_workers", "1", "--storage", postgres_url,
             "--heartbeat_grace", "6", "--pruner", "none"]
    frozen = runs(tmp_path / "node1", flags, sleep=8.0, host="node1", objective=reporting,
                  out=tmp_path / "node1.out")
    frozen.wait_until_started(1)
    workers = _descendants_by_env(frozen)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    other = runs(tmp_path / "node2", flags, sleep=1.0, host="node2", objective=reporting,
                 out=tmp_path / "node2.out")
    deadline = time.monotonic() + 90
    while not [t for t in trials(storage=postgres_url) if t.state == TrialState.FAIL]:
        assert time.monotonic() < deadline, other.output()
        time.sleep(0.5)
    (stale,) = by_state(trials(storage=postgres_url), TrialState.FAIL)
    assert stale.user_attrs["host"] == "node1" and stale.user_attrs["fail_reason"] == "stale"
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    assert other.wait(120) == 0, other.output()
    assert frozen.wait(120) == 0, frozen.output()
    ts = trials(storage=postgres_url)
    assert len(by_state(ts, TrialState.COMPLETE)) == 3 and len(by_state(ts, TrialState.FAIL)) == 1
    log = "".join(p.read_text() for p in (tmp_path / "node1" / "logs").glob("worker_*.log"))
    assert f"Trial {stale.number} was taken over by another launcher" in log
    assert f"Trial {stale.number} COMPLETE" not in log
    assert "trials in a row failed" not in log
