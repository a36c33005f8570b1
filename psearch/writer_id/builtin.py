"""The built-in writer-identification objective as the engine sees it (engine/objectives.py): its
flags, the settings that define its trial value, its checks and preparation, its default search
space (`default_space.yaml`, the one place it is defined), and the commands that run the engine
with it as their default (`python -m psearch.writer_id.builtin` is a worker).

Adding a hyperparameter or a flag to the built-in objective is a change in this folder only.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from psearch.engine import layout, objectives, spawn
from psearch.engine.errors import UsageError
from psearch.writer_id.names import (DEFAULT_TRIAL_VALUE, LEGACY_TRIAL_VALUE, MODEL_CHOICES,
                                     PARAMETERS, RESUME_CHECKPOINT, TRIAL_VALUES)

if TYPE_CHECKING:  # the space loads optuna: the launcher loads it once it runs single-threaded
    from psearch.engine.config import SearchConfig
    from psearch.engine.space import Space
    from psearch.engine.stopping import StopFlag

NAME = "builtin:writer_identification"  # how stored settings name it (since the first version)
DEFAULT_SPACE_FILE = Path(__file__).with_name("default_space.yaml")
SYNTHETIC_MODULE = "psearch.writer_id.synthetic"
# Writers of one shared script in fairly similar hands: hard enough that trials differ (with
# distinct alphabets every trial reaches page top-1 = 1 and the search has nothing to show).
DEMO_SIMILARITY = 0.75
# 12 writers x 24 pages of 4 lines: 4 validation pages per writer, 48 retrieval queries, so that
# the demo's figures move in steps well below the differences between its trials (with 2 pages
# per writer, page top-1 moved in steps of 1/16 and a lucky epoch decided the search).
DEMO_DATA = ("--writers", "12", "--pages-per-writer", "24", "--lines-per-page", "4")
# One worker's memory: torch, a model, the data loaders, the cache's pages.
WORKER_MEMORY = 1 << 30


@dataclass(frozen=True)
class WriterOptions:
    """The built-in objective's own settings (its flags), resolved once."""

    data_root: str | None = None
    use_all_writers: bool = False
    num_writers_subset: int | None = None
    patience: int = 15
    batch_size: int = 16
    img_height: int = 160
    img_width: int = 1760
    models: tuple[str, ...] = ("convnext", "vit")
    no_pretrained: bool = False
    num_workers: int = 4
    max_val_pages_per_writer: int = 20
    lines_per_writer: int = 300
    cache_dir: str | None = None
    trial_value: str = DEFAULT_TRIAL_VALUE


def image_cache_dir(cfg: SearchConfig) -> Path:
    """Where preprocessed pixels are cached (keyed by data and image size inside)."""
    cache_dir = cfg.options.cache_dir
    return Path(cache_dir) if cache_dir else layout.cache_dir(cfg.checkpoint_dir)


def add_args(parser: argparse.ArgumentParser) -> None:
    """The built-in objective's flags; every help states its default."""
    d = WriterOptions()
    a = parser.add_argument
    a("--data_root", help="data set root holding train/ val/ [test/] writer folders, or writer "
      "folders directly (then split deterministically by page). Required unless --objective "
      "(default: none)")
    a("--use_all_writers", action="store_true", help="use every writer (this is the default; the "
      "flag is accepted for old scripts and conflicts with --num_writers_subset)")
    a("--num_writers_subset", type=int, default=None, help="use only the first K writers in sorted "
      "order (default: all writers)")
    a("--patience", type=int, default=d.patience, help="early-stopping patience in epochs without a "
      f"better trial value score (see --trial_value) (default: {d.patience})")
    a("--trial_value", default=d.trial_value, choices=TRIAL_VALUES, help="how a trial's value is "
      "read off its validation curve (also what is reported for pruning, what early stopping "
      "waits for, and which epoch's weights become best_model.pth): map_smooth3 is the best mean "
      "page mAP over 3 consecutive epochs, *_best the single best epoch, map_last3 the last 3 "
      "epochs; a study made before this flag existed used top1_best "
      f"(default: {d.trial_value})")
    a("--batch_size", type=int, default=d.batch_size, help=f"batch size (default: {d.batch_size})")
    a("--img_height", type=int, default=d.img_height, help="line image height after resizing "
      f"(default: {d.img_height})")
    a("--img_width", type=int, default=d.img_width, help="line image width after padding/cropping "
      f"(default: {d.img_width})")
    a("--models", default=",".join(d.models), help="comma list of model types to search over, from "
      f"{','.join(MODEL_CHOICES)}, when the search space does not set model_type "
      f"(default: {','.join(d.models)})")
    a("--no_pretrained", action="store_true", help="start ConvNeXt/ViT from random weights instead "
      "of ImageNet weights (then freeze is not searched) (default: pretrained)")
    a("--num_workers", type=int, default=d.num_workers, help="data-loader processes per worker "
      f"(default: {d.num_workers}; the launcher caps it to the cores each worker gets)")
    a("--max_val_pages_per_writer", type=int, default=d.max_val_pages_per_writer, help="validation "
      f"pages per writer, a fixed deterministic subset (default: {d.max_val_pages_per_writer})")
    a("--lines_per_writer", type=int, default=d.lines_per_writer, help="training lines drawn per "
      f"writer each epoch (default: {d.lines_per_writer})")
    a("--cache_dir", default=None, help="folder for the preprocessed-image cache (default: "
      "CHECKPOINT_DIR/cache)")


