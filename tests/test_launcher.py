"""The parallel launcher: pure decisions with plain data, then real CPU worker processes running a
tiny objective that sleeps like a GPU-bound trial (tests/objectives/sleepy.py)."""
import ctypes
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from psearch.engine import console, devices, launcher as ps, ownership, supervisor as sup
from psearch.engine.config import SearchConfig, child_env, config_from_args
from psearch.engine.study import Counts
from psearch.engine.controller import Controller, Worker, backoff_s
from psearch.writer_id.builtin import KIND, WriterOptions

from launcher_runs import ROOT, SLEEPY, _descendants_by_env, by_state, envs, max_overlap, trials

# ---------------------------------------------------------------- pure decisions

@pytest.mark.parametrize("code, kind", [(0, "done"), (2, "usage"), (3, "failures"), (1, "died"),
                                        (130, "died"), (143, "died"), (-9, "died"), (-11, "died")])
def test_worker_exit_codes(code, kind):
    assert sup.classify_exit(code) == kind


def test_describe_exit():
    assert sup.describe_exit(-9) == "killed by SIGKILL"
    assert sup.describe_exit(1) == "exit code 1"


@pytest.mark.parametrize("finished, usage, sig, code", [
    (24, False, None, 0), (30, False, None, 0), (23, False, None, 1), (24, True, None, 2),
    (5, False, signal.SIGINT, 130), (24, False, signal.SIGTERM, 143)])
def test_exit_code_is_zero_only_when_the_budget_was_reached(finished, usage, sig, code):
    assert sup.final_exit_code(finished, 24, usage, sig) == code


def test_leaving_the_rest_to_other_launchers_is_a_success():
    assert sup.final_exit_code(10, 14, False, None, left_to_others=True) == 0
    assert sup.final_exit_code(10, 14, False, signal.SIGTERM, left_to_others=True) == 143


@pytest.mark.parametrize("finished, running, restartable, no_wait, step", [
    (14, 0, 2, False, "finished"),
    (12, 2, 2, False, "wait"),      # the budget is taken by other launchers' trials
    (12, 2, 2, True, "leave"),
    (11, 2, 2, False, "restart"),   # one of theirs failed or its launcher died: take it over
    (11, 2, 0, False, "wait"),      # no worker of ours can take it: theirs may
    (11, 0, 0, False, "stuck"),     # nothing runs anywhere and we cannot start a trial
    (11, 0, 0, True, "stuck"),
])
def test_what_a_launcher_does_once_its_workers_are_done(finished, running, restartable,
                                                         no_wait, step):
    assert sup.after_workers(finished, running, 14, restartable, no_wait) == step


@pytest.mark.parametrize("to_run, workers, text", [(24, 4, "6"), (10, 4, "2-3"), (2, 4, "0-1")])
def test_trials_per_worker(to_run, workers, text):
    assert console.trials_per_worker(to_run, workers) == text


def test_demo_defaults_yield_to_explicit_flags():
    parser = ps.build_parser(KIND)
    ns = parser.parse_args(ps.with_demo_defaults(["--demo", "--n_trials", "3", "--epochs", "2"],
                                                 KIND))
    assert (ns.n_trials, ns.epochs, ns.models, ns.img_width) == (3, 2, "small", 640)
    assert (ns.data_root, ns.checkpoint_dir, ns.no_pretrained) == ("demo_data", "demo_runs", True)
    assert ps.with_demo_defaults(["--n_trials", "3"], KIND) == ["--n_trials", "3"]
    assert ps.with_demo_defaults(["--demo"], None) == ["--demo"]  # no default objective, no demo


