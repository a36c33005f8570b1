"""The user owns what is searched, run as a user runs it: a --space file for the built-in objective
and for a custom one, --show_space, bad space and enqueue files refused before anything is written,
a changed space refused on rerun, known sets first (--enqueue, once per study), and warm starts
from an earlier study (--warm_start, once, apart from this search's trials)."""
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from psearch.engine import prior_trials, space as space_lib, study as study_lib
from psearch.writer_id import builtin
from psearch.writer_id.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parent.parent
SPACED = ROOT / "tests" / "objectives" / "spaced.py"
TINY = ["--epochs", "1", "--img_height", "32", "--img_width", "256", "--batch_size", "8",
        "--lines_per_writer", "16", "--num_workers", "0"]
RESTRICTED = """\
model_type: small
lr: {type: float, low: 1.0e-3, high: 2.0e-3, log: true}
embedding_dim: 64
loss: ce
"""


def launch(*flags, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "parallel_search.py"), *map(str, flags)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def worker(*flags, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "single_gpu_hyperparameter_search.py"),
                           *map(str, flags)], capture_output=True, text=True, timeout=timeout)


def trials_of(ckpt):
    return optuna.load_study(study_name="writer_id_search",
                             storage=f"sqlite:///{ckpt}/optuna_study.db").get_trials()


def one_error_line(run, logs=False):
    """The one `error:` line a refused run prints (a stand-alone worker, `logs`, logs before it)."""
    lines = (run.stdout + run.stderr).strip().splitlines()  # the launcher echoes its helper's
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr + run.stdout
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and (logs or len(lines) == 1), run.stdout + run.stderr
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("space") / "data", writers=4,
                          pages_per_writer=6, lines_per_page=4, height=32)


