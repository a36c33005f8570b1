"""The built-in objective: one Optuna trial trains one writer-identification model.

The trial suggests hyperparameters (the space in force: default_space.yaml or --space;
search_space.py fills in the defaults), builds the model (model.py), trains it
(train.py) on the shared, preprocessed data (dataset.py), reports its score each epoch for pruning,
and returns the trial value (trial_value.py: by default the best mean validation page mAP over 3
consecutive epochs). Everything the trial makes goes to its folder. The training seed is the
trial's `seed` user attribute (`--seed`, or another one for a confirmation run).

With --gpus_per_trial K > 1 the worker suggests the hyperparameters, then runs the training as K
ranks under DistributedDataParallel (`engine/ranks.py` starts and watches them,
`ddp_objective.py` is one rank); rank 0 reports each epoch to Optuna and hands the value back.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch

from psearch.engine import atomic, layout, optuna_internals, ranks, spawn
from psearch.engine.config import SearchConfig, config_to_argv
from psearch.engine.devices import loader_processes
from psearch.engine.errors import UsageError
from psearch.engine.stopping import StopFlag, StopRequested
from psearch.writer_id import builtin, data_index, dataset, model as model_lib
from psearch.writer_id.hardware import available_cores, pick_device
from psearch.writer_id.names import RESUME_CHECKPOINT, TRIAL_RESULT_KEYS
from psearch.writer_id.search_space import hparams
from psearch.writer_id.train import TrainConfig, Trainer, plot_history, read_last

RANK_MODULE = "psearch.writer_id.ddp_objective"

logger = logging.getLogger(__name__)


def load_index(cfg: SearchConfig) -> tuple[data_index.DataIndex, tuple[str, ...]]:
    """Index the data and keep the selected writers (a large data set takes a while: say so)."""
    started = time.monotonic()
    logger.info("Indexing %s ...", cfg.options.data_root)
    index = data_index.index_dataset(cfg.options.data_root)
    logger.info("Indexed %d lines of %d writers in %.1f s",
                sum(len(r) for r in index.splits.values()), len(index.writers),
                time.monotonic() - started)
    writers = data_index.select_writers(index.writers, cfg.options.num_writers_subset)
    return data_index.restrict_to_writers(index, writers), writers


def check_data(cfg: SearchConfig) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Index and validate the data, image size and pretrained weights; the writers used and the
    data's fingerprint (data_index.fingerprint: stored with the study).

    Cheap and writes nothing, so that a bad data set, image size, missing weights or a
    changed setting stop the run before anything (the image cache included) is made.
    """
    index, writers = load_index(cfg)
    used = data_index.search_subset(index, writers, cfg.options.max_val_pages_per_writer)
    for note in used.notes:
        logger.warning("%s", note)
    few = data_index.writers_with_few_pages(used.splits["val"], 2, writers=writers)
    if len(few) == len(writers):
        raise UsageError(f"no writer in {cfg.options.data_root} has 2 validation pages: page "
                         "retrieval cannot be measured; add validation pages "
                         "(val/<writer>/<page>/)")
    if few:
        logger.warning("%d writer(s) have fewer than 2 validation pages, so their pages cannot be "
                       "retrieval queries (they stay as distractors): %s", len(few),
                       ", ".join(few[:10]) + (" …" if len(few) > 10 else ""))
    for model_type in builtin.space_models(cfg.space, cfg.options):
        model_lib.check_input_size(model_type, cfg.options.img_height, cfg.options.img_width)
        if not cfg.options.no_pretrained and model_type != "small":
            model_lib.ensure_pretrained_available(model_type)
    logger.info("Data: %d writers, %s", len(writers),
                ", ".join(f"{len(r)} {s} lines" for s, r in used.splits.items()))
    return writers, data_index.fingerprint(used)


def build_cache(cfg: SearchConfig) -> None:
    """Decode every image the search uses once into the shared cache (and check what is
    readable), before any trial: later trials and other workers only load it."""
    make_bundle(cfg, *load_index(cfg))


def make_bundle(cfg: SearchConfig, index: data_index.DataIndex,
                writers: tuple[str, ...]) -> dataset.DataBundle:
    """Datasets over the shared cache (built here if it does not exist yet)."""
    o = cfg.options
    return dataset.make_datasets(index, writers, o.img_height, o.img_width,
                                 builtin.image_cache_dir(cfg), o.max_val_pages_per_writer, cfg.seed,
                                 processes=available_cores())


def model_spec(hp: dict[str, Any], num_classes: int, cfg: SearchConfig) -> model_lib.ModelSpec:
    """The model a trial's hyperparameters describe."""
    return model_lib.ModelSpec(
        model_type=hp["model_type"], num_classes=num_classes, embedding_dim=hp["embedding_dim"],
        img_height=cfg.options.img_height, img_width=cfg.options.img_width,
        pretrained=not cfg.options.no_pretrained,
        dropout=hp["dropout"], drop_path=hp["drop_path"], freeze=hp["freeze"])


