"""Writer-identification networks: a backbone, an L2-normalised embedding for page retrieval and a
cosine classifier over the training writers.

    spec = ModelSpec("small", num_classes=20, img_height=64, img_width=640)
    emb, logits = build_model(spec)(images)      # images: float [B, 1, H, W] in [0, 1], 0 = ink

`small` is a compact CNN trained from scratch; `convnext` is torchvision's ConvNeXt-Tiny; `vit` is
a ViT-B/16 encoder over rectangular patches (the backbones and their ImageNet weights, read from
torch's hub cache and never downloaded, are in backbones.py). Here: the spec, the network around
a backbone, its checks, freezing, and the checkpoints.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psearch.engine import atomic
from psearch.engine.errors import UsageError
from psearch.writer_id.backbones import (WEIGHTS, ConvNeXtBackbone, RectViT, SmallCNN,
                                         ensure_pretrained_available, load_pretrained_state_dict,
                                         weights_file)
from psearch.writer_id.names import MODEL_CHOICES

logger = logging.getLogger(__name__)

# The most stages (ConvNeXt, of 4) or encoder blocks (ViT, of 12) `freeze` may cover: all but
# the last, which always trains.
FREEZABLE_UNITS = {"convnext": 3, "vit": 11}
# Logit scale of the cosine classifier (NormFace): cosines lie in [-1, 1], so softmax needs a
# temperature; 16 lets the true class reach p > 0.99 against a thousand writers.
COSINE_SCALE = 16.0
_CHECKPOINT_KEYS = ("model_spec", "state_dict", "writers")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network; stored in checkpoints as `to_dict()`."""

    model_type: str
    num_classes: int
    embedding_dim: int = 256
    img_height: int = 160
    img_width: int = 1760
    pretrained: bool = True
    dropout: float = 0.2
    drop_path: float = 0.1
    freeze: int = 0
    vit_patch: tuple[int, int] = (16, 32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (the patch tuple becomes a list)."""
        d = dataclasses.asdict(self)
        d["vit_patch"] = list(self.vit_patch)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Inverse of `to_dict`."""
        return cls(**{**d, "vit_patch": tuple(d.get("vit_patch", cls.vit_patch))})


# ----------------------------------------------------------------------------- the network

class CosineClassifier(nn.Module):
    """Logits = COSINE_SCALE * cos(embedding, writer prototype)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))

    def forward(self, emb: Tensor) -> Tensor:
        return COSINE_SCALE * emb @ F.normalize(self.weight, dim=1).t()


class WriterNet(nn.Module):
    """Backbone -> dropout, Linear, LayerNorm -> L2-normalised embedding -> cosine classifier.

    The classifier sees the normalised embedding, so cross-entropy trains exactly the angles that
    page retrieval ranks by; an unnormalised softmax can instead lower its loss by growing
    feature norms, which cosine retrieval throws away. LayerNorm rather than BatchNorm1d: it works
    for batches of one and behaves the same in training and evaluation.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        _validate(spec)
        self.spec = spec
        self.backbone = _make_backbone(spec)
        self.head = nn.Sequential(nn.Dropout(spec.dropout),
                                  nn.Linear(self.backbone.out_dim, spec.embedding_dim),
                                  nn.LayerNorm(spec.embedding_dim))
        self.classifier = CosineClassifier(spec.embedding_dim, spec.num_classes)
        for p in self.backbone.frozen_parameters(spec.freeze):
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x float [B,1,H,W] in [0,1] -> (L2-normalised embedding [B,E], logits [B,C])."""
        emb = F.normalize(self.head(self.backbone(x)), dim=1)
        return emb, self.classifier(emb)

    def train(self, mode: bool = True) -> WriterNet:
        """Like nn.Module.train, but frozen layers stay in eval mode (no stochastic depth)."""
        super().train(mode)
        for module in self.backbone.frozen_modules(self.spec.freeze):
            module.eval()
        return self


def _make_backbone(spec: ModelSpec) -> nn.Module:
    if spec.model_type == "small":
        return SmallCNN()
    if spec.model_type == "convnext":
        return ConvNeXtBackbone(spec.drop_path)
    return RectViT((spec.img_height, spec.img_width), spec.vit_patch, spec.drop_path)


def _validate(spec: ModelSpec) -> None:
    """UsageError naming the bad value; sizes are checked before anything large is built."""
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    check(spec.model_type in MODEL_CHOICES, f"unknown model type {spec.model_type!r}; "
          f"choose from {','.join(MODEL_CHOICES)}")
    check(spec.num_classes >= 1 and spec.embedding_dim >= 1, f"num_classes {spec.num_classes} "
          f"and embedding_dim {spec.embedding_dim} must be at least 1")
    check(0.0 <= spec.dropout < 1.0 and 0.0 <= spec.drop_path < 1.0, f"dropout {spec.dropout} "
          f"and drop_path {spec.drop_path} must lie in [0, 1)")
    min_size = {"small": 8, "convnext": 32}.get(spec.model_type, 1)
    check(min(spec.img_height, spec.img_width) >= min_size, f"{spec.model_type} needs images of "
          f"at least {min_size}x{min_size} pixels, got {spec.img_height}x{spec.img_width}")
    if spec.model_type in FREEZABLE_UNITS:
        top = FREEZABLE_UNITS[spec.model_type]
        check(0 <= spec.freeze <= top, f"{spec.model_type}: freeze={spec.freeze} is out of "
              f"range; use 0 to {top}")
        check(spec.pretrained or spec.freeze == 0, f"{spec.model_type}: freeze={spec.freeze} "
              "without pretrained weights would freeze random weights; use freeze=0")
    if spec.model_type == "vit":
        _validate_vit_size(spec)


def _validate_vit_size(spec: ModelSpec) -> None:
    ph, pw = spec.vit_patch
    if ph < 1 or pw < 1:
        raise UsageError(f"vit: patch size {ph}x{pw} must be positive")
    problems = [f"--{flag} {size} (nearest valid: {' or '.join(map(str, _near(size, p)))})"
                for flag, size, p in (("img_height", spec.img_height, ph),
                                      ("img_width", spec.img_width, pw)) if size % p]
    if problems:
        raise UsageError(f"vit: the image {spec.img_height}x{spec.img_width} must be a "
                                f"multiple of the {ph}x{pw} patch: " + "; ".join(problems))


def _near(size: int, p: int) -> list[int]:
    """The multiples of p just below and above size."""
    lower = size // p * p
    return [m for m in (lower, lower + p) if m >= p]


# ----------------------------------------------------------------------------- public helpers

def check_input_size(model_type: str, img_height: int, img_width: int) -> None:
    """UsageError when `model_type` cannot take images of this size; builds nothing."""
    _validate(ModelSpec(model_type=model_type, num_classes=2, img_height=img_height,
                        img_width=img_width, pretrained=False))


def build_model(spec: ModelSpec) -> WriterNet:
    """Build the network; pretrained=True loads ImageNet weights from the hub cache or raises."""
    _validate(spec)
    pretrained = spec.pretrained and spec.model_type in WEIGHTS
    if pretrained:
        ensure_pretrained_available(spec.model_type)  # fail before building anything large
    model = WriterNet(spec)
    if pretrained:
        model.backbone.load_pretrained(load_pretrained_state_dict(spec.model_type))
        logger.info("loaded ImageNet weights for %s from %s", spec.model_type,
                    weights_file(spec.model_type))
    return model


def trainable_parameter_fraction(model: nn.Module) -> float:
    """Share of the model's parameter elements that require gradients."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable / total if total else 0.0


def checkpoint_payload(model: WriterNet, writers: Sequence[str], extra: dict) -> dict:
    """What best_model.pth holds: spec, CPU state dict, writer names by class index, and `extra`."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile: keep the plain key names
    clash = set(extra) & set(_CHECKPOINT_KEYS)
    if clash:
        raise ValueError(f"checkpoint extra keys {sorted(clash)} would overwrite reserved keys")
    if len(writers) != model.spec.num_classes:
        raise ValueError(f"{len(writers)} writer names for a model of "
                         f"{model.spec.num_classes} classes")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"model_spec": model.spec.to_dict(), "state_dict": state,
            "writers": [str(w) for w in writers], **plain_values(extra)}


def plain_values(obj: Any) -> Any:
    """numpy scalars/arrays -> Python values: torch.load(weights_only=True) refuses numpy."""
    if isinstance(obj, dict):
        return {k: plain_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_values(v) for v in obj)
    return obj.tolist() if hasattr(obj, "tolist") and not torch.is_tensor(obj) else obj


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` atomically: a reader sees the old file or the new one, never half."""
    with atomic.atomic_path(path) as tmp:
        # through a Python file: torch.save to a path hides a full disk behind "unexpected pos",
        # while the OSError (ENOSPC) of a file write stays in the exception's context
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


class UnsafeCheckpoint(UsageError):
    """A checkpoint that torch.load(weights_only=True) refused or could not read: nothing in it
    ran."""


def load_torch(path: str | os.PathLike, what_now: str,
               map_location: str | torch.device = "cpu", lazy: bool = False) -> Any:
    """torch.load under weights_only: only tensors and plain Python values are rebuilt, so a
    planted pickle runs nothing (checkpoint folders are often group-writable).

    Raises UnsafeCheckpoint, one line naming the file, why, and `what_now` (what the caller does
    about it or what the user should), for anything else: a pickle of other objects, a truncated
    or corrupt file. `lazy` maps the tensors instead of reading them (a cheap check).
    """
    try:
        # mmap needs torch's zip format; any other file goes through the same safe unpickler
        lazy = lazy and zipfile.is_zipfile(path)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=lazy)
    except Exception as exc:  # noqa: BLE001 - no code ran: whatever failed, the file is unusable
        raise UnsafeCheckpoint(f"{path} cannot be loaded safely ({_load_failure(exc)}): "
                               f"{what_now}") from exc