@pytest.fixture(scope="module")
def restricted(tmp_path_factory, data):
    """A finished two-trial built-in search under RESTRICTED, and its space file."""
    root = tmp_path_factory.mktemp("restricted")
    space_file = root / "space.yaml"
    space_file.write_text(RESTRICTED)
    done = worker("--data_root", data, "--checkpoint_dir", root / "run", "--n_trials", 2,
                  "--space", space_file, *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", space_file


def test_a_space_file_restricts_the_built_in_objective(restricted):
    ckpt, space_file = restricted
    trials = trials_of(ckpt)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        p = t.params
        assert (p["model_type"], p["embedding_dim"], p["loss"]) == ("small", 64, "ce")
        assert 1e-3 <= p["lr"] <= 2e-3
        assert "focal_gamma" not in p and "freeze" not in p  # not in the file: the default
        hp = json.loads((ckpt / f"trial_{t.number:03d}" / "config.json").read_text())
        assert hp["hyperparameters"]["embedding_dim"] == 64
    config = json.loads((ckpt / "trial_000" / "config.json").read_text())
    assert space_lib.from_data(config["space"], "x") == space_lib.from_data(
        builtin.KIND.complete_space(space_lib.load(space_file), builtin.WriterOptions(
            models=("convnext", "vit"))).to_data(), "x")
    report = (ckpt / "summary" / "report.md").read_text()
    assert "## Search space" in report and "embedding_dim: 64" in report


def test_a_rerun_with_another_space_is_refused_and_changes_nothing(restricted, data, tmp_path):
    ckpt, _ = restricted
    other = tmp_path / "other.yaml"
    other.write_text(RESTRICTED.replace("embedding_dim: 64", "embedding_dim: 128"))
    before = (ckpt / "optuna_study.db").read_bytes()
    for runner in (worker, launch):
        refused = runner("--data_root", data, "--checkpoint_dir", ckpt, "--n_trials", 3,
                         "--space", other, *TINY, *(["--cpu_workers", 1]
                                                    if runner is launch else []))
        error = one_error_line(refused, logs=runner is worker)
        assert "space.embedding_dim: stored '64', now '128'" in error, error
    # and without --space: the study's space is not the default one
    refused = worker("--data_root", data, "--checkpoint_dir", ckpt, "--n_trials", 3, *TINY,
                     "--models", "small")
    assert "space." in one_error_line(refused, logs=True)
    assert (ckpt / "optuna_study.db").read_bytes() == before


BAD_SPACES = {
    "unknown parameter": ("learning_rate: {type: float, low: 0.1, high: 0.2}\n",
                          ["learning_rate", "unknown"]),
    "low >= high": ("lr: {type: float, low: 0.1, high: 0.01}\n", ["lr", "low"]),
    "log with low <= 0": ("lr: {type: float, low: 0.0, high: 0.1, log: true}\n", ["lr", "log"]),
    "empty choices": ("loss: {type: categorical, choices: []}\n", ["loss", "choices"]),
    "condition on an unknown parameter": (
        "dropout: {type: float, low: 0.0, high: 0.5, when: {optimizer: adam}}\n",
        ["dropout", "optimizer"]),
    "wrong type": ("warmup_epochs: {type: int, low: 0.5, high: 3}\n", ["warmup_epochs"]),
    "malformed YAML": ("lr: {type: float, low: 0.1\n", ["line"]),
    "not a mapping": ("- lr\n", ["mapping"]),
}


@pytest.mark.parametrize("text, says", BAD_SPACES.values(), ids=list(BAD_SPACES))
def test_a_bad_space_file_is_refused_with_one_line_before_anything_exists(data, tmp_path,
                                                                         text, says):
    bad = tmp_path / "bad space.yaml"
    bad.write_text(text)
    ckpt = tmp_path / "run"
    error = one_error_line(launch("--data_root", data, "--checkpoint_dir", ckpt, "--n_trials", 2,
                                  "--space", bad, "--cpu_workers", 1))
    assert "bad space.yaml" in error and all(s in error for s in says), error
    assert not ckpt.exists()


BAD_SETS = {
    "outside the range": ("- {lr: 0.5}\n", ["set 1", "lr"]),
    "unknown parameter": ("- {model_type: small}\n- {depth: 3}\n", ["set 2", "depth"]),
    "not a choice": ("- {loss: hinge}\n", ["loss", "hinge"]),
    "not a list": ("lr: 0.001\n", ["list"]),
}


@pytest.mark.parametrize("text, says", BAD_SETS.values(), ids=list(BAD_SETS))
def test_a_bad_enqueue_file_is_refused_and_leaves_the_study_unchanged(restricted, data, tmp_path,
                                                                      text, says):
    ckpt, space_file = restricted
    bad = tmp_path / "known.yaml"
    bad.write_text(text)
    before = (ckpt / "optuna_study.db").read_bytes()
    error = one_error_line(launch("--data_root", data, "--checkpoint_dir", ckpt, "--n_trials", 3,
                                  "--space", space_file, "--enqueue", bad, *TINY,
                                  "--cpu_workers", 1))
    assert "known.yaml" in error and all(s in error for s in says), error
    assert (ckpt / "optuna_study.db").read_bytes() == before


def test_show_space_prints_the_space_in_force_ready_to_copy(tmp_path):
    shown = launch("--show_space", "--models", "small,vit")
    assert shown.returncode == 0, shown.stderr
    copied = tmp_path / "copied.yaml"
    copied.write_text(shown.stdout)
    options = builtin.WriterOptions(models=("small", "vit"))
    assert space_lib.load(copied) == builtin.KIND.default_space(options)
    assert yaml.safe_load(shown.stdout)["model_type"]["choices"] == ["small", "vit"]
    mine = tmp_path / "mine.yaml"
    mine.write_text(RESTRICTED)
    shown = launch("--show_space", "--space", mine)
    assert shown.returncode == 0 and "embedding_dim: 64" in shown.stdout, shown.stderr


def _custom(ckpt, space_file, n, *flags):
    return launch("--objective", f"{SPACED}:objective", "--space", space_file,
                  "--checkpoint_dir", ckpt, "--n_trials", n, "--cpu_workers", 2, *flags)


CUSTOM_SPACE = """\
x: {type: float, low: 0.0, high: 1.0}
width: {type: int, low: 1, high: 8}
act: {type: categorical, choices: [relu, gelu]}
"""


def test_known_sets_run_first_once_per_study_with_a_custom_objective(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(CUSTOM_SPACE)
    known = tmp_path / "known.yaml"
    known.write_text("- {x: 0.25, width: 2, act: relu}\n- {x: 0.5, width: 4, act: gelu}\n"
                     "- {x: 0.75}\n")
    ckpt = tmp_path / "run"
    done = _custom(ckpt, space_file, 5, "--enqueue", known)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = sorted(trials_of(ckpt), key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert trials[0].params == {"x": 0.25, "width": 2, "act": "relu"}
    assert trials[1].params == {"x": 0.5, "width": 4, "act": "gelu"}
    assert trials[2].params["x"] == 0.75 and set(trials[2].params) == {"x", "width", "act"}
    for t in trials:  # the objective got exactly the trial's parameters
        got = json.loads((ckpt / f"trial_{t.number:03d}" / "params.json").read_text())
        assert got == t.params
    assert [t.user_attrs.get("enqueued") is not None for t in trials] == [True] * 3 + [False] * 2
    again = _custom(ckpt, space_file, 6, "--enqueue", known)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = trials_of(ckpt)
    assert len(trials) == 6 and trials[5].user_attrs.get("enqueued") is None


def test_a_warm_start_adds_an_earlier_studys_trials_once_and_never_hands_them_back(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(CUSTOM_SPACE)
    earlier = tmp_path / "pilot"
    done = _custom(earlier, space_file, 4)
    assert done.returncode == 0, done.stderr[-3000:]
    # an earlier trial far better than any new one can be: it must still not be handed back
    pilot = optuna.load_study(study_name="writer_id_search",
                              storage=f"sqlite:///{earlier}/optuna_study.db")
    best_old = max(pilot.get_trials(), key=lambda t: t.value)
    narrower = tmp_path / "narrower.yaml"  # width up to 4: pilot trials with more do not fit
    narrower.write_text(CUSTOM_SPACE.replace("high: 8", "high: 4"))
    fit = [t for t in pilot.get_trials() if t.params["width"] <= 4]
    ckpt = tmp_path / "run"
    for n in (3, 3):  # twice: the second run adds nothing
        run = _custom(ckpt, narrower, n, "--warm_start", earlier)
        assert run.returncode == 0, run.stderr[-3000:]
    trials = trials_of(ckpt)
    warm = [t for t in trials if prior_trials.WARM_START_FROM in t.user_attrs]
    own = [t for t in trials if t not in warm]
    assert sorted(t.params["x"] for t in warm) == sorted(t.params["x"] for t in fit)
    assert all(t.state == TrialState.COMPLETE for t in warm)
    assert len(own) == 3 and all(t.state == TrialState.COMPLETE for t in own)
    best = study_lib.best_answer(trials, "maximize")
    assert best in own
    handed_back = (ckpt / "best_overall" / "best_model.pth").read_text()
    assert handed_back == f"model of trial {best.number}"
    assert best_old.value > 0  # (the pilot did run)
    table = (ckpt / "summary" / "all_trials.csv").read_text()
    assert "warm_start_from" in table.splitlines()[0]
    assert "warm-start" in run.stdout or "warm start" in run.stdout.lower()


def test_warm_start_sources_that_cannot_be_used_are_refused(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(CUSTOM_SPACE)
    empty = tmp_path / "empty"
    empty.mkdir()
    error = one_error_line(_custom(tmp_path / "run", space_file, 2, "--warm_start", empty))
    assert "optuna_study.db" in error
    assert not (tmp_path / "run").exists()
    error = one_error_line(_custom(tmp_path / "run", space_file, 2, "--warm_start_study", "x"))
    assert "--warm_start" in error
