"""Training augmentation of a whole batch of cached uint8 lines, with tensor ops on its device.

The data loader hands over uint8 [B, 1, H, W] pixels as cached; `augment_batch` turns them into
the model's float input in [0, 1] (0 = ink) where the batch already is: on the GPU when training
there, so the GPU never waits for per-image CPU work, and on the CPU otherwise (the same code,
which is why the CPU tests exercise it). Each step is applied to each line independently with its
own probability, in this order: Otsu binarisation (like a binarised scan that is then blurred and
noisy), a small rotation about the centre (white paper fills the corners), Gaussian blur,
brightness/contrast, sensor noise.

Randomness comes only from the `torch.Generator` passed in; `epoch_generator` seeds one from
(seed, epoch), so an epoch's augmentations are the same whenever it runs, a resumed trial included.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# probability of each augmentation, applied independently (training only)
P_BINARIZE, P_ROTATE, P_BLUR, P_JITTER, P_NOISE = 0.5, 0.5, 0.3, 0.5, 0.3
MAX_ROTATION_DEG = 2.0
BLUR_SIGMA = (0.3, 1.2)
CONTRAST, BRIGHTNESS = (0.7, 1.3), (-25.0, 25.0)   # brightness in grey levels of 0..255
NOISE_STD = (3.0, 12.0)                            # grey levels
_TAG_AUGMENT = 3   # keeps this stream apart from the sampler's (dataset.py uses 1 and 2)
# columns of the per-line uniform draws: five on/off draws (0-4), then one per parameter
_ANGLE, _SIGMA, _CONTRAST, _BRIGHT, _NOISE = 5, 6, 7, 8, 9
_N_DRAWS = 10


def epoch_generator(seed: int, epoch: int, device: torch.device,
                    stream: int = 0) -> torch.Generator:
    """A generator on `device` determined by (seed, epoch) only, and the rank's `stream` when a
    trial trains on several devices (stream 0 is the one-device stream)."""
    keys = [_TAG_AUGMENT, int(seed) % 2**64, int(epoch) % 2**64] + ([int(stream)] if stream else [])
    state = np.random.SeedSequence(keys)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state.generate_state(1, np.uint64)[0]) >> 1)
    return gen


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 lines → float32 in [0, 1], the model's input without augmentation (evaluation)."""
    return pixels.float().div_(255.0)


def augment_batch(pixels: torch.Tensor, gen: torch.Generator,
                  sync_free: bool | None = None) -> torch.Tensor:
    """uint8 [B, 1, H, W] lines → augmented float32 [B, 1, H, W] in [0, 1], on their device.

    sync_free (default: on a GPU) computes each step for every line and keeps it where drawn, so
    the host never waits for the device and keeps queueing work ahead; otherwise (the CPU's way)
    only the lines drawn for a step are computed. Both give the same lines from the same draws.
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[1] != 1:
        raise ValueError(f"augment_batch needs uint8 [B, 1, H, W], got {pixels.dtype} "
                         f"{tuple(pixels.shape)}")
    sync_free = pixels.is_cuda if sync_free is None else sync_free
    u = torch.rand(len(pixels), _N_DRAWS, generator=gen, device=pixels.device)
    # compared with Python floats: a tensor of them would be a copy to the device, which waits
    on = torch.stack([u[:, k] < p for k, p in enumerate(
        (P_BINARIZE, P_ROTATE, P_BLUR, P_JITTER, P_NOISE))], dim=1)
    steps = ((_binarize, ()),
             (_rotate, (_span(u[:, _ANGLE], -MAX_ROTATION_DEG, MAX_ROTATION_DEG),)),
             (_blur, (_span(u[:, _SIGMA], *BLUR_SIGMA),)),
             (_jitter, (_span(u[:, _CONTRAST], *CONTRAST), _span(u[:, _BRIGHT], *BRIGHTNESS))),
             (_noise, (_span(u[:, _NOISE], *NOISE_STD), torch.randn(
                 pixels.shape, generator=gen, device=pixels.device))))
    x = pixels.float()
    for k, (step, params) in enumerate(steps):
        if sync_free:
            x = torch.where(on[:, k, None, None, None], step(x, *params), x)
        else:
            sel = on[:, k].nonzero().squeeze(1)
            if len(sel):
                x[sel] = step(x[sel], *(p[sel] for p in params))
    return x.div_(255.0)


def _span(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def otsu_thresholds(pixels: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold of each line [N, ...] of grey levels 0..255: the level that maximises the
    between-class variance."""
    flat = pixels.reshape(len(pixels), -1).long()
    # scatter_add, not bincount: batched, and no device-to-host sync on a GPU (float counts stay
    # exact below 2**24 pixels a line, so the order of the atomic adds does not matter)
    hist = torch.zeros(len(pixels), 256, device=pixels.device).scatter_add_(
        1, flat, torch.ones(1, device=pixels.device).expand_as(flat))
    p = hist.double()
    p /= p.sum(1, keepdim=True)
    omega = p.cumsum(1)                                   # weight of the dark class
    mu = (p * torch.arange(256, device=p.device)).cumsum(1)   # its unnormalised mean
    between = (mu[:, -1:] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return torch.nan_to_num(between, nan=-1.0, posinf=-1.0).argmax(1)


def _binarize(x: torch.Tensor) -> torch.Tensor:
    t = otsu_thresholds(x).view(-1, 1, 1, 1)
    return (x > t).float() * 255.0


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each line about its centre by its angle, bilinear, white corners."""
    n, _, h, w = x.shape
    a = (degrees * (math.pi / 180.0)).view(n, 1, 1)
    # grid_sample's [-1, 1] coordinates of each output pixel's centre (align_corners=False) ...
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    ys = ((torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1).view(h, 1)
    # ... rotated in pixels (hence the aspect ratio), written out: what affine_grid computes with
    # a batched matrix product, several times slower on a CPU
    grid = torch.stack([a.cos() * xs - a.sin() * (h / w) * ys,
                        a.sin() * (w / h) * xs + a.cos() * ys], dim=-1)
    # sample the ink (255 - x), so that the zeros grid_sample pads with are white paper
    return 255.0 - F.grid_sample(255.0 - x, grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per line (edges repeated, like PIL)."""
    radius = math.ceil(3 * BLUR_SIGMA[1])
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)                       # [n, K]
    n, _, h, w = x.shape
    y = F.pad(x.reshape(1, n, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(n, 1, 1, -1), groups=n)                 # along the width
    y = F.conv2d(y, kernel.view(n, 1, -1, 1), groups=n)                 # along the height
    return y.reshape(n, 1, h, w)


def _jitter(x: torch.Tensor, contrast: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
    mean = x.mean((1, 2, 3), keepdim=True)
    c, b = contrast.view(-1, 1, 1, 1), brightness.view(-1, 1, 1, 1)
    return ((x - mean) * c + mean + b).clamp_(0.0, 255.0)


def _noise(x: torch.Tensor, std: torch.Tensor, unit_noise: torch.Tensor) -> torch.Tensor:
    return (x + unit_noise * std.view(-1, 1, 1, 1)).clamp_(0.0, 255.0)
