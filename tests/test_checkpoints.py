"""Checkpoints are read under torch.load(weights_only=True) (issue 20): last.pth still restores a
trial exactly, and a planted or broken last.pth / best_model.pth runs nothing and says why."""
import dataclasses
import json
import logging
import pathlib
import pickle
import random
import subprocess

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from psearch.engine.errors import UsageError
from psearch.writer_id import data_index, dataset, evaluate, model as model_lib
from psearch.writer_id.synthetic import make_synthetic
from psearch.writer_id.train import TrainConfig, Trainer, read_last

from worker_runs import interrupt_after_first_epoch, search

TC = TrainConfig(epochs=2, patience=5, batch_size=8, lr=1e-3, weight_decay=1e-4,
                 mixup_alpha=0.2, triplet_weight=0.5, lines_per_writer=8, seed=3)


class Planted:
    """Unpickled with weights_only=False, this creates `marker` (as os.system would run a
    command): what someone with write access to a checkpoint folder could leave there."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant(path: pathlib.Path, marker: pathlib.Path) -> None:
    """A file shaped like a checkpoint, with the payload where the weights would be."""
    torch.save({"model": Planted(marker), "model_spec": {}, "state_dict": Planted(marker),
                "writers": []}, path)


def assert_payload_is_live(path: pathlib.Path, marker: pathlib.Path) -> None:
    """The control: the planted file does run its payload when loaded the unsafe way."""
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "lines", writers=4,
                          pages_per_writer=6, lines_per_page=4, height=32, mess=True)


@pytest.fixture(scope="module")
def bundle(data, tmp_path_factory):
    index = data_index.index_dataset(str(data))
    return dataset.make_datasets(index, index.writers, 32, 128,
                                 tmp_path_factory.mktemp("cache"), 20, seed=3, processes=1)


def make_trainer(bundle, out: pathlib.Path, init_seed: int) -> Trainer:
    torch.manual_seed(init_seed)
    net = model_lib.build_model(model_lib.ModelSpec("small", len(bundle.writers), 32, 32, 128,
                                                    pretrained=False))
    return Trainer(net, bundle, TC, torch.device("cpu"), out, {"title": out.name, "seed": 3})


class Interrupt(Exception):
    pass


def stop_after_first(epoch, row):
    if epoch == 1:
        raise Interrupt


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def plain(obj) -> str:
    """Nested plain values with NaN made comparable."""
    return json.dumps(obj, sort_keys=True, default=repr)


def test_last_pth_restores_the_trial_exactly_under_weights_only(bundle, tmp_path):
    interrupted = make_trainer(bundle, tmp_path / "a", init_seed=0)
    with pytest.raises(Interrupt):
        interrupted.fit(stop_after_first)
    rng = (torch.get_rng_state(), random.getstate(), interrupted.rng.bit_generator.state)
    last = tmp_path / "a" / "last.pth"
    raw = torch.load(last, weights_only=True)            # what read_last does: no error
    assert isinstance(raw["rng"]["python"], tuple) and raw["fit_state"]["query_top1"]

    torch.manual_seed(123)
    random.seed(123)
    resumed = make_trainer(bundle, tmp_path / "b", init_seed=1)   # other initial weights
    assert resumed.load_last(last)
    assert same_tensors(resumed.model.state_dict(), interrupted.model.state_dict())
    assert plain(resumed.optimizer.state_dict()["param_groups"]) == plain(
        interrupted.optimizer.state_dict()["param_groups"])
    for k, state in interrupted.optimizer.state_dict()["state"].items():
        assert same_tensors(resumed.optimizer.state_dict()["state"][k], state)
    assert resumed.scheduler.state_dict() == interrupted.scheduler.state_dict()
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert resumed.rng.bit_generator.state == rng[2]
    assert plain(dataclasses.asdict(resumed.state)) == plain(dataclasses.asdict(interrupted.state))

    # and it continues as if it had never stopped: epoch 2 equals that of a straight run
    rows_resumed, rows_straight = [], []
    resumed.fit(lambda epoch, row: rows_resumed.append(row))
    straight = make_trainer(bundle, tmp_path / "c", init_seed=0)
    straight.fit(lambda epoch, row: rows_straight.append(row))
    assert [r["epoch"] for r in rows_resumed] == [2]
    drop_time = [{k: v for k, v in r.items() if k != "epoch_time_s"}
                 for r in (rows_resumed[0], rows_straight[1])]
    assert plain(drop_time[0]) == plain(drop_time[1])
    assert same_tensors(resumed.model.state_dict(), straight.model.state_dict())


def test_a_last_pth_of_the_previous_layout_still_resumes(bundle, tmp_path):
    """Earlier versions wrote numpy's state as a dict and Python's as a tuple, and a FitState
    without the per-query lists: all of it loads under weights_only."""
    old = make_trainer(bundle, tmp_path / "old", init_seed=0)
    path = tmp_path / "old" / "last.pth"
    path.parent.mkdir()
    torch.save({"model": old.model.state_dict(), "optimizer": old.optimizer.state_dict(),
                "scheduler": old.scheduler.state_dict(), "scaler": old.scaler.state_dict(),
                "fit_state": {"epoch": 1, "best": None, "best_epoch": 0, "bad_epochs": 0,
                              "history": []},
                "rng": {"numpy": old.rng.bit_generator.state, "torch": torch.get_rng_state(),
                        "python": random.getstate(), "cuda": None},
                "meta": {"title": "old"}}, path)
    resumed = make_trainer(bundle, tmp_path / "new", init_seed=1)
    assert resumed.load_last(path)
    assert resumed.state.epoch == 1 and resumed.state.query_ap == []
    assert same_tensors(resumed.model.state_dict(), old.model.state_dict())


@pytest.mark.parametrize("kind", ["planted", "truncated", "plain pickle", "not a checkpoint"])
def test_a_last_pth_that_cannot_be_loaded_safely_is_ignored_with_a_reason(bundle, tmp_path, caplog,
                                                                          kind):
    marker = tmp_path / "marker"
    path = tmp_path / "trial_003" / "last.pth"
    path.parent.mkdir()
    if kind == "planted":
        plant(path, marker)
    elif kind == "truncated":
        torch.save({"model": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:700])
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps({"model": Planted(marker)}, protocol=2))
    else:
        torch.save({"model": {}}, path)
    trainer = make_trainer(bundle, tmp_path / "out", init_seed=0)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="psearch.writer_id.train"):
        assert read_last(path, lazy=True) is None
        assert trainer.load_last(path) is False
    assert not marker.exists()
    assert trainer.state.epoch == 0 and same_tensors(trainer.model.state_dict(), before)
    (first, second) = [r.getMessage() for r in caplog.records]
    assert first == second and "\n" not in first
    assert first.startswith(f"{path} ")
    assert first.endswith(": it is ignored and the trial starts from scratch")
    assert ("cannot be loaded safely (" in first) == (kind != "not a checkpoint")
    if kind == "planted":
        assert_payload_is_live(path, marker)


def test_a_planted_last_pth_runs_nothing_and_the_rerun_starts_from_scratch(data, tmp_path):
    ckpt, marker = tmp_path / "run", tmp_path / "marker"
    proc = search(data, ckpt, 1, 3, stderr=subprocess.DEVNULL)
    interrupt_after_first_epoch(proc, ckpt)
    assert proc.wait(timeout=120) == 130
    last = ckpt / "trial_000" / "last.pth"
    assert read_last(last) is not None          # a genuine one would have been resumed
    plant(last, marker)
    copy = tmp_path / "planted.pth"   # for the control: the finished rerun removes last.pth
    copy.write_bytes(last.read_bytes())

    r = search(data, ckpt, 1, 3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not marker.exists()
    assert (f"{last} cannot be loaded safely (it holds pickled objects, not only tensors and "
            "plain values") in r.stderr
    assert "it is ignored and the trial starts from scratch" in r.stderr
    assert "continues trial 0" not in r.stderr
    study = optuna.load_study(study_name="writer_id_search",
                              storage=f"sqlite:///{ckpt}/optuna_study.db")
    rerun = study.get_trials()[1]
    assert rerun.state == TrialState.COMPLETE and rerun.user_attrs["resumed_from"] == 0
    # nothing of the old run was taken over: the curve is the new run's own
    new = pd.read_csv(ckpt / "trial_001" / "history.csv")
    assert list(new["epoch"]) == [1, 2, 3]
    assert rerun.intermediate_values == pytest.approx(dict(zip(new["epoch"], new["value"])))
    assert_payload_is_live(copy, marker)


@pytest.fixture
def planted_best(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "trial_000" / "best_model.pth"
    path.parent.mkdir()
    plant(path, marker)
    return path, marker


def test_a_planted_best_model_is_refused_and_runs_nothing(planted_best):
    path, marker = planted_best
    with pytest.raises(UsageError) as err:
        model_lib.load_best_model(path)
    message = str(err.value)
    assert message.startswith(f"{path} cannot be loaded safely (it holds pickled objects")
    assert "nothing in it was run; pass a best_model.pth written by a search" in message
    assert not marker.exists()
    assert_payload_is_live(path, marker)


def test_evaluate_refuses_a_planted_or_truncated_best_model_in_one_line(planted_best, capsys):
    path, marker = planted_best
    assert evaluate.main([str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {path} cannot be loaded safely (") and not marker.exists()
    path.write_bytes(b"")
    assert evaluate.main([str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: {path} cannot be loaded safely (the file ends early: empty or cut "
                    "short): nothing in it was run; pass a best_model.pth written by a search "
                    "(a trial folder's or best_overall/'s), or rerun its trial to write it again")
