"""One trial on several devices (--gpus_per_trial K): GPUs grouped into slots, the ranks started,
watched and ended by the worker, DistributedDataParallel training of the built-in objective on
K CPU processes (gloo), a failing rank, Ctrl+C and resume — real processes and signals."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from psearch.engine import console, devices, ranks
from psearch.engine.config import SearchConfig
from psearch.engine.errors import UsageError
from psearch.engine.stopping import StopRequested
from psearch.engine.study import Counts
from psearch.writer_id.augment import epoch_generator
from psearch.writer_id.dataset import ShardSampler, WriterBalancedSampler
from psearch.writer_id.model import load_best_model
from psearch.writer_id.synthetic import make_synthetic

from launcher_runs import TAG_VAR, processes_tagged

ROOT = Path(__file__).resolve().parents[1]
DDP_OBJECTIVE = ROOT / "tests" / "objectives" / "ddp_objectives.py"
TINY = ["--models", "small", "--img_height", "32", "--img_width", "256", "--batch_size", "8",
        "--lines_per_writer", "32", "--num_workers", "0", "--no_summary"]


# ------------------------------------------------------------------ slots of K GPUs (pure)
def test_gpus_are_grouped_into_slots_of_k_with_their_ids_verbatim():
    slots = devices.plan_workers([str(i) for i in range(8)], gpus_per_trial=2)
    assert [s.device for s in slots] == ["0,1", "2,3", "4,5", "6,7"]
    assert [s.label for s in slots] == ["gpu0+1", "gpu2+3", "gpu4+5", "gpu6+7"]
    assert slots[1].gpus == ("2", "3") and slots[1].describe() == "GPUs 2,3"
    env = devices.worker_env({}, slots[3], 4, 1, 4)
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7"
    # K = all GPUs: one trial at a time on every GPU (the original tool's second approach)
    (whole,) = devices.plan_workers(["3", "5", "GPU-ab12"], gpus_per_trial=3)
    assert whole.device == "3,5,GPU-ab12" and whole.label == "gpu3+gpu5+gpu-GPU-ab12"


def test_gpus_that_do_not_fill_a_slot_are_named_and_left_idle(caplog):
    environ = {"CUDA_VISIBLE_DEVICES": "0,2,5"}
    slots = devices.choose_workers(None, None, 1, environ, lambda: [], gpus_per_trial=2)
    assert [s.device for s in slots] == ["0,2"]
    assert "GPU 5 left idle" in caplog.text
    assert devices.group_gpus(["a", "b", "c", "d", "e"], 2) == ([("a", "b"), ("c", "d")], ["e"])


@pytest.mark.parametrize("kwargs, message", [
    ({"gpus_per_trial": 4}, "--gpus_per_trial 4 needs 4 GPUs, but only 3 are available (0,1,2)"),
    ({"gpus_per_trial": 0}, "--gpus_per_trial must be at least 1, got 0"),
    ({"gpus_per_trial": 2, "workers_per_gpu": 2}, "conflicts with --workers_per_gpu 2"),
])
def test_impossible_slots_are_refused_naming_the_fix(kwargs, message):
    kwargs = {"workers_per_gpu": 1, **kwargs}
    with pytest.raises(UsageError, match=re.escape(message)):
        devices.choose_workers(None, None, kwargs.pop("workers_per_gpu"),
                               {"CUDA_VISIBLE_DEVICES": "0,1,2"}, lambda: [], **kwargs)


def test_banner_and_status_line_say_how_many_devices_a_trial_holds():
    gpu_slots = devices.plan_workers(["0", "1", "2", "3"], gpus_per_trial=2)
    cpu_slots = devices.plan_workers([], cpu_workers=1)
    assert devices.per_trial_words(gpu_slots, 2) == "2 GPUs per trial"
    assert devices.per_trial_words(cpu_slots, 2) == "2 processes per trial"
    assert devices.per_trial_words(gpu_slots, 1) == ""
    counts = Counts(complete=1, running=2, best_value=0.5, best_number=0)
    line = console.status_line(counts, 8, 60.0, None, "2 GPUs per trial")
    assert line.startswith("1/8 finished | 2 running (2 GPUs per trial) | 0 pruned")
    cfg = SearchConfig(checkpoint_dir="c", n_trials=8, gpus_per_trial=2, objective="x.py:f")
    banner = console.banner_head(cfg, gpu_slots, 1, counts, 4, "node1")
    assert "GPUs: 0,1; 2,3 (2 GPUs per trial, 2 trial(s) at a time)" in banner


@pytest.mark.parametrize("flags, message", [
    (["--cpu_workers", "2", "--gpus_per_trial", "500"],
     "error: --cpu_workers 2 x --gpus_per_trial 500 asks for 1000 training processes; this "
     "machine can run at most"),
    (["--cpu_workers", "1", "--gpus_per_trial", "0"], "error: --gpus_per_trial must be at least 1"),
])
def test_the_launcher_refuses_impossible_trials_before_creating_anything(tmp_path, flags, message):
    r = subprocess.run([sys.executable, str(ROOT / "parallel_search.py"), "--objective",
                        f"{DDP_OBJECTIVE}:objective", "--checkpoint_dir", str(tmp_path / "c"),
                        "--n_trials", "2", *flags], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


# ------------------------------------------------------------------ ranks (pure parts)
def test_each_rank_gets_torchruns_variables_and_its_own_files(tmp_path):
    env = ranks.rank_env({"CUDA_VISIBLE_DEVICES": "4,5", "KEEP": "1"}, 1, 2, 29500, tmp_path, 77)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
            } == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": "29500"}
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5" and env["KEEP"] == "1"
    assert env[ranks.ERROR_VAR] == str(tmp_path / "rank1.error")
    assert env[ranks.PARENT_VAR] == "77"


def test_the_reason_names_the_rank_that_caused_the_failure():
    assert ranks.exit_reason(-9, None) == "killed by SIGKILL (out of memory?)"
    assert ranks.exit_reason(1, "OutOfMemoryError: CUDA out of memory") == \
        "OutOfMemoryError: CUDA out of memory"
    assert "exit code 3" in ranks.exit_reason(3, None)
    # the rank killed by a signal caused it; else the one whose error came first
    assert ranks.culprit([(0, 1, 5.0), (1, -9, None)]) == (1, -9)
    assert ranks.culprit([(0, 1, 5.0), (1, 1, 4.0)]) == (1, 1)
    assert ranks.culprit([(0, 1, None), (1, 1, 4.0)]) == (1, 1)


def test_rank_shards_cover_the_epoch_once_with_equal_counts():
    labels = np.repeat(np.arange(5), [3, 7, 2, 9, 4])
    base = WriterBalancedSampler(labels, lines_per_writer=7, seed=3)
    shards = [ShardSampler(base, r, 3) for r in range(3)]
    for epoch in (1, 2):
        for s in shards:
            s.set_epoch(epoch)
        drawn = [list(s) for s in shards]
        assert {len(d) for d in drawn} == {len(base) // 3} == {len(shards[0])}
        everything = base.epoch_indices(epoch)
        assert sorted(sum(drawn, [])) == sorted(everything[:len(base) // 3 * 3].tolist())
    with pytest.raises(ValueError):
        ShardSampler(base, 3, 3)


def test_rank_zero_augments_like_one_device_and_the_others_differ():
    one = torch.rand(4, generator=epoch_generator(7, 2, torch.device("cpu")))
    again = torch.rand(4, generator=epoch_generator(7, 2, torch.device("cpu"), stream=0))
    other = torch.rand(4, generator=epoch_generator(7, 2, torch.device("cpu"), stream=1))
    assert torch.equal(one, again) and not torch.equal(one, other)


# ------------------------------------------------------------------ run_ranks, real processes
RANK_CODE = textwrap.dedent("""
    import os, signal, sys, time
    from psearch.engine import ranks
    mode, rank = sys.argv[1], ranks.rank()
    def work():
        if mode == "fail" and rank == 1:
            time.sleep(0.3)
            raise MemoryError("rank 1 is out of memory")
        if mode == "sigkill" and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode in ("fail", "sigkill", "hang"):
            open(os.path.join(sys.argv[2], f"alive{rank}"), "w").write(str(os.getpid()))
            time.sleep(600)
        return {"rank": rank, "world": int(os.environ["WORLD_SIZE"])}
    ranks.rank_main(work)
