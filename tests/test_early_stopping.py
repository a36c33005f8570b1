"""Early stopping on the real Trainer, built as the built-in objective builds it (tiny synthetic
data, the small model, the CPU): a model that cannot learn stops once its trial value's window
is full and `patience` more epochs brought no better value; with patience for every epoch, a
trial runs them all."""
import pandas as pd
import pytest
import torch

from psearch.engine.config import SearchConfig
from psearch.writer_id import model as model_lib, objective, trial_value
from psearch.writer_id.builtin import WriterOptions
from psearch.writer_id.synthetic import make_synthetic
from psearch.writer_id.train import Trainer

# One trial's hyperparameters, with nothing random on top of the data's draws: plain
# cross-entropy, no dropout, mixup or triplet loss.
HP = {"model_type": "small", "lr": 1e-3, "weight_decay": 0.0, "dropout": 0.0, "drop_path": 0.0,
      "embedding_dim": 128, "freeze": 0, "loss": "ce", "label_smoothing": 0.0,
      "focal_gamma": 0.0, "mixup_alpha": 0.0, "use_triplet": False, "triplet_weight": 0.0,
      "triplet_margin": 0.0, "warmup_epochs": 0, "grad_clip": 1.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Writers alike enough that an untrained model retrieves their pages far from perfectly."""
    return make_synthetic(tmp_path_factory.mktemp("data") / "lines", writers=4,
                          pages_per_writer=5, lines_per_page=2, height=32, similarity=0.8)


def fit(data, out, lr: float, epochs: int, patience: int, frozen: bool = False):
    """Train one trial to its end: (the trial value's definition, fit's result, history.csv).
    `frozen`: BatchNorm keeps its initial statistics, so that with a learning rate too small to
    move a weight nothing the validation sees changes from epoch to epoch."""
    cfg = SearchConfig(checkpoint_dir=str(out), n_trials=1, epochs=epochs, options=WriterOptions(
        data_root=str(data), patience=patience, batch_size=8, img_height=32, img_width=128,
        models=("small",), no_pretrained=True, num_workers=0, lines_per_writer=8))
    hp = {**HP, "lr": lr}
    bundle = objective.make_bundle(cfg, *objective.load_index(cfg))
    torch.manual_seed(0)
    net = model_lib.build_model(objective.model_spec(hp, len(bundle.writers), cfg))
    if frozen:
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0
    trainer = Trainer(net, bundle, objective.train_config(hp, cfg, 0, cfg.seed),
                      torch.device("cpu"), out / "trial_000", {"title": "early stopping"})
    result = trainer.fit(lambda epoch, row: None)
    return trainer.definition, result, pd.read_csv(out / "trial_000" / "history.csv")


def test_a_trial_that_cannot_improve_stops_after_the_window_and_patience(data, tmp_path):
    patience, epochs = 2, 10
    definition, result, history = fit(data, tmp_path, lr=1e-12, epochs=epochs,
                                      patience=patience, frozen=True)
    assert definition.name == trial_value.DEFAULT and definition.window == 3
    # epochs before the window is full never count as bad: the first full one sets the score
    # to beat, then `patience` epochs fail to beat it
    stopped_after = definition.window + patience
    assert stopped_after < epochs
    assert (result["status"], result["epochs_run"]) == ("early_stopped", stopped_after)
    assert list(history["epoch"]) == list(range(1, stopped_after + 1))
    # why it could not improve: the same figure every epoch, and not a perfect one
    assert history["val_page_map"].nunique() == 1 and history["val_page_map"][0] < 0.9


def test_with_patience_for_every_epoch_a_learning_trial_runs_them_all(data, tmp_path):
    epochs = 5
    _, result, history = fit(data, tmp_path, lr=1e-3, epochs=epochs, patience=epochs)
    assert (result["status"], result["epochs_run"]) == ("complete", epochs)
    assert list(history["epoch"]) == list(range(1, epochs + 1))
