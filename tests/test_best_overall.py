"""Tests of best_overall/ on real studies: the best trial's files, the atomic folder swap that
replaces them, and the best model's one evaluation on the held-out test split (a fake
`psearch.writer_id.evaluate` stands in for the real one, which loads torch)."""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import optuna
import pytest

from psearch.engine import atomic
from psearch.reports import best_overall
from psearch.writer_id import builtin

from summary_studies import make_study, run, trial

# ---------------------------------------------------------------- the best trial's files

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


# ---------------------------------------------------------------- test split

BUILTIN = {"objective": builtin.NAME, "direction": "maximize"}


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
    assert best_overall.held_out_split({**BUILTIN, "data_root": str(tmp_path)}) is None
    assert best_overall.held_out_split({"objective": "x.py:f", "data_root": str(tmp_path)}) is None
