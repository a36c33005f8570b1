"""Writer-identification networks: a backbone, an L2-normalised embedding for page retrieval and a
cosine classifier over the training writers.

    spec = ModelSpec("small", num_classes=20, img_height=64, img_width=640)
    emb, logits = build_model(spec)(images)      # images: float [B, 1, H, W] in [0, 1], 0 = ink

`small` is a compact CNN trained from scratch; `convnext` is torchvision's ConvNeXt-Tiny; `vit` is
a ViT-B/16 encoder over rectangular patches. ImageNet weights are read from torch's hub cache and
never downloaded: `ensure_pretrained_available` says how to put them there.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock
from torchvision.ops import StochasticDepth

from psearch.engine import atomic
from psearch.engine.errors import UsageError
from psearch.writer_id.names import MODEL_CHOICES

logger = logging.getLogger(__name__)

# The most stages (ConvNeXt, of 4) or encoder blocks (ViT, of 12) `freeze` may cover: all but
# the last, which always trains.
FREEZABLE_UNITS = {"convnext": 3, "vit": 11}
# Logit scale of the cosine classifier (NormFace): cosines lie in [-1, 1], so softmax needs a
# temperature; 16 lets the true class reach p > 0.99 against a thousand writers.
COSINE_SCALE = 16.0
_WEIGHTS = {"convnext": ("convnext_tiny", torchvision.models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1),
            "vit": ("vit_b_16", torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1)}
_CHECKPOINT_KEYS = ("model_spec", "state_dict", "writers")


class PretrainedWeightsMissing(UsageError):
    """The ImageNet weights file is not in torch's hub cache (nothing is ever downloaded)."""


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


# ----------------------------------------------------------------------------- pretrained weights

def _weights_file(model_type: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_WEIGHTS[model_type][1].url)


def ensure_pretrained_available(model_type: str) -> None:
    """Raise PretrainedWeightsMissing (one line, with the fix) unless the weights are cached."""
    if model_type == "small":
        return  # trained from scratch: nothing to fetch
    if model_type not in _WEIGHTS:
        raise UsageError(f"unknown model type {model_type!r}; choose from "
                                f"{','.join(MODEL_CHOICES)}")
    path = _weights_file(model_type)
    if path.is_file():
        return
    builder = _WEIGHTS[model_type][0]
    raise PretrainedWeightsMissing(
        f"pretrained {model_type} weights {path.name} are not in {path.parent} (nothing is "
        f"downloaded here): on a machine with network run `python -c \"import torchvision; "
        f"torchvision.models.{builder}(weights='IMAGENET1K_V1')\"` and copy {path.name} from its "
        f"~/.cache/torch/hub/checkpoints/ into {path.parent} (or set TORCH_HOME to a folder whose "
        f"hub/checkpoints/ holds it), or pass --no_pretrained to start from random weights")


