"""A database that restarts or goes away for a while must cost nothing: two launchers on a real
PostgreSQL server of this test's own, restarted (`pg_ctl restart -m fast`) or stopped and
started again mid-search, finish the exact budget with exit 0 and no failed trial; a server that
never comes back ends a launcher with one line and the rerun hint."""
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from optuna.trial import TrialState

import pg_server
from launcher_runs import ROOT, by_state, runs, trials  # noqa: F401 (fixture)

REPORTING = ROOT / "tests" / "objectives" / "reporting.py"


class OwnServer:
    """A PostgreSQL server this test may stop, start and restart."""

    def __init__(self, bindir, prefix, folder, port):
        self.bindir, self.prefix, self.folder, self.port = bindir, prefix, folder, port

    def ctl(self, *args):
        done = subprocess.run([*self.prefix, str(self.bindir / "pg_ctl"), *args, "-D",
                               str(self.folder / "data")], cwd=self.folder, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout + done.stderr

    def stop(self):
        self.ctl("stop", "-w", "-m", "fast")

    def start(self):
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses={pg_server.HOST} "
                   "-c max_connections=200 -c fsync=off")
        self.ctl("start", "-w", "-t", "60", "-l", str(self.folder / "server.log"), "-o", options)

    def restart(self):
        # -l: without a log file the server would write to (and hold open) our captured pipe
        self.ctl("restart", "-w", "-m", "fast", "-l", str(self.folder / "server.log"))


@pytest.fixture
def own_server(missing_server):
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing_server("psycopg missing: pip install 'psycopg[binary]'")
    bindir = pg_server.find_bindir()
    if bindir is None:
        missing_server(f"no PostgreSQL server binaries ({pg_server.INSTALL})")
    prefix, user = pg_server.run_as(missing_server)
    folder = Path(tempfile.mkdtemp(prefix="pg_outage_"))
    import os
    os.chown(folder, user.pw_uid, user.pw_gid)
    try:
        port = pg_server.start(bindir, prefix, folder)
        server = OwnServer(bindir, prefix, folder, port)
        name = f"outage_{uuid.uuid4().hex[:8]}"
        pg_server.PostgresServer(pg_server.HOST, port).create_database(name)
        server.url = pg_server.PostgresServer(pg_server.HOST, port).url(name)
        yield server
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "stop", "-w", "-m", "immediate", "-D",
                        str(folder / "data")], cwd=folder, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _two_launchers(runs, tmp_path, url, n_trials, sleep, extra=(), env=None):
    flags = ["--n_trials", str(n_trials), "--cpu_workers", "2", "--storage", url,
             "--pruner", "none", *extra]
    return [runs(tmp_path / f"launcher{i}", flags, sleep=sleep, objective=REPORTING,
                 out=tmp_path / f"launcher{i}.out", env=env) for i in (1, 2)]


def _wait_for_trials(run, n, timeout=60):
    deadline = time.monotonic() + timeout
    while len(list(run.ckpt.glob("trial_*/env.json"))) < n:
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output()
        time.sleep(0.1)


def _exact_and_clean(url, n_trials, launchers):
    ts = trials(storage=url)
    assert not by_state(ts, TrialState.FAIL), [
        (t.number, t.user_attrs.get("fail_reason")) for t in by_state(ts, TrialState.FAIL)]
    assert len(by_state(ts, TrialState.COMPLETE)) == n_trials and len(ts) == n_trials
    for run in launchers:
        assert "Traceback" not in run.output()


def test_a_fast_restart_of_the_database_fails_no_trial(tmp_path, runs, own_server):
    launchers = _two_launchers(runs, tmp_path, own_server.url, n_trials=8, sleep=3.0)
    for run in launchers:
        _wait_for_trials(run, 2)
    time.sleep(1.0)  # mid-trial: every worker is reporting
    own_server.restart()
    for run in launchers:
        assert run.wait(180) == 0, run.output()
    _exact_and_clean(own_server.url, 8, launchers)


@pytest.mark.parametrize("workers_wait_s, down_s", [(None, 17), ("6", 17)])
def test_a_database_down_for_17_s_is_waited_out_without_a_rerun(tmp_path, runs, own_server,
                                                                 workers_wait_s, down_s):
    """Longer than the 15.5 s that workers used to retry before they gave up for good: workers
    wait it out (default 300 s), or, told to wait only 6 s, give up on their trials (which run
    again) and on the study, and are restarted by their launcher once it answers again."""
    env = {"PARALLEL_SEARCH_STORAGE_OUTAGE_S": workers_wait_s} if workers_wait_s else None
    launchers = _two_launchers(runs, tmp_path, own_server.url, n_trials=8, sleep=3.0, env=env)
    for run in launchers:
        _wait_for_trials(run, 2)
    own_server.stop()
    time.sleep(down_s)
    for run in launchers:
        assert run.proc.poll() is None, run.output()  # waiting, not gone
    own_server.start()
    for run in launchers:
        assert run.wait(240) == 0, run.output()
    logs = "".join(p.read_text() for p in (tmp_path / "launcher1" / "logs").glob("*.log"))
    assert "trying again" in logs
    if not workers_wait_s:
        _exact_and_clean(own_server.url, 8, launchers)
        return
    # The trials cut off were recorded as such and ran again (from their checkpoints): the
    # storage, not the trials, failed.
    ts = trials(storage=own_server.url)
    assert len(by_state(ts, TrialState.COMPLETE)) == 8
    cut = by_state(ts, TrialState.FAIL)
    assert {t.user_attrs["fail_reason"] for t in cut} <= {"storage_unreachable", "worker_died",
                                                          "crashed"}
    reran = {t.user_attrs.get("resumed_from") for t in ts}
    assert all(t.number in reran for t in cut)


def test_a_database_that_never_comes_back_ends_with_one_line_and_the_rerun_hint(
        tmp_path, runs, own_server):
    run = runs(tmp_path / "lost", ["--n_trials", "4", "--cpu_workers", "1", "--storage",
                                   own_server.url, "--pruner", "none"], sleep=30.0,
               objective=REPORTING,
               env={"PARALLEL_SEARCH_STORAGE_OUTAGE_S": "2"})
    _wait_for_trials(run, 1)
    own_server.stop()
    assert run.wait(120) == 1, run.output()
    out = run.output()
    assert "Traceback" not in out
    assert "the study cannot be reached" in out and "rerun the same command" in out.lower()
    own_server.start()
    again = runs(tmp_path / "lost", ["--n_trials", "4", "--cpu_workers", "1", "--storage",
                                     own_server.url], sleep=0.4, objective=REPORTING)
    assert again.wait(120) == 0, again.output()
    ts = trials(storage=own_server.url)
    assert len(by_state(ts, TrialState.COMPLETE)) == 4
    # the trial the outage cut off ran again, not failed on its own merits
    assert {t.user_attrs.get("fail_reason") for t in by_state(ts, TrialState.FAIL)} <= {
        "storage_unreachable", "worker_died", "crashed", "interrupted"}