def train_config(hp: dict[str, Any], cfg: SearchConfig, num_workers: int,
                 seed: int) -> TrainConfig:
    """Training knobs from a trial's hyperparameters, its seed and the run's fixed settings."""
    return TrainConfig(
        epochs=cfg.epochs, patience=cfg.options.patience, batch_size=cfg.options.batch_size,
        lr=hp["lr"],
        weight_decay=hp["weight_decay"], loss=hp["loss"], label_smoothing=hp["label_smoothing"],
        focal_gamma=hp["focal_gamma"], mixup_alpha=hp["mixup_alpha"],
        triplet_weight=hp["triplet_weight"], triplet_margin=hp["triplet_margin"],
        warmup_epochs=hp["warmup_epochs"], grad_clip=hp["grad_clip"], num_workers=num_workers,
        seed=seed, lines_per_writer=cfg.options.lines_per_writer,
        trial_value=cfg.options.trial_value)


def fit_trial(trial: optuna.Trial, trainer: Trainer, trial_dir: Path,
              resume_path: Path | None) -> float:
    """Train, reporting each epoch to `trial` (pruning), and leave the trial's final metrics
    (metrics.json, user attributes, the curve plot) whatever happens; the trial value."""
    status = "failed"
    try:
        result = trainer.fit(lambda e, row: on_epoch(trial, trainer, e, row), resume_path)
        status = result["status"]
    except optuna.TrialPruned:
        status = "pruned"
        raise
    except StopRequested:
        status = "interrupted"
        raise
    finally:
        finish(trial, trainer, trial_dir, status)
    return float(result["value"])