def test_worker_argv_rebuilds_the_same_config_with_capped_loaders(tmp_path):
    options = WriterOptions(data_root=str(tmp_path), num_workers=8, models=("small",))
    cfg = SearchConfig(checkpoint_dir=str(tmp_path / "c d"), n_trials=24, options=options,
                       storage="sqlite:////x y.db", kind=KIND, space=KIND.default_space(options))
    argv = ps.worker_argv(cfg, threads=1, python="py")
    assert argv[:3] == ["py", "-m", KIND.worker_module]
    assert "sqlite:////x y.db" not in argv  # the storage URL travels in the environment
    ns = ps.build_parser(KIND).parse_args(argv[3:])
    assert config_from_args(ns, KIND, environ=child_env(cfg)) == \
        SearchConfig(**{**cfg.__dict__, "options": WriterOptions(**{
            **options.__dict__, "num_workers": devices.loader_processes(8, 1)})})


def test_build_workers_pins_each_worker_to_the_parents_id(tmp_path):
    cfg = SearchConfig(checkpoint_dir=str(tmp_path), n_trials=24, kind=KIND,
                       options=WriterOptions(data_root=str(tmp_path), num_workers=4))
    env = {"CUDA_VISIBLE_DEVICES": "0,1,3", "HOME": "/h"}
    slots = devices.choose_workers(None, None, 1, env, lambda: [])
    workers = ps.build_workers(cfg, slots, "20260101_000000", env, parent_pid=7, n_cores=8,
                               host="node_1", run="node_1/7/20260101T000000")
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "1", "3"]
    # the host in the name: workers of several nodes may share one logs/ folder
    assert [w.log_path.name for w in workers] == [f"worker_gpu{i}_node-1_20260101_000000.log"
                                                  for i in (0, 1, 3)]
    assert {w.env["PARALLEL_SEARCH_RUN"] for w in workers} == {"node_1/7/20260101T000000"}
    for w in workers:  # the same total budget for every worker, not n_trials each
        assert w.argv[w.argv.index("--n_trials") + 1] == "24"
        assert w.argv[w.argv.index("--num_workers") + 1] == "1"  # 8 cores / 3 workers - 1
        assert w.env["OMP_NUM_THREADS"] == "2"
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1,3", "HOME": "/h"}


def test_status_line_and_eta():
    counts = Counts(complete=6, pruned=1, failed=2, running=4, best_value=0.81234,
                    best_number=5)
    line = console.status_line(counts, 24, 754, console.eta_s(7, 0, 24, 754))
    assert line == ("7/24 finished | 4 running | 1 pruned | 2 failed | best 0.8123 (trial 5) | "
                    "12:34 elapsed | ETA 30:31")
    assert console.eta_s(3, 3, 24, 100) is None  # nothing finished in this run yet
    assert console.eta_s(24, 3, 24, 100) == 0.0
    assert console.format_duration(3 * 3600 + 62) == "3:01:02"
    assert "best --" in console.status_line(Counts(), 5, 0, None)


def test_status_line_redraws_on_a_terminal_and_logs_calmly():
    out, logged, now = io.StringIO(), [], [0.0]
    status = console.StatusLine(out, tty=True, log=logged.append, log_every_s=30,
                                 clock=lambda: now[0])
    for t in (0, 1, 2, 31):
        now[0] = t
        status.update(f"line {t}")
    assert logged == ["line 0", "line 31"]
    assert out.getvalue().count(console.CLEAR_LINE) == 4 and out.getvalue().endswith("line 31")
    quiet = console.StatusLine(io.StringIO(), tty=False, log=logged.append)
    quiet.update("x")
    assert quiet.stream.getvalue() == ""


def test_restart_back_off_and_dropping_a_device_that_keeps_failing(tmp_path):
    now = [100.0]
    worker = Worker(devices.WorkerSlot("gpu3", 0, "3"), ["x"], {}, tmp_path / "w.log")
    ctl = Controller([worker], clock=lambda: now[0])
    assert [backoff_s(n) for n in (1, 2, 3, 10)] == [1, 2, 4, 30]
    worker.started_at = now[0] - 5  # died 5 s after starting, three times: restarted each time
    assert [ctl.schedule_restart(worker) for _ in range(3)] == [True, True, True]
    assert worker.restart_at == now[0] + 4
    assert not ctl.schedule_restart(worker)  # the fourth time: the device is dropped
    assert worker.restart_at is None and not ctl.active()
    healthy = Worker(devices.WorkerSlot("gpu1", 1, "1"), ["x"], {}, tmp_path / "h.log",
                     early_failures=3, started_at=0.0)  # ran 100 s before dying
    assert ctl.schedule_restart(healthy) and healthy.early_failures == 1


