"""Tests of the report's text (summary/report.md) on real studies of a wide search space: the top
trials stay a narrow Markdown table, also for 500 trials."""
from __future__ import annotations

import time

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from psearch.reports import plots as summary_plots, report as summary_report

from summary_studies import assert_summary_files, make_study, read_csv, run, trial, with_params

# A search space like the built-in one: many parameters, some conditional, long names and values.
WIDE_DISTS = {
    "model_type": CategoricalDistribution(["small", "convnext", "vit"]),
    "learning_rate_of_the_backbone": FloatDistribution(1e-5, 3e-4, log=True),
    "weight_decay": FloatDistribution(1e-6, 1e-1, log=True),
    "dropout": FloatDistribution(0.0, 0.5), "embedding_dim": CategoricalDistribution([128, 512]),
    "loss": CategoricalDistribution(["ce", "focal"]), "warmup_epochs": IntDistribution(0, 5),
    "label_smoothing": FloatDistribution(0.0, 0.2), "focal_gamma": FloatDistribution(1.0, 3.0),
    "grad_clip": FloatDistribution(0.5, 5.0, log=True),
    "augmentation": CategoricalDistribution(["none", "a-rather-long-augmentation-policy-name-v2"]),
}


def wide_trial(number: int, state: TrialState = TrialState.COMPLETE) -> FrozenTrial:
    """A trial of WIDE_DISTS, its parameters and value drawn from its number."""
    rng = np.random.default_rng(number)
    params = {}
    for name, dist in WIDE_DISTS.items():
        if isinstance(dist, CategoricalDistribution):
            params[name] = dist.choices[rng.integers(len(dist.choices))]
        elif isinstance(dist, IntDistribution):
            params[name] = int(rng.integers(dist.low, dist.high + 1))
        elif dist.log:
            params[name] = float(np.exp(rng.uniform(np.log(dist.low), np.log(dist.high))))
        else:
            params[name] = float(rng.uniform(dist.low, dist.high))
    params.pop("focal_gamma" if params["loss"] == "ce" else "label_smoothing")
    value = float(rng.uniform(0.2, 0.9))
    base = trial(number, state, value=value, curve=20, val_page_top1=value,
                 val_page_top5=min(1.0, value + 0.1), val_page_map=value * 0.9,
                 a_custom_metric_with_a_very_long_name_indeed=value / 3)
    return with_params(base, params, {n: WIDE_DISTS[n] for n in params})


def _top_section(report: str) -> list[str]:
    return report.split("## Top 5 trials")[1].split("## Files")[0].strip().splitlines()


def test_top_table_is_narrow_markdown(tmp_path):
    ckpt = tmp_path / "c"
    trials = [wide_trial(i) for i in range(8)]
    make_study(ckpt, trials)
    assert run(ckpt) == 0
    section = _top_section((ckpt / "summary" / "report.md").read_text())
    assert max(map(len, section)) <= 120, "\n".join(section)
    header, rule, *rows = section[:7]
    assert header.startswith("| # | trial |") and set(rule) <= set("|-:") and len(rows) == 5
    best = max(trials, key=lambda t: t.value)
    assert rows[0].split("|")[2].strip() == str(best.number)
    assert f"{best.value:.4g}" in rows[0]
    lines = "\n".join(section)
    lr = best.params["learning_rate_of_the_backbone"]
    assert f"learning_rate_of_the_backbone={summary_plots.compact_number(lr)}" in lines
    # The table keeps a few numbers per trial; the CSV keeps them all, at full precision.
    top5 = read_csv(ckpt, "top5_trials.csv")
    assert top5.loc[0, "learning_rate_of_the_backbone"] == pytest.approx(lr, rel=1e-12)
    assert "a_custom_metric_with_a_very_long_name_indeed" in top5.columns
    assert "top5_trials.csv" in lines


def test_markdown_table_lines_up():
    assert summary_report.markdown_table(["a", "bb"], [["1", "2"], ["333", "4"]]) == [
        "|   a | bb |", "|----:|---:|", "|   1 |  2 |", "| 333 |  4 |"]


def test_500_wide_trials_summary_is_quick(tmp_path):
    log = tmp_path / "journal.log"  # a journal file is written much faster than SQLite
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(log)))
    study = optuna.create_study(storage=storage, study_name="wide")
    states = [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    study.add_trials([wide_trial(i, states[i % 4]) for i in range(500)])
    started = time.monotonic()
    assert run(tmp_path, "--storage", f"journal:///{log}") == 0
    elapsed = time.monotonic() - started
    print(f"summary of 500 trials with {len(WIDE_DISTS)} hyperparameters: {elapsed:.1f} s")
    assert elapsed < 30
    assert_summary_files(tmp_path)
    assert max(map(len, _top_section((tmp_path / "summary" / "report.md").read_text()))) <= 120


def _interval_trial(number, value, low, high):
    return trial(number, value=value, val_page_top1=value, val_page_top5=1.0, val_page_map=value,
                 value_low=low, value_high=high)


def test_intervals_are_shown_and_overlapping_leaders_get_the_confirmation_hint(tmp_path):
    ckpt = tmp_path / "c"
    make_study(ckpt, [_interval_trial(0, 0.80, 0.70, 0.88), _interval_trial(1, 0.75, 0.66, 0.82),
                      _interval_trial(2, 0.40, 0.31, 0.47)])
    assert run(ckpt) == 0
    report = (ckpt / "summary" / "report.md").read_text()
    header, _, first, *_ = _top_section(report)
    assert "95% interval" in header and "0.7–0.88" in first
    assert "Trials 0 and 1 are within each other's 95% intervals" in report
    assert "--confirm_top 2 --confirm_seeds 2" in report
    table = read_csv(ckpt, "all_trials.csv")
    assert {"value_low", "value_high"} <= set(table.columns)
    assert "95% interval 0.7–0.88" in report.split("## Top")[0]  # the best trial's line


def test_a_clear_leader_gets_no_hint_and_a_minimised_study_reads_the_other_way():
    import pandas as pd

    top = pd.DataFrame({"number": [3, 1, 2], "value": [0.9, 0.6, 0.5],
                        "value_low": [0.85, 0.5, 0.4], "value_high": [0.95, 0.7, 0.6]})
    assert summary_report.overlapping_leaders(top, "maximize") == [3]
    assert "leads beyond" in " ".join(summary_report.overlap_advice(top, "maximize"))
    low = pd.DataFrame({"number": [1, 2], "value": [0.1, 0.15], "value_low": [0.05, 0.12],
                        "value_high": [0.14, 0.2]})
    assert summary_report.overlapping_leaders(low, "minimize") == [1, 2]
    assert summary_report.overlap_advice(low.drop(columns=["value_low", "value_high"]),
                                         "minimize") == []