def _load_failure(exc: Exception) -> str:
    """torch's multi-paragraph load error -> a short reason (pure)."""
    text = " ".join(str(exc).split())
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)|Unsupported operand \d+", text)
        return ("it holds pickled objects, not only tensors and plain values"
                + (f": {found.group(0)}" if found else ""))
    if isinstance(exc, EOFError):
        return "the file ends early: empty or cut short"
    first = re.split(r"(?<=\.) ", text, maxsplit=1)[0]
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def load_best_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[WriterNet, list[str], dict]:
    """(model in eval mode, writer names by class index, the checkpoint without its state dict).
    UsageError for a file that is missing, not a model checkpoint, or cannot be loaded safely
    (UnsafeCheckpoint: loaded under weights_only, so nothing in it ran)."""
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist; pass the best_model.pth of a "
                         "trial folder or of best_overall/")
    ckpt = load_torch(path, "nothing in it was run; pass a best_model.pth written by a search "
                      "(a trial folder's or best_overall/'s), or rerun its trial to write it "
                      "again", map_location)
    missing = ([k for k in _CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict)
               else list(_CHECKPOINT_KEYS))
    if missing:
        raise UsageError(f"{path} is not a model checkpoint: it lacks {', '.join(missing)}")
    # The weights come from the checkpoint, so the ImageNet file is not needed here.
    model = WriterNet(ModelSpec.from_dict(ckpt["model_spec"]))
    model.load_state_dict(ckpt["state_dict"])
    model.to(map_location).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    if "hparams" in meta:  # the name of "hyperparameters" in checkpoints of older versions
        meta.setdefault("hyperparameters", meta.pop("hparams"))
    return model, list(ckpt["writers"]), meta
