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
from typing import TYPE_CHECKING, Any, Mapping

from psearch.engine import layout, objectives
from psearch.engine.errors import UsageError
from psearch.engine.layout import STUDY_DB_NAME, default_storage_url
from psearch.engine.objectives import ObjectiveKind
from psearch.engine.urls import STORAGE_ENV_PREFIX, redact_url, resolve_storage

if TYPE_CHECKING:  # loads optuna: the launcher loads it only once it runs single-threaded
    from psearch.engine.space import Space

# The name studies have had from the start (whatever their objective): a rerun must find them.
DEFAULT_STUDY_NAME = "writer_id_search"
PRUNER_CHOICES = ("median", "asha", "hyperband", "none")
# Below this, a heartbeat delayed by a busy database could make a live trial look dead.
MIN_HEARTBEAT_GRACE_S = 5
# The environment variable in which the launcher hands the storage URL to its workers (a
# password in a URL must never be on a command line: `ps` shows those).
CHILD_STORAGE_VAR = "PARALLEL_SEARCH_STORAGE"


@dataclass(frozen=True)
class SearchConfig:
    """Everything a search run needs, resolved once from the command line: the engine's settings,
    and the objective's own (`options`, built by its kind from its flags)."""

    checkpoint_dir: str
    n_trials: int
    epochs: int = 70
    seed: int = 42
    storage: str | None = None
    study_name: str = DEFAULT_STUDY_NAME
    objective: str | None = None
    direction: str = "maximize"
    heartbeat_grace: int = 90
    trial_timeout: float | None = None
    keep_last: bool = False
    pruner: str = "median"
    gpus_per_trial: int = 1
    confirm_top: int = 0
    confirm_seeds: int = 0
    space_file: str | None = None
    enqueue_file: str | None = None
    warm_start: str | None = None
    warm_start_study: str | None = None
    enqueue: tuple = ()  # --enqueue's parameter sets, checked against the space
    options: Any = None  # the objective's own settings (a frozen dataclass of its kind)
    space: "Space | None" = None  # the space in force (space_in_force)
    # What runs the trials: the entry point's default kind, or --objective's.
    kind: "ObjectiveKind | None" = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def storage_url(self) -> str:
        """The study's storage URL: `--storage`, else SQLite inside the checkpoint folder."""
        return self.storage or default_storage_url(self.checkpoint_dir)

    @property
    def objective_kind(self) -> ObjectiveKind:
        """The kind of objective the trials run (a bare config with --objective: that file)."""
        if self.kind is not None:
            return self.kind
        if self.objective is None:
            raise UsageError("no objective: pass --objective path/to/file.py:NAME")
        return objectives.PythonFunction(self.objective)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists), safe to write: the storage's password hidden;
        the objective's own settings beside the engine's."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("options", "kind", "space", "enqueue")}
        if dataclasses.is_dataclass(self.options):
            d.update(dataclasses.asdict(self.options))
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["storage"] = redact_url(self.storage) if self.storage else None
        d["space"] = self.space.to_data() if self.space is not None else None
        return d


