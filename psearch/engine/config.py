"""The search's command-line flags and the frozen configuration built from them.

Shared by the worker (`engine/worker.py`) and the launcher (`engine/launcher.py`); imports neither
torch nor optuna, so the launcher stays light.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from psearch.engine import layout, paths
from psearch.engine.errors import UsageError
from psearch.engine.layout import STUDY_DB_NAME, default_storage_url
from psearch.writer_id.names import DEFAULT_TRIAL_VALUE, MODEL_CHOICES, TRIAL_VALUES

DEFAULT_STUDY_NAME = "writer_id_search"
PRUNER_CHOICES = ("median", "asha", "hyperband", "none")
# Below this, a heartbeat delayed by a busy database could make a live trial look dead.
MIN_HEARTBEAT_GRACE_S = 5
# `--storage env:NAME` reads the URL from the environment; the launcher hands the URL to its
# workers this way (a password in a URL must never be on a command line: `ps` shows those).
STORAGE_ENV_PREFIX = "env:"
CHILD_STORAGE_VAR = "PARALLEL_SEARCH_STORAGE"


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search run needs, resolved once from the command line."""

    data_root: str | None
    checkpoint_dir: str
    n_trials: int
    use_all_writers: bool = False
    num_writers_subset: int | None = None
    epochs: int = 70
    patience: int = 15
    batch_size: int = 16
    img_height: int = 160
    img_width: int = 1760
    models: tuple[str, ...] = ("convnext", "vit")
    seed: int = 42
    no_pretrained: bool = False
    num_workers: int = 4
    max_val_pages_per_writer: int = 20
    lines_per_writer: int = 300
    storage: str | None = None
    study_name: str = DEFAULT_STUDY_NAME
    objective: str | None = None
    direction: str = "maximize"
    cache_dir: str | None = None
    heartbeat_grace: int = 90
    trial_timeout: float | None = None
    keep_last: bool = False
    pruner: str = "median"
    gpus_per_trial: int = 1
    trial_value: str = DEFAULT_TRIAL_VALUE
    confirm_top: int = 0
    confirm_seeds: int = 0

    @property
    def storage_url(self) -> str:
        """The study's storage URL: `--storage`, else SQLite inside the checkpoint folder."""
        return self.storage or default_storage_url(self.checkpoint_dir)

    @property
    def image_cache_dir(self) -> Path:
        """Where preprocessed pixels are cached (keyed by data and image size inside)."""
        return Path(self.cache_dir) if self.cache_dir else layout.cache_dir(self.checkpoint_dir)

    @property
    def builtin_objective(self) -> bool:
        """True when trials train the writer-identification models of this project."""
        return self.objective is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists), safe to write: the storage's password hidden."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["storage"] = redact_url(self.storage) if self.storage else None
        return d


