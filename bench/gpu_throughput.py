"""Training-step throughput of each model on one GPU, mixed precision against float32, side by
side in one run (ratios, not absolute timings, are what to compare across machines).

    python bench/gpu_throughput.py [--height 160 --width 1760 --batch 16 --steps 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from psearch.writer_id import model as model_lib  # noqa: E402
from psearch.writer_id.train import amp_settings  # noqa: E402


def images_per_second(model_type: str, amp: bool, args: argparse.Namespace) -> tuple[float, float]:
    """(images/s, peak GiB) of forward+backward+AdamW steps on random lines."""
    device = torch.device("cuda:0")
    net = model_lib.build_model(model_lib.ModelSpec(model_type, 100, 256, args.height, args.width,
                                                    pretrained=False)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.rand(args.batch, 1, args.height, args.width, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    on, dtype, _ = amp_settings(device)
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=amp and on):
            _, logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    rate = args.steps * args.batch / (time.perf_counter() - start)
    return rate, torch.cuda.max_memory_allocated() / 2 ** 30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=160, help="default: 160")
    parser.add_argument("--width", type=int, default=1760, help="default: 1760")
    parser.add_argument("--batch", type=int, default=16, help="default: 16")
    parser.add_argument("--steps", type=int, default=20, help="default: 20")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for model_type in ("small", "convnext", "vit"):
        amp_rate, amp_mem = images_per_second(model_type, True, args)
        fp32_rate, fp32_mem = images_per_second(model_type, False, args)
        rows.append({"model": model_type, "amp_img_s": round(amp_rate, 1),
                     "fp32_img_s": round(fp32_rate, 1), "speedup": round(amp_rate / fp32_rate, 2),
                     "amp_peak_gib": round(amp_mem, 2), "fp32_peak_gib": round(fp32_mem, 2)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"{torch.cuda.get_device_name(0)}, {args.height}x{args.width}, batch {args.batch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