def add_search_args(parser: argparse.ArgumentParser, kind: ObjectiveKind | None = None) -> None:
    """Add the engine's flags shared by the worker and the launcher, then the objective kind's
    own; every help states its default."""
    d = SearchConfig(checkpoint_dir="", n_trials=0)
    a = parser.add_argument
    a("--checkpoint_dir", help="folder for the study, logs, trial folders and summary "
      "(required)")
    a("--n_trials", type=int, help="total finished (complete + pruned) trials the "
      "study should hold; rerunning with a larger number runs the difference (required)")
    a("--epochs", type=int, default=d.epochs, help="maximum epochs (reported steps) per trial; "
      f"the pruners' scale (default: {d.epochs})")
    a("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    a("--space", default=None, dest="space_file", metavar="FILE.yaml", help="the search space: "
      "a YAML file of parameters (see --show_space for the format and the default) (default: "
      "the objective's own)")
    a("--enqueue", default=None, dest="enqueue_file", metavar="FILE.yaml", help="known "
      "parameter sets to run first, a YAML list such as '- {lr: 1.0e-4}' (a partial set samples "
      "the rest); enqueued once per study, counted in --n_trials (default: none)")
    a("--warm_start", default=None, metavar="SOURCE", help="add the COMPLETE trials of an "
      "earlier study (its checkpoint folder, or a storage URL with --warm_start_study) that fit "
      "the space as finished trials the sampler learns from; they are not counted in "
      "--n_trials, never rerun, never best_overall (default: none)")
    a("--warm_start_study", default=None, metavar="NAME", help="the study to warm start from in "
      "--warm_start's storage (default: its only study)")
    a("--storage", default=None, help="Optuna storage URL, or env:NAME to read it from the "
      "environment variable NAME (keeps a password off the command line) (default: "
      f"sqlite:///CHECKPOINT_DIR/{STUDY_DB_NAME})")
    a("--study_name", default=d.study_name, help=f"study name (default: {d.study_name})")
    a("--objective", default=None, help="custom objective path/to/file.py:NAME or package.module:NAME,"
      " called as NAME(trial, trial_dir) -> float (default: "
      f"{kind.description if kind is not None else 'none, required'})")
    a("--direction", default=d.direction, choices=("maximize", "minimize"),
      help=f"optimisation direction (default: {d.direction})")
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
    a("--keep_last", action="store_true", help="keep each finished trial's resume checkpoint "
      "(last.pth for the built-in objective: as big as the model and its optimizer state) "
      "(default: removed once the trial has finished; best_model.pth is always kept)")
    from psearch.engine import program

    program.add_args(parser)
    if kind is not None:
        kind.add_args(parser)


_OBJECTIVE_RE = re.compile(r"^(?:.+\.py|[A-Za-z_][\w.]*):[A-Za-z_]\w*$")


def config_from_args(ns: argparse.Namespace, kind: ObjectiveKind | None = None,
                     environ: Mapping[str, str] | None = None) -> SearchConfig:
    """Validate parsed flags and build the frozen config; raise UsageError naming the bad value.
    `kind`: the objective the flags chose (objectives.choose); its own flags become `options`.
    `environ` (default: this process's) resolves `--storage env:NAME`."""
    missing = [flag for flag in ("checkpoint_dir", "n_trials") if getattr(ns, flag) is None]
    _check(not missing, f"the following arguments are required: "
           f"{', '.join('--' + flag for flag in missing)}")
    _check(ns.n_trials >= 1, f"--n_trials must be at least 1, got {ns.n_trials}")
    _check(ns.epochs >= 1, f"--epochs must be at least 1, got {ns.epochs}")
    if ns.objective is not None:
        _check(bool(_OBJECTIVE_RE.match(ns.objective)), f"--objective {ns.objective!r} is not of "
               "the form path/to/file.py:NAME or package.module:NAME")
        if ns.objective.split(":")[0].endswith(".py"):
            path = ns.objective.rsplit(":", 1)[0]
            _check(os.path.isfile(path), f"--objective: file {path!r} does not exist")
    kind = kind if kind is not None else objectives.choose(ns, None)
    options = kind.options(ns)
    space = space_in_force(kind, options, ns.space_file)
    enqueue_file = _existing_file("--enqueue", ns.enqueue_file)
    _check(str(ns.study_name).strip() != "", "--study_name must not be empty")
    checkpoint_dir = layout.check_output_dir("--checkpoint_dir", ns.checkpoint_dir)
    _check(ns.heartbeat_grace >= MIN_HEARTBEAT_GRACE_S, "--heartbeat_grace must be at least "
           f"{MIN_HEARTBEAT_GRACE_S} seconds, got {ns.heartbeat_grace}")
    _check(ns.gpus_per_trial >= 1, f"--gpus_per_trial must be at least 1, got {ns.gpus_per_trial}")
    confirm_top, confirm_seeds = confirmation(ns.confirm_top, ns.confirm_seeds)
    if ns.trial_timeout is not None:
        _check(ns.trial_timeout > 0, f"--trial_timeout must be more than 0 seconds, got "
               f"{ns.trial_timeout:g}")
    _check(ns.warm_start_study is None or ns.warm_start is not None, "--warm_start_study "
           f"{ns.warm_start_study} needs --warm_start SOURCE (the folder or storage URL)")
    return SearchConfig(
        checkpoint_dir=str(checkpoint_dir), n_trials=ns.n_trials, epochs=ns.epochs, seed=ns.seed,
        storage=resolve_storage(ns.storage, os.environ if environ is None else environ),
        study_name=ns.study_name,
        objective=absolute_objective(ns.objective), direction=ns.direction,
        heartbeat_grace=ns.heartbeat_grace, trial_timeout=ns.trial_timeout,
        keep_last=bool(ns.keep_last), pruner=ns.pruner, gpus_per_trial=ns.gpus_per_trial,
        confirm_top=confirm_top, confirm_seeds=confirm_seeds,
        space_file=_existing_file("--space", ns.space_file), space=space,
        enqueue_file=enqueue_file, enqueue=enqueued_sets(enqueue_file, space),
        warm_start=_warm_source(ns.warm_start), warm_start_study=ns.warm_start_study,
        options=options, kind=kind)