def parse_models(spec: str) -> tuple[str, ...]:
    """--models as a tuple, checked (UsageError naming an unknown model)."""
    models = tuple(m.strip() for m in str(spec).split(",") if m.strip())
    _check(bool(models), f"--models {spec!r} names no model; use a comma list of "
           f"{','.join(MODEL_CHOICES)}")
    for m in models:
        _check(m in MODEL_CHOICES, f"--models: unknown model {m!r}; choose from "
               f"{','.join(MODEL_CHOICES)}")
    return models


def options_from_args(ns: argparse.Namespace) -> WriterOptions:
    """Check the built-in objective's flags (UsageError naming the bad value)."""
    models = parse_models(ns.models)
    for flag in ("batch_size", "img_height", "img_width", "max_val_pages_per_writer",
                 "lines_per_writer", "patience"):
        value = getattr(ns, flag)
        _check(value >= 1, f"--{flag} must be at least 1, got {value}")
    _check(ns.num_workers >= 0, f"--num_workers must be 0 or more, got {ns.num_workers}")
    _check(ns.img_height >= 16 and ns.img_width >= 16,
           f"--img_height/--img_width must be at least 16 pixels, got {ns.img_height}x{ns.img_width}")
    if ns.num_writers_subset is not None:
        _check(not ns.use_all_writers, "--use_all_writers conflicts with --num_writers_subset "
               f"{ns.num_writers_subset}; pass one of them")
        _check(ns.num_writers_subset >= 2, "--num_writers_subset must be at least 2 (writer "
               f"identification needs two writers), got {ns.num_writers_subset}")
    _check(ns.data_root is not None, "--data_root is required with the built-in objective "
           "(or pass --objective FILE.py:NAME)")
    _check(os.path.isdir(ns.data_root), f"--data_root {ns.data_root!r} is not a folder")
    cache_dir = layout.check_output_dir("--cache_dir", ns.cache_dir) if ns.cache_dir else None
    return WriterOptions(
        data_root=str(Path(ns.data_root).resolve()), use_all_writers=bool(ns.use_all_writers),
        num_writers_subset=ns.num_writers_subset, patience=ns.patience,
        batch_size=ns.batch_size, img_height=ns.img_height, img_width=ns.img_width,
        models=models, no_pretrained=bool(ns.no_pretrained), num_workers=ns.num_workers,
        max_val_pages_per_writer=ns.max_val_pages_per_writer,
        lines_per_writer=ns.lines_per_writer, cache_dir=str(cache_dir) if cache_dir else None,
        trial_value=ns.trial_value)


def options_argv(o: WriterOptions) -> list[str]:
    """The flags that rebuild `o` in a worker (pure)."""
    argv = ["--data_root", str(o.data_root), "--models", ",".join(o.models)]
    for flag in ("patience", "batch_size", "img_height", "img_width", "num_workers",
                 "max_val_pages_per_writer", "lines_per_writer", "trial_value"):
        argv += [f"--{flag}", str(getattr(o, flag))]
    for flag in ("use_all_writers", "no_pretrained"):
        if getattr(o, flag):
            argv.append(f"--{flag}")
    if o.num_writers_subset is not None:
        argv += ["--num_writers_subset", str(o.num_writers_subset)]
    if o.cache_dir is not None:
        argv += ["--cache_dir", o.cache_dir]
    return argv


def with_models(space: Space, o: WriterOptions) -> Space:
    """The space as trials run it: `model_type` from --models when the file does not set it, and
    no `freeze` without pretrained weights (nothing to freeze)."""
    if "model_type" not in space.names:
        space = space.with_first("model_type", {"type": "categorical", "choices": list(o.models)}
                                 if len(o.models) > 1 else o.models[0])
    return space.without("freeze") if o.no_pretrained else space