def _load_pretrained_state_dict(model_type: str) -> dict[str, Tensor]:
    ensure_pretrained_available(model_type)
    # Read the cached file ourselves: weights.get_state_dict() would download if it vanished.
    return torch.load(_weights_file(model_type), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- backbones

def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Compact CNN (0.39M parameters): two strided 3x3 convolutions bring a 64x640 line to
    16x160 cheaply (full-resolution layers cost most of the CPU time for little gain), then
    3x3 blocks with 2x2 poolings, then global average + max pooling over the whole line (a style
    descriptor: what occurs, and how strongly at its peak)."""

    out_dim = 512

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(1, 16, stride=2), _conv_bn(16, 32, stride=2),
            _conv_bn(32, 64), nn.MaxPool2d(2),
            _conv_bn(64, 128), nn.MaxPool2d(2),
            _conv_bn(128, 256))

    def forward(self, x: Tensor) -> Tensor:
        # Invert so paper is 0 and ink is 1: zero padding then looks like paper, not like ink.
        f = self.features(1.0 - x)
        return torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=1)

    def frozen_modules(self, freeze: int) -> list[nn.Module]:
        return []

    def frozen_parameters(self, freeze: int) -> list[nn.Parameter]:
        return []


class ImageNetInput(nn.Module):
    """Grayscale [B,1,H,W] in [0,1] -> the 3-channel, ImageNet-normalised input of the weights."""

    def __init__(self, weights: torchvision.models.WeightsEnum) -> None:
        super().__init__()
        t = weights.transforms()
        # Constants of the weights, not learnt: kept out of the state dict.
        self.register_buffer("mean", torch.tensor(t.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(t.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


class ConvNeXtBackbone(nn.Module):
    """torchvision ConvNeXt-Tiny features, global average pool and its final LayerNorm."""

    out_dim = 768

    def __init__(self, drop_path: float) -> None:
        super().__init__()
        net = torchvision.models.convnext_tiny(weights=None, stochastic_depth_prob=drop_path)
        self.input = ImageNetInput(_WEIGHTS["convnext"][1])
        # features = [stem, stage1, down, stage2, down, stage3, down, stage4]
        self.features = net.features
        self.norm = net.classifier[0]

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(self.input(x))
        return self.norm(f.mean((2, 3), keepdim=True)).flatten(1)

    def load_pretrained(self, sd: dict[str, Tensor]) -> None:
        # The ImageNet classifier's LayerNorm is kept, its 1000-way Linear is not.
        mapped = {k.replace("classifier.0.", "norm.", 1): v for k, v in sd.items()
                  if not k.startswith("classifier.2.")}
        self.load_state_dict(mapped)

    def frozen_modules(self, freeze: int) -> list[nn.Module]:
        # Stem + the first `freeze` stages and the downsampling layers between them.
        return list(self.features[:2 * freeze])

    def frozen_parameters(self, freeze: int) -> list[nn.Parameter]:
        return [p for m in self.frozen_modules(freeze) for p in m.parameters()]


class _DropPathBlock(EncoderBlock):
    """torchvision's encoder block (same parameters and names) with stochastic depth added."""

    def __init__(self, drop_path: float) -> None:
        super().__init__(num_heads=12, hidden_dim=768, mlp_dim=3072, dropout=0.0,
                         attention_dropout=0.0)
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.drop_path(self.dropout(y))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class _Encoder(nn.Module):
    """torchvision's ViT encoder layout (same state-dict keys), built from _DropPathBlock."""

    def __init__(self, seq_length: int, drop_path: float, depth: int = 12) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, 768).normal_(std=0.02))
        # Stochastic depth grows linearly with depth, as in DeiT and torchvision's ConvNeXt.
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", _DropPathBlock(drop_path * i / (depth - 1)))
            for i in range(depth)))
        self.ln = nn.LayerNorm(768, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.layers(x + self.pos_embedding))


class RectViT(nn.Module):
    """ViT-B over rectangular patches (16x32 on 160x1760: 10x55 tokens).

    The line is described by [class token, mean patch token]: the class token is what ImageNet
    pretraining learnt to summarise with, the mean weighs every stretch of the line equally.
    """

    out_dim = 2 * 768

    def __init__(self, img_size: tuple[int, int], patch: tuple[int, int], drop_path: float) -> None:
        super().__init__()
        self.grid = (img_size[0] // patch[0], img_size[1] // patch[1])
        self.input = ImageNetInput(_WEIGHTS["vit"][1])
        self.conv_proj = nn.Conv2d(3, 768, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 768))
        self.encoder = _Encoder(1 + self.grid[0] * self.grid[1], drop_path)
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (3 * patch[0] * patch[1])))
        nn.init.zeros_(self.conv_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.conv_proj(self.input(x)).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(len(tokens), -1, -1), tokens], dim=1)
        out = self.encoder(tokens)
        return torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=1)

    def load_pretrained(self, sd: dict[str, Tensor]) -> None:
        mapped = {k: v for k, v in sd.items() if not k.startswith("heads.")}
        mapped["conv_proj.weight"] = pi_resize_kernel(sd["conv_proj.weight"],
                                                      tuple(self.conv_proj.kernel_size))
        mapped["encoder.pos_embedding"] = resample_pos_embedding(sd["encoder.pos_embedding"],
                                                                 self.grid)
        self.load_state_dict(mapped)

    def frozen_modules(self, freeze: int) -> list[nn.Module]:
        return [self.conv_proj, *self.encoder.layers[:freeze]] if freeze else []

    def frozen_parameters(self, freeze: int) -> list[nn.Parameter]:
        # The class token and position embedding are bare parameters, frozen with the patches.
        extra = [self.class_token, self.encoder.pos_embedding] if freeze else []
        return extra + [p for m in self.frozen_modules(freeze) for p in m.parameters()]


