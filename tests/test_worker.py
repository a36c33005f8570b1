"""The sequential search as a real process on a real SQLite study, with custom objectives."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from psearch.engine import ownership
from psearch.engine.worker_env import WorkerIdentity

ROOT = Path(__file__).resolve().parent.parent
OBJ = ROOT / "tests" / "objectives" / "worker_objectives.py"


def run(ckpt, n, objective="quadratic", *extra, env=None, summary=False):
    cmd = [sys.executable, str(ROOT / "single_gpu_hyperparameter_search.py"), "--checkpoint_dir",
           str(ckpt), "--n_trials", str(n), "--objective", f"{OBJ}:{objective}", *extra,
           *([] if summary else ["--no_summary"])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def signal_mid_trial(ckpt, n, objective, sig, env=None, **popen):
    """Start the search, send `sig` once its first trial runs; the exit code."""
    cmd = [sys.executable, str(ROOT / "single_gpu_hyperparameter_search.py"), "--checkpoint_dir",
           str(ckpt), "--n_trials", str(n), "--objective", f"{OBJ}:{objective}", "--no_summary"]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stderr=subprocess.DEVNULL,
                            text=True, **popen)
    deadline = time.time() + 60
    while not (ckpt / "trial_000").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    return proc.wait(timeout=30)


def trials(ckpt):
    return optuna.load_study(study_name="writer_id_search",
                             storage=f"sqlite:///{ckpt}/optuna_study.db").get_trials()


def states(ckpt):
    return [t.state for t in trials(ckpt)]


def test_n_trials_is_the_study_total_and_resume_adds_the_difference(tmp_path):
    ckpt = tmp_path / "run dir 'quoted'"
    assert run(ckpt, 2).returncode == 0
    assert states(ckpt) == [TrialState.COMPLETE] * 2
    assert (ckpt / "trial_000" / "seen.json").exists() and (ckpt / "trial_001").is_dir()
    assert run(ckpt, 2).returncode == 0
    assert len(trials(ckpt)) == 2                      # finished: runs nothing
    assert run(ckpt, 3).returncode == 0
    assert states(ckpt) == [TrialState.COMPLETE] * 3   # exactly one more
    assert list((ckpt / "logs").glob("single_gpu_*.log"))


def test_a_stand_alone_search_ends_with_the_launchers_summary(tmp_path):
    r = run(tmp_path / "c", 3, summary=True)
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "c" / "summary" / "report.md").read_text()
    assert "3 trials: 3 complete" in report
    best = json.loads((tmp_path / "c" / "best_overall" / "config.json").read_text())
    assert best["trial_number"] == max(trials(tmp_path / "c"), key=lambda t: t.value).number
    assert run(tmp_path / "d", 1).returncode == 0  # --no_summary
    assert not (tmp_path / "d" / "summary").exists()


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path):
    r = run(tmp_path, 2, "fails_first")
    assert r.returncode == 0, r.stderr
    ts = trials(tmp_path)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert ts[0].user_attrs["fail_reason"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "Traceback" in (tmp_path / "trial_000" / "error.log").read_text()


def test_nan_value_fails_and_repeated_failures_stop_the_worker(tmp_path):
    r = run(tmp_path, 3, "returns_nan")
    assert r.returncode == 3
    ts = trials(tmp_path)
    assert len(ts) == 5 and all(t.state == TrialState.FAIL for t in ts)
    assert "not a finite number" in ts[0].user_attrs["fail_reason"]
    assert "5 trials in a row failed" in r.stderr


def test_changed_setting_is_refused_and_changes_nothing(tmp_path):
    assert run(tmp_path, 1).returncode == 0
    before = (tmp_path / "optuna_study.db").read_bytes()
    r = run(tmp_path, 2, "always_fails")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: the study in sqlite:///")
    assert "objective: stored" in r.stderr
    assert (tmp_path / "optuna_study.db").read_bytes() == before


def test_sigint_marks_the_trial_interrupted_and_rerun_resumes_it(tmp_path):
    # started with SIGINT ignored, as a background job inherits it: the worker must still stop
    code = signal_mid_trial(tmp_path, 2, "quadratic", signal.SIGINT, env={"TEST_SLEEP": "30"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert code == 130
    first = trials(tmp_path)
    assert [t.state for t in first] == [TrialState.FAIL]
    assert first[0].user_attrs["fail_reason"] == "interrupted"
    assert run(tmp_path, 2).returncode == 0
    ts = trials(tmp_path)
    assert [t.state for t in ts] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert ts[1].user_attrs["resumed_from"] == 0
    assert ts[1].params == first[0].params


def test_trials_left_running_by_a_crash_are_recovered(tmp_path):
    assert run(tmp_path, 1).returncode == 0
    study = optuna.load_study(study_name="writer_id_search",
                              storage=f"sqlite:///{tmp_path}/optuna_study.db")
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = ownership.owner_attrs(ownership.Host.current(), run="crashed-run", worker="single",
                                  pid=worker.pid)
    study.enqueue_trial({}, user_attrs=owner)
    orphan = study.ask()
    orphan.suggest_float("x", -5, 5)
    worker.kill()  # the trial's process was kill -9'd: it is left RUNNING
    worker.wait()
    assert run(tmp_path, 2).returncode == 0
    ts = trials(tmp_path)
    assert ts[orphan.number].state == TrialState.FAIL
    assert ts[orphan.number].user_attrs["fail_reason"] == "crashed"
    assert [t.state for t in ts].count(TrialState.COMPLETE) == 2
    assert any(t.user_attrs.get("resumed_from") == orphan.number for t in ts)


def test_worker_identity_from_environment():
    who = WorkerIdentity.from_environ({"PARALLEL_SEARCH_WORKER": "gpu3", "PARALLEL_SEARCH_RANK":
                                       "2", "PARALLEL_SEARCH_N_WORKERS": "4",
                                       "PARALLEL_SEARCH_MANAGED": "1",
                                       "PARALLEL_SEARCH_PARENT_PID": "77"})
    assert (who.label, who.rank, who.n_workers, who.managed, who.parent_pid) == \
        ("gpu3", 2, 4, True, 77)
    assert WorkerIdentity.from_environ({}) == WorkerIdentity()


def test_an_error_caused_by_the_stop_counts_as_an_interruption(tmp_path):
    assert signal_mid_trial(tmp_path, 1, "stop_breaks_it", signal.SIGTERM) == 143
    (trial,) = trials(tmp_path)
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted"
    assert not (tmp_path / "trial_000" / "error.log").exists()


def test_a_workers_identity_survives_its_environment():
    who = WorkerIdentity(label="gpu3", rank=2, n_workers=4, managed=True, parent_pid=77,
                         cpu_threads=5, run="node1/77/20261205T101500")
    assert WorkerIdentity.from_environ(who.environ()) == who
    assert WorkerIdentity.from_environ(WorkerIdentity().environ()) == WorkerIdentity()
