"""The benchmarks' own arithmetic and reports (bench/), with plain data: no timings are asserted."""
import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import numpy as np
import pytest
from optuna.trial import TrialState

from psearch.engine import layout

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import ddp_scaling  # noqa: E402
import gpu_check_report  # noqa: E402
import launcher_vs_optuna  # noqa: E402
import pruners  # noqa: E402
import results_md  # noqa: E402
import trial_value as tv_bench  # noqa: E402

T0 = dt.datetime(2026, 11, 28, 12, 0, 0)


def trial(number, state, start_s, end_s, value=None, steps=0):
    return SimpleNamespace(number=number, state=state, value=value,
                           datetime_start=None if start_s is None else T0 + dt.timedelta(
                               seconds=start_s),
                           datetime_complete=None if end_s is None else T0 + dt.timedelta(
                               seconds=end_s),
                           intermediate_values={k: 0.0 for k in range(1, steps + 1)})


def test_effective_parallelism_and_time_to_first_trial():
    trials = [trial(0, TrialState.COMPLETE, 2, 10), trial(1, TrialState.COMPLETE, 3, 11),
              trial(2, TrialState.FAIL, 4, 5)]
    fig = launcher_vs_optuna.trial_figures(trials, T0, wall_s=12.0, workers=2)
    assert fig == {"finished": 2, "wall_s": 12.0, "first_trial_s": 2.0, "busy_s": 16.0,
                   "parallelism": round(16 / 24, 3)}
    rows = launcher_vs_optuna.summarize(
        [{"method": "plain", **fig}, {"method": "plain", **fig, "wall_s": 14.0},
         {"method": "sequential", **fig, "wall_s": 26.0}], sequential_wall=26.0)
    assert [r["method"] for r in rows] == ["plain", "sequential"]
    assert rows[0]["wall_s"] == 13.0 and rows[0]["speedup_vs_sequential"] == 2.0


def test_pruner_budget_and_best_so_far_curve():
    trials = [trial(0, TrialState.COMPLETE, 0, 10, 0.5, 3), trial(1, TrialState.PRUNED, 10, 12,
                                                                  None, 1),
              trial(2, TrialState.COMPLETE, 12, 22, 0.75, 3), trial(3, TrialState.COMPLETE, 22,
                                                                    30, 0.6, 3),
              trial(4, TrialState.FAIL, 30, 31), trial(5, TrialState.RUNNING, 31, None, None, 1)]
    now = (T0 + dt.timedelta(seconds=35)).timestamp()
    assert pruners.device_seconds(trials, now) == pytest.approx(35.0)
    curve = pruners.best_curve(trials)
    assert curve == [(10.0, 0.5, 0), (12.0, 0.5, 1), (22.0, 0.75, 2), (30.0, 0.75, 3),
                     (31.0, 0.75, 4)]
    row = pruners.summary_row({"pruner": "asha", "trials": trials, "curve": curve}, 35.0)
    assert row == {"pruner": "asha", "budget_s": 35.0, "complete": 3, "pruned": 1,
                   "epochs_trained": 11, "best_val_page_top1": 0.75, "best_reached_at_s": 22.0,
                   "trial0_val_page_top1": 0.5}


FIGURES = {
    "cache": {"lines": 192, "size": "160x1760", "source_height": 240, "num_workers": 0,
              "repeats": 5, "cache_build_s": 1.2, "cache_lines_per_s": 900.0,
              "decode_lines_per_s": 300.0, "ratio": 3.0, "target_ratio": 5.0},
    "augment": {"threads": 1, "batch": 16, "rows": [{"size": "64x640", "ratio": 1.0,
                                                     "per_image_pil_lines_per_s": 1100,
                                                     "batched_torch_lines_per_s": 1100}]},
    "throughput": {"threads": 2, "rows": [{"model": "vit", "size": "160x1760", "batch": 2,
                                           "steps": 3, "lines_per_s": 0.2, "precision": "fp32",
                                           "cpu_share": 0.9}]},
    "pruners": {"settings": {"budget_s": 75.0, "writers": 8, "img_height": 64, "img_width": 640,
                             "epochs": 9, "lines_per_writer": 16, "seed": 42},
                "rows": [{"pruner": "none", "complete": 3, "pruned": 0, "epochs_trained": 27,
                          "best_val_page_top1": None, "best_reached_at_s": None,
                          "trial0_val_page_top1": None}]},
}
FIGURES["ddp"] = {"device": "cpu", "repeats": 2, "trials": 2, "epochs": 3, "model": "small",
                  "size": "64x640", "lines_per_epoch": 512, "batch": 16,
                  "rows": [{"k": 1, "trials": 4, "wall_s": 30.0, "epochs_s": 29.0, "other_s": 1.0,
                            "lines_per_s": 50.0, "epoch_speedup": 1.0},
                           {"k": 2, "trials": 4, "wall_s": 26.0, "epochs_s": 20.0, "other_s": 6.0,
                            "lines_per_s": 75.0, "epoch_speedup": 1.5}]}