def on_epoch(trial: optuna.Trial, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
    """Report to Optuna, keep metrics.json current, then the pruning check."""
    trial.report(row["value"], epoch)
    atomic.write_json(Path(trainer.out_dir) / "metrics.json", trainer.result("running"))
    if trial.should_prune():
        raise optuna.TrialPruned(f"pruned at epoch {epoch} (score {row['value']:.4f}, "
                                 f"{trainer.definition.name})")


def finish(trial: optuna.Trial, trainer: Trainer, trial_dir: Path, status: str) -> None:
    """Final metrics.json, the metrics as user attributes, the training-curve plot."""
    record_metrics(trial, trial_dir, trainer.result(status))
    trainer.write_plot()


def record_metrics(trial: optuna.Trial, trial_dir: Path, result: dict[str, Any]) -> None:
    """metrics.json and the metrics as the trial's user attributes (NaN as None)."""
    atomic.write_json(trial_dir / "metrics.json", result)
    for key in TRIAL_RESULT_KEYS:
        value = result[key]
        trial.set_user_attr(key, None if value != value else value)


def finish_stopped_ranks(trial: optuna.Trial, trial_dir: Path, title: str) -> None:
    """A trial on several devices stopped (Ctrl+C): its ranks were ended mid-epoch, so leave
    what a stopped one-device trial leaves (status interrupted, the metrics as user attributes,
    the curve plot) from what rank 0 wrote after its last epoch. Best effort: the stop goes on."""
    try:
        running = json.loads((trial_dir / "metrics.json").read_text())
        history = pd.read_csv(trial_dir / "history.csv").to_dict("records")
    except (OSError, ValueError):
        return   # stopped before its first epoch: nothing to show
    try:
        record_metrics(trial, trial_dir, {**running, "status": "interrupted"})
        plot_history(history, trial_dir / "plots" / "training_curves.png", title)
    except Exception as exc:  # noqa: BLE001 - a plot that fails must not turn a stop into more
        logger.warning("Trial %d: could not finish its files after the stop (%s)", trial.number,
                       exc)


def rank_title(number: int, hp: dict[str, Any], world_size: int) -> str:
    """The curve plot's title of a trial trained on several devices."""
    return f"Trial {number} ({hp['model_type']}, {world_size} devices)"


def trial_seed(trial: optuna.Trial, cfg: SearchConfig) -> int:
    """The seed this trial trains with: its `seed` user attribute (set when it was claimed; a
    confirmation run has its own), else --seed."""
    return int(trial.user_attrs.get("seed", cfg.seed))


def trial_record(trial_number: int, hp: dict[str, Any], cfg: SearchConfig,
                 seed: int) -> dict[str, Any]:
    """What config.json and the checkpoints share (evaluate.py reads "settings")."""
    return {"trial_number": trial_number, "hyperparameters": hp, "settings": cfg.to_dict(),
            "seed": seed, "world_size": cfg.gpus_per_trial,
            "space": cfg.space.to_data() if cfg.space is not None else None}


class WriterObjective:
    """Callable objective(trial, trial_dir) -> the trial value (trial_value.py)."""

    def __init__(self, cfg: SearchConfig, stop: StopFlag, cpu_threads: int | None = None):
        self.cfg, self.stop = cfg, stop
        self.world_size = cfg.gpus_per_trial
        self.threads = cpu_threads or available_cores()
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        # Pinned to GPUs CUDA cannot use: refuse now (the ranks would each find out later).
        self.device = pick_device()
        # The launcher already fit --num_workers to this worker's share of cores (and then sets
        # cpu_threads): use it as given. A stand-alone worker applies the same rule to its cores.
        self.num_workers = (cfg.options.num_workers if cpu_threads
                            else loader_processes(cfg.options.num_workers, available_cores()))
        self._data: dataset.DataBundle | None = None
        self._writers: tuple[str, ...] | None = None

    @property
    def data(self) -> "dataset.DataBundle":
        """The data, built on first use from the shared cache and kept for every later trial."""
        if self._data is None:
            self._data = make_bundle(self.cfg, *load_index(self.cfg))
        return self._data

    @property
    def writers(self) -> tuple[str, ...]:
        """The writers trained on (a trial on several devices reads only the index here)."""
        if self._data is not None:
            return self._data.writers
        if self._writers is None:
            self._writers = load_index(self.cfg)[1]
        return self._writers

    def __call__(self, trial: optuna.Trial, trial_dir: Path) -> float:
        cfg = self.cfg
        data = self.data if self.world_size == 1 else None
        hp = hparams(cfg.space.suggest(trial), cfg.epochs)
        resumed_from = trial.user_attrs.get("resumed_from")
        seed = trial_seed(trial, cfg)
        record = trial_record(trial.number, hp, cfg, seed)
        device = (str(self.device) if self.world_size == 1 else
                  f"{self.world_size} x {self.device.type}")
        atomic.write_json(trial_dir / "config.json", {
            **record, "writers": list(self.writers), "resumed_from": resumed_from,
            "device": device, "confirms": trial.user_attrs.get("confirms")})
        logger.info("Trial %d hyperparameters: %s", trial.number, hp)
        resume_path = self._resume_source(trial, trial_dir, resumed_from)
        if data is None:
            return self._run_ranks(trial, trial_dir, hp, resume_path, seed)
        torch.manual_seed(seed)   # the same initial weights for the same hyperparameters and seed
        trainer = Trainer(model_lib.build_model(model_spec(hp, len(data.writers), cfg)), data,
                          train_config(hp, cfg, self.num_workers, seed), self.device, trial_dir,
                          {**record, "title": f"Trial {trial.number} ({hp['model_type']})"},
                          stop_check=self.stop.check)
        return fit_trial(trial, trainer, trial_dir, resume_path)

    def _run_ranks(self, trial: optuna.Trial, trial_dir: Path, hp: dict[str, Any],
                   resume_path: Path | None, seed: int) -> float:
        """Train as `world_size` ranks; rank 0 reports to the study and hands back the value."""
        threads = max(1, self.threads // self.world_size)
        spec = {"argv": config_to_argv(self.cfg), "trial_id": optuna_internals.trial_id(trial),
                "trial_number": trial.number, "hyperparameters": hp, "seed": seed,
                "resume_from": str(resume_path) if resume_path else None, "threads": threads,
                "num_workers": loader_processes(self.cfg.options.num_workers, threads)}
        spec_path = trial_dir / ranks.RANKS_DIR / "spec.json"
        atomic.write_json(spec_path, spec)
        try:
            result = ranks.run_ranks([sys.executable, "-m", RANK_MODULE, str(spec_path)],
                                     trial_dir, self.world_size,
                                     spawn.child_environ(os.environ, self.cfg),
                                     should_stop=lambda: self.stop.requested)
        except StopRequested:
            finish_stopped_ranks(trial, trial_dir, rank_title(trial.number, hp, self.world_size))
            raise
        if result["status"] == "pruned":
            raise optuna.TrialPruned(result["message"])
        return float(result["value"])

    def _resume_source(self, trial: optuna.Trial, trial_dir: Path,
                       resumed_from: int | None) -> Path | None:
        """For a rerun of an interrupted trial: the last.pth, best model and reported curve of
        the latest trial of its line that saved a last.pth (a rerun that was interrupted before
        its first epoch saved none; the trial it continued did)."""
        if resumed_from is None:
            return None
        trials = trial.study.get_trials(deepcopy=False)
        source = int(resumed_from)
        while not self._last(source).exists():
            if trials[source].user_attrs.get("resumed_from") is None:
                logger.info("Trial %d reruns trial %d from scratch (no %s was saved)",
                            trial.number, resumed_from, RESUME_CHECKPOINT)
                return None
            source = int(trials[source].user_attrs["resumed_from"])
        # Checked before its curve and best model are taken over: one that cannot be loaded
        # safely (read_last warns why) leaves a rerun from scratch with nothing of the old run.
        if read_last(self._last(source), lazy=True) is None:
            return None
        for step, value in sorted(trials[source].intermediate_values.items()):
            trial.report(value, step)
        best = self._last(source).with_name("best_model.pth")
        if best.exists():
            shutil.copy2(best, trial_dir / "best_model.pth")
        logger.info("Trial %d continues trial %d from %s", trial.number, source,
                    self._last(source))
        return self._last(source)

    def _last(self, number: int) -> Path:
        return layout.trial_dir(self.cfg.checkpoint_dir, number) / RESUME_CHECKPOINT
