"""Any training program as the objective (--command), run as a user runs it: a script of our own
(tests/programs/train.py) that takes flags or overrides, prints `psearch:` lines and exits;
exact budgets, the parameters it received, pruning and stops that leave no process behind, the
rerun of an interrupted trial told where to resume from, failures with their reasons, and bad
command lines refused before anything exists."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from launcher_runs import ROOT, processes_tagged
from psearch.engine import program
from psearch.engine.config import SearchConfig
from psearch.engine.errors import UsageError
from psearch.engine.objectives import TrialFailed
from psearch.engine.space import parse
from psearch.engine.stopping import StopFlag, StopRequested

TRAIN = ROOT / "tests" / "programs" / "train.py"
SPACE = """\
x: {type: float, low: 0.0, high: 1.0}
lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
act: {type: categorical, choices: [relu, gelu]}
"""


# ---------------------------------------------------------------- pure decisions

def test_parameters_become_flags_overrides_or_fill_placeholders():
    params = {"lr": 0.001, "act": "relu", "deep": True, "width": 3}
    base = ["python", "train.py", "--epochs", "3"]
    assert program.program_argv(base, params, "flags") == [
        *base, "--lr", "0.001", "--act", "relu", "--deep", "true", "--width", "3"]
    assert program.program_argv(base, params, "hydra") == [
        *base, "lr=0.001", "act=relu", "deep=true", "width=3"]
    templated = ["python", "train.py", "optimizer.lr={lr}", "--act", "{act}"]
    assert program.placeholders(templated) == ["lr", "act"]
    assert program.program_argv(templated, params, "flags") == [
        "python", "train.py", "optimizer.lr=0.001", "--act", "relu"]


def test_metric_lines_are_parsed_and_a_bad_metric_fails_the_trial():
    assert program.parse_line("psearch: epoch=3 val_acc=0.71 loss=0.4 tag=best") == {
        "epoch": 3.0, "val_acc": 0.71, "loss": 0.4, "tag": "best"}
    assert program.parse_line("  psearch:  val/acc=1e-3 junk") == {"val/acc": 0.001}
    assert program.parse_line("epoch 3 val_acc=0.7") is None
    assert program.metric_value({"loss": 0.4}, "val_acc", "psearch: loss=0.4") is None
    for bad in ("nan", "inf", "high"):
        line = f"psearch: epoch=2 val_acc={bad}"
        with pytest.raises(TrialFailed, match=f"val_acc={bad}.*{line}"):
            program.metric_value(program.parse_line(line), "val_acc", line)


def test_the_program_must_exist_and_be_executable(tmp_path):
    program.check_program(["python3", str(TRAIN)])
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(UsageError, match="is not executable; chmod"):
        program.check_program([str(script)])
    with pytest.raises(UsageError, match="does not exist"):
        program.check_program([str(tmp_path / "nope.sh")])
    with pytest.raises(UsageError, match="not a program on the PATH"):
        program.check_program(["trian-py-nowhere"])
    with pytest.raises(UsageError, match="--command is empty"):
        program.check_program([])
    with pytest.raises(UsageError, match="the script 'tarin.py' does not exist"):
        program.check_program(["python3", "-u", "tarin.py", "--epochs", "3"])
    program.check_program(["python3", "-m", "http.server"])  # a module: nothing to look for
    program.check_program(["python3", str(TRAIN), "--epochs", "3"])


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def _objective(tmp_path, command, stop=None, metric="val_acc"):
    cfg = SearchConfig(checkpoint_dir=str(tmp_path), n_trials=1, kind=program.Command(),
                       options=program.CommandOptions(command, metric),
                       space=parse({"x": {"type": "float", "low": 0.0, "high": 1.0}}, "s"))
    return program.ProgramObjective(cfg, stop or StopFlag())


def test_a_pruned_program_is_ended_within_seconds_group_and_all(tmp_path):
    """The program reports at once, then would run a minute (and has a child of its own)."""
    trial = optuna.create_study(direction="maximize", pruner=AlwaysPrune()).ask()
    objective = _objective(tmp_path, "sh -c 'echo psearch: epoch=1 val_acc=0.1; "
                                     "sleep 60 & sleep 60'")
    started = time.monotonic()
    with pytest.raises(optuna.TrialPruned):
        objective(trial, tmp_path)
    assert time.monotonic() - started < 15
    assert not _processes_matching("sleep 60")


def test_a_stop_ends_the_program_and_its_children(tmp_path):
    stop = StopFlag()
    objective = _objective(tmp_path, "sh -c 'sleep 61 & sleep 61'", stop)
    threading.Timer(1.0, lambda: setattr(stop, "signum", signal.SIGINT)).start()
    with pytest.raises(StopRequested):
        objective(optuna.create_study().ask(), tmp_path)
    assert not _processes_matching("sleep 61")


def _processes_matching(text):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmd and state != "Z":
                found.append(int(entry.name))
    return found


# ---------------------------------------------------------------- as a user runs it

def launch(ckpt, space_file, *flags, command=None, env=None, wait=True):
    command = command or f"{sys.executable} {TRAIN} --epochs 4"
    argv = [sys.executable, str(ROOT / "parallel_search.py"), "--command", command,
            "--space", str(space_file), "--metric", "val_acc", "--checkpoint_dir", str(ckpt),
            *map(str, flags)]
    full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full_env.update(env or {})
    if not wait:
        return subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=300)


def trials_of(ckpt):
    return sorted(optuna.load_study(study_name="writer_id_search",
                                    storage=f"sqlite:///{ckpt}/optuna_study.db").get_trials(),
                  key=lambda t: t.number)


def got(ckpt, t):
    return json.loads((ckpt / f"trial_{t.number:03d}" / "got.json").read_text())


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def test_a_search_over_a_program_runs_exactly_n_trials_with_their_parameters(tmp_path,
                                                                              space_file):
    ckpt = tmp_path / "run"
    done = launch(ckpt, space_file, "--n_trials", 8, "--cpu_workers", 2, "--epochs", 4)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = trials_of(ckpt)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 8 and len(trials) == 8, [t.state for t in trials]
    for t in trials:
        received = got(ckpt, t)["params"]
        assert set(received) == {"epochs", "x", "lr", "act"}
        assert (float(received["x"]), float(received["lr"]), received["act"]) == (
            t.params["x"], t.params["lr"], t.params["act"])
        assert got(ckpt, t)["env"]["PSEARCH_TRIAL_NUMBER"] == str(t.number)
        assert json.loads(got(ckpt, t)["env"]["PSEARCH_PARAMS"]) == t.params
        history = (ckpt / f"trial_{t.number:03d}" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(history[0])["epoch"] == 1
        assert "epoch 1 done" in (ckpt / f"trial_{t.number:03d}" / "output.log").read_text()
    for t in trials:
        if t.state == TrialState.COMPLETE:  # the value is the last val_acc the program printed
            assert t.value == pytest.approx(json.loads(history_of(ckpt, t)[-1])["val_acc"])
            assert t.user_attrs["loss"] == pytest.approx(json.loads(history_of(ckpt, t)[-1])["loss"])
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert (ckpt / "best_overall" / "model.txt").read_text() == \
        (ckpt / f"trial_{best.number:03d}" / "model.txt").read_text()
    assert (ckpt / "summary" / "all_trials.csv").is_file()


def history_of(ckpt, t):
    return (ckpt / f"trial_{t.number:03d}" / "metrics.jsonl").read_text().splitlines()


@pytest.mark.parametrize("style, command, expect", [
    ("hydra", f"{sys.executable} {TRAIN} epochs=3", lambda p: p),
    ("flags", f"{sys.executable} {TRAIN} --epochs 3 model.x={{x}} --act {{act}} {{lr}}",
     lambda p: {"model.x": p["x"], "act": p["act"]}),
])
def test_overrides_and_placeholders(tmp_path, space_file, style, command, expect):
    ckpt = tmp_path / "run"
    done = launch(ckpt, space_file, "--n_trials", 2, "--cpu_workers", 1, "--param_style", style,
                  "--no_summary", command=command)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for t in trials_of(ckpt):
        received = got(ckpt, t)
        if style == "hydra":
            assert received["argv"] == ["epochs=3", f"x={t.params['x']!r}",
                                        f"lr={t.params['lr']!r}", f"act={t.params['act']}"]
        else:  # put where the command has them, nothing appended
            assert received["argv"] == ["--epochs", "3", f"model.x={t.params['x']!r}", "--act",
                                        t.params["act"], repr(t.params["lr"])]


def test_a_failing_program_fails_its_trial_with_its_reason_and_the_search_goes_on(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("mode: {type: categorical, choices: [ok, fail, nometric, nan]}\n")
    known = tmp_path / "known.yaml"
    known.write_text("- {mode: fail}\n- {mode: nometric}\n- {mode: nan}\n- {mode: ok}\n")
    ckpt = tmp_path / "run"
    done = launch(ckpt, space_file, "--n_trials", 1, "--cpu_workers", 1, "--enqueue", known,
                  "--no_summary", "--pruner", "none")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = trials_of(ckpt)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE]
    reasons = [t.user_attrs["fail_reason"] for t in trials[:3]]
    assert reasons[0] == "ValueError: the data ran out"
    assert reasons[1].startswith("the program reported no val_acc")
    assert "val_acc=nan" in reasons[2] and "psearch: epoch=2 val_acc=nan" in reasons[2]
    error_log = (ckpt / "trial_000" / "error.log").read_text()
    assert "epoch 4 done" in error_log and "ValueError: the data ran out" in error_log


def test_ctrl_c_leaves_no_process_and_the_rerun_resumes_from_the_interrupted_folder(
        tmp_path, space_file):
    ckpt = tmp_path / "run"
    tag = f"program-{os.getpid()}-{time.monotonic_ns()}"
    env = {"SLEEPY_SECONDS": "30", "PSEARCH_TEST_RUN": tag}
    proc = launch(ckpt, space_file, "--n_trials", 3, "--cpu_workers", 2, "--no_summary",
                  env=env, wait=False)
    deadline = time.monotonic() + 60
    while len(list(ckpt.glob("trial_*/got.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(list(ckpt.glob("trial_*/got.json"))) == 2
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    time.sleep(0.5)
    assert processes_tagged(tag) == [], out[-3000:]
    interrupted = [t for t in trials_of(ckpt) if t.user_attrs.get("fail_reason") == "interrupted"]
    assert len(interrupted) == 2
    again = launch(ckpt, space_file, "--n_trials", 3, "--cpu_workers", 2, "--no_summary",
                   env={"SLEEPY_SECONDS": "0.2"})
    assert again.returncode == 0, again.stdout[-3000:]
    trials = trials_of(ckpt)
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 3
    reruns = [t for t in trials if "resumed_from" in t.user_attrs]
    assert {t.user_attrs["resumed_from"] for t in reruns} == {t.number for t in interrupted}
    for t in reruns:
        source = ckpt / f"trial_{t.user_attrs['resumed_from']:03d}"
        assert got(ckpt, t)["env"]["PSEARCH_RESUME_FROM"] == str(source)
    first = [t for t in trials if "resumed_from" not in t.user_attrs]
    assert all("PSEARCH_RESUME_FROM" not in got(ckpt, t)["env"] for t in first)


def test_a_program_on_two_ranks_gets_torchruns_variables(tmp_path, space_file):
    ckpt = tmp_path / "run"
    done = launch(ckpt, space_file, "--n_trials", 1, "--cpu_workers", 1, "--gpus_per_trial", 2,
                  "--no_summary")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = ckpt / "trial_000"
    ranks = [json.loads((folder / name).read_text())["env"]
             for name in ("got.json", "got_rank1.json")]
    assert [(r["RANK"], r["WORLD_SIZE"]) for r in ranks] == [("0", "2"), ("1", "2")]
    assert ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"]
    assert (folder / "output_rank1.log").is_file()
    assert trials_of(ckpt)[0].state == TrialState.COMPLETE


BAD = {
    "no metric": (["--metric", None], "--command needs --metric"),
    "no space": (["--space", None], "--command needs --space"),
    "no such program": (["--command", "trian-nowhere --epochs 3"], "not a program on the PATH"),
    "placeholder not in the space": (["--command", f"{sys.executable} {TRAIN} --depth {{depth}}"],
                                     "placeholder {depth}"),
    "with --objective too": (["--objective", f"{TRAIN}:main"], "pass one"),
}


@pytest.mark.parametrize("change, says", BAD.values(), ids=list(BAD))
def test_bad_command_lines_are_refused_before_anything_exists(tmp_path, space_file, change,
                                                              says):
    flags = {"--command": f"{sys.executable} {TRAIN}", "--space": str(space_file),
             "--metric": "val_acc", "--checkpoint_dir": str(tmp_path / "run"), "--n_trials": "2",
             "--cpu_workers": "1"}
    flags[change[0]] = change[1]
    argv = [a for k, v in flags.items() if v is not None for a in (k, v)]
    run = subprocess.run([sys.executable, str(ROOT / "parallel_search.py"), *argv],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not (tmp_path / "run").exists()
