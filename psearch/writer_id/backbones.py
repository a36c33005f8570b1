"""The backbones of the writer-identification networks, and their ImageNet weights.

`SmallCNN` is a compact CNN trained from scratch; `ConvNeXtBackbone` is torchvision's
ConvNeXt-Tiny features; `RectViT` is a ViT-B/16 encoder over rectangular patches, its patch
kernel and position embedding resampled from the square ImageNet ones. The weights are read from
torch's hub cache and never downloaded: `ensure_pretrained_available` says how to put them there.
Each backbone maps a float [B, 1, H, W] batch to features [B, out_dim] (model.py adds the rest).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock
from torchvision.ops import StochasticDepth

from psearch.engine.errors import UsageError
from psearch.writer_id.names import MODEL_CHOICES

WEIGHTS = {"convnext": ("convnext_tiny", torchvision.models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1),
           "vit": ("vit_b_16", torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1)}


class PretrainedWeightsMissing(UsageError):
    """The ImageNet weights file is not in torch's hub cache (nothing is ever downloaded)."""


# ----------------------------------------------------------------------------- pretrained weights

def weights_file(model_type: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(WEIGHTS[model_type][1].url)


def ensure_pretrained_available(model_type: str) -> None:
    """Raise PretrainedWeightsMissing (one line, with the fix) unless the weights are cached."""
    if model_type == "small":
        return  # trained from scratch: nothing to fetch
    if model_type not in WEIGHTS:
        raise UsageError(f"unknown model type {model_type!r}; choose from "
                                f"{','.join(MODEL_CHOICES)}")
    path = weights_file(model_type)
    if path.is_file():
        return
    builder = WEIGHTS[model_type][0]
    raise PretrainedWeightsMissing(
        f"pretrained {model_type} weights {path.name} are not in {path.parent} (nothing is "
        f"downloaded here): on a machine with network run `python -c \"import torchvision; "
        f"torchvision.models.{builder}(weights='IMAGENET1K_V1')\"` and copy {path.name} from its "
        f"~/.cache/torch/hub/checkpoints/ into {path.parent} (or set TORCH_HOME to a folder whose "
        f"hub/checkpoints/ holds it), or pass --no_pretrained to start from random weights")


def load_pretrained_state_dict(model_type: str) -> dict[str, Tensor]:
    ensure_pretrained_available(model_type)
    # Read the cached file ourselves: weights.get_state_dict() would download if it vanished.
    return torch.load(weights_file(model_type), map_location="cpu", weights_only=True)


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
        self.input = ImageNetInput(WEIGHTS["convnext"][1])
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
        self.input = ImageNetInput(WEIGHTS["vit"][1])
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
