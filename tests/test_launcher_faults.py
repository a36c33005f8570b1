"""Faults seen from the launcher: a closed terminal, Ctrl+C during the summary, a worker that
cannot use its GPU; and the pure decisions behind them. Real launcher subprocesses and signals."""
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from optuna.trial import TrialState

from psearch.engine import errors, faults
from psearch.engine.console import DeferredFileHandler
from psearch.engine.launcher import HeldOutput
from psearch.engine.supervisor import classify_exit, final_exit_code
from psearch.writer_id.synthetic import make_synthetic

from launcher_runs import _descendants_by_env, by_state, trials

ROOT = Path(__file__).resolve().parents[1]


def _alive(pids):
    return [p for p in pids if Path(f"/proc/{p}").exists()
            and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]


def _wait_for_text(run, text, timeout=90):
    deadline = time.monotonic() + timeout
    while text not in run.output():
        assert run.proc.poll() is None, run.output()
        assert time.monotonic() < deadline, f"never saw {text!r}:\n{run.output()}"
        time.sleep(0.05)


def test_a_closed_terminal_stops_the_run_like_sigterm(tmp_path, runs):
    ckpt = tmp_path / "c"
    run = runs(ckpt, ["--cpu_workers", "2", "--n_trials", "4"], sleep=60)
    run.wait_until_started(2)
    members = _descendants_by_env(run)
    run.proc.send_signal(signal.SIGHUP)
    assert run.wait(45) == 128 + signal.SIGHUP
    time.sleep(0.5)
    assert not _alive(members)
    ts = trials(ckpt)
    assert not by_state(ts, TrialState.RUNNING)
    assert [t.user_attrs["fail_reason"] for t in by_state(ts, TrialState.FAIL)] == \
        ["interrupted", "interrupted"]
    launcher_log = next((ckpt / "logs").glob("launcher_*.log")).read_text()
    assert "terminal closed" in launcher_log  # the terminal is gone; the log says what happened


def test_ctrl_c_during_the_summary_exits_130(tmp_path, runs):
    run = runs(tmp_path / "c", ["--cpu_workers", "1", "--n_trials", "1"], sleep=0, summary=True)
    _wait_for_text(run, "Summarizing results")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(30) == 130, run.output()
    assert "Traceback" not in run.output()


