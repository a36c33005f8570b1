"""The hyperparameters a trial suggests: the users' search space, conditional on the model so
that parameters that don't apply to a model are never suggested for it."""
from __future__ import annotations

from typing import Any, Sequence

import optuna

# Learning-rate ranges per model: a compact CNN from scratch wants far larger steps than a
# pretrained backbone being fine-tuned.
LR_RANGE = {"small": (3e-4, 3e-3), "convnext": (2e-5, 5e-4), "vit": (1e-5, 3e-4)}
# The most stages / encoder blocks a trial may freeze: a choice of the search, within what the
# model allows (model.FREEZABLE_UNITS, checked by tests/test_model.py; not imported, so that
# this module loads without torch).
MAX_SUGGESTED_FREEZE = {"convnext": 2, "vit": 6}


def suggest_hparams(trial: optuna.Trial, models: Sequence[str], pretrained: bool,
                    epochs: int) -> dict[str, Any]:
    """Suggest one trial's hyperparameters; returns all of them, defaults for those not used."""
    model_type = trial.suggest_categorical("model_type", list(models))
    hp: dict[str, Any] = {"model_type": model_type}
    hp["lr"] = trial.suggest_float("lr", *LR_RANGE[model_type], log=True)
    hp["weight_decay"] = trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)
    hp["dropout"] = trial.suggest_float("dropout", 0.0, 0.5)
    hp["drop_path"] = (trial.suggest_float("drop_path", 0.0, 0.3)
                       if model_type in ("convnext", "vit") else 0.0)
    hp["embedding_dim"] = trial.suggest_categorical("embedding_dim", [128, 256, 512])
    hp["freeze"] = (trial.suggest_int("freeze", 0, MAX_SUGGESTED_FREEZE[model_type])
                    if pretrained and model_type in MAX_SUGGESTED_FREEZE else 0)
    hp["loss"] = trial.suggest_categorical("loss", ["ce", "focal"])
    if hp["loss"] == "ce":
        hp["label_smoothing"] = trial.suggest_float("label_smoothing", 0.0, 0.2)
        hp["mixup_alpha"] = trial.suggest_float("mixup_alpha", 0.0, 0.4)
        hp["focal_gamma"] = 0.0
    else:
        hp["focal_gamma"] = trial.suggest_float("focal_gamma", 1.0, 3.0)
        hp["label_smoothing"] = hp["mixup_alpha"] = 0.0
    hp["use_triplet"] = trial.suggest_categorical("use_triplet", [False, True])
    if hp["use_triplet"]:
        hp["triplet_weight"] = trial.suggest_float("triplet_weight", 0.1, 1.0)
        hp["triplet_margin"] = trial.suggest_float("triplet_margin", 0.1, 0.5)
    else:
        hp["triplet_weight"] = hp["triplet_margin"] = 0.0
    hp["warmup_epochs"] = trial.suggest_int("warmup_epochs", 0, max(1, min(5, epochs // 4)))
    hp["grad_clip"] = trial.suggest_float("grad_clip", 0.5, 5.0, log=True)
    return hp