""")


def run(mode, tmp_path, world=3, should_stop=lambda: False):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return ranks.run_ranks([sys.executable, "-c", RANK_CODE, mode, str(tmp_path)], tmp_path,
                           world, env, should_stop=should_stop)


def alive_pids(folder):
    pids = [int(p.read_text()) for p in Path(folder).glob("alive*") if p.read_text()]
    return [pid for pid in pids if Path(f"/proc/{pid}").exists() and
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


def test_run_ranks_returns_rank_zeros_result_and_leaves_no_files(tmp_path):
    assert run("ok", tmp_path) == {"rank": 0, "world": 3}
    assert not (tmp_path / ranks.RANKS_DIR).exists()


@pytest.mark.parametrize("mode, reason", [
    ("fail", "rank 1 of 3 failed: MemoryError: rank 1 is out of memory"),
    ("sigkill", "rank 1 of 3 failed: killed by SIGKILL (out of memory?)"),
])
def test_a_failing_rank_ends_the_others_and_names_itself(tmp_path, mode, reason):
    started = time.monotonic()
    with pytest.raises(ranks.RankFailed, match=re.escape(reason)):
        run(mode, tmp_path)
    assert time.monotonic() - started < 30
    assert alive_pids(tmp_path) == []


def test_a_stop_ends_every_rank(tmp_path):
    stop_at = time.monotonic() + 3
    with pytest.raises(StopRequested):
        run("hang", tmp_path, world=2, should_stop=lambda: time.monotonic() > stop_at)
    assert len(list(tmp_path.glob("alive*"))) == 2 and alive_pids(tmp_path) == []


def test_a_rank_that_gives_no_result_is_a_failure(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with pytest.raises(ranks.RankFailed, match="without a result"):
        ranks.run_ranks([sys.executable, "-c", "pass"], tmp_path, 2, env)


# ------------------------------------------------------------------ through the launcher
class Launcher:
    """parallel_search.py as a user starts it, its output in a file, tagged for process checks."""

    def __init__(self, tmp_path, flags, extra_env=None):
        self.tag = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        env.update({**(extra_env or {}), TAG_VAR: self.tag})
        self.out = tmp_path / f"launcher_{time.monotonic_ns()}.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "parallel_search.py"), *flags],
                                         env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"launcher still running after {timeout} s:\n{self.output()}")

    def output(self):
        return self.out.read_text(errors="replace")

    def kill(self):
        for pid in [self.proc.pid, *processes_tagged(self.tag)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def leftovers(self, timeout=15):
        deadline = time.monotonic() + timeout
        while processes_tagged(self.tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        return processes_tagged(self.tag)


@pytest.fixture
def launchers():
    started = []
    yield lambda *a, **k: started.append(Launcher(*a, **k)) or started[-1]
    for launcher in started:
        launcher.kill()


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("ddp") / "lines", writers=4,
                          pages_per_writer=6, lines_per_page=4, height=32)


def study_trials(ckpt):
    return optuna.load_study(study_name="writer_id_search",
                             storage=f"sqlite:///{ckpt}/optuna_study.db").get_trials()


def test_builtin_trials_train_on_two_cpu_ranks_and_resume_after_ctrl_c(lines, tmp_path, launchers):
    ckpt = tmp_path / "runs"
    flags = ["--data_root", str(lines), "--checkpoint_dir", str(ckpt), "--n_trials", "2",
             "--epochs", "3", "--cpu_workers", "1", "--gpus_per_trial", "2", *TINY]
    first = launchers(tmp_path, flags)
    metrics = ckpt / "trial_000" / "metrics.json"   # written after each epoch
    deadline = time.monotonic() + 180
    while not metrics.exists():
        assert first.proc.poll() is None, first.output()
        assert time.monotonic() < deadline, first.output()
        time.sleep(0.2)
    first.proc.send_signal(signal.SIGINT)             # Ctrl+C in the middle of trial 0
    assert first.wait(120) == 130, first.output()
    assert first.leftovers() == [], first.output()    # worker, both ranks: all gone
    assert "1 CPU worker(s) (2 processes per trial)" in first.output()
    (interrupted,) = study_trials(ckpt)
    assert interrupted.state == TrialState.FAIL and \
        interrupted.user_attrs["fail_reason"] == "interrupted"
    assert len(interrupted.intermediate_values) >= 1
    # the stopped trial's folder is finished like a one-device one's: status, metrics, curve
    stopped = ckpt / "trial_000"
    assert json.loads((stopped / "metrics.json").read_text())["status"] == "interrupted"
    assert (stopped / "plots" / "training_curves.png").is_file()
    assert interrupted.user_attrs["epochs_run"] == len(interrupted.intermediate_values)

    second = launchers(tmp_path, flags)
    assert second.wait(300) == 0, second.output()
    assert second.leftovers() == []
    done = [t for t in study_trials(ckpt) if t.state == TrialState.COMPLETE]
    assert len(done) == 2                              # exactly the budget
    resumed = [t for t in done if t.user_attrs.get("resumed_from") == interrupted.number]
    assert len(resumed) == 1 and sorted(resumed[0].intermediate_values) == [1, 2, 3]
    assert resumed[0].params == interrupted.params
    for t in done:
        folder = ckpt / f"trial_{t.number:03d}"
        config = json.loads((folder / "config.json").read_text())
        assert config["world_size"] == 2 and config["device"] == "2 x cpu"
        for name in ("best_model.pth", "metrics.json", "history.csv",
                     "plots/training_curves.png"):
            assert (folder / name).is_file(), (t.number, name)
        assert not (folder / ranks.RANKS_DIR).exists()
        net, writers, _ = load_best_model(folder / "best_model.pth")   # no DDP wrapper in it
        assert writers == config["writers"] and net(torch.ones(1, 1, 32, 256))[1].shape == (1, 4)
        assert t.value == pytest.approx(json.loads((folder / "metrics.json").read_text())
                                        ["value"])
    log = "".join(p.read_text() for p in (ckpt / "logs").glob("worker_cpu0_*.log"))
    assert "Rank 1 of 2 on cpu (gloo)" in log


def test_a_failing_rank_fails_its_trial_and_the_worker_goes_on(tmp_path, launchers):
    ckpt = tmp_path / "custom"
    run = launchers(tmp_path, ["--objective", f"{DDP_OBJECTIVE}:objective", "--checkpoint_dir",
                               str(ckpt), "--n_trials", "2", "--cpu_workers", "1",
                               "--gpus_per_trial", "2", "--no_summary"],
                    extra_env={"DDP_FAIL_TRIAL": "0"})
    assert run.wait(240) == 0, run.output()
    assert run.leftovers() == []
    ts = study_trials(ckpt)
    failed = [t for t in ts if t.state == TrialState.FAIL]
    done = [t for t in ts if t.state == TrialState.COMPLETE]
    assert [t.number for t in failed] == [0]
    assert failed[0].user_attrs["fail_reason"] == \
        "RankFailed: rank 1 of 2 failed: MemoryError: rank 1 ran out of memory (test)"
    assert len(done) == 2
    for t in done:   # x * 1 + x * 2: both ranks took part
        assert t.value == pytest.approx(3 * t.params["x"]) and t.user_attrs["world_size"] == 2


# ------------------------------------------------------------------ Trainer on two ranks
TRAINER_RANK = ROOT / "tests" / "objectives" / "ddp_trainer.py"


def run_trainer_ranks(lines, tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return ranks.run_ranks([sys.executable, str(TRAINER_RANK), str(lines),
                            str(tmp_path / "cache"), str(tmp_path), mode], tmp_path, 2, env)


def rank_records(tmp_path):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_rank_zeros_decision_to_end_the_trial_stops_every_rank_at_that_epoch(lines, tmp_path):
    with pytest.raises(ranks.RankFailed,
                       match="rank 0 of 2 failed: RuntimeError: rank 0 ends the trial at epoch 2"):
        run_trainer_ranks(lines, tmp_path, "end_at_2")
    zero, one = rank_records(tmp_path)
    assert zero["on_epoch"] == [1, 2] and one["on_epoch"] == []   # only rank 0 judges epochs
    assert one["left"] == "RankEnded" and one["epochs"] == 1       # left at epoch 2, not later
    assert zero["batches"] == one["batches"]                        # equal shares of the epoch
    assert zero["checksum"] == pytest.approx(one["checksum"], rel=1e-6)  # the same weights


def test_early_stopping_on_rank_zero_ends_every_rank_together(lines, tmp_path):
    assert run_trainer_ranks(lines, tmp_path, "patience_1") in ("early_stopped", "complete")
    zero, one = rank_records(tmp_path)
    assert zero["epochs"] == one["epochs"] and zero["left"] == one["left"]
    assert zero["checksum"] == pytest.approx(one["checksum"], rel=1e-6)
    assert (tmp_path / "trial" / "last.pth").exists() and len(zero["on_epoch"]) == zero["epochs"]
