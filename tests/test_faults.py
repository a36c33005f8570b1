"""Faults seen from the worker: user code that raises KeyboardInterrupt or SystemExit or leaves a
thread, a stop while waiting for the budget lock or right after a claim, a hung trial, a full
disk, a GPU that CUDA cannot use, a wrong objective. Real worker (and launcher) subprocesses on
real studies; pure helpers with plain data."""
import errno
import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from psearch.engine import (faults, ownership, storage as storage_lib, study as study_lib, urls,
                            watchers)
from psearch.engine.config import SearchConfig
from psearch.engine.errors import EXIT_DISK_FULL, EXIT_NO_DEVICE, EXIT_TOO_MANY_FAILURES, EXIT_USAGE
from psearch.engine.stopping import StopFlag, StopRequested
from psearch.engine.worker import WorkerIdentity, run_search

from launcher_runs import by_state, trials

ROOT = Path(__file__).resolve().parents[1]
OBJ = ROOT / "tests" / "objectives" / "fault_objectives.py"


def worker_argv(ckpt, n, objective, *extra, summary=False):
    return [sys.executable, str(ROOT / "single_gpu_hyperparameter_search.py"), "--checkpoint_dir",
            str(ckpt), "--n_trials", str(n), "--objective", f"{OBJ}:{objective}", *extra,
            *([] if summary else ["--no_summary"])]