def redact_url(url: str) -> str:
    """The URL with its password hidden: postgresql://user:***@host:5432/db (pure).

    The one rule for every place that shows a storage URL: banner, logs, report, errors, files.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, question, query = rest.partition("?")
    userinfo, at, host_and_path = head.rpartition("@")
    if at and ":" in userinfo:
        head = f"{userinfo.split(':', 1)[0]}:***@{host_and_path}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", query)
    return f"{scheme}{sep}{head}{question}{query}"


def url_secrets(url: str) -> list[str]:
    """The passwords written in a URL, as typed: after 'user:' and in 'password=' (pure)."""
    found = []
    scheme, sep, rest = url.partition("://")
    head, _, query = rest.partition("?")
    userinfo, at, _ = head.rpartition("@")
    if sep and at and ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    found += re.findall(r"(?i)(?:^|&)password=([^&]*)", query)
    return [secret for secret in found if secret]


def without_password(url: str) -> str:
    """The URL with no password at all, for commands to copy (libpq then reads ~/.pgpass or
    PGPASSWORD) (pure)."""
    bare = redact_url(url).replace(":***@", "@", 1)
    return re.sub(r"(?i)([?&])password=\*\*\*(&|$)", lambda m: m.group(1) if m.group(2) else "",
                  bare).rstrip("?&")


def resolve_storage(spec: str | None, environ: Mapping[str, str]) -> str | None:
    """`--storage` as given: a URL, or env:NAME naming the environment variable that holds one."""
    if spec is None or not spec.startswith(STORAGE_ENV_PREFIX):
        return spec
    name = spec[len(STORAGE_ENV_PREFIX):]
    url = environ.get(name, "").strip() if name else ""
    _check(bool(url), f"--storage {spec}: the environment variable {name or '(none)'} is not set;"
           f" export {name or 'NAME'}=postgresql://USER@HOST:PORT/DB first")
    return url


def add_search_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags shared by the worker and the launcher; every help states its default."""
    d = SearchConfig(data_root=None, checkpoint_dir="", n_trials=0)
    a = parser.add_argument
    a("--data_root", help="data set root holding train/ val/ [test/] writer folders, or writer "
      "folders directly (then split deterministically by page). Required unless --objective "
      "(default: none)")
    a("--checkpoint_dir", required=True, help="folder for the study, logs, trial folders and summary "
      "(required)")
    a("--n_trials", type=int, required=True, help="total finished (complete + pruned) trials the "
      "study should hold; rerunning with a larger number runs the difference (required)")
    a("--use_all_writers", action="store_true", help="use every writer (this is the default; the "
      "flag is accepted for old scripts and conflicts with --num_writers_subset)")
    a("--num_writers_subset", type=int, default=None, help="use only the first K writers in sorted "
      "order (default: all writers)")
    a("--epochs", type=int, default=d.epochs, help=f"maximum epochs per trial (default: {d.epochs})")
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
      f"{','.join(MODEL_CHOICES)} (default: {','.join(d.models)})")
    a("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    a("--no_pretrained", action="store_true", help="start ConvNeXt/ViT from random weights instead "
      "of ImageNet weights (default: pretrained)")
    a("--num_workers", type=int, default=d.num_workers, help="data-loader processes per worker "
      f"(default: {d.num_workers}; the launcher caps it to the cores each worker gets)")
    a("--max_val_pages_per_writer", type=int, default=d.max_val_pages_per_writer, help="validation "
      f"pages per writer, a fixed deterministic subset (default: {d.max_val_pages_per_writer})")
    a("--lines_per_writer", type=int, default=d.lines_per_writer, help="training lines drawn per "
      f"writer each epoch (default: {d.lines_per_writer})")
    a("--storage", default=None, help="Optuna storage URL, or env:NAME to read it from the "
      "environment variable NAME (keeps a password off the command line) (default: "
      f"sqlite:///CHECKPOINT_DIR/{STUDY_DB_NAME})")
    a("--study_name", default=d.study_name, help=f"study name (default: {d.study_name})")
    a("--objective", default=None, help="custom objective path/to/file.py:NAME or package.module:NAME,"
      " called as NAME(trial, trial_dir) -> float (default: the built-in writer-identification "
      "objective)")
    a("--direction", default=d.direction, choices=("maximize", "minimize"),
      help=f"optimisation direction (default: {d.direction})")
    a("--cache_dir", default=None, help="folder for the preprocessed-image cache (default: "
      "CHECKPOINT_DIR/cache)")
    a("--heartbeat_grace", type=int, default=d.heartbeat_grace, help="seconds without a heartbeat "
      "after which a trial of another host counts as dead and runs again; the same for every "
      "launcher of a study (default: %d)" % d.heartbeat_grace)
    a("--pruner", default=d.pruner, choices=PRUNER_CHOICES, help="how unpromising trials are "
      "stopped early: Optuna's MedianPruner, SuccessiveHalvingPruner (asha), HyperbandPruner, or "
      f"none (default: {d.pruner})")
    a("--gpus_per_trial", type=int, default=d.gpus_per_trial, help="devices one trial trains on "
      "with DistributedDataParallel, one process per device: the launcher gives each worker K "
      "GPUs (K CPU processes with --cpu_workers); the batch size stays per device "
      f"(default: {d.gpus_per_trial})")
    a("--confirm_top", type=int, default=d.confirm_top, help="once --n_trials have finished, "
      "run the K best hyperparameter sets again with other seeds (--confirm_seeds) and choose by "
      "the mean over each set's runs; raising it on a rerun runs only the difference "
      f"(default: {d.confirm_top}, no confirmation)")
    a("--confirm_seeds", type=int, default=None, help="how many more seeds each "
      "confirmed set runs with (default: 2 when --confirm_top is given, else 0)")
    a("--trial_timeout", type=float, default=None, help="seconds a trial may run; a trial past it "
      "fails with reason 'timeout', its processes are killed and the worker starts the next trial "
      "(default: no limit)")
    a("--keep_last", action="store_true", help="keep each finished trial's last.pth (the resume "
      "checkpoint, as big as the model and its optimizer state) (default: removed once the trial "
      "has finished; best_model.pth is always kept)")


