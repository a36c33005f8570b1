"""evaluate.py on a best_model.pth laid out as a real trial writes it (an untrained `small` model
on tiny synthetic data): the metrics, the command line and its errors; and the summary's test
figures of a real search's best model, which must be evaluate.py's own."""
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from psearch.engine import layout
from psearch.engine.config import SearchConfig
from psearch.engine.errors import UsageError
from psearch.reports import summary
from psearch.writer_id import data_index, evaluate, model as model_lib, objective
from psearch.writer_id.builtin import KIND, WriterOptions
from psearch.writer_id.search_space import hparams
from psearch.writer_id.synthetic import make_synthetic

METRICS = ("page_top1", "page_top5", "page_map", "line_acc", "page_cls_acc")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def best_model(tmp_path_factory):
    """Trial 0's best_model.pth: what `train.Trainer._save_best` writes for `objective.py`."""
    root = tmp_path_factory.mktemp("evaluate")
    # 6 pages: 3 train, 2 val, 1 test (split into two half-pages, so retrieval can be measured)
    data = make_synthetic(root / "data", writers=3, pages_per_writer=6, lines_per_page=2,
                          height=32)
    options = WriterOptions(data_root=str(data), batch_size=4, img_height=32, img_width=128,
                            models=("small",), no_pretrained=True)
    cfg = SearchConfig(checkpoint_dir=str(root / "run"), n_trials=1, options=options,
                       space=KIND.default_space(options))
    writers = data_index.index_dataset(options.data_root).writers
    hp = hparams(cfg.space.suggest(optuna.create_study().ask()), epochs=1)
    net = model_lib.build_model(objective.model_spec(hp, len(writers), cfg))
    meta = {"trial_number": 0, "hyperparameters": hp, "settings": cfg.to_dict(),
            "title": "Trial 0 (small)", "epoch": 1, "metrics": {}}
    path = layout.trial_dir(cfg.checkpoint_dir, 0) / "best_model.pth"
    path.parent.mkdir(parents=True)
    model_lib.save_torch(model_lib.checkpoint_payload(net, writers, meta), path)
    return path, data


def test_metrics_on_the_test_split(best_model):
    path, data = best_model
    found = evaluate.evaluate_checkpoint(path, split="test", data_root=str(data))
    assert found["split"] == "test" and found["lines"] == 6
    assert found["pages"] == found["retrieval_queries"] == 6   # 3 writers x 2 half-pages
    assert all(0.0 <= found[k] <= 1.0 for k in METRICS), found
    # each query has its one other half-page among 5 candidates: always in the top 5, and
    # average precision 1/rank is at least the top-1 hit
    assert found["page_top5"] == 1.0
    assert found["page_top1"] <= found["page_map"] and found["page_map"] >= 1 / 5
    assert layout.cache_dir(path.parents[1]).is_dir()   # the search's image cache, reused


def test_command_line_prints_the_same_metrics(best_model, capsys):
    path, data = best_model
    assert evaluate.main([str(path)]) == 0   # the data root the model was trained on
    printed = json.loads(capsys.readouterr().out)
    assert printed == evaluate.evaluate_checkpoint(path, split="test", data_root=str(data))
    assert evaluate.main([str(path), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "val"


def test_bad_checkpoint_path_is_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "no such" / "best_model.pth"
    with pytest.raises(UsageError, match="does not exist"):
        evaluate.evaluate_checkpoint(missing)
    assert evaluate.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and err.count("\n") == 1


def test_data_without_a_test_split_is_a_usage_error(best_model, tmp_path, capsys):
    path, _ = best_model
    no_test = make_synthetic(tmp_path / "no test", writers=3, pages_per_writer=3,
                             lines_per_page=1, height=32)
    assert evaluate.main([str(path), "--data_root", str(no_test)]) == 2
    assert "has no test/ lines" in capsys.readouterr().err


def test_the_summary_evaluates_the_best_model_on_the_test_split(tmp_path):
    """A real one-trial search, then the summary: best_overall/test_metrics.json holds what
    evaluate.py finds for best_overall/best_model.pth, figure for figure (a failed evaluation
    would only be a warning in the summary, and no test_metrics.json)."""
    data = make_synthetic(tmp_path / "data", writers=4, pages_per_writer=6, lines_per_page=4,
                          height=32)
    ckpt = tmp_path / "run"
    search = subprocess.run(
        [sys.executable, str(ROOT / "single_gpu_hyperparameter_search.py"), "--data_root",
         str(data), "--checkpoint_dir", str(ckpt), "--n_trials", "1", "--epochs", "1",
         "--models", "small", "--img_height", "32", "--img_width", "256", "--batch_size", "8",
         "--lines_per_writer", "16", "--num_workers", "0", "--no_summary"],
        capture_output=True, text=True, timeout=300)
    assert search.returncode == 0, search.stderr[-3000:]
    assert not (ckpt / "best_overall").exists()
    assert summary.main(["--checkpoint_dir", str(ckpt)]) == 0
    best = ckpt / "best_overall" / "best_model.pth"
    assert best.read_bytes() == (layout.trial_dir(ckpt, 0) / "best_model.pth").read_bytes()
    direct = evaluate.evaluate_checkpoint(best, split="test", data_root=str(data))
    assert set(METRICS) <= set(direct) and direct["pages"] == 8  # 4 writers x 2 half-pages
    tested = ckpt / "best_overall" / "test_metrics.json"
    assert tested.is_file(), "the summary did not evaluate the best model (see its warning)"
    assert json.loads(tested.read_text()) == direct
