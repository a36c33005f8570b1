"""Real trials of the built-in objective on tiny synthetic data, on the CPU, as a user runs them."""
import json
import subprocess

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from psearch.writer_id.model import load_best_model
from psearch.writer_id.synthetic import make_synthetic

from worker_runs import interrupt_after_first_epoch, search


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "lines", writers=4,
                          pages_per_writer=6, lines_per_page=4, height=32, mess=True)


def load(ckpt):
    return optuna.load_study(study_name="writer_id_search",
                             storage=f"sqlite:///{ckpt}/optuna_study.db").get_trials()


def test_one_real_trial_writes_everything_a_user_reads(data, tmp_path):
    r = search(data, tmp_path, 1, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    trial_dir = tmp_path / "trial_000"
    # (its last.pth, the resume checkpoint, is removed once the trial has finished: --keep_last)
    for name in ("config.json", "best_model.pth", "metrics.json", "history.csv",
                 "plots/training_curves.png"):
        assert (trial_dir / name).is_file(), name
    metrics = json.loads((trial_dir / "metrics.json").read_text())
    assert set(metrics) >= {"val_page_top1", "val_page_top5", "val_page_map", "val_line_acc",
                            "val_page_cls_acc", "best_epoch", "epochs_run", "status", "value",
                            "value_low", "value_high", "trial_value"}
    assert metrics["trial_value"] == "map_smooth3"
    # the interval is that of the value: it holds it
    assert metrics["value_low"] <= metrics["value"] <= metrics["value_high"]
    assert metrics["epochs_run"] == 2 and metrics["status"] == "complete"
    history = pd.read_csv(trial_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    best_row = history[history["epoch"] == metrics["best_epoch"]].iloc[0]
    assert best_row["val_page_top1"] == pytest.approx(metrics["val_page_top1"])
    # two epochs, a window of three: the value is the mean mAP of both, the weights the last's
    assert metrics["best_epoch"] == 2
    assert metrics["value"] == pytest.approx(history["val_page_map"].mean())
    assert list(history["value"]) == pytest.approx(
        [history["val_page_map"][0], history["val_page_map"].mean()])
    config = json.loads((trial_dir / "config.json").read_text())
    assert config["trial_number"] == 0 and len(config["writers"]) == 4
    assert config["hyperparameters"]["model_type"] == "small"
    (trial,) = load(tmp_path)
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(metrics["value"])
    assert trial.user_attrs["value_low"] == pytest.approx(metrics["value_low"])
    assert sorted(trial.intermediate_values) == [1, 2]
    assert trial.intermediate_values[2] == pytest.approx(metrics["value"])
    net, writers, meta = load_best_model(trial_dir / "best_model.pth")
    emb, logits = net(torch.ones(2, 1, 32, 256))
    assert writers == config["writers"] and logits.shape == (2, 4)
    assert meta["epoch"] == metrics["best_epoch"]
    assert meta["hyperparameters"] == config["hyperparameters"]  # one name in both files
    assert "unreadable" in r.stderr  # the corrupt files were reported, not used
    # a changed setting is refused before anything is written, the image cache included
    def files():  # (lock files record who holds them; logs say what happened)
        return {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")
                if p.is_file() and "logs" not in p.parts and p.suffix != ".lock"}

    before = files()
    refused = search(data, tmp_path, 2, 2, extra=["--img_width", "320"])
    assert refused.returncode == 2
    assert "img_width: stored 256, now 320" in refused.stderr.strip().splitlines()[-1]
    assert files() == before


def test_a_rerun_on_changed_data_is_refused_naming_what_changed(tmp_path):
    """A page added under the same data root: the values of the new trials would be measured on
    other pages than the old ones'."""
    import shutil

    data = make_synthetic(tmp_path / "lines", writers=3, pages_per_writer=6, lines_per_page=3,
                          height=32)
    ckpt = tmp_path / "run"
    r = search(data, ckpt, 1, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    stored = json.loads(json.dumps(optuna.load_study(
        study_name="writer_id_search", storage=f"sqlite:///{ckpt}/optuna_study.db"
    ).user_attrs["search_settings"]["data"]))
    assert stored["val"] == {"writers": 3, "pages": 6, "lines": 18, "digest": stored["val"]["digest"]}
    study_bytes = (ckpt / "optuna_study.db").read_bytes()
    val_writer = sorted((data / "val").iterdir())[0]
    page = sorted(val_writer.iterdir())[0]
    shutil.copytree(page, val_writer / "page_new")
    refused = search(data, ckpt, 2, 1)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "data.val.pages: stored 6, now 7" in line
    assert "start a new study" in line
    assert (ckpt / "optuna_study.db").read_bytes() == study_bytes


def test_interrupted_trial_continues_from_its_last_checkpoint(data, tmp_path):
    proc = search(data, tmp_path, 1, 4, stderr=subprocess.PIPE, text=True)
    interrupt_after_first_epoch(proc, tmp_path)
    assert proc.wait(timeout=120) == 130
    first = load(tmp_path)[0]
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "interrupted"
    done_before = len(pd.read_csv(tmp_path / "trial_000" / "history.csv"))
    assert done_before < 4
    r = search(data, tmp_path, 1, 4)
    assert r.returncode == 0, r.stderr[-3000:]
    rerun = load(tmp_path)[1]
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["resumed_from"] == 0
    assert rerun.params == first.params
    resumed = pd.read_csv(tmp_path / "trial_001" / "history.csv")
    assert list(resumed["epoch"]) == [1, 2, 3, 4]          # the old epochs, then the rest
    assert "continues trial 0" in r.stderr
    assert sorted(rerun.intermediate_values) == [1, 2, 3, 4]


def test_training_on_the_cpu_is_reproducible_under_the_seed(data, tmp_path):
    """Two trainings with one seed (sampler, batched augmentation, mixup, initial weights) give the
    same losses and metrics; another augmentation seed gives other losses."""
    from psearch.writer_id import data_index, dataset, model as model_lib
    from psearch.writer_id.train import TrainConfig, Trainer

    index = data_index.index_dataset(str(data))
    tc = TrainConfig(epochs=2, patience=5, batch_size=8, lr=1e-3, weight_decay=1e-4,
                     mixup_alpha=0.2, triplet_weight=0.5, lines_per_writer=8, seed=3)

    def history(seed: int, name: str) -> list[tuple[float, ...]]:
        bundle = dataset.make_datasets(index, index.writers, 32, 128, tmp_path / "cache", 20,
                                       seed=seed, processes=1)
        torch.manual_seed(0)
        net = model_lib.build_model(model_lib.ModelSpec("small", len(bundle.writers), 32, 32, 128,
                                                        pretrained=False))
        rows = []
        Trainer(net, bundle, tc, torch.device("cpu"), tmp_path / name, {"title": name}).fit(
            lambda epoch, row: rows.append((row["train_loss"], row["val_page_map"])))
        return rows

    first = history(3, "a")
    assert len(first) == 2 and all(map(np.isfinite, first[-1]))
    assert history(3, "b") == first
    assert history(4, "c")[0][0] != first[0][0]
