"""Training-step throughput of each model on one GPU, mixed precision against float32, side by
side in one run (ratios, not absolute timings, are what to compare across machines). The step is
train_throughput.py's: the real input path (uint8 batch, augmentation on the GPU) included.

    python bench/gpu_throughput.py [--height 160 --width 1760 --batch 16 --steps 20]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import MODELS, measure  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=160, help="default: 160")
    parser.add_argument("--width", type=int, default=1760, help="default: 1760")
    parser.add_argument("--batch", type=int, default=16, help="default: 16")
    parser.add_argument("--steps", type=int, default=20, help="default: 20")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda:0")
    for model_type in MODELS:
        amp, fp32 = (measure(model_type, device, args.height, args.width, args.batch, amp=on,
                             steps=args.steps, seconds=float("inf")) for on in (True, False))
        print(json.dumps({"model": model_type, "amp_img_s": amp["lines_per_s"],
                          "fp32_img_s": fp32["lines_per_s"],
                          "speedup": round(amp["lines_per_s"] / fp32["lines_per_s"], 2),
                          "precision": amp["precision"], "amp_peak_gib": amp["peak_gib"],
                          "fp32_peak_gib": fp32["peak_gib"]}), flush=True)
    print(f"{torch.cuda.get_device_name(0)}, {args.height}x{args.width}, batch {args.batch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
