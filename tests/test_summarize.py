"""Tests of summarize.py on real studies: SQLite (and a journal file for 1,200 trials), made with
the worker on a tiny custom objective or with Optuna directly."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from psearch.engine import atomic, study as study_lib
from psearch.reports import plots as summary_plots, summary as summarize

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = REPO / "tests" / "objectives" / "summary_objectives.py"
PNGS = ("all_trials_comparison.png", "hyperparameter_relationships.png", "param_importances.png",
        "optimization_history.png")
T0 = dt.datetime(2026, 1, 1, 12, 0, 0)
DISTS = {"lr": FloatDistribution(1e-5, 1e-1, log=True), "width": IntDistribution(1, 8),
         "act": CategoricalDistribution(["relu", "gelu", "tanh"])}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def trial(number: int, state: TrialState = TrialState.COMPLETE, value: float | None = None,
          minutes: float = 10.0, curve: int = 4, **user_attrs) -> FrozenTrial:
    """A finished (or running) trial with parameters derived from its number."""
    params = {"lr": 10 ** -(1 + number % 4), "width": 1 + number % 8,
              "act": ["relu", "gelu", "tanh"][number % 3]}
    start = T0 + dt.timedelta(minutes=number)
    end = None if state in (TrialState.RUNNING, TrialState.WAITING) else \
        start + dt.timedelta(minutes=minutes)
    base = value if value is not None else 0.5
    return FrozenTrial(number=number, state=state, value=value, values=None, datetime_start=start,
                       datetime_complete=end, params=params, distributions=DISTS,
                       user_attrs=user_attrs, system_attrs={}, trial_id=number,
                       intermediate_values={e: base * (e + 1) / curve for e in range(curve)})


def make_study(ckpt: Path, trials=(), direction: str = "maximize", name: str = "writer_id_search",
               settings: dict | None = None) -> optuna.Study:
    """A study in CKPT/optuna_study.db holding `trials`."""
    ckpt.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{ckpt / 'optuna_study.db'}",
                                study_name=name, direction=direction)
    if settings is not None:
        study.set_user_attr("search_settings", settings)
    study.add_trials(list(trials))
    return study


def run(ckpt: Path, *extra: str) -> int:
    return summarize.main(["--checkpoint_dir", str(ckpt), *extra])


def read_csv(ckpt: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(ckpt / "summary" / name)


def assert_summary_files(ckpt: Path) -> None:
    for name in (*PNGS, "all_trials.csv", "top5_trials.csv", "report.md"):
        path = ckpt / "summary" / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert not list(ckpt.glob(".best_overall.*")), "a staging folder was left behind"


# ---------------------------------------------------------------- end to end

def test_ten_trial_custom_objective_run_then_regenerate(tmp_path, capsys):
    ckpt = tmp_path / "run with spaces"
    subprocess.run([sys.executable, "single_gpu_hyperparameter_search.py", "--checkpoint_dir",
                    str(ckpt), "--n_trials", "10", "--objective", f"{OBJECTIVES}:with_files"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    assert run(ckpt) == 0
    assert_summary_files(ckpt)
    study = optuna.load_study(study_name="writer_id_search",
                              storage=f"sqlite:///{ckpt / 'optuna_study.db'}")
    ranked = sorted(study.trials, key=lambda t: -t.value)
    top5 = read_csv(ckpt, "top5_trials.csv")
    assert list(top5["number"]) == [t.number for t in ranked[:5]]
    assert list(top5["value"]) == pytest.approx([t.value for t in ranked[:5]])
    assert {"duration_s", "lr", "width", "act", "dropout", "val_page_top1"} <= set(top5.columns)
    assert len(read_csv(ckpt, "all_trials.csv")) == 10
    config = json.loads((ckpt / "best_overall" / "config.json").read_text())
    assert (config["trial_number"], config["value"]) == (study.best_trial.number,
                                                         study.best_trial.value)
    assert (ckpt / "best_overall" / "best_model.pth").read_text() == \
        f"weights of trial {study.best_trial.number}"
    assert f"Trial {study.best_trial.number}" in capsys.readouterr().out

    # Delete the outputs: the plain command line brings them back.
    for folder in ("summary", "best_overall"):
        shutil.rmtree(ckpt / folder)
    done = subprocess.run([sys.executable, "summarize.py", "--checkpoint_dir", str(ckpt)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_summary_files(ckpt)
    assert json.loads((ckpt / "best_overall" / "config.json").read_text()) == config
    assert "## Top 5 trials" in done.stdout


def test_custom_objective_without_files_still_gets_best_overall(tmp_path):
    ckpt = tmp_path / "c"
    make_study(ckpt, [trial(0, value=0.3), trial(1, value=0.9), trial(2, value=0.6)])
    assert run(ckpt) == 0
    best = ckpt / "best_overall"
    assert sorted(os.listdir(best)) == ["config.json", "metrics.json"]
    config = json.loads((best / "config.json").read_text())
    assert config["trial_number"] == 1 and config["value"] == 0.9
    assert config["params"] == trial(1).params and config["direction"] == "maximize"
    assert json.loads((best / "metrics.json").read_text())["value"] == 0.9
    assert "no best_model.pth" in (ckpt / "summary" / "report.md").read_text()


def test_minimize_puts_the_lowest_value_first(tmp_path):
    ckpt = tmp_path / "c"
    values = [3.0, 1.0, 2.0, 5.0, 4.0, 0.5, 6.0]
    trials = [trial(i, value=v) for i, v in enumerate(values)]
    trials += [trial(7, TrialState.PRUNED, value=0.1), trial(8, TrialState.FAIL)]
    make_study(ckpt, trials, direction="minimize")
    assert run(ckpt) == 0
    assert list(read_csv(ckpt, "top5_trials.csv")["number"]) == [5, 1, 2, 0, 4]
    table = read_csv(ckpt, "all_trials.csv")
    assert list(table["number"]) == [5, 1, 2, 0, 4, 3, 6, 7, 8]
    assert list(table["state"][-2:]) == ["PRUNED", "FAIL"]
    assert json.loads((ckpt / "best_overall" / "config.json").read_text())["trial_number"] == 5


# ---------------------------------------------------------------- little or odd data

def test_zero_trials(tmp_path):
    ckpt = tmp_path / "c"
    make_study(ckpt)
    assert run(ckpt) == 0
    assert_summary_files(ckpt)
    assert list(read_csv(ckpt, "all_trials.csv").columns[:4]) == ["number", "state", "value",
                                                                  "duration_s"]
    assert len(read_csv(ckpt, "top5_trials.csv")) == 0
    report = (ckpt / "summary" / "report.md").read_text()
    assert "0 trials" in report and "no trial has completed yet" in report
    assert not (ckpt / "best_overall").exists()


def test_only_pruned_and_failed_leave_best_overall_as_it_was(tmp_path):
    ckpt = tmp_path / "c"
    make_study(ckpt, [trial(0, TrialState.PRUNED, value=0.2),
                      trial(1, TrialState.FAIL, fail_reason="RuntimeError: CUDA out of memory"),
                      trial(2, TrialState.FAIL, curve=0, fail_reason="interrupted")])
    old = ckpt / "best_overall"
    old.mkdir()
    (old / "config.json").write_text('{"trial_number": 99}')
    assert run(ckpt) == 0
    assert_summary_files(ckpt)
    assert sorted(os.listdir(old)) == ["config.json"]
    assert (old / "config.json").read_text() == '{"trial_number": 99}'
    report = (ckpt / "summary" / "report.md").read_text()
    assert "best_overall/ left as it was: no trial has completed yet" in report
    assert "0 complete, 1 pruned, 2 failed" in report and "CUDA out of memory" in report
    table = read_csv(ckpt, "all_trials.csv")
    assert set(table["fail_reason"].dropna()) == {"RuntimeError: CUDA out of memory",
                                                  "interrupted"}


def test_running_trials_are_shown(tmp_path):
    ckpt = tmp_path / "c"
    make_study(ckpt, [trial(0, value=0.7), trial(1, value=0.8), trial(2, TrialState.RUNNING),
                      trial(3, TrialState.PRUNED, value=0.1, resumed_from=1, attempt=2)])
    assert run(ckpt) == 0
    table = read_csv(ckpt, "all_trials.csv")
    assert list(table["state"]) == ["COMPLETE", "COMPLETE", "PRUNED", "RUNNING"]
    assert table.loc[table["number"] == 3, "resumed_from"].item() == 1
    assert "1 running" in (ckpt / "summary" / "report.md").read_text()


def test_running_trial_appears_in_the_values_plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    summary_plots._values_panel(ax, [trial(0, value=0.7), trial(1, TrialState.RUNNING)],
                                "maximize", "value")
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert labels == ["complete (1)", "running (1, last reported value)"]


# ---------------------------------------------------------------- best_overall swap

def _stage(ckpt: Path, i: int) -> Path:
    staging = ckpt / f".best_overall.new-{i}"
    staging.mkdir()
    (staging / "best_model.pth").write_bytes(bytes([i % 256]) * 200_000)
    (staging / "config.json").write_text(json.dumps({"trial_number": i, "pad": "x" * 5000}))
    (staging / "metrics.json").write_text(json.dumps({"value": i}))
    return staging


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_swap_keeps_a_complete_folder(tmp_path, monkeypatch, exchange):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    target = ckpt / "best_overall"
    assert atomic.swap_in_folder(_stage(ckpt, 0), target) is None
    if not exchange:
        monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: False)
    seen, problems, stop = [], [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                names = sorted(os.listdir(target))
                assert names == ["best_model.pth", "config.json", "metrics.json"], names
                seen.append(json.loads((target / "config.json").read_text())["trial_number"])
            except (OSError, ValueError, AssertionError) as exc:
                problems.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    kept = tmp_path / "retired"  # as in summarize, old folders outlive their swap a while
    kept.mkdir()
    try:
        for i in range(1, 60):
            retired = atomic.swap_in_folder(_stage(ckpt, i), target)
            assert json.loads((retired / "config.json").read_text())["trial_number"] == i - 1
            retired.rename(kept / str(i))
    finally:
        stop.set()
        thread.join()
    assert json.loads((target / "config.json").read_text())["trial_number"] == 59
    assert sorted(os.listdir(ckpt)) == ["best_overall"]
    assert len(set(seen)) > 1
    if exchange:  # the fallback has a short window without the folder: that is why it is one
        assert problems == []


def test_second_summary_waits_for_the_first(tmp_path):
    ckpt = tmp_path / "c"
    make_study(ckpt, [trial(0, value=0.5)])
    result = {}
    with summarize.summary_lock(ckpt):
        worker = threading.Thread(target=lambda: result.setdefault("rc", run(ckpt)))
        worker.start()
        time.sleep(1.0)
        assert not (ckpt / "summary" / "report.md").exists()
    worker.join(timeout=60)
    assert result["rc"] == 0 and (ckpt / "summary" / "report.md").exists()


# ---------------------------------------------------------------- test split

BUILTIN = {"objective": study_lib.BUILTIN_OBJECTIVE, "direction": "maximize"}


def _builtin_study(tmp_path: Path) -> tuple[Path, optuna.Study]:
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    ckpt = tmp_path / "c"
    study = make_study(ckpt, [trial(0, value=0.4), trial(1, value=0.8)],
                       settings={**BUILTIN, "data_root": str(data)})
    for number in (1, 2):
        (ckpt / f"trial_{number:03d}").mkdir()
        (ckpt / f"trial_{number:03d}" / "best_model.pth").write_bytes(b"weights %d" % number)
    return ckpt, study


def test_each_best_model_is_evaluated_once_on_the_test_split(tmp_path, monkeypatch):
    ckpt, study = _builtin_study(tmp_path)
    calls = []

    class FakeEvaluate:
        @staticmethod
        def evaluate_checkpoint(path, split, data_root):
            calls.append((Path(path).read_bytes(), split, data_root))
            return {"page_top1": 0.71, "page_top5": 0.9, "page_map": 0.65}

    monkeypatch.setitem(sys.modules, "psearch.writer_id.evaluate", FakeEvaluate)
    assert run(ckpt) == 0
    assert run(ckpt) == 0  # the same best: not evaluated again
    assert calls == [(b"weights 1", "test", str(tmp_path / "data"))]
    tested = json.loads((ckpt / "best_overall" / "test_metrics.json").read_text())
    assert tested["page_top1"] == 0.71 and tested["split"] == "test"
    assert "page top-1 0.7100" in (ckpt / "summary" / "report.md").read_text()

    study.add_trial(trial(2, value=0.9))  # a new best replaces best_overall/ and is evaluated
    assert run(ckpt) == 0
    assert [c[0] for c in calls] == [b"weights 1", b"weights 2"]
    config = json.loads((ckpt / "best_overall" / "config.json").read_text())
    assert config["trial_number"] == 2
    assert (ckpt / "best_overall" / "best_model.pth").read_bytes() == b"weights 2"
    assert (ckpt / "best_overall" / "test_metrics.json").is_file()
    assert not list(ckpt.glob(".best_overall.*"))


def test_missing_evaluate_module_is_a_warning(tmp_path, monkeypatch, caplog):
    ckpt, _ = _builtin_study(tmp_path)
    monkeypatch.setitem(sys.modules, "psearch.writer_id.evaluate", None)  # the import fails
    assert run(ckpt) == 0
    assert not (ckpt / "best_overall" / "test_metrics.json").exists()
    assert "evaluate module is not available" in caplog.text
    assert "not evaluated on the test split" in (ckpt / "summary" / "report.md").read_text()


def test_no_test_split_means_no_evaluation(tmp_path):
    assert summarize.held_out_split({**BUILTIN, "data_root": str(tmp_path)}) is None
    assert summarize.held_out_split({"objective": "x.py:f", "data_root": str(tmp_path)}) is None


# ---------------------------------------------------------------- scale

def test_1000_trials_well_under_30_seconds(tmp_path):
    log = tmp_path / "journal.log"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(log)))
    study = optuna.create_study(storage=storage, study_name="big")
    states = [TrialState.COMPLETE] * 6 + [TrialState.PRUNED, TrialState.FAIL]
    study.add_trials([trial(i, states[i % 8], value=None if i % 8 == 7 else (i * 37 % 101) / 100,
                            curve=20, worker=f"gpu{i % 8}") for i in range(1000)])
    started = time.monotonic()
    assert run(tmp_path, "--storage", f"journal:///{log}") == 0
    elapsed = time.monotonic() - started
    print(f"summary of 1000 trials: {elapsed:.1f} s")
    assert elapsed < 30
    assert_summary_files(tmp_path)
    assert len(read_csv(tmp_path, "all_trials.csv")) == 1000


# ---------------------------------------------------------------- command line and helpers

def test_missing_database_or_study_exits_2(tmp_path, capsys):
    assert run(tmp_path / "nowhere") == 2
    assert run(tmp_path) == 2
    assert "no study database" in capsys.readouterr().err
    assert not (tmp_path / "optuna_study.db").exists()
    make_study(tmp_path)
    assert run(tmp_path, "--study_name", "other") == 2
    assert "no study 'other'" in capsys.readouterr().err


def test_study_name_defaults():
    assert summarize.pick_study_name(["only"], None, "url") == "only"
    assert summarize.pick_study_name(["a", "writer_id_search"], None, "url") == "writer_id_search"
    with pytest.raises(summarize.UsageError, match="--study_name"):
        summarize.pick_study_name(["a", "b"], None, "url")


def test_time_stats():
    trials = [trial(0, value=1.0, minutes=30), trial(1, TrialState.PRUNED, minutes=90),
              trial(2, TrialState.RUNNING)]
    wall, device_hours = summarize.time_stats(trials)
    assert wall == 91 * 60 and device_hours == pytest.approx(2.0)


def test_importances_need_a_varied_parameter():
    same = [trial(0, value=0.1), trial(0, value=0.2)]
    assert summary_plots.varied_params(same) == []
    assert summary_plots.varied_params([trial(0, value=0.1), trial(1, value=0.2)]) == \
        ["act", "lr", "width"]


def test_import_does_not_load_torch_or_pyplot():
    code = ("import sys, summarize; bad = {'torch', 'matplotlib.pyplot'} & set(sys.modules); "
            "sys.exit(str(bad) if bad else 0)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
