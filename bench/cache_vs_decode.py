"""The data part of a training epoch, two ways side by side: the image cache (image_cache.py, what
trials use) against opening, decoding and resizing every PNG each epoch (what an earlier version
did). Both hand the same uint8 [1, H, W] lines to the same DataLoader; epochs alternate, and the
median over --repeats epochs of each is reported (lines/s and their ratio; the target is >= 5x).

    python bench/cache_vs_decode.py [--height 160 --width 1760 --source_height 240 --repeats 5]

The lines are synthetic PNGs of --source_height pixels (about 4.7 to 14 times as wide, saved with
fast compression); both ways read them from a warm OS page cache, so disk speed plays no part.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from psearch.engine import atomic  # noqa: E402
from psearch.writer_id import data_index  # noqa: E402
from psearch.writer_id.dataset import LineDataset  # noqa: E402
from psearch.writer_id.image_cache import build_or_load_cache, preprocess  # noqa: E402
from psearch.writer_id.synthetic import make_synthetic  # noqa: E402


class DecodingDataset(torch.utils.data.Dataset):
    """Every item decoded from its file and resized again: the way without a cache."""

    def __init__(self, paths: list[str], height: int, width: int) -> None:
        self.paths, self.height, self.width = paths, height, width

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        with Image.open(self.paths[i]) as img:
            pixels = preprocess(img, self.height, self.width)
        return torch.from_numpy(pixels).unsqueeze(0), 0, i


def epoch_rate(dataset: torch.utils.data.Dataset, batch: int, workers: int) -> float:
    """Lines/s of one pass of a DataLoader over `dataset` (the loader's start included)."""
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    seen = sum(len(x) for x, _, _ in loader)
    return seen / (time.perf_counter() - start)


def run(args: argparse.Namespace, folder: Path) -> dict:
    """Make the data, build the cache (timed), then alternate epochs of both ways."""
    root = make_synthetic(folder / "lines", writers=args.writers, pages_per_writer=6,
                          lines_per_page=8, height=args.source_height)
    paths = sorted(data_index.index_paths(data_index.index_dataset(str(root))))
    started = time.perf_counter()
    cache = build_or_load_cache(paths, args.height, args.width, folder / "cache", processes=1)
    build_s = time.perf_counter() - started
    cached = LineDataset(cache, [cache.row(p) for p in paths], [0] * len(paths), False, 0)
    decoding = DecodingDataset(paths, args.height, args.width)
    rates: dict[str, list[float]] = {"cache": [], "decode": []}
    for _ in range(args.repeats):
        rates["decode"].append(epoch_rate(decoding, args.batch, args.num_workers))
        rates["cache"].append(epoch_rate(cached, args.batch, args.num_workers))
    cache_rate, decode_rate = (statistics.median(rates[k]) for k in ("cache", "decode"))
    return {"lines": len(paths), "size": f"{args.height}x{args.width}",
            "source_height": args.source_height, "num_workers": args.num_workers,
            "repeats": args.repeats, "cache_build_s": round(build_s, 2),
            "cache_lines_per_s": round(cache_rate, 1), "decode_lines_per_s": round(decode_rate, 1),
            "ratio": round(cache_rate / decode_rate, 1), "target_ratio": 5.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=160, help="cached height (default: 160)")
    parser.add_argument("--width", type=int, default=1760, help="cached width (default: 1760)")
    parser.add_argument("--source_height", type=int, default=240,
                        help="height of the PNG files (default: 240)")
    parser.add_argument("--writers", type=int, default=4, help="writers; 48 lines each "
                        "(default: 4)")
    parser.add_argument("--batch", type=int, default=16, help="default: 16")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="DataLoader processes, the same both ways (default: 0)")
    parser.add_argument("--repeats", type=int, default=5, help="epochs of each way (default: 5)")
    parser.add_argument("--json", default=None, help="write the figures here (default: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)   # neither way computes in torch; keep the comparison per core
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result))
    if args.json:
        atomic.write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