def env_for(ckpt, **extra):
    """A clean stand-alone environment; FAULT_MARK lies beside the checkpoint folder."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PARALLEL_SEARCH_") and k != "CUDA_VISIBLE_DEVICES"}
    return {**env, "FAULT_MARK": str(Path(ckpt).parent / f"{Path(ckpt).name}.mark"), **extra}


def run_worker(ckpt, n, objective, *extra, timeout=60, **env):
    return subprocess.run(worker_argv(ckpt, n, objective, *extra), capture_output=True,
                          text=True, timeout=timeout, env=env_for(ckpt, **env))


def start_worker(ckpt, n, objective, *extra, summary=False, **env):
    """A worker in the background, its stderr in CKPT.err (read it with `wait_for_text`)."""
    err = Path(ckpt).parent / f"{Path(ckpt).name}.err"
    with open(err, "w") as fh:
        proc = subprocess.Popen(worker_argv(ckpt, n, objective, *extra, summary=summary),
                                stdout=subprocess.DEVNULL, stderr=fh, env=env_for(ckpt, **env),
                                start_new_session=True)
    proc.err = err
    return proc


def wait_for(condition, proc, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"ended ({proc.returncode}) before {what}:\n" + \
            proc.err.read_text()
        assert time.monotonic() < deadline, f"never saw {what}:\n" + proc.err.read_text()
        time.sleep(0.05)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def reasons(ts):
    return [t.user_attrs.get("fail_reason") for t in ts]


# ---------------------------------------------------------------- what user code raises or leaves

def test_keyboard_interrupt_from_the_objective_is_a_failure_not_a_stop(tmp_path):
    r = run_worker(tmp_path / "c", 3, "raises_keyboard_interrupt")
    assert r.returncode == EXIT_TOO_MANY_FAILURES, r.stderr
    ts = trials(tmp_path / "c")
    assert [t.state for t in ts] == [TrialState.FAIL] * 5   # not retried, not looping
    assert set(reasons(ts)) == {"KeyboardInterrupt raised by the objective"}
    assert "Traceback" not in r.stderr


def test_sys_exit_in_the_objective_fails_its_trial_not_the_worker(tmp_path):
    r = run_worker(tmp_path / "c", 2, "exits")
    assert r.returncode == 0, r.stderr
    ts = trials(tmp_path / "c")
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE,
                                     TrialState.COMPLETE]
    assert reasons(ts)[:2] == ["SystemExit(0) raised by the objective",
                               "SystemExit(3) raised by the objective"]


def test_a_thread_the_objective_leaves_running_does_not_keep_the_worker_alive(tmp_path):
    r = run_worker(tmp_path / "c", 2, "leaves_a_thread", timeout=30)
    assert r.returncode == 0, r.stderr
    assert len(by_state(trials(tmp_path / "c"), TrialState.COMPLETE)) == 2
    assert "forgotten-0" in r.stderr
    # stopped by SIGTERM (as the launcher's death sends it) mid-trial: it ends all the same
    proc = start_worker(tmp_path / "d", 2, "leaves_a_thread", TEST_SLEEP="60")
    wait_for(lambda: (tmp_path / "d" / "trial_000" / "started").exists(), proc, "trial 0")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert reasons(trials(tmp_path / "d")) == ["interrupted"]


# ---------------------------------------------------------------- stops at awkward moments

def test_a_stop_while_waiting_for_the_budget_lock_ends_at_once_and_makes_no_trial(tmp_path):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    with open(ckpt / "optuna_study.db.budget.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is starting a trial, forever
        proc = start_worker(ckpt, 1, "exits")
        wait_for(lambda: "Waiting for the study's budget lock" in proc.err.read_text(), proc,
                 "the worker waiting for the lock")
        asked = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert time.monotonic() - asked < 3
    assert trials(ckpt) == []
    assert "Traceback" not in proc.err.read_text()


@pytest.mark.parametrize("kind", ["journal", "postgresql", "mysql"])
def test_a_wait_for_a_held_database_or_journal_lock_can_be_cancelled(tmp_path, kind, request):
    storage = {"journal": lambda: f"journal:///{tmp_path / 'study.log'}",
               "postgresql": lambda: request.getfixturevalue("postgres_url"),
               "mysql": lambda: request.getfixturevalue("mysql_url")}[kind]()
    cfg = SearchConfig(checkpoint_dir=str(tmp_path), n_trials=2,
                       objective="x.py:f", storage=storage)
    study = study_lib.open_study(cfg)
    owner = ownership.owner_attrs(ownership.Host.current(), run="lock-test", worker="w")
    with _held_budget_lock(kind, storage, cfg.study_name):
        asked = time.monotonic()
        with pytest.raises(StopRequested):
            study_lib.claim_trial(study, cfg, owner, cancelled=lambda: time.monotonic() - asked
                                  > 0.3)
        assert time.monotonic() - asked < 3
    assert study.get_trials() == []
    assert study_lib.claim_trial(study, cfg, owner) is not None  # and the lock is free again


class _held_budget_lock:
    """The budget lock of `study_name`, held as another process of the study would hold it."""

    def __init__(self, kind, storage, study_name):
        self.kind, self.storage, self.key = kind, storage, storage_lib.lock_key(study_name)

    def __enter__(self):
        if self.kind == "journal":
            path = urls.journal_path(self.storage)
            os.symlink(path + ".budget", path + ".budget.lock")
            return
        import sqlalchemy

        self.engine = sqlalchemy.create_engine(urls.driver_url(self.storage))
        self.conn = self.engine.connect()
        take = ("SELECT pg_advisory_lock(:key)" if self.kind == "postgresql"
                else "SELECT GET_LOCK(CONCAT('parallel_search_', :key), 0)")
        self.conn.execute(sqlalchemy.text(take), {"key": self.key})

    def __exit__(self, *exc):
        if self.kind == "journal":
            os.unlink(urls.journal_path(self.storage) + ".budget.lock")
            return
        self.conn.close()  # the server lets go of a closed session's locks
        self.engine.dispose()


def test_a_stop_that_comes_while_a_trial_is_claimed_keeps_that_trial_from_running(tmp_path):
    cfg = SearchConfig(checkpoint_dir=str(tmp_path), n_trials=3,
                       objective="x.py:f")
    study = study_lib.open_study(cfg)

    class StopOnceClaimed(StopFlag):  # SIGTERM arrives the moment a trial is RUNNING
        @property
        def requested(self):
            if self.signum is None and study.get_trials(states=(TrialState.RUNNING,)):
                self.signum = signal.SIGTERM
            return self.signum is not None

    ran = []
    code = run_search(study, cfg, lambda trial, trial_dir: ran.append(trial) or 1.0,
                      StopOnceClaimed(), WorkerIdentity(run="claim-test"))
    assert code == 143 and ran == []
    (trial,) = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted"


def test_a_claim_tried_again_after_a_storage_error_takes_the_trial_it_queued(tmp_path):
    cfg = SearchConfig(checkpoint_dir=str(tmp_path), n_trials=3,
                       objective="x.py:f")
    study = study_lib.open_study(cfg)
    owner = ownership.owner_attrs(ownership.Host.current(), run="retry-test", worker="w")
    study.enqueue_trial({}, user_attrs=owner)  # queued, then ask() failed: the connection dropped
    trial = study_lib.claim_trial(study, cfg, owner)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    assert trial.number == 0 and trial.user_attrs["worker"] == "w"


def test_failures_in_a_row_are_counted_per_worker_and_run_across_restarts():
    def ended(number, state, reason=None, worker="gpu0", run="r1"):
        t = optuna.trial.create_trial(
            state=state, value=1.0 if state == TrialState.COMPLETE else None,
            user_attrs={"worker": worker, "run": run,
                        **({"fail_reason": reason} if reason else {})})
        t.number = number
        return t

    ts = [ended(0, TrialState.FAIL, "timeout"), ended(1, TrialState.COMPLETE),
          ended(2, TrialState.FAIL, "timeout"), ended(3, TrialState.FAIL, "timeout", "gpu1"),
          ended(4, TrialState.FAIL, "ValueError: x"), ended(5, TrialState.FAIL, "x", run="r0")]
    assert study_lib.failures_in_row(ts, "r1", "gpu0") == 2
    assert study_lib.failures_in_row(ts + [ended(6, TrialState.FAIL, "interrupted")], "r1",
                                     "gpu0") == 0  # an interrupt is no failure: it resets
    assert study_lib.failures_in_row(ts, "r2", "gpu0") == 0


def test_ctrl_c_during_the_stand_alone_summary_exits_130(tmp_path):
    proc = start_worker(tmp_path / "c", 1, "exits", summary=True)
    wait_for(lambda: "Summarizing results" in proc.err.read_text(), proc, "the summary")
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl+C reaches the whole job
    assert proc.wait(timeout=20) == 130


# ---------------------------------------------------------------- a trial that hangs

def test_a_hung_trial_times_out_and_a_stand_alone_worker_goes_on(tmp_path):
    r = run_worker(tmp_path / "c", 2, "hangs_first", "--trial_timeout", "2", timeout=90)
    assert r.returncode == 0, r.stderr
    _assert_only_the_first_timed_out(tmp_path / "c")
    assert "Trial 0 ran past --trial_timeout 2 s" in r.stderr and "Traceback" not in r.stderr


def test_a_hung_trial_times_out_under_the_launcher_and_the_slot_goes_on(tmp_path):
    ckpt = tmp_path / "c"
    r = subprocess.run([sys.executable, str(ROOT / "parallel_search.py"), "--objective",
                        f"{OBJ}:hangs_first", "--checkpoint_dir", str(ckpt), "--n_trials", "2",
                        "--cpu_workers", "1", "--trial_timeout", "2", "--no_summary"],
                       capture_output=True, text=True, timeout=120, env=env_for(ckpt))
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_only_the_first_timed_out(ckpt)


def _assert_only_the_first_timed_out(ckpt):
    ts = trials(ckpt)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert reasons(ts)[0] == "timeout"  # and not retried: it would hang again
    child = int((ckpt / "trial_000" / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)  # what the hung trial started was ended with it


def test_the_processes_a_trial_left_are_its_descendants_and_its_group_since_it_began():
    table = {100: (1, 100, 10),     # the worker, leading its process group
             101: (100, 100, 50),   # a data loader
             102: (101, 100, 60),   # its child
             103: (1, 100, 70),     # orphaned during the trial, still in the group
             104: (1, 100, 5),      # `| tee`, started with the worker
             105: (1, 105, 80),     # someone else's
             106: (100, 106, 90)}   # a child in a session of its own
    assert watchers.trial_processes(100, table, trial_started=40) == [101, 102, 103, 106]
    not_leader = {**table, 100: (1, 99, 10)}
    assert watchers.trial_processes(100, not_leader, trial_started=40) == [101, 102, 106]


# ---------------------------------------------------------------- a full disk

def test_a_full_disk_fails_the_trial_keeps_the_old_model_and_stops_the_worker(small_disk):
    ckpt = small_disk / "c"
    r = run_worker(ckpt, 1, "fills_the_disk_first")
    assert r.returncode == EXIT_DISK_FULL, r.stderr
    assert "Traceback" not in r.stderr and "No space left on the device" in r.stderr
    (trial,) = trials(ckpt)
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == \
        faults.DISK_FULL_REASON
    trial_dir = ckpt / "trial_000"
    assert (trial_dir / "best_model.pth").read_bytes() == b"good weights"
    assert sorted(p.name for p in trial_dir.iterdir()) == ["best_model.pth"]  # no temporary
    assert run_worker(ckpt, 1, "fills_the_disk_first").returncode == 0
    assert [t.state for t in trials(ckpt)] == [TrialState.FAIL, TrialState.COMPLETE]


def test_a_disk_too_full_to_record_the_trial_still_stops_cleanly_and_a_rerun_recovers(
        small_disk):
    ckpt = small_disk / "c"
    r = run_worker(ckpt, 1, "fills_the_disk_first", FAULT_LEAVE_FULL="1")
    assert r.returncode == EXIT_DISK_FULL, r.stderr
    assert "Traceback" not in r.stderr
    (trial,) = trials(ckpt)
    assert trial.state == TrialState.RUNNING or \
        trial.user_attrs["fail_reason"] == faults.DISK_FULL_REASON
    (ckpt / "filler").unlink()  # the user frees space and reruns
    assert run_worker(ckpt, 1, "fills_the_disk_first").returncode == 0
    ts = trials(ckpt)
    assert len(by_state(ts, TrialState.COMPLETE)) == 1 and not by_state(ts, TrialState.RUNNING)


def test_full_disks_are_recognised_through_wrappers():
    import sqlalchemy.exc

    assert faults.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert faults.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not faults.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    try:  # SQLite's error, through SQLAlchemy and Optuna
        try:
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as e:
                raise sqlalchemy.exc.OperationalError("INSERT", {}, e) from e
        except sqlalchemy.exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("commit failed") from e
    except optuna.exceptions.StorageInternalError as wrapped:
        assert faults.is_disk_full(wrapped)
        assert not faults.is_transient_storage_error(wrapped)
    try:  # torch.save into a file: a RuntimeError while handling the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")
    except RuntimeError as torch_style:
        assert faults.is_disk_full(torch_style)
    looped = RuntimeError("a")
    looped.__context__ = ValueError("b")
    looped.__context__.__context__ = looped
    assert not faults.is_disk_full(looped)


def test_transient_storage_errors_are_retried_with_back_off_others_are_not():
    import sqlalchemy.exc

    locked = sqlalchemy.exc.OperationalError("UPDATE", {}, sqlite3.OperationalError(
        "database is locked"))
    slept, calls = [], []

    def flaky(failures, error):
        def call():
            calls.append(1)
            if len(calls) <= failures:
                raise error
            return "done"
        return call

    assert faults.retry(flaky(2, locked), "tell", sleep=slept.append) == "done"
    assert slept == [0.5, 1.0]
    slept.clear(), calls.clear()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        faults.retry(flaky(99, locked), "tell", sleep=slept.append)
    assert slept == [0.5, 1.0, 2.0, 4.0, 8.0] and len(calls) == 6
    slept.clear(), calls.clear()
    full = sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError(
        "database or disk is full"))
    for error in (full, ValueError("a bug")):
        calls.clear()
        with pytest.raises(type(error)):
            faults.retry(flaky(1, error), "tell", sleep=slept.append)
    assert slept == []


# ---------------------------------------------------------------- devices, files, arguments

def test_a_worker_pinned_to_a_gpu_cuda_cannot_use_refuses_to_train_on_the_cpu(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: CUDA_VISIBLE_DEVICES=5 may name a real one")
    from psearch.writer_id.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "lines", writers=3, pages_per_writer=3, lines_per_page=2,
                          height=32)
    ckpt = tmp_path / "c"
    r = subprocess.run(
        [sys.executable, str(ROOT / "single_gpu_hyperparameter_search.py"), "--data_root",
         str(data), "--checkpoint_dir", str(ckpt), "--n_trials", "1", "--models", "small",
         "--epochs", "1", "--img_height", "32", "--img_width", "128", "--num_workers", "0",
         "--no_pretrained", "--no_summary"],
        capture_output=True, text=True, timeout=120, env={**env_for(ckpt),
                                                          "CUDA_VISIBLE_DEVICES": "5"})
    assert r.returncode == EXIT_NO_DEVICE, r.stderr
    assert "CUDA_VISIBLE_DEVICES=5 but CUDA cannot use it" in r.stderr
    assert "refusing to train on the CPU" in r.stderr and "Traceback" not in r.stderr
    assert not (ckpt / "optuna_study.db").exists()  # no trial claimed: not even a study


def test_last_pth_goes_once_a_trial_ends_for_good_and_stays_while_it_will_resume(tmp_path):
    ckpt = tmp_path / "c"
    proc = start_worker(ckpt, 1, "writes_last", TEST_SLEEP="60")
    wait_for(lambda: (ckpt / "trial_000" / "last.pth").exists(), proc, "trial 0's last.pth")
    proc.send_signal(signal.SIGHUP)  # the terminal was closed: a stop like SIGTERM
    assert proc.wait(timeout=20) == 128 + signal.SIGHUP
    assert reasons(trials(ckpt)) == ["interrupted"]
    assert (ckpt / "trial_000" / "last.pth").exists()  # the rerun resumes from it
    assert run_worker(ckpt, 2, "writes_last").returncode == 0
    ts = trials(ckpt)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    assert ts[1].user_attrs["resumed_from"] == 0
    assert list(ckpt.glob("trial_*/last.pth")) == []  # the rerun's, and the one it resumed
    assert run_worker(tmp_path / "k", 2, "writes_last", "--keep_last").returncode == 0
    assert len(list((tmp_path / "k").glob("trial_*/last.pth"))) == 2


def test_an_objective_with_the_wrong_signature_is_refused_and_nothing_is_made(tmp_path):
    r = run_worker(tmp_path / "c", 1, "one_arg")
    assert r.returncode == EXIT_USAGE
    assert "one_arg(trial) cannot be called as one_arg(trial, trial_dir)" in \
        r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "c").exists()


def test_a_refused_rerun_leaves_the_study_and_the_logs_as_they_were(tmp_path):
    ckpt = tmp_path / "c"
    assert run_worker(ckpt, 1, "exits").returncode == 0
    before = (ckpt / "optuna_study.db").read_bytes(), sorted((ckpt / "logs").iterdir())
    r = run_worker(ckpt, 1, "writes_last")
    assert r.returncode == EXIT_USAGE and "objective: stored" in r.stderr
    assert ((ckpt / "optuna_study.db").read_bytes(), sorted((ckpt / "logs").iterdir())) == before


def test_an_old_study_with_a_relative_objective_path_is_the_same_objective(tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SearchConfig(checkpoint_dir=str(tmp_path), n_trials=1,
                       objective=f"{tmp_path / 'obj.py'}:f")
    study = study_lib.open_study(cfg)
    study.set_user_attr("search_settings", {"objective": "obj.py:f", "direction": "maximize"})
    study_lib.check_or_store_settings(study, study_lib.search_settings(cfg, {}), "here")
    with pytest.raises(study_lib.SettingsMismatch, match="objective: stored"):
        study_lib.check_or_store_settings(study, {"objective": f"{tmp_path / 'other.py'}:f",
                                                  "direction": "maximize"}, "here")