def test_a_worker_pinned_to_a_gpu_cuda_cannot_use_stops_its_slot_not_trains_on_cpu(tmp_path):
    data = make_synthetic(tmp_path / "lines", writers=3, pages_per_writer=3, lines_per_page=2)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    # as SLURM pins a GPU, on a node without nvidia-smi: only the worker itself can tell
    env.update(PATH="/usr/bin:/bin", CUDA_VISIBLE_DEVICES="0")
    done = subprocess.run(
        [sys.executable, str(ROOT / "parallel_search.py"), "--data_root", str(data),
         "--checkpoint_dir", str(tmp_path / "c"), "--n_trials", "2",
         "--models", "small", "--epochs", "1", "--img_height", "32", "--img_width", "128",
         "--no_summary", "--no_pretrained"],
        env=env, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "cannot use GPU 0" in out and "Traceback" not in out
    ts = trials(tmp_path / "c")
    assert not ts  # no trial was started, let alone trained on the CPU
    worker_log = next((tmp_path / "c" / "logs").glob("worker_gpu0_*.log")).read_text()
    assert "refusing to train on the CPU" in worker_log


# ---------------------------------------------------------------- pure decisions, plain data

def test_each_worker_exit_code_has_its_meaning():
    assert [classify_exit(c) for c in (0, 2, 3, 4, 5, 6, 1, -9)] == \
        ["done", "usage", "failures", "no_device", "timeout", "disk_full", "died", "died"]
    assert errors.EXIT_DISK_FULL == 6 and errors.EXIT_TRIAL_TIMEOUT == 5
    assert final_exit_code(3, 4, False, None, disk_full=True) == 1
    assert final_exit_code(4, 4, False, signal.SIGHUP) == 129


def test_passing_storage_errors_are_told_apart_from_a_full_disk():
    import sqlite3

    import sqlalchemy.exc

    locked = sqlalchemy.exc.OperationalError("UPDATE", {}, sqlite3.OperationalError(
        "database is locked"))
    assert faults.is_transient_storage_error(locked) and not faults.is_disk_full(locked)
    assert not faults.is_storage_error(ValueError("database is locked"))
    assert faults.one_line(locked).endswith("database is locked")


def test_the_preparations_progress_is_held_until_it_has_checked_everything(capsys):
    now = [0.0]
    out = HeldOutput(hold_s=10, clock=lambda: now[0])
    out("Indexing /data ...\n")
    out("error: --num_writers_subset 9 asks for more writers than the 3\n")
    out.finish(errors.EXIT_USAGE)
    assert capsys.readouterr().out == "error: --num_writers_subset 9 asks for more writers " \
                                      "than the 3\n"
    out = HeldOutput(hold_s=10, clock=lambda: now[0])
    out("Indexing /data ...\n")
    assert capsys.readouterr().out == ""
    out("Arguments, data and study checked\n")
    out("Caching images 10/100\n")
    assert capsys.readouterr().out.splitlines() == [
        "Indexing /data ...", "Arguments, data and study checked", "Caching images 10/100"]
    slow = HeldOutput(hold_s=10, clock=lambda: now[0])
    slow("Indexing a big data set ...\n")
    now[0] = 11.0
    slow("still indexing\n")  # a long check shows its progress after a while
    assert capsys.readouterr().out.splitlines() == ["Indexing a big data set ...",
                                                    "still indexing"]


def test_the_launcher_log_is_written_only_once_opened(tmp_path):
    handler = DeferredFileHandler(logging.Formatter("%(message)s"))
    log = logging.getLogger("test_deferred")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("before")
        assert not (tmp_path / "logs").exists()
        handler.open(tmp_path / "logs" / "launcher.log")
        log.warning("after")
        handler.flush()
        assert (tmp_path / "logs" / "launcher.log").read_text().splitlines() == ["before", "after"]
    finally:
        log.removeHandler(handler)
        handler.close()


def test_a_full_disk_ends_the_run_cleanly_and_the_rerun_finishes_exactly(small_disk, runs):
    ckpt = small_disk / "c"
    flags = ["--cpu_workers", "2", "--n_trials", "10"]
    run = runs(ckpt, flags, sleep=0, objective=ROOT / "tests" / "objectives" / "fills_disk.py",
               out=small_disk.parent / "run1.out")
    code = run.wait(120)
    out = run.output()
    assert code != 0 and "Traceback" not in out, out
    assert "No space left on the device" in out and "Free space, then rerun" in out, out
    assert not _alive(_descendants_by_env(run))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    rerun = runs(ckpt, flags, sleep=0, objective=ROOT / "tests" / "objectives" / "fills_disk.py",
                 out=small_disk.parent / "run2.out")
    assert rerun.wait(120) == 0, rerun.output()
    ts = trials(ckpt)
    assert len(by_state(ts, TrialState.COMPLETE)) == 10 and not by_state(ts, TrialState.RUNNING)


def test_the_resume_hint_repeats_the_command_as_typed_without_a_password():
    from psearch.engine.supervisor import resume_command

    argv = ["--checkpoint_dir", "runs/a b", "--storage", "postgresql://ana:pw@db/s"]
    assert resume_command(argv, "parallel_search.py", "/venv/bin/python") == \
        "/venv/bin/python parallel_search.py --checkpoint_dir 'runs/a b' --storage " \
        "'postgresql://ana:***@db/s'"
    assert resume_command(["--n_trials", "4"], "/venv/bin/parallel-search") == \
        "/venv/bin/parallel-search --n_trials 4"


def test_an_image_cache_that_does_not_fit_is_a_clean_disk_full_error(small_disk, tmp_path):
    data = make_synthetic(tmp_path / "lines", writers=4, pages_per_writer=10, lines_per_page=8)
    done = subprocess.run(
        [sys.executable, str(ROOT / "parallel_search.py"), "--data_root", str(data),
         "--checkpoint_dir", str(small_disk / "c"), "--n_trials", "2", "--cpu_workers", "1",
         "--models", "small", "--img_height", "64", "--img_width", "640", "--no_pretrained"],
        capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "No space left on the device" in out and "Traceback" not in out, out
    assert not list((small_disk / "c" / "cache").glob("*.npy"))  # no half-written cache