FIGURES["trial_value"] = {
    "sets": 10, "seeds": 3, "epochs": 8, "writers": 12, "val_pages": 48, "test_pages": 48,
    "searches": 4000, "search_size": 4, "size": "32x320", "lines_per_writer": 40,
    "seconds": 300, "winner": "map_smooth3",
    "definitions": {name: {"summary": f"what {name} is", "agreement": a, "agreement_own": 0.8,
                           "test_map_of_pick": 0.61234, "test_top1_of_pick": 0.7, "spearman": s,
                           "seed_sd": 0.02, "set_spread": 0.05, "mean_epoch": 6.25}
                    for name, a, s in (("top1_best", 0.41, float("nan")),
                                       ("map_smooth3", 0.72, 0.8))}}
LAUNCHER = {"workers": 8, "repeats": 3, "cores": 2, "ray_tune": "not installed",
            "scenarios": {"160 x 0.5 s": [
                {"method": "launcher", "runs": 3, "finished": "160", "wall_s": 17.2,
                 "first_trial_s": 4.6, "parallelism": 0.62, "speedup_vs_sequential": 4.97}]}}


def test_ddp_scaling_medians_and_epoch_speed_relative_to_one_device():
    row = lambda wall, epochs, lps: {"wall_s": wall, "epochs_s": epochs,  # noqa: E731
                                     "other_s": wall - epochs, "lines_per_s": lps}
    out = ddp_scaling.summarize({2: [row(30, 20, 90), row(32, 22, 80), row(40, 30, 60)],
                                 1: [row(31, 30, 40), row(33, 32, 50)]})
    assert [r["k"] for r in out] == [1, 2]
    assert out[0] == {"k": 1, "trials": 2, "wall_s": 32.0, "epochs_s": 31.0, "other_s": 1.0,
                      "lines_per_s": 45.0, "epoch_speedup": 1.0}
    assert out[1]["trials"] == 3 and out[1]["lines_per_s"] == 80 and \
        out[1]["epoch_speedup"] == round(80 / 45, 2) and out[1]["other_s"] == 10


def test_results_file_names_a_missed_target_and_a_failed_benchmark():
    info = {"cpu": "AMD EPYC", "cores": 2, "ram_gib": 23.5, "python": "3.11", "torch": "2",
            "optuna": "5", "gpu": "none", "date": "today", "load_before": "1", "load_after": "2"}
    timings = [{"name": "cache", "seconds": 10, "others_cpu": "3%", "status": "ok"},
               {"name": "launcher", "seconds": 3, "others_cpu": "40%", "status": "failed"}]
    text = results_md.render(info, {**FIGURES, "launcher": None},
                             {"launcher": "exit 1: boom"}, timings)
    assert "| AMD EPYC | 2 | 23.5 |" in text
    assert "**3.0x**" in text and "**missed**" in text
    assert "| vit | 160x1760 | 2 | 3 | 0.2 | fp32 | 0.9 |" in text
    assert "| none | 3 | 0 | 27 | - | - | - |" in text      # no complete value: a dash
    assert "## launcher: failed" in text and "exit 1: boom" in text
    assert "| launcher | 3 | 40% | failed |" in text
    ok = results_md.render(info, {**FIGURES, "launcher": LAUNCHER}, {}, timings[:1])
    assert "`parallel_search.py --cpu_workers 8`" in ok and "### 160 x 0.5 s on 8 workers" in ok
    assert "| launcher | 3 | 160 | 17.2 | 4.6 | 0.62 | 4.97 |" in ok and "failed" not in ok
    assert "| 2 | 4 | 26.0 | 20.0 | 6.0 | 75.0 | 1.5 |" in ok and "CPU processes (gloo)" in ok


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_gpu_check_stops_at_once_without_a_gpu():
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("gpu_check: error: nvidia-smi not found")


