"""Evaluate a saved best model on a split of its data set (the held-out test split by default).

    python evaluate.py CHECKPOINT_DIR/best_overall/best_model.pth [--split test]
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from psearch.engine import cli, layout
from psearch.engine.errors import EXIT_USAGE, UsageError
from psearch.writer_id import data_index, dataset, model as model_lib
from psearch.writer_id.hardware import available_cores, pick_device
from psearch.writer_id.train import evaluate, make_loader

logger = logging.getLogger(__name__)


def evaluate_checkpoint(best_model_path: str | Path, split: str = "test",
                        data_root: str | None = None) -> dict[str, float]:
    """Page top-1/top-5/mAP and classification accuracy of a best_model.pth on `split`.

    Every page of the split is used (no per-writer cap), with the writers the model was trained
    on; pages of other writers are left out since the classifier cannot name them.
    """
    net, writers, meta = model_lib.load_best_model(best_model_path)
    settings = meta["settings"]
    root = data_root or settings["data_root"]
    index = data_index.restrict_to_writers(data_index.index_dataset(root), writers)
    if not index.splits.get(split):
        raise UsageError(f"{root} has no {split}/ lines for the model's writers")
    bundle = dataset.make_datasets(index, writers, settings["img_height"], settings["img_width"],
                                   settings.get("cache_dir")
                                   or layout.cache_dir(settings["checkpoint_dir"]),
                                   # the search's own subset, so that its image cache is reused
                                   max_val_pages_per_writer=settings["max_val_pages_per_writer"],
                                   seed=settings["seed"], processes=available_cores())
    ds, page_ids, page_writer = (
        (bundle.test, bundle.test_page_ids, bundle.test_page_writer) if split == "test" else
        (bundle.val, bundle.val_page_ids, bundle.val_page_writer))
    device = pick_device()
    loader = make_loader(ds, settings["batch_size"] * 2, 0, device)
    found = evaluate(net.to(device), loader, page_ids, device, prefix="")
    pages_per_writer = np.bincount(page_writer)
    found.update({"split": split, "pages": int(len(page_writer)), "lines": int(len(ds)),
                  # pages whose writer has another page here: only these can be queries
                  "retrieval_queries": int((pages_per_writer[page_writer] >= 2).sum())})
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Print the metrics of a checkpoint on a split as JSON."""
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a best_model.pth (required)")
    parser.add_argument("--split", default="test", choices=("test", "val"),
                        help="split to evaluate on (default: test)")
    parser.add_argument("--data_root", default=None, help="data set root (default: the one the "
                        "model was trained on)")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        with torch.no_grad():
            print(json.dumps(evaluate_checkpoint(ns.checkpoint, ns.split, ns.data_root), indent=2))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
