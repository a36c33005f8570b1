import math

import numpy as np
import optuna
import torch
import torch.nn.functional as F

from psearch.writer_id import losses
from psearch.writer_id.builtin import KIND, WriterOptions
from psearch.writer_id.search_space import hparams
from psearch.writer_id.train import is_better, lr_factor


def test_focal_with_gamma_zero_is_cross_entropy_and_down_weights_easy_examples():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.allclose(losses.focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))
    easy = torch.tensor([[10.0, 0.0]])
    assert losses.focal_loss(easy, torch.tensor([0]), 2.0) < F.cross_entropy(easy, torch.tensor([0]))


def test_batch_hard_triplet_by_hand():
    # writer 0 at angles 0 and 90 degrees, writer 1 at 180: cosine distances 1 (pos) and 1, 2.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    # anchor 0: hardest pos d=1, hardest neg d=2 -> relu(1-2+0.5)=0
    # anchor 1: pos d=1, neg d=1 -> 0.5 ; anchor 2 has no positive: left out
    assert math.isclose(losses.batch_hard_triplet_loss(emb, labels, 0.5).item(), 0.25)
    assert losses.batch_hard_triplet_loss(emb, torch.tensor([0, 1, 2]), 0.5).item() == 0.0


def test_mixup_keeps_weights_and_partners_consistent():
    x = torch.arange(4, dtype=torch.float32).view(4, 1)
    y = torch.tensor([0, 1, 2, 3])
    mixed, ya, yb, lam = losses.mixup(x, y, 0.4, np.random.default_rng(0))
    assert 0.0 <= lam <= 1.0
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[yb])
    assert torch.equal(ya, y)


def test_lr_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == 0.1
    assert lr_factor(9, 10, 100) == 1.0
    assert math.isclose(lr_factor(10, 10, 100), 1.0)
    assert math.isclose(lr_factor(55, 10, 100), 0.5)
    assert lr_factor(100, 10, 100) == 0.0
    assert lr_factor(0, 0, 10) == 1.0


def test_is_better_uses_the_score_then_map_and_never_nan():
    assert is_better(0.6, 0.1, 0.5, 0.4)
    assert is_better(0.5, 0.5, 0.5, 0.4)
    assert not is_better(0.5, 0.4, 0.5, 0.4)
    assert not is_better(float("nan"), 1.0, 0.5, 0.4)
    assert not is_better(float("nan"), 1.0, None, None)
    assert is_better(0.1, float("nan"), None, None)


def _suggest(models, pretrained, seed):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    space = KIND.default_space(WriterOptions(models=tuple(models), no_pretrained=not pretrained))
    return hparams(space.suggest(trial), epochs=20), trial.params


def test_search_space_suggests_only_what_applies():
    for seed in range(30):
        hp, params = _suggest(["small", "convnext", "vit"], True, seed)
        if hp["model_type"] == "small":
            assert "freeze" not in params and "drop_path" not in params
        else:
            assert "freeze" in params and "drop_path" in params
        assert ("mixup_alpha" in params) == (hp["loss"] == "ce")
        assert ("focal_gamma" in params) == (hp["loss"] == "focal")
        assert ("triplet_margin" in params) == hp["use_triplet"]
    for seed in range(10):  # random weights: freezing them would be meaningless
        hp, params = _suggest(["convnext", "vit"], False, seed)
        assert "freeze" not in params and hp["freeze"] == 0