def pi_resize_kernel(kernel: Tensor, new_size: tuple[int, int]) -> Tensor:
    """Resample a patch-embedding kernel [O,I,h,w] to new_size: FlexiViT pseudo-inverse resize."""
    old_size = tuple(kernel.shape[-2:])
    if old_size == tuple(new_size):
        return kernel.clone()
    # Plain bilinear resizing of the kernel would scale every token by the area ratio (2x for
    # 16x16 -> 16x32). The pseudo-inverse keeps <resize(x), w_new> = <x, w_old>: a 16x32 patch
    # showing a stretched 16x16 patch gets exactly the token the pretrained model gave it.
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, dtype=torch.float64).reshape(n_old, 1, *old_size)
    resize = F.interpolate(basis, size=new_size, mode="bilinear", align_corners=False,
                           antialias=True).reshape(n_old, -1)          # rows: resize(e_i)
    # Solve resize @ w_new = w_old (least-norm when upsampling, least-squares when shrinking).
    w_new = kernel.reshape(-1, n_old).double() @ torch.linalg.pinv(resize).T
    return w_new.reshape(*kernel.shape[:2], *new_size).to(kernel.dtype)


def resample_pos_embedding(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bicubic 2-D resampling of a square ViT position embedding [1,1+n*n,D] to grid; keeps the
    class token's entry."""
    n = math.isqrt(pos.shape[1] - 1)
    assert n * n == pos.shape[1] - 1, f"position embedding of {pos.shape[1]} tokens is not square"
    if (n, n) == tuple(grid):
        return pos.clone()
    patches = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
    # antialias matters when shrinking (e.g. 14 -> 10 rows): it averages instead of skipping.
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:, :1], patches], dim=1)


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
    pretrained = spec.pretrained and spec.model_type in _WEIGHTS
    if pretrained:
        ensure_pretrained_available(spec.model_type)  # fail before building anything large
    model = WriterNet(spec)
    if pretrained:
        model.backbone.load_pretrained(_load_pretrained_state_dict(spec.model_type))
        logger.info("loaded ImageNet weights for %s from %s", spec.model_type,
                    _weights_file(spec.model_type))
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
            "writers": [str(w) for w in writers], **_builtin(extra)}


def _builtin(obj: Any) -> Any:
    """numpy scalars/arrays -> Python values: torch.load(weights_only=True) refuses numpy."""
    if isinstance(obj, dict):
        return {k: _builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_builtin(v) for v in obj)
    return obj.tolist() if hasattr(obj, "tolist") and not torch.is_tensor(obj) else obj


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` atomically: a reader sees the old file or the new one, never half."""
    with atomic.atomic_path(path) as tmp:
        # through a Python file: torch.save to a path hides a full disk behind "unexpected pos",
        # while the OSError (ENOSPC) of a file write stays in the exception's context
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)


def load_best_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[WriterNet, list[str], dict]:
    """(model in eval mode, writer names by class index, the checkpoint without its state dict)."""
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist; pass the best_model.pth of a "
                         "trial folder or of best_overall/")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
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
