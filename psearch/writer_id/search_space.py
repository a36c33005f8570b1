"""A trial's hyperparameters from what its search space suggested: every parameter the training
needs, the objective's default for each one the space did not suggest (its conditions did not
hold, or the space leaves it out). The space itself is `default_space.yaml` or the user's
`--space` file (engine/space.py suggests it); this module imports neither optuna nor torch."""
from __future__ import annotations

from typing import Any, Mapping

from psearch.writer_id.names import PARAMETERS

# What a parameter that is not suggested trains with: the choice that leaves its mechanism off
# (no dropout, no smoothing, no triplet loss), or a middle value for those always needed.
DEFAULTS: dict[str, Any] = {
    "lr": 3e-4, "weight_decay": 1e-4, "dropout": 0.0, "drop_path": 0.0, "embedding_dim": 256,
    "freeze": 0, "loss": "ce", "label_smoothing": 0.0, "mixup_alpha": 0.0, "focal_gamma": 0.0,
    "use_triplet": False, "triplet_weight": 0.0, "triplet_margin": 0.0, "warmup_epochs": 0,
    "grad_clip": 1.0}
assert set(DEFAULTS) | {"model_type"} == set(PARAMETERS)


def hparams(suggested: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    """Every hyperparameter a trial trains with (pure): the suggested values over the defaults;
    the triplet terms off unless use_triplet, focal_gamma 0 with cross-entropy and smoothing
    and mixup 0 with the focal loss, warmup at most a
    quarter of the epochs (at least 1 when asked for) so that a short run still trains at its
    learning rate."""
    hp = {**DEFAULTS, **suggested}
    if not hp["use_triplet"]:
        hp["triplet_weight"] = hp["triplet_margin"] = 0.0
    if hp["loss"] == "ce":
        hp["focal_gamma"] = 0.0
    else:  # the focal loss takes neither smoothed labels nor mixed-up pairs (losses.py)
        hp["label_smoothing"] = hp["mixup_alpha"] = 0.0
    hp["warmup_epochs"] = min(int(hp["warmup_epochs"]), max(1, epochs // 4))
    return hp
