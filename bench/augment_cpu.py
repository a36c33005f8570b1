"""Training augmentation on the CPU, two ways side by side, per core (one thread): per image with
PIL/numpy, as data-loader processes did before (kept below as the baseline), against the batched
tensor augmentation that training now runs on its device (augment.py). This is what decided that
the CPU uses the batched path too: if it is about as fast per core, one path serves both devices.

    python bench/augment_cpu.py [--sizes 64x640,160x1760] [--seconds 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from psearch.engine import atomic  # noqa: E402
from psearch.writer_id import augment  # noqa: E402
from psearch.writer_id.image_cache import preprocess  # noqa: E402
from psearch.writer_id.synthetic import random_style, render_line  # noqa: E402

BATCH = 16


def otsu_threshold(img: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image (the baseline's, in numpy)."""
    p = np.bincount(img.ravel(), minlength=256).astype(np.float64)
    p /= p.sum()
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    return int(np.argmax(np.nan_to_num(between, nan=-1.0, posinf=-1.0)))


def augment_one(img: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """The baseline: one uint8 line in PIL/numpy, the same steps and probabilities as augment.py,
    then the float tensor a data-loader process handed over."""
    out = img
    if rng.random() < augment.P_BINARIZE:
        out = np.where(out > otsu_threshold(out), 255, 0).astype(np.uint8)
    if rng.random() < augment.P_ROTATE:
        out = np.asarray(Image.fromarray(out).rotate(
            rng.uniform(-2.0, 2.0), resample=Image.Resampling.BILINEAR, fillcolor=255))
    if rng.random() < augment.P_BLUR:
        out = np.asarray(Image.fromarray(out).filter(
            ImageFilter.GaussianBlur(radius=rng.uniform(*augment.BLUR_SIGMA))))
    if rng.random() < augment.P_JITTER:
        contrast, brightness = rng.uniform(*augment.CONTRAST), rng.uniform(*augment.BRIGHTNESS)
        mean = float(out.mean())
        out = np.clip((out - mean) * contrast + mean + brightness, 0, 255).astype(np.uint8)
    if rng.random() < augment.P_NOISE:
        noise = rng.standard_normal(out.shape, dtype=np.float32) * rng.uniform(*augment.NOISE_STD)
        out = np.clip(out + noise, 0, 255).astype(np.uint8)
    return torch.from_numpy(np.array(out, dtype=np.uint8)).float().div_(255.0).unsqueeze(0)


def rate(fn, seconds: float) -> float:
    """Lines/s of calls of fn (each augments BATCH lines) over about `seconds`."""
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n * BATCH / (time.perf_counter() - start)


def measure(height: int, width: int, seconds: float, repeats: int) -> dict:
    """Median lines/s of both ways over alternating rounds, on BATCH synthetic lines."""
    style = random_style(np.random.default_rng(0))
    lines = np.stack([preprocess(Image.fromarray(render_line(style, np.random.default_rng(k),
                                                             height)), height, width)
                      for k in range(BATCH)])
    batch = torch.from_numpy(lines).unsqueeze(1)
    rng, gen = np.random.default_rng(0), augment.epoch_generator(0, 0, torch.device("cpu"))
    per_image, batched = [], []
    for _ in range(repeats):
        per_image.append(rate(lambda: [augment_one(img, rng) for img in lines], seconds))
        batched.append(rate(lambda: augment.augment_batch(batch, gen), seconds))
    pil, tensor = statistics.median(per_image), statistics.median(batched)
    return {"size": f"{height}x{width}", "per_image_pil_lines_per_s": round(pil, 1),
            "batched_torch_lines_per_s": round(tensor, 1), "ratio": round(tensor / pil, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x640,160x1760", help="default: 64x640,160x1760")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="per round and way (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--json", default=None, help="write the rows here (default: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for size in args.sizes.split(","):
        height, width = (int(v) for v in size.lower().split("x"))
        rows.append(measure(height, width, args.seconds, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        atomic.write_json(Path(args.json), {"threads": 1, "batch": BATCH, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
