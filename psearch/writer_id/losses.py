"""Losses for one trial: cross-entropy with label smoothing, focal loss, mixup, batch-hard triplet."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss: cross-entropy down-weighted by (1 - p_true)^gamma for easy examples."""
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, targets[:, None]).squeeze(1)
    return (-(1.0 - log_pt.exp()) ** gamma * log_pt).mean()


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str,
                        label_smoothing: float = 0.0, focal_gamma: float = 2.0) -> torch.Tensor:
    """Cross-entropy (with label smoothing) or focal loss, computed in float32."""
    if kind == "focal":
        return focal_loss(logits, targets, focal_gamma)
    if kind == "ce":
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {kind!r}; expected 'ce' or 'focal'")


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mix each image with a shuffled partner: (mixed x, labels a, labels b, weight of a)."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], y, y[perm], lam


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor,
                            margin: float) -> torch.Tensor:
    """Batch-hard triplet loss on L2-normalised embeddings with cosine distance.

    Each anchor takes its farthest same-writer and nearest other-writer sample; anchors with no
    positive or no negative in the batch are left out (zero loss when none is left).
    """
    emb = embeddings.float()
    dist = 1.0 - emb @ emb.t()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos_mask, neg_mask = same & ~eye, ~same
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not valid.any():
        return emb.sum() * 0.0
    hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).max(1).values
    hardest_neg = dist.masked_fill(~neg_mask, float("inf")).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()