_OBJECTIVE_RE = re.compile(r"^(?:.+\.py|[A-Za-z_][\w.]*):[A-Za-z_]\w*$")


def config_from_args(ns: argparse.Namespace,
                     environ: Mapping[str, str] | None = None) -> SearchConfig:
    """Validate parsed flags and build the frozen config; raise UsageError naming the bad value.
    `environ` (default: this process's) resolves `--storage env:NAME`."""
    models = tuple(m.strip() for m in str(ns.models).split(",") if m.strip())
    _check(bool(models), f"--models {ns.models!r} names no model; use a comma list of "
           f"{','.join(MODEL_CHOICES)}")
    for m in models:
        _check(m in MODEL_CHOICES, f"--models: unknown model {m!r}; choose from "
               f"{','.join(MODEL_CHOICES)}")
    _check(ns.n_trials >= 1, f"--n_trials must be at least 1, got {ns.n_trials}")
    for flag in ("epochs", "batch_size", "img_height", "img_width", "max_val_pages_per_writer",
                 "lines_per_writer"):
        value = getattr(ns, flag)
        _check(value >= 1, f"--{flag} must be at least 1, got {value}")
    _check(ns.patience >= 1, f"--patience must be at least 1, got {ns.patience}")
    _check(ns.num_workers >= 0, f"--num_workers must be 0 or more, got {ns.num_workers}")
    _check(ns.img_height >= 16 and ns.img_width >= 16,
           f"--img_height/--img_width must be at least 16 pixels, got {ns.img_height}x{ns.img_width}")
    if ns.num_writers_subset is not None:
        _check(not ns.use_all_writers, "--use_all_writers conflicts with --num_writers_subset "
               f"{ns.num_writers_subset}; pass one of them")
        _check(ns.num_writers_subset >= 2, "--num_writers_subset must be at least 2 (writer "
               f"identification needs two writers), got {ns.num_writers_subset}")
    if ns.objective is not None:
        _check(bool(_OBJECTIVE_RE.match(ns.objective)), f"--objective {ns.objective!r} is not of "
               "the form path/to/file.py:NAME or package.module:NAME")
        if ns.objective.split(":")[0].endswith(".py"):
            path = ns.objective.rsplit(":", 1)[0]
            _check(os.path.isfile(path), f"--objective: file {path!r} does not exist")
    else:
        _check(ns.data_root is not None, "--data_root is required with the built-in objective "
               "(or pass --objective FILE.py:NAME)")
    if ns.data_root is not None and ns.objective is None:
        _check(os.path.isdir(ns.data_root), f"--data_root {ns.data_root!r} is not a folder")
    _check(str(ns.study_name).strip() != "", "--study_name must not be empty")
    checkpoint_dir = paths.check_output_dir("--checkpoint_dir", ns.checkpoint_dir)
    cache_dir = paths.check_output_dir("--cache_dir", ns.cache_dir) if ns.cache_dir else None
    _check(ns.heartbeat_grace >= MIN_HEARTBEAT_GRACE_S, "--heartbeat_grace must be at least "
           f"{MIN_HEARTBEAT_GRACE_S} seconds, got {ns.heartbeat_grace}")
    _check(ns.gpus_per_trial >= 1, f"--gpus_per_trial must be at least 1, got {ns.gpus_per_trial}")
    confirm_top, confirm_seeds = confirmation(ns.confirm_top, ns.confirm_seeds)
    if ns.trial_timeout is not None:
        _check(ns.trial_timeout > 0, f"--trial_timeout must be more than 0 seconds, got "
               f"{ns.trial_timeout:g}")
    return SearchConfig(
        data_root=str(Path(ns.data_root).resolve()) if ns.data_root else None,
        checkpoint_dir=str(checkpoint_dir),
        n_trials=ns.n_trials, use_all_writers=bool(ns.use_all_writers),
        num_writers_subset=ns.num_writers_subset, epochs=ns.epochs, patience=ns.patience,
        batch_size=ns.batch_size, img_height=ns.img_height, img_width=ns.img_width, models=models,
        seed=ns.seed, no_pretrained=bool(ns.no_pretrained), num_workers=ns.num_workers,
        max_val_pages_per_writer=ns.max_val_pages_per_writer,
        lines_per_writer=ns.lines_per_writer,
        storage=resolve_storage(ns.storage, os.environ if environ is None else environ),
        study_name=ns.study_name,
        objective=absolute_objective(ns.objective), direction=ns.direction,
        cache_dir=str(cache_dir) if cache_dir else None,
        heartbeat_grace=ns.heartbeat_grace, trial_timeout=ns.trial_timeout,
        keep_last=bool(ns.keep_last), pruner=ns.pruner, gpus_per_trial=ns.gpus_per_trial,
        trial_value=ns.trial_value, confirm_top=confirm_top, confirm_seeds=confirm_seeds)