def space_models(space: Space, o: WriterOptions) -> tuple[str, ...]:
    """The model types trials of `space` can train (those whose input size and pretrained weights
    must be checked): what its model_type can take, else --models (pure)."""
    entries = dict(space.params).get("model_type", ())
    found = []
    for entry in entries:
        choices = getattr(entry.distribution, "choices", None)
        found += list(choices) if choices is not None else [entry.value]
    return tuple(dict.fromkeys(m for m in found if m in MODEL_CHOICES)) or o.models


class WriterIdentification(objectives.ObjectiveKind):
    """Trials train writer-identification models on manuscript line images (objective.py)."""

    name = NAME
    description = "built-in writer identification"
    worker_module = __name__
    worker_memory = WORKER_MEMORY
    prepare_in_helper = True  # it loads torch (pretrained weights) and builds the image cache
    parameters = frozenset(PARAMETERS)
    implicit_parameters = ("model_type",)
    resume_files = (RESUME_CHECKPOINT,)
    demo_defaults = ("--data_root", "demo_data", "--checkpoint_dir", "demo_runs", "--n_trials",
                     "6", "--models", "small", "--epochs", "8", "--img_height", "64",
                     "--img_width", "640", "--lines_per_writer", "40", "--no_pretrained")

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        add_args(parser)

    def options(self, ns: argparse.Namespace) -> WriterOptions:
        return options_from_args(ns)

    def options_argv(self, options: WriterOptions) -> list[str]:
        return options_argv(options)

    def for_worker(self, options: WriterOptions, cpu_threads: int) -> WriterOptions:
        from psearch.engine.devices import loader_processes

        return dataclasses.replace(
            options, num_workers=loader_processes(options.num_workers, cpu_threads))

    def check(self, cfg: SearchConfig) -> dict[str, Any]:
        from psearch.writer_id import objective

        o = cfg.options
        writers, data = objective.check_data(cfg)
        return {"data_root": o.data_root, "writers": list(writers), "img_height": o.img_height,
                "img_width": o.img_width, "epochs": cfg.epochs, "models": list(o.models),
                "max_val_pages_per_writer": o.max_val_pages_per_writer,
                "trial_value": o.trial_value, "data": dict(data)}

    def legacy_settings(self, cfg: SearchConfig) -> dict[str, Any]:
        return {"trial_value": LEGACY_TRIAL_VALUE}

    def prepare(self, cfg: SearchConfig) -> None:
        from psearch.writer_id import objective

        objective.build_cache(cfg)

    def space_options(self, ns: argparse.Namespace) -> WriterOptions:
        return WriterOptions(models=parse_models(ns.models), no_pretrained=bool(ns.no_pretrained))

    def default_space(self, options: WriterOptions) -> Space:
        from psearch.engine import space as space_lib

        return with_models(space_lib.load(DEFAULT_SPACE_FILE, known=self.parameters,
                                          implicit=self.implicit_parameters), options)

    def complete_space(self, space: Space, options: WriterOptions) -> Space:
        return with_models(space, options)

    def make(self, cfg: SearchConfig, stop: StopFlag, cpu_threads: int | None):
        from psearch.writer_id import objective

        return objective.WriterObjective(cfg, stop, cpu_threads=cpu_threads)

    def banner_lines(self, cfg: SearchConfig) -> list[str]:
        return [f"Data root: {cfg.options.data_root}"]

    def make_demo_data(self, ns: argparse.Namespace) -> None:
        make_demo_data(ns.data_root)


def make_demo_data(data_root: str) -> None:
    """Generate the demo's synthetic data set if it is missing."""
    if os.path.isdir(data_root):
        return
    print(f"Generating the demo data set in {data_root} ...", flush=True)
    result = subprocess.run([*spawn.module_argv(sys.executable, SYNTHETIC_MODULE),
                             "make-synthetic", data_root, *DEMO_DATA,
                             "--similarity", str(DEMO_SIMILARITY)],
                            env=spawn.child_environ(os.environ), check=False)
    if result.returncode != 0:
        raise UsageError(f"could not generate the demo data in {data_root!r} (exit code "
                         f"{result.returncode}); see the output above")


KIND = WriterIdentification()


def launcher_main(argv: Sequence[str] | None = None) -> int:
    """`parallel_search.py`: the launcher with the built-in objective as its default."""
    from psearch.engine import launcher

    return launcher.main(argv, default=KIND)


def worker_main(argv: Sequence[str] | None = None) -> int:
    """`single_gpu_hyperparameter_search.py`, and each worker the launcher starts."""
    from psearch.engine import worker

    return worker.main(argv, default=KIND)


main = worker_main  # what a forked worker runs (`python -m` this module: engine/spawn.py)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


if __name__ == "__main__":
    raise SystemExit(worker_main())