@pytest.mark.parametrize("flags, env, message", [
    (["--cpu_workers", "2", "--gpus", "0"], {}, "conflicts with --cpu_workers"),
    (["--gpus", "0,0"], {}, "more than once"),
    (["--gpus", "0,1,3"], {"CUDA_VISIBLE_DEVICES": "0,1"}, "3 gpus requested"),
    ([], {"CUDA_VISIBLE_DEVICES": ""}, "No GPUs available"),
    (["--cpu_workers", "0"], {}, "--cpu_workers must be at least 1"),
    (["--workers_per_gpu", "0", "--gpus", "0"], {}, "--workers_per_gpu must be at least 1"),
    (["--cpu_workers", "1", "--stop_timeout", "-1"], {}, "--stop_timeout must be 0 or more"),
    (["--cpu_workers", "1", "--objective", "nope.py:f"], {}, "does not exist"),
])
def test_bad_arguments_exit_2_naming_the_value_before_anything_starts(
        tmp_path, monkeypatch, capsys, flags, env, message):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ckpt = tmp_path / "never"
    assert ps.main(["--checkpoint_dir", str(ckpt), "--n_trials", "4", "--objective",
                    f"{SLEEPY}:objective", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not ckpt.exists()


def test_the_launcher_never_imports_torch():
    code = ("import sys, parallel_search\n"
            "from psearch.engine import (launcher as ps, console, devices, study,\n"
            "                            supervisor as sup, controller)\n"
            "from psearch.writer_id.builtin import KIND\n"
            "ns = ps.build_parser(KIND).parse_args(ps.with_demo_defaults(['--demo'], KIND))\n"
            "KIND.default_space(KIND.space_options(ns))\n"
            "devices.choose_workers(None, None, 1, {}, devices.probe_gpus, cpu_fallback=2)\n"
            "console.trials_per_worker(24, 4); sup.classify_exit(3)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---------------------------------------------------------------- real processes

def test_four_cpu_workers_run_at_once_and_finish_exactly_the_budget(tmp_path, runs):
    # Paths with spaces and quotes: argv lists, never a shell string.
    objective = tmp_path / "my objectives" / "sleepy 'obj'.py"
    objective.parent.mkdir()
    shutil.copy(SLEEPY, objective)
    ckpt = tmp_path / "run dir 'a' \"b\""
    run = runs(ckpt, ["--cpu_workers", "4", "--n_trials", "12"], sleep=2, objective=objective)
    assert run.wait(90) == 0, run.output()
    ts = trials(ckpt)
    assert len(by_state(ts, TrialState.COMPLETE)) == 12 and len(ts) == 12
    assert max_overlap(envs(ckpt)) == 4
    host = ownership.safe_host(socket.gethostname())
    logs = sorted(p.name.rsplit("_", 2)[0] for p in (ckpt / "logs").iterdir())
    assert logs == [f"{role}_{host}" for role in
                    ("launcher", "worker_cpu0", "worker_cpu1", "worker_cpu2", "worker_cpu3")]
    threads = str(devices.threads_per_worker(len(os.sched_getaffinity(0)), 4))
    assert {r["omp_num_threads"] for r in envs(ckpt)} == {threads}
    assert {r["cuda_visible_devices"] for r in envs(ckpt)} == {""}
    assert "12/12 finished" in run.output()


def test_eight_racing_workers_never_overshoot_the_budget(tmp_path, runs):
    run = runs(tmp_path / "c", ["--cpu_workers", "8", "--n_trials", "10"], sleep=0.2)
    assert run.wait(90) == 0, run.output()
    ts = trials(tmp_path / "c")
    assert len(ts) == 10 and len(by_state(ts, TrialState.COMPLETE)) == 10


def test_workers_see_exactly_the_parents_gpu_ids(tmp_path, runs):
    ckpt = tmp_path / "c"
    run = runs(ckpt, ["--n_trials", "3"], sleep=0.2,
               env={"CUDA_VISIBLE_DEVICES": "0,1,3", "SLEEPY_WAIT_FOR": "3"})
    assert run.wait(90) == 0, run.output()
    seen = {r["worker"]: r["cuda_visible_devices"] for r in envs(ckpt)}
    assert seen == {"gpu0": "0", "gpu1": "1", "gpu3": "3"}
    assert sorted(p.name.split("_")[1] for p in (ckpt / "logs").glob("worker_*")) == \
        ["gpu0", "gpu1", "gpu3"]


def test_ctrl_c_stops_every_process_and_a_rerun_finishes_the_budget(tmp_path, runs):
    ckpt = tmp_path / "ctrl c 'run'"
    flags = ["--cpu_workers", "2", "--n_trials", "4"]
    run = runs(ckpt, flags, sleep=120)
    run.wait_until_started(2)
    members = _descendants_by_env(run)
    assert len(members) == 2
    assert "libtorch" not in Path(f"/proc/{run.proc.pid}/maps").read_text()  # the real run too
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(45) == 130, run.output()
    assert time.monotonic() - t0 < 20
    assert "INTERRUPT RECEIVED" in run.output() and "Stopping worker on CPU (cpu0)" in run.output()
    time.sleep(0.5)
    assert not [p for p in members if Path(f"/proc/{p}").exists()
                and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]
    ts = trials(ckpt)
    assert not by_state(ts, TrialState.RUNNING)
    stopped = by_state(ts, TrialState.FAIL)
    assert [t.user_attrs["fail_reason"] for t in stopped] == ["interrupted", "interrupted"]

    rerun = runs(ckpt, flags, sleep=0.2)
    assert rerun.wait(90) == 0, rerun.output()
    ts = trials(ckpt)
    assert len(by_state(ts, TrialState.COMPLETE)) == 4
    reruns = {t.user_attrs.get("resumed_from"): t for t in by_state(ts, TrialState.COMPLETE)}
    for t in stopped:  # stopped trials ran again first, with their hyperparameters
        assert reruns[t.number].params == t.params


def test_workers_are_forked_each_in_its_own_group_env_log_and_name(tmp_path, runs):
    ckpt = tmp_path / "c"
    run = runs(ckpt, ["--cpu_workers", "2", "--n_trials", "2"], sleep=60)
    run.wait_until_started(2)
    for record in envs(ckpt):
        pid, label = record["pid"], record["worker"]
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[1]) == run.proc.pid and int(stat[2]) == pid  # our child, its own group
        assert Path(f"/proc/{pid}/comm").read_text().strip() == f"psearch-{label}"
        assert b"-m psearch.engine.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert record["cuda_visible_devices"] == "" and record["omp_num_threads"] == "1"
        log = next((ckpt / "logs").glob(f"worker_{label}_*.log")).read_text()
        assert f"starting {label} =====" in log and "new interpreter" not in log  # forked
        assert f"[{label}@" in log and "Trial" in log
    launcher_log = next((ckpt / "logs").glob("launcher_*.log")).read_text()
    assert "Trial 0 started" not in launcher_log  # no worker line reaches the launcher's log
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(45) == 130, run.output()


def test_a_worker_killed_with_sigkill_is_restarted_and_its_trial_retried(tmp_path, runs):
    ckpt = tmp_path / "c"
    run = runs(ckpt, ["--cpu_workers", "2", "--n_trials", "4"], sleep=2)
    run.wait_until_started(1)
    victim = envs(ckpt)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    assert run.wait(90) == 0, run.output()
    ts = trials(ckpt)
    assert len(by_state(ts, TrialState.COMPLETE)) == 4
    dead = [t for t in by_state(ts, TrialState.FAIL) if t.user_attrs.get("pid") == victim["pid"]]
    # The launcher marks it worker_died as it sees its worker die; the other worker, claiming its
    # next trial in the same instant, may find the dead owner first and mark it crashed. Either
    # way it did not fail on its own merits, and it runs again.
    assert len(dead) == 1 and dead[0].user_attrs["fail_reason"] in ("worker_died", "crashed")
    retried = [t for t in ts if t.user_attrs.get("resumed_from") == dead[0].number]
    assert retried and retried[0].params == dead[0].params
    assert "killed by SIGKILL" in run.output() and "Restarting worker" in run.output()


def test_kill_9_of_launcher_and_workers_then_rerun_finishes_exactly(tmp_path, runs):
    ckpt = tmp_path / "c"
    flags = ["--cpu_workers", "2", "--n_trials", "4"]
    run = runs(ckpt, flags, sleep=120)
    run.wait_until_started(2)
    for pid in [*_descendants_by_env(run), run.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    run.proc.wait()
    assert len(by_state(trials(ckpt), TrialState.RUNNING)) == 2  # what a crash leaves behind

    rerun = runs(ckpt, flags, sleep=0.2)
    assert rerun.wait(120) == 0, rerun.output()
    ts = trials(ckpt)
    assert len(by_state(ts, TrialState.COMPLETE)) == 4 and not by_state(ts, TrialState.RUNNING)
    assert [t.user_attrs["fail_reason"] for t in by_state(ts, TrialState.FAIL)] == \
        ["crashed", "crashed"]


PR_SET_CHILD_SUBREAPER = 36


def test_workers_do_not_outlive_a_killed_launcher(tmp_path, runs):
    # Orphans are adopted by this test process (a subreaper), not by the machine's init, so the
    # test sees how they end, wherever it runs.
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    try:
        ckpt = tmp_path / "c"
        run = runs(ckpt, ["--cpu_workers", "2", "--n_trials", "4"], sleep=120)
        run.wait_until_started(2)
        members = _descendants_by_env(run)
        assert len(members) == 2
        # One thread: Linux repeats PDEATHSIG for every launcher thread a worker is handed to.
        assert len(os.listdir(f"/proc/{run.proc.pid}/task")) == 1
        run.proc.kill()
        run.proc.wait()
        codes = {pid: _wait_orphan(pid, timeout=20) for pid in members}
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
    assert set(codes.values()) == {143}, codes  # each stopped on the SIGTERM of PDEATHSIG
    ts = trials(ckpt)  # ... and marked its trial: none is left RUNNING
    assert [t.user_attrs["fail_reason"] for t in by_state(ts, TrialState.FAIL)] == \
        ["interrupted", "interrupted"]


def _wait_orphan(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    pytest.fail(f"worker {pid} outlived its launcher by {timeout} s")


def test_a_repeated_sigterm_stops_gracefully_and_a_second_ctrl_c_kills(tmp_path, runs):
    """SLURM and process managers repeat SIGTERM: it must not turn into a kill; a person pressing
    Ctrl+C twice means it."""
    slow = ROOT / "tests" / "objectives" / "slow_stop.py"
    flags = ["--cpu_workers", "2", "--n_trials", "4"]
    run = runs(tmp_path / "term", flags, sleep=0, objective=slow, summary=True)
    run.wait_until_started(2)
    run.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == 143, run.output()
    assert len(list((tmp_path / "term").glob("trial_*/saved.txt"))) == 2, run.output()
    assert (tmp_path / "term" / "summary" / "report.md").is_file()
    assert "killing all workers" not in run.output()

    run = runs(tmp_path / "int", flags, sleep=0, objective=slow, summary=True)
    run.wait_until_started(2)
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.6)
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(60) == 130, run.output()
    assert "Second interrupt: killing all workers now" in run.output()
    assert not list((tmp_path / "int").glob("trial_*/saved.txt"))


def test_the_launcher_loads_no_optuna_before_it_limits_its_threads():
    """Importing the launcher's entry point must not start BLAS threads (numpy, via optuna): a
    launcher with a second thread cannot fork its workers."""
    code = ("import sys, parallel_search\n"
            "loaded = sorted(m for m in ('optuna', 'numpy') if m in sys.modules)\n"
            "assert loaded == [], loaded\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
