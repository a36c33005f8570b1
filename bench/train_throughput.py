"""Training throughput of each model: lines/s of the real training step (uint8 batch on the device
→ batched augmentation there → forward under autocast → loss → backward → clip → AdamW), random
weights (nothing is downloaded), side by side in one run.

    python bench/train_throughput.py                         # CPU: small size and 160x1760
    python bench/train_throughput.py --device cuda --sizes 160x1760 --batch 16
    python bench/train_throughput.py --json out.json         # the figures for bench/run_all.py

On the CPU each measurement is time-boxed (--seconds per model and size) and the batch is kept
small, so a ViT-B at 160x1760 finishes in about a minute; on a GPU it runs --steps steps under AMP
(the precision train.py picks) and reports peak memory.
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
from psearch.engine import atomic  # noqa: E402
from psearch.writer_id import model as model_lib  # noqa: E402
from psearch.writer_id.augment import augment_batch, epoch_generator  # noqa: E402
from psearch.writer_id.train import amp_settings  # noqa: E402

MODELS = ("small", "convnext", "vit")
NUM_WRITERS = 100


def precision_name(device: torch.device, amp: bool) -> str:
    """What a step computes in, as train.py picks it: 'bf16 autocast', 'fp16 autocast + grad
    scaler' or 'fp32'."""
    on, dtype, scaler = amp_settings(device)
    if not (amp and on):
        return "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype] + " autocast" + (
        " + grad scaler" if scaler else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model_type: str, device: torch.device, height: int, width: int, batch: int,
            amp: bool = True, steps: int = 20, seconds: float = 60.0) -> dict:
    """lines/s of training steps after one warm-up step: `steps` steps or until `seconds` pass."""
    net = model_lib.build_model(model_lib.ModelSpec(model_type, NUM_WRITERS, 256, height, width,
                                                    pretrained=False)).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    on, dtype, use_scaler = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and use_scaler)
    pixels = torch.randint(0, 256, (batch, 1, height, width), dtype=torch.uint8, device=device)
    labels = torch.randint(0, NUM_WRITERS, (batch,), device=device)
    gen = epoch_generator(0, 0, device)

    def step() -> None:
        x = augment_batch(pixels, gen)
        with torch.autocast(device.type, dtype=dtype, enabled=amp and on):
            _, logits = net(x)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    step()   # warm-up: allocator, cuDNN autotuning, first-call overheads
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start, cpu_start, done = time.perf_counter(), time.process_time(), 0
    while done < steps and (done == 0 or time.perf_counter() - start < seconds):
        step()   # (on a GPU the time box sees queued steps: --steps is what bounds it there)
        done += 1
    _sync(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    row = {"model": model_type, "device": device.type, "size": f"{height}x{width}",
           "batch": batch, "steps": done, "lines_per_s": round(done * batch / elapsed, 2),
           "precision": precision_name(device, amp)}
    if device.type == "cpu":
        # the share of its threads' time this process got: well below 1, other processes took
        # cores during the measurement and the rate is lower than the machine can do
        row["cpu_share"] = round(cpu / (elapsed * torch.get_num_threads()), 2)
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def parse_size(text: str) -> tuple[int, int]:
    """'160x1760' -> (160, 1760)."""
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma list (default: {','.join(MODELS)})")
    parser.add_argument("--sizes", default="64x640,160x1760",
                        help="comma list of HxW (default: 64x640,160x1760)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: 16 on a GPU; on the CPU 8 at the small size, "
                        "2 at 160x1760)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps at most (default: 20)")
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="time box per model and size, after warm-up (default: 40)")
    parser.add_argument("--fp32", action="store_true", help="no autocast (default: AMP on a GPU)")
    parser.add_argument("--json", default=None, help="write the rows here (default: none)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    rows = []
    for size in args.sizes.split(","):
        height, width = parse_size(size)
        batch = args.batch or (16 if device.type == "cuda" else 8 if height * width <= 64 * 640
                               else 2)
        for model_type in args.models.split(","):
            rows.append(measure(model_type, device, height, width, batch, amp=not args.fp32,
                                steps=args.steps, seconds=args.seconds))
            print(json.dumps(rows[-1]), flush=True)
    info = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        atomic.write_json(Path(args.json), info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