def space_in_force(kind: ObjectiveKind, options: Any, space_file: str | None) -> Space | None:
    """The space trials suggest from: --space's file (checked against the parameters the
    objective takes, completed as it runs it), else the objective's default (UsageError naming
    the file, the parameter and the fix)."""
    from psearch.engine import space as space_lib

    if space_file is None:
        return kind.default_space(options)
    _existing_file("--space", space_file)
    return kind.complete_space(space_lib.load(space_file, known=kind.parameters,
                                              implicit=kind.implicit_parameters), options)


def enqueued_sets(path: str | None, space: Space | None) -> tuple[dict[str, Any], ...]:
    """--enqueue's parameter sets (`path`: a file `_existing_file` checked), each checked
    against the space (with none: as given)."""
    if path is None:
        return ()
    from psearch.engine import space as space_lib

    return tuple(space_lib.load_sets(path, space))


def _existing_file(flag: str, path: str | None) -> str | None:
    """An input file's absolute path, or UsageError when it is not a readable file."""
    if path is None:
        return None
    _check(os.path.isfile(path), f"{flag} {path!r}: no such file; give the path of a YAML file")
    _check(os.access(path, os.R_OK), f"{flag} {path!r}: the file cannot be read (permissions)")
    return str(Path(path).resolve())


def _warm_source(source: str | None) -> str | None:
    """--warm_start as given: a storage URL as it is, a folder made absolute."""
    if source is None or "://" in source:
        return source
    _check(os.path.isdir(source), f"--warm_start {source!r} is neither a checkpoint folder nor a "
           "storage URL (sqlite:///…, postgresql://…)")
    return str(Path(source).resolve())


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
    for flag in ("epochs", "seed", "study_name", "direction", "heartbeat_grace", "pruner",
                 "gpus_per_trial", "confirm_top", "confirm_seeds"):
        argv += [f"--{flag}", str(getattr(cfg, flag))]
    if cfg.keep_last:
        argv.append("--keep_last")
    if cfg.trial_timeout is not None:
        argv += ["--trial_timeout", repr(cfg.trial_timeout)]
    argv += storage_argv(cfg)
    for flag, value in (("objective", cfg.objective), ("space", cfg.space_file),
                        ("enqueue", cfg.enqueue_file), ("warm_start", cfg.warm_start),
                        ("warm_start_study", cfg.warm_start_study)):
        if value is not None:
            argv += [f"--{flag}", value]
    if cfg.kind is not None:
        argv += cfg.kind.options_argv(cfg.options)
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
