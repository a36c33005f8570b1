"""Tests of summarize.py on real studies: SQLite (and a journal file for 1,000 trials), made with
the worker on a tiny custom objective or with Optuna directly: the tables, the figures, the
command line. best_overall/ and its test evaluation are tested in test_best_overall.py, the
report's text in test_report.py; all three make their studies with tests/summary_studies.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from psearch.reports import (param_plots, plots as summary_plots, summary as summarize, tables,
                             trial_plots)

from summary_studies import (OBJECTIVES, REPO, assert_summary_files, make_study, read_csv, run,
                             trial, with_params)

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
    trial_plots._values_panel(ax, [trial(0, value=0.7), trial(1, TrialState.RUNNING)],
                              "maximize", "value")
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    assert labels == ["complete (1)", "running (1, last reported value)"]


# ---------------------------------------------------------------- one summary at a time

def test_second_summary_waits_for_the_first(tmp_path):
    """While one summary holds the lock, a second one started as a command says that it waits
    and writes nothing; it finishes once the lock is free."""
    ckpt = tmp_path / "c"
    make_study(ckpt, [trial(0, value=0.5)])
    with summarize.summary_lock(ckpt):
        second = subprocess.Popen([sys.executable, "summarize.py", "--checkpoint_dir", str(ckpt)],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        # Read until it says it waits, or until it ends (stderr closes): a summary that did not
        # wait for the lock runs to its end while the lock is held here.
        said = next((line for line in iter(second.stderr.readline, "")
                     if "is being written; waiting for it" in line), None)
        assert said is not None and second.poll() is None, "the second summary did not wait"
        assert not list((ckpt / "summary").glob("*")) and not (ckpt / "best_overall").exists()
    _, rest = second.communicate(timeout=60)
    assert second.returncode == 0, rest
    assert_summary_files(ckpt)


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
    wall, device_hours = tables.time_stats(trials)
    assert wall == 91 * 60 and device_hours == pytest.approx(2.0)


def test_importances_need_a_varied_parameter():
    same = [trial(0, value=0.1), trial(0, value=0.2)]
    assert param_plots.varied_params(same) == []
    assert param_plots.varied_params([trial(0, value=0.1), trial(1, value=0.2)]) == \
        ["act", "lr", "width"]


def test_import_does_not_load_torch_or_pyplot():
    code = ("import sys, summarize; bad = {'torch', 'matplotlib.pyplot'} & set(sys.modules); "
            "sys.exit(str(bad) if bad else 0)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------- readable figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _captured_figures(monkeypatch) -> list:
    """Figures the plotting functions would save, kept open for the test to read."""
    figures = []
    monkeypatch.setattr(summary_plots, "save",
                        lambda fig, path, tight_bbox=False: figures.append(fig))
    return figures


def _shown_labels(fig, ax, axis) -> list:
    """(text, window extent) of the tick labels drawn inside the axes, left to right."""
    fig.canvas.draw()
    left, right = ax.bbox.x0, ax.bbox.x1
    labels = [label for minor in (False, True) for label in axis.get_ticklabels(minor=minor)
              if label.get_visible() and label.get_text()]
    boxes = [(label.get_text(), label.get_window_extent()) for label in labels]
    return sorted((b for b in boxes if left - 1 <= (b[1].x0 + b[1].x1) / 2 <= right + 1),
                  key=lambda b: b[1].x0)


def test_compact_numbers():
    assert [summary_plots.compact_number(v) for v in (0.0, 0.5, 0.0031041, 3.0404e-4, 1.5e6,
                                                      -2e-5, 256.0, 12345.0)] == \
        ["0", "0.5", "0.003104", "3.04e-4", "1.5e6", "-2e-5", "256", "1.234e4"]
    assert summary_plots.tick_labels([1e-4, 1e-3, 1e-2]) == ["1e-4", "1e-3", "1e-2"]
    assert summary_plots.tick_labels([0.5, 1.0, 2.0]) == ["0.5", "1", "2"]


@pytest.mark.parametrize("lo, hi", [(3e-4, 3e-3), (2e-5, 5e-4), (0.5, 5.0), (1e-6, 1e-1),
                                    (1e-8, 1e-2), (3.1e-4, 3.9e-4), (3e-4, 4.5e-4)])
def test_log_ticks_are_few(lo, hi):
    ticks = summary_plots.log_ticks(lo, hi)
    assert 2 <= len(ticks) <= 6 and all(lo * 0.99 <= t <= hi * 1.01 for t in ticks)
    assert all(len(label) <= 6 for label in summary_plots.tick_labels(ticks))


@pytest.mark.parametrize("lo, hi", [(3e-4, 3e-3), (2e-5, 5e-4), (0.5, 5.0), (1e-6, 1e-1),
                                    (3e-4, 6e-4), (3e-4, 3e-4)])
def test_log_axis_labels_do_not_overlap(lo, hi):
    """A learning rate over a decade or less is where matplotlib labels its minor ticks too;
    all trials at one value leave no round value to label."""
    plt = _pyplot()
    dist = FloatDistribution(lo, hi, log=True)
    values = np.geomspace(lo, hi, 7)
    trials = [with_params(trial(i, value=0.5 + i / 100), {"lr": v}, {"lr": dist})
              for i, v in enumerate(values)]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))  # one panel of the hyperparameter figure
    param_plots._param_panel(ax, "lr", trials, None)
    labels = _shown_labels(fig, ax, ax.xaxis)
    plt.close(fig)
    assert len(labels) >= 2, labels
    for (text, box), (next_text, next_box) in zip(labels, labels[1:]):
        assert box.x1 + 2 < next_box.x0, f"{text!r} runs into {next_text!r}"


def test_box_plots_only_from_four_values():
    acts = ["relu"] * 5 + ["gelu"] * 3 + ["tanh"]
    trials = [with_params(trial(i, value=i / 10), {**trial(i).params, "act": a})
              for i, a in enumerate(acts)]
    trials.append(with_params(trial(9, TrialState.PRUNED, value=0.1),
                              {**trial(9).params, "act": "gelu"}))
    groups = param_plots.box_groups("act", ["relu", "gelu", "tanh"], trials)
    assert groups == [(0, [0.0, 0.1, 0.2, 0.3, 0.4])]  # gelu: 3 completed + 1 pruned, no box


def test_history_ticks_are_whole_trial_numbers(monkeypatch, tmp_path):
    figures = _captured_figures(monkeypatch)
    param_plots.plot_history([trial(i, value=i / 10) for i in range(5)], "maximize", "v",
                             tmp_path / "h.png")
    ax = figures[0].axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    _pyplot().close(figures[0])
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


@pytest.mark.parametrize("n_complete, rough", [(5, True), (10, False)])
def test_importances_from_few_trials_carry_a_caution(monkeypatch, tmp_path, n_complete, rough):
    assert (param_plots.importance_caution(n_complete) is not None) == rough
    figures = _captured_figures(monkeypatch)
    trials = [trial(i, value=(i * 7 % 11) / 10) for i in range(n_complete)]
    trials.append(trial(n_complete, TrialState.PRUNED, value=0.1))  # pruned ones do not count
    param_plots.plot_importances(trials, "maximize", "v", tmp_path / "i.png")
    texts = " ".join(t.get_text() for t in figures[0].axes[0].texts)
    _pyplot().close(figures[0])
    assert (f"Only {n_complete} completed trials: importances are rough" in texts) == rough

    ckpt = tmp_path / "c"
    make_study(ckpt, trials)
    assert run(ckpt) == 0
    report = (ckpt / "summary" / "report.md").read_text()
    assert (f"only {n_complete} completed trials: importances are rough" in report) == rough


def test_curves_are_thinned_evenly_by_rank():
    ranked = [trial(i, value=1 - i / 1000) for i in range(500)]
    picked = trial_plots.thin_by_rank(ranked, 100)
    assert len(picked) == 100 and picked[0] is ranked[0] and picked[-1] is ranked[-1]
    gaps = np.diff([t.number for t in picked])
    assert gaps.min() >= 4 and gaps.max() <= 6
    assert trial_plots.thin_by_rank(ranked[:80], 100) == ranked[:80]

    plt = _pyplot()
    fig, ax = plt.subplots()
    states = [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    trial_plots._curves_panel(ax, [trial(i, states[i % 3], value=i / 300) for i in range(300)],
                              "maximize", "v")
    title, labels = ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    assert title == "Validation curves of 100 of 300 trials, evenly spaced by rank"
    assert labels[:2] == ["complete (67 of 200)", "pruned (33 of 100)"]