def test_gpu_check_report_from_what_the_check_leaves(tmp_path):
    search = tmp_path / "search"
    search.mkdir()
    study = optuna.create_study(study_name="writer_id_search", direction="maximize",
                                storage=layout.default_storage_url(search))
    for k, (start, end) in enumerate([(0, 40), (5, 50)]):
        study.add_trial(optuna.trial.FrozenTrial(
            number=k, trial_id=k, state=TrialState.COMPLETE, value=0.5,
            datetime_start=T0 + dt.timedelta(seconds=start),
            datetime_complete=T0 + dt.timedelta(seconds=end), params={}, distributions={},
            user_attrs={"worker": f"gpu0w{k}"}, system_attrs={}, intermediate_values={}))
        folder = search / f"trial_{k:03d}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(
            {"writers": ["a", "b"], "settings": {"lines_per_writer": 100, "batch_size": 16}}))
        (folder / "history.csv").write_text("epoch,epoch_time_s\n1,10\n2,10\n")
    # samples before the first trial (idle) are left out; those while trials ran count
    stamps = [T0 + dt.timedelta(seconds=s) for s in (-60, 1, 49)]
    (tmp_path / "nvidia_smi.csv").write_text("".join(
        f"{s:%Y/%m/%d %H:%M:%S.%f}, {u}, {m}, 143771\n"
        for s, u, m in zip(stamps, (0, 80, 90), (500, 30000, 31000))))
    (tmp_path / "throughput.json").write_text(json.dumps({"device_name": "NVIDIA H200", "rows": [
        {"model": "convnext", "size": "160x1760", "batch": 16, "lines_per_s": 500.0,
         "precision": "bf16 autocast", "peak_gib": 5.8}]}))
    (tmp_path / "pytest.log").write_text("..\n2 passed in 3.1s\n")
    text = gpu_check_report.report(tmp_path)
    assert "| trials | 2 complete |" in text and "gpu0w0, gpu0w1" in text
    # 2 trials x 2 epochs x 192 lines (200 less the partial batch): in 40 s of epochs, and in
    # the 50 s from the first trial's start to the last one's end
    assert "| training lines/s, per trial (epochs incl. validation) | 19.2 |" in text
    assert "| training lines/s, the GPU (both workers, while trials ran) | 15.4 |" in text
    assert "85 / 90 (2 samples)" in text and "| 31000 of 143771 |" in text
    assert "| convnext | 160x1760 | 16 | 500.0 | bf16 autocast | 5.8 |" in text
    assert text.rstrip().endswith("2 passed in 3.1s")


# ---------------------------------------------------------------- bench/trial_value.py

def curves_of(val_top1, val_map, test_map):
    """[sets, seeds, epochs] curves from per-set [epochs] lists, the same under every seed."""
    arr = lambda rows: np.repeat(np.array(rows, float)[:, None, :], 2, axis=1)  # noqa: E731
    return {"val_page_top1": arr(val_top1), "val_page_map": arr(val_map),
            "test_page_top1": arr(test_map), "test_page_map": arr(test_map)}


def test_trial_value_a_value_that_is_the_truth_agrees_always_and_its_reverse_never():
    target = np.array([0.1, 0.4, 0.2, 0.3])
    searches = tv_bench.draw_searches(4, 2, searches=300, size=3, seed=1)
    assert searches.sets.shape == searches.seeds.shape == (300, 3)
    assert all(len(set(row)) == 3 for row in searches.sets.tolist())   # distinct sets
    assert set(searches.seeds.ravel().tolist()) == {0, 1}
    exact = np.repeat(target[:, None], 2, axis=1)
    assert tv_bench.agreement(exact, target, searches) == 1.0
    assert tv_bench.agreement(-exact, target, searches) == 0.0
    # seed noise smaller than the gaps between sets changes nothing; a run without a value
    # (NaN) never wins a search
    noisy = exact + np.array([[0.01, -0.01]] * 4)
    noisy[1, 0] = np.nan
    assert tv_bench.agreement(noisy, target, searches) < 1.0
    assert tv_bench.agreement(noisy, np.nanmean(noisy, axis=1), searches) < 1.0
    assert tv_bench.agreement(exact + np.array([[0.01, -0.01]] * 4), target, searches) == 1.0


def test_trial_value_a_first_epoch_spike_fools_the_best_epoch_not_the_smoothed_value():
    # set 0 improves steadily; set 1 has one lucky first epoch on the validation pages, then
    # stays poor, on the test pages too
    curves = curves_of(val_top1=[[0.5, 0.6, 0.7, 0.7, 0.8, 0.8], [1.0, 0.3, 0.3, 0.3, 0.3, 0.3]],
                       val_map=[[0.5, 0.6, 0.7, 0.8, 0.8, 0.6], [0.9, 0.3, 0.3, 0.3, 0.3, 0.3]],
                       test_map=[[0.4, 0.5, 0.6, 0.7, 0.8, 0.9], [0.5, 0.2, 0.2, 0.2, 0.2, 0.2]])
    assert tv_bench.truth(curves["test_page_map"]).tolist() == pytest.approx([0.85, 0.2])
    searches = tv_bench.draw_searches(2, 2, searches=50, size=2)
    fig = tv_bench.compare(curves, searches)
    assert fig["top1_best"]["agreement"] == fig["map_best"]["agreement"] == 0.0
    assert fig["top1_best"]["test_map_of_pick"] == pytest.approx(0.5)     # set 1, epoch 1
    assert fig["top1_best"]["mean_epoch"] == pytest.approx((1 + 5) / 2)   # 1 for set 1, 5 for 0
    for name in ("map_smooth3", "top1_smooth3", "mix_smooth3", "map_last3"):
        assert fig[name]["agreement"] == fig[name]["agreement_own"] == 1.0
    # the best 3 epochs in a row are 3-5: their last one's weights stand for the value
    assert fig["map_smooth3"]["test_map_of_pick"] == pytest.approx(0.8)
    assert fig["map_last3"]["test_map_of_pick"] == pytest.approx(0.9)     # the last epoch
    assert fig["map_smooth3"]["spearman"] == pytest.approx(1.0)
    assert fig["top1_best"]["spearman"] == pytest.approx(-1.0)
    assert fig["map_smooth3"]["seed_sd"] == 0.0      # the same curve under both seeds
    assert tv_bench.winner(fig) in ("map_smooth3", "top1_smooth3", "mix_smooth3", "map_last3")


