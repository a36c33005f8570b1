"""One rank of a built-in trial on several devices (`python -m psearch.writer_id.ddp_objective F`).

The worker (`objective.WriterObjective`) has claimed the trial, suggested its hyperparameters and
found what it resumes from; it writes them to the file F and starts the ranks (`engine/ranks.py`).
Every rank joins the process group, loads the shared data cache and builds the same model;
rank 0 alone talks to Optuna (reports each epoch, asks whether to prune, records the metrics)
through its own handle on the claimed trial, writes the checkpoints and returns the value; the
others follow its decisions (`train.Trainer` with a `distributed.Dist`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import optuna
import torch

from psearch.engine import confirm, layout, ranks, study as study_lib
from psearch.engine.resilient_trial import ResilientTrial
from psearch.engine.config import SearchConfig, add_search_args, config_from_args
from psearch.engine.worker_env import WorkerIdentity
from psearch.writer_id import builtin, distributed, model as model_lib
from psearch.writer_id.objective import (fit_trial, load_index, make_bundle, model_spec, rank_title,
                                         train_config, trial_record)
from psearch.writer_id.train import RankEnded, Trainer

logger = logging.getLogger(__name__)


def load_config(argv: list[str]) -> SearchConfig:
    """The worker's settings from its flags (the storage URL comes in the environment)."""
    parser = argparse.ArgumentParser()
    add_search_args(parser, builtin.KIND)
    return config_from_args(parser.parse_args(argv), builtin.KIND)


def run_rank(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Train this rank's part of the trial; rank 0's result: complete with its value, or pruned."""
    cfg = load_config(spec["argv"])
    torch.set_num_threads(int(spec["threads"]))
    dist = distributed.from_env()
    try:
        data = make_bundle(cfg, *load_index(cfg))
        hp, number = spec["hyperparameters"], int(spec["trial_number"])
        seed = int(spec.get("seed", cfg.seed))
        torch.manual_seed(seed)   # DistributedDataParallel also copies rank 0's weights
        model = model_lib.build_model(model_spec(hp, len(data.writers), cfg))
        trial_dir = layout.trial_dir(cfg.checkpoint_dir, number)
        trainer = Trainer(model, data, train_config(hp, cfg, int(spec["num_workers"]), seed),
                          dist.device, trial_dir,
                          {**trial_record(number, hp, cfg, seed),
                           "title": rank_title(number, hp, dist.world_size)}, dist=dist)
        resume = Path(spec["resume_from"]) if spec["resume_from"] else None
        if not dist.is_main:
            try:
                trainer.fit(lambda epoch, row: None, resume)
            except RankEnded:
                pass
            return None
        study = study_lib.open_study(cfg, create=False)
        trial = confirm.never_pruned(ResilientTrial(study, int(spec["trial_id"])))
        try:
            return {"status": "complete", "value": fit_trial(trial, trainer, trial_dir, resume)}
        except optuna.TrialPruned as exc:
            return {"status": "pruned", "message": str(exc)}
    finally:
        distributed.close()


def setup_logging() -> None:
    """Lines like the worker's, marked with the rank (they go to the worker's log)."""
    fmt = (f"%(asctime)s [{WorkerIdentity.from_environ(os.environ).label} rank "
           f"{ranks.rank()}@{socket.gethostname()} pid %(process)d] %(levelname)s %(name)s: "
           "%(message)s")
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    setup_logging()
    spec = json.loads(Path(args[0]).read_text())
    ranks.rank_main(lambda: run_rank(spec))


if __name__ == "__main__":
    main()
