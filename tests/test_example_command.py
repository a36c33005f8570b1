"""examples/command/: the two-moons training script tuned through `parallel_search.py --command`
as a user runs it (real trials on the CPU, their parameters received, best_overall/ filled), and
the script alone resuming an interrupted run from its last.pt."""
import json
import os
import subprocess
import sys

import optuna
from optuna.trial import TrialState

from launcher_runs import ROOT

EXAMPLE = ROOT / "examples" / "command"
TRAIN = EXAMPLE / "train.py"


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k != "CUDA_VISIBLE_DEVICES" and not k.startswith("PSEARCH_")}
    return {**env, **extra}


def test_the_example_is_tuned_through_the_launcher(tmp_path):
    ckpt = tmp_path / "runs moons"  # a space in the path, as users have
    # The program runs in its trial's folder: the script is named by its absolute path.
    command = f"{sys.executable} {TRAIN} --epochs 3"
    done = subprocess.run(
        [sys.executable, str(ROOT / "parallel_search.py"), "--command", command,
         "--space", str(EXAMPLE / "space.yaml"), "--metric", "val_acc",
         "--checkpoint_dir", str(ckpt), "--n_trials", "3", "--cpu_workers", "2",
         "--epochs", "3", "--pruner", "none"],
        env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = optuna.load_study(study_name="writer_id_search",
                               storage=f"sqlite:///{ckpt}/optuna_study.db").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:
        assert 0 < t.value <= 1
        log = (ckpt / f"trial_{t.number:03d}" / "output.log").read_text()
        args = next(line for line in log.splitlines() if line.startswith("args: "))
        for name, value in t.params.items():
            assert f"'{name}': {value!r}" in args, (name, value, args)
        assert ("momentum" in t.params) == (t.params["optimizer"] == "sgd")
        epochs = [json.loads(line) for line in
                  (ckpt / f"trial_{t.number:03d}" / "metrics.jsonl").read_text().splitlines()]
        # the value is the best epoch's accuracy, printed last
        assert t.value == max(e["val_acc"] for e in epochs if "epoch" in e)
    assert (ckpt / "best_overall" / "best_model.pt").is_file()


def _start(tmp_path, trial_dir, epochs, resume_from=None):
    extra = {"PSEARCH_TRIAL_DIR": str(tmp_path / trial_dir)}
    if resume_from:
        extra["PSEARCH_RESUME_FROM"] = str(tmp_path / resume_from)
    return subprocess.Popen([sys.executable, str(TRAIN), "--epochs", str(epochs)], cwd=tmp_path,
                            env=_env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _lines(proc):
    """The `psearch:` lines of a finished run, as {key: text}."""
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return [dict(word.split("=") for word in line.split()[1:])
            for line in out.splitlines() if line.startswith("psearch:")]


def test_the_script_resumes_where_the_interrupted_run_stopped(tmp_path):
    unbroken = _start(tmp_path, "c", epochs=3)  # meanwhile, on the other core
    first = _lines(_start(tmp_path, "a", epochs=2))
    resumed = _lines(_start(tmp_path, "b", epochs=3, resume_from="a"))
    unbroken = _lines(unbroken)
    assert [e.get("epoch") for e in first] == ["1", "2", None]
    assert [e.get("epoch") for e in resumed] == ["3", None]  # only epoch 3 ran
    # the model and optimizer came back: epoch 3 is the unbroken run's epoch 3
    assert resumed[0] == unbroken[2]
    assert resumed[-1]["val_acc"] == unbroken[-1]["val_acc"]
    assert (tmp_path / "b" / "best_model.pt").is_file() and (tmp_path / "b" / "last.pt").is_file()