def test_trial_value_winner_breaks_ties_by_the_test_map_of_the_pick():
    fig = {"a": {"agreement": 0.5, "test_map_of_pick": 0.9},
           "b": {"agreement": 0.7, "test_map_of_pick": 0.1},
           "c": {"agreement": 0.7, "test_map_of_pick": 0.2},
           "d": {"agreement": 0.7, "test_map_of_pick": float("nan")}}
    assert tv_bench.winner(fig) == "c"


def test_trial_value_ranks_spearman_and_spreads_match_the_references():
    stats = pytest.importorskip("scipy.stats")
    x = np.array([0.3, 0.1, 0.3, 0.7, 0.1, 0.2])
    assert tv_bench.ranks(x).tolist() == stats.rankdata(x).tolist()
    truth = np.array([0.5, 0.2, 0.4, 0.9, 0.1, 0.3])
    values = np.column_stack([x, truth[::-1]])
    expected = np.mean([stats.spearmanr(values[:, r], truth)[0] for r in range(2)])
    assert tv_bench.spearman(values, truth) == pytest.approx(expected)
    assert np.isnan(tv_bench.spearman(np.ones((6, 2)), truth))         # nothing varies
    spread = np.array([[1.0, 3.0], [5.0, 7.0]])
    assert tv_bench.seed_sd(spread) == pytest.approx(np.sqrt(2))
    assert tv_bench.set_spread(spread) == pytest.approx(np.sqrt(8))
    assert np.isnan(tv_bench.seed_sd(spread[:, :1]))                   # one seed: no spread


def test_trial_value_runs_become_curves_with_nan_where_a_run_stopped():
    row = {k: 0.5 for k in tv_bench.CURVES}
    results = [{"set": 1, "seed_index": 0, "rows": [row, row]},
               {"set": 0, "seed_index": 1, "rows": [row]}]
    curves = tv_bench.assemble(results, sets=2, seeds=2, epochs=2)
    assert curves["test_page_map"].shape == (2, 2, 2)
    assert curves["val_page_map"][1, 0].tolist() == [0.5, 0.5]
    assert curves["val_page_map"][0, 1, 0] == 0.5 and np.isnan(curves["val_page_map"][0, 1, 1])
    assert np.isnan(curves["val_page_map"][0, 0]).all()
    # a run that never finished an epoch has no value and no chosen epoch
    values, chosen = tv_bench.apply_definition(tv_bench.tv.get("map_smooth3"),
                                               curves["val_page_top1"], curves["val_page_map"])
    assert np.isnan(values[0, 0]) and chosen[0, 0] == -1 and chosen[0, 1] == 0
    assert np.isnan(tv_bench.at_epoch(curves["test_page_map"], chosen)[0, 0])


def test_trial_value_flags_are_checked_before_anything_runs(capsys):
    assert tv_bench.main(["--pages_per_writer", "9"]) == 2
    assert "--pages_per_writer 9 gives 2 validation and 1 test pages per writer; retrieval " \
        "needs 2 of each: pass 10 or more" in capsys.readouterr().err
    assert tv_bench.main(["--sets", "3", "--search_size", "4"]) == 2
    assert "--search_size 4 must be from 2 to --sets (3)" in capsys.readouterr().err


def test_results_file_has_the_trial_value_comparison():
    info = {"cpu": "AMD EPYC", "cores": 2}
    text = results_md.render(info, FIGURES, {}, [])
    assert "## 7. Which trial value picks" in text and "(chance: 0.25)" in text
    assert ("| **`map_smooth3`** | what map_smooth3 is | 0.72 | 0.8 | 0.612 / 0.7 | 0.8 | 0.02 "
            "| 0.05 | 6.2 |") in text
    assert "| `top1_best` | what top1_best is | 0.41 | 0.8 | 0.612 / 0.7 | - |" in text
    assert "Winner: **`map_smooth3`**" in text and "12 writers, 48 validation and 48 test" in text
