"""GPU paths: run on a machine with CUDA (the device machine), skipped elsewhere.

    python -m pytest tests/test_gpu.py -v
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from psearch.engine import ownership, study as study_lib
from psearch.engine.config import SearchConfig
from psearch.engine.worker import run_one_trial
from psearch.writer_id.synthetic import make_synthetic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run on the device machine)")
ROOT = Path(__file__).resolve().parent.parent
OWNER = ownership.owner_attrs(ownership.Host.current(), run="gpu-test", worker="gpu0")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("gpu") / "lines", writers=6,
                          pages_per_writer=6, lines_per_page=6, height=64)


def _bundle(data, tmp_path, height, width):
    from psearch.writer_id import data_index, dataset

    index = data_index.index_dataset(str(data))
    return dataset.make_datasets(index, index.writers, height, width, tmp_path / "cache", 20, 0, 2)


@pytest.mark.parametrize("model_type, size", [("small", (64, 640)), ("convnext", (64, 640)),
                                              ("vit", (64, 640))])
def test_amp_training_epoch_on_gpu(data, tmp_path, model_type, size):
    from psearch.writer_id import model as model_lib
    from psearch.writer_id.train import TrainConfig, Trainer, amp_settings

    device = torch.device("cuda:0")
    on, dtype, scaler = amp_settings(device)
    assert on and dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    bundle = _bundle(data, tmp_path, *size)
    net = model_lib.build_model(model_lib.ModelSpec(model_type, len(bundle.writers), 128, *size,
                                                    pretrained=False))
    tc = TrainConfig(epochs=2, patience=5, batch_size=16, lr=1e-3 if model_type == "small"
                     else 2e-4, weight_decay=1e-4, triplet_weight=0.5, mixup_alpha=0.2,
                     lines_per_writer=32, num_workers=2)
    rows = []
    result = Trainer(net, bundle, tc, device, tmp_path / "trial", {"title": model_type}).fit(
        lambda epoch, row: rows.append(row))
    assert result["epochs_run"] == 2 and np.isfinite(rows[-1]["train_loss"])
    assert 0.0 <= result["val_page_top1"] <= 1.0
    assert (tmp_path / "trial" / "best_model.pth").exists()
    print(f"{model_type}: {[round(r['epoch_time_s'], 2) for r in rows]} s/epoch, "
          f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def test_memory_is_released_after_an_out_of_memory_trial(tmp_path):
    cfg = SearchConfig(checkpoint_dir=str(tmp_path), n_trials=2,
                       objective="x.py:f")
    study = study_lib.open_study(cfg)
    baseline = torch.cuda.memory_allocated()
    free, _total = torch.cuda.mem_get_info()

    def greedy(trial, trial_dir):
        trial.suggest_float("x", 0, 1)
        keep = torch.empty(int(free * 0.5), dtype=torch.uint8, device="cuda")  # held by the frame
        torch.empty(int(free * 0.8), dtype=torch.uint8, device="cuda")         # then OOM
        return float(keep.numel())

    trial = study_lib.claim_trial(study, cfg, OWNER)
    state, reason = run_one_trial(study, trial, greedy, cfg)
    assert state == TrialState.FAIL and "OutOfMemoryError" in reason
    assert torch.cuda.memory_allocated() == baseline
    reserved_after = torch.cuda.memory_reserved()
    assert reserved_after < free * 0.1, f"{reserved_after} bytes still reserved"

    def fits(trial, trial_dir):
        trial.suggest_float("x", 0, 1)
        big = torch.ones(int(free * 0.6), dtype=torch.uint8, device="cuda")
        return float(big[-1].item())   # (a .sum() would upcast the whole tensor to int64)

    trial = study_lib.claim_trial(study, cfg, OWNER)
    assert run_one_trial(study, trial, fits, cfg)[0] == TrialState.COMPLETE


def test_two_workers_share_one_gpu(data, tmp_path):
    if not (ROOT / "parallel_search.py").exists():
        pytest.skip("parallel_search.py not present")
    cmd = [sys.executable, str(ROOT / "parallel_search.py"), "--data_root", str(data),
           "--checkpoint_dir", str(tmp_path / "ckpt"), "--n_trials", "4", "--gpus", "0",
           "--workers_per_gpu", "2", "--models", "small", "--epochs", "3", "--img_height", "64",
           "--img_width", "640", "--use_all_writers", "--lines_per_writer", "64", "--no_summary"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    trials = optuna.load_study(study_name="writer_id_search",
                               storage=f"sqlite:///{tmp_path}/ckpt/optuna_study.db").get_trials()
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, workers
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "trials never overlapped"
    logs = list((tmp_path / "ckpt" / "logs").glob("worker_gpu0*.log"))
    assert len(logs) == 2
    assert all("CUDA is not available" not in p.read_text() for p in logs)


def test_sigterm_mid_training_then_resume_from_last_checkpoint(data, tmp_path):
    """scancel-style stop of a real GPU search with data-loader processes, then the same command
    again: interrupted trials continue from their last.pth, exactly n_trials finish."""
    import signal
    import time

    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, str(ROOT / "parallel_search.py"), "--data_root", str(data),
           "--checkpoint_dir", str(ckpt), "--n_trials", "2", "--gpus", "0", "--workers_per_gpu",
           "2", "--models", "small", "--epochs", "20", "--img_height", "64", "--img_width", "640",
           "--use_all_writers", "--lines_per_writer", "400", "--num_workers", "2",
           "--no_summary"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    histories = lambda: list(ckpt.glob("trial_*/history.csv"))  # noqa: E731
    while time.time() < deadline and len(histories()) < 2:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    storage = f"sqlite:///{ckpt}/optuna_study.db"
    first = optuna.load_study(study_name="writer_id_search", storage=storage).get_trials()
    assert [t.state for t in first] == [TrialState.FAIL, TrialState.FAIL], out[-3000:]
    assert {t.user_attrs["fail_reason"] for t in first} == {"interrupted"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:]
    trials = optuna.load_study(study_name="writer_id_search", storage=storage).get_trials()
    reruns = [t for t in trials if "resumed_from" in t.user_attrs]
    assert sorted(t.user_attrs["resumed_from"] for t in reruns) == [0, 1]
    assert all(t.state == TrialState.COMPLETE for t in reruns), [
        (t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    logs = "".join(p.read_text() for p in (ckpt / "logs").glob("*.log"))
    assert logs.count("continues trial") == 2
    for t in reruns:
        # the old epochs, then the rest (until --epochs or early stopping)
        assert sorted(t.intermediate_values) == list(range(1, t.user_attrs["epochs_run"] + 1))
        assert t.user_attrs["epochs_run"] > len(first[t.user_attrs["resumed_from"]]
                                                 .intermediate_values)


def _ddp_command(data, ckpt, gpus):
    return [sys.executable, str(ROOT / "parallel_search.py"), "--data_root", str(data),
            "--checkpoint_dir", str(ckpt), "--n_trials", "2", "--gpus", gpus,
            "--gpus_per_trial", "2", "--models", "small", "--epochs", "3", "--img_height", "64",
            "--img_width", "640", "--use_all_writers", "--lines_per_writer", "64",
            "--no_summary"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL ranks)")
def test_one_trial_on_two_gpus_with_nccl(data, tmp_path):
    import json

    r = subprocess.run(_ddp_command(data, tmp_path / "ckpt", "0,1"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = optuna.load_study(study_name="writer_id_search",
                               storage=f"sqlite:///{tmp_path}/ckpt/optuna_study.db").get_trials()
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 2
    config = json.loads((tmp_path / "ckpt" / "trial_000" / "config.json").read_text())
    assert config["world_size"] == 2 and config["device"] == "2 x cuda"
    log = "".join(p.read_text() for p in (tmp_path / "ckpt" / "logs").glob("worker_gpu0+1_*.log"))
    assert "Rank 1 of 2 on cuda:1 (nccl)" in log


def test_two_gpus_per_trial_on_one_gpu_is_refused(data, tmp_path):
    if torch.cuda.device_count() != 1:
        pytest.skip("for a machine with exactly one GPU")
    r = subprocess.run(_ddp_command(data, tmp_path / "ckpt", "0"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "--gpus_per_trial 2 needs 2 GPUs, but only 1 are available (0)" in r.stderr
    assert not (tmp_path / "ckpt").exists()