DEFAULT_CONFIRM_SEEDS = 2


def confirmation(top: int, seeds: int | None) -> tuple[int, int]:
    """(--confirm_top, --confirm_seeds) checked: (0, 0) when off; the seeds default to
    DEFAULT_CONFIRM_SEEDS when only --confirm_top is given (pure but for the error)."""
    _check(top >= 0, f"--confirm_top must be 0 or more, got {top}")
    if top == 0:
        _check(not seeds, f"--confirm_seeds {seeds} needs --confirm_top K (how many of the best "
               "sets to run again); add --confirm_top 3, say")
        return 0, 0
    seeds = DEFAULT_CONFIRM_SEEDS if seeds is None else seeds
    _check(seeds >= 1, f"--confirm_seeds must be at least 1 with --confirm_top {top}, got {seeds}")
    return top, seeds


def absolute_objective(spec: str | None) -> str | None:
    """`path/to/file.py:NAME` with the file's absolute path, so the same file named from another
    folder, or relatively and absolutely, is the same objective; a module spec as it is."""
    if spec is None or not spec.rsplit(":", 1)[0].endswith(".py"):
        return spec
    target, name = spec.rsplit(":", 1)
    return f"{Path(target).resolve()}:{name}"


def config_to_argv(cfg: SearchConfig) -> list[str]:
    """The flags that rebuild `cfg` in a worker process (inverse of config_from_args, given the
    environment of `child_env`): the storage URL travels in the environment, not on the command
    line."""
    argv = ["--checkpoint_dir", cfg.checkpoint_dir, "--n_trials", str(cfg.n_trials)]
    if cfg.data_root is not None:
        argv += ["--data_root", cfg.data_root]
    if cfg.use_all_writers:
        argv.append("--use_all_writers")
    if cfg.num_writers_subset is not None:
        argv += ["--num_writers_subset", str(cfg.num_writers_subset)]
    for flag in ("epochs", "patience", "batch_size", "img_height", "img_width", "seed",
                 "num_workers", "max_val_pages_per_writer", "lines_per_writer", "study_name",
                 "direction", "heartbeat_grace", "pruner", "gpus_per_trial", "trial_value",
                 "confirm_top", "confirm_seeds"):
        argv += [f"--{flag}", str(getattr(cfg, flag))]
    argv += ["--models", ",".join(cfg.models)]
    if cfg.no_pretrained:
        argv.append("--no_pretrained")
    if cfg.keep_last:
        argv.append("--keep_last")
    if cfg.trial_timeout is not None:
        argv += ["--trial_timeout", repr(cfg.trial_timeout)]
    argv += storage_argv(cfg)
    for flag in ("objective", "cache_dir"):
        if getattr(cfg, flag) is not None:
            argv += [f"--{flag}", str(getattr(cfg, flag))]
    return argv


def storage_argv(cfg: SearchConfig) -> list[str]:
    """`--storage` for a child process: a pointer to `child_env`, never the URL itself (pure)."""
    return ["--storage", STORAGE_ENV_PREFIX + CHILD_STORAGE_VAR] if cfg.storage is not None else []


def child_env(cfg: SearchConfig) -> dict[str, str]:
    """What a child process started with `config_to_argv(cfg)` needs in its environment: the
    storage URL (an environment is readable only by its user, a command line by everyone)."""
    return {CHILD_STORAGE_VAR: cfg.storage} if cfg.storage is not None else {}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)
