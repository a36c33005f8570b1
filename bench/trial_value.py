"""Which definition of a trial's value (psearch/writer_id/trial_value.py) best predicts which set of
hyperparameters is really better over seeds: N sets sampled from the built-in search space, each
trained under R seeds with the real training code on synthetic similar-writer data, every epoch
measured on the validation pages (what the definitions see) and on the held-out test pages (what
they are judged by).

    python bench/trial_value.py [--sets 10] [--seeds 3] [--epochs 8] [--processes 2]
        [--json out.json]

The truth of a set is the mean over its seeds of the test page mAP of its last third of epochs: a
measurement on pages no definition sees. Simulated searches draw `--search_size` sets with one
seed run each and keep the one a definition values most; per definition the report gives how often
that is the set best by truth (`agreement`) and the set best by the definition's own mean over
seeds (`agreement_own`), what the kept run's best_model.pth scores on the test pages, the rank
correlation of single-seed values with the truth, and the spread of values over seeds and over
sets. A seed varies what a confirmation run varies (initial weights, sampling order, mixup,
dropout; `objective.py`), and each run trains to the last epoch, without pruning.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from psearch.engine import atomic  # noqa: E402
from psearch.engine.config import SearchConfig  # noqa: E402
from psearch.writer_id import trial_value as tv  # noqa: E402
from psearch.writer_id.data_index import split_counts  # noqa: E402

logger = logging.getLogger("bench.trial_value")
# Per epoch and run: what the definitions read (val) and what judges them (test).
CURVES = ("val_page_top1", "val_page_map", "test_page_top1", "test_page_map")
FIRST_SEED = 42
DATA_SEED = 0


@dataclasses.dataclass(frozen=True)
class Run:
    """One training: a set of hyperparameters under one seed, in its own folder."""

    set_index: int
    seed_index: int
    seed: int
    hp: dict[str, Any]
    cfg: SearchConfig
    device: str
    folder: str


class Searches(NamedTuple):
    """Simulated searches: the sets each one compares and the seed run drawn for each ([K, m])."""

    sets: np.ndarray
    seeds: np.ndarray


# ---------------------------------------------------------------- training (side effects)

def sample_hparams(n: int, epochs: int) -> list[dict[str, Any]]:
    """`n` sets from the built-in search space (model `small`, from scratch), seeded sampler."""
    import optuna

    from psearch.writer_id.builtin import KIND, WriterOptions
    from psearch.writer_id.search_space import hparams

    space = KIND.default_space(WriterOptions(models=("small",), no_pretrained=True))
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    return [hparams(space.suggest(study.ask()), epochs) for _ in range(n)]


def search_config(data: Path, folder: Path, args: argparse.Namespace) -> SearchConfig:
    """The settings every run shares: all epochs (patience = epochs), one small model."""
    from psearch.writer_id.builtin import WriterOptions

    return SearchConfig(checkpoint_dir=str(folder), n_trials=1, epochs=args.epochs,
                        seed=FIRST_SEED, pruner="none", options=WriterOptions(
                            data_root=str(data), patience=args.epochs,
                            img_height=args.img_height, img_width=args.img_width,
                            models=("small",), no_pretrained=True, num_workers=0,
                            lines_per_writer=args.lines_per_writer))


def train_run(run: Run) -> dict[str, Any]:
    """Train one run as objective.py does, measuring the test pages after every epoch too."""
    import torch

    from psearch.writer_id import model as model_lib
    from psearch.writer_id.objective import load_index, make_bundle, model_spec, train_config
    from psearch.writer_id.train import Trainer, evaluate, make_loader

    torch.set_num_threads(1)   # --processes runs side by side, one core each
    started = time.perf_counter()
    data = make_bundle(run.cfg, *load_index(run.cfg))   # the parent built the image cache
    device = torch.device(run.device)
    torch.manual_seed(run.seed)
    trainer = Trainer(model_lib.build_model(model_spec(run.hp, len(data.writers), run.cfg)), data,
                      train_config(run.hp, run.cfg, 0, run.seed), device, Path(run.folder),
                      {"title": f"set {run.set_index} seed {run.seed}"})
    test_loader = make_loader(data.test, run.cfg.options.batch_size * 2, 0, device)
    rows: list[dict[str, float]] = []

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        # A DataLoader draws its base seed from the global torch RNG: restore it, so that
        # measuring the test pages leaves the training exactly as it is in a search.
        rng = torch.get_rng_state()
        test = evaluate(trainer.model, test_loader, data.test_page_ids, device, prefix="test_")
        torch.set_rng_state(rng)
        rows.append({k: {**row, **test}[k] for k in CURVES})

    error = ""
    try:
        trainer.fit(on_epoch)
    except FloatingPointError as exc:   # a diverged run: its epochs so far count, the rest NaN
        error = str(exc)
    return {"set": run.set_index, "seed_index": run.seed_index, "seed": run.seed, "rows": rows,
            "error": error,
            "seconds": time.perf_counter() - started}


def train_all(runs: Sequence[Run], processes: int) -> list[dict[str, Any]]:
    """Every run on `processes` spawned worker processes; a log line per finished run."""
    results = []
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for k, res in enumerate(pool.imap_unordered(train_run, runs), 1):
            results.append(res)
            last = res["rows"][-1] if res["rows"] else {}
            logger.info("run %d/%d: set %d seed %d: %d epochs in %.1f s (last epoch: val mAP "
                        "%.3f, test mAP %.3f)%s", k, len(runs), res["set"], res["seed"],
                        len(res["rows"]), res["seconds"], last.get("val_page_map", np.nan),
                        last.get("test_page_map", np.nan),
                        f"  FAILED: {res['error']}" if res["error"] else "")
    return results


# ---------------------------------------------------------------- analysis (pure)

def assemble(results: Sequence[dict], sets: int, seeds: int, epochs: int) -> dict[str, np.ndarray]:
    """Per curve, a [sets, seeds, epochs] array of the runs' rows; NaN where a run has none."""
    curves = {k: np.full((sets, seeds, epochs), np.nan) for k in CURVES}
    for res in results:
        for e, row in enumerate(res["rows"]):
            for k in CURVES:
                curves[k][res["set"], res["seed_index"], e] = row[k]
    return curves


def truth(test_map: np.ndarray) -> np.ndarray:
    """[sets]: the mean over seeds of the test page mAP of the last third of the epochs (>= 1)."""
    tail = max(1, test_map.shape[2] // 3)
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.nanmean(test_map[:, :, -tail:], axis=2), axis=1)


def apply_definition(definition: tv.Definition, val_top1: np.ndarray,
                     val_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([sets, seeds] values, [sets, seeds] 0-based chosen epochs; -1 for none) of every run,
    each from the epochs it ran (a run that stopped early is NaN after its last epoch)."""
    values = np.full(val_top1.shape[:2], np.nan)
    chosen = np.full(val_top1.shape[:2], -1, dtype=int)
    for i, r in np.ndindex(*val_top1.shape[:2]):
        ran = np.flatnonzero(np.isfinite(val_top1[i, r]) | np.isfinite(val_map[i, r]))
        n = ran[-1] + 1 if len(ran) else 0
        values[i, r], chosen[i, r] = definition.choose(val_top1[i, r, :n], val_map[i, r, :n])
    return values, chosen


def at_epoch(curve: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """[sets, seeds]: each run's figure at its chosen epoch (NaN where none was chosen)."""
    picked = np.take_along_axis(curve, np.maximum(chosen, 0)[..., None], axis=2)[..., 0]
    return np.where(chosen >= 0, picked, np.nan)


def draw_searches(sets: int, seeds: int, searches: int, size: int, seed: int = 0) -> Searches:
    """`searches` simulated searches of `size` distinct sets, one random seed run for each."""
    rng = np.random.default_rng(seed)
    drawn = np.argsort(rng.random((searches, sets)), axis=1)[:, :size]
    return Searches(drawn, rng.integers(0, seeds, size=(searches, size)))


def nan_argmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """argmax with NaN counted as the lowest value (a run without a value never wins)."""
    return np.argmax(np.where(np.isnan(x), -np.inf, x), axis=axis)


def picked(values: np.ndarray, searches: Searches) -> tuple[np.ndarray, np.ndarray]:
    """([K] set, [K] seed index) of the run each simulated search keeps: its highest value."""
    rows = np.arange(len(searches.sets))
    best = nan_argmax(values[searches.sets, searches.seeds], axis=1)
    return searches.sets[rows, best], searches.seeds[rows, best]


def agreement(values: np.ndarray, target: np.ndarray, searches: Searches) -> float:
    """Share of the searches whose kept set is the one with the highest `target` ([sets])."""
    best = searches.sets[np.arange(len(searches.sets)), nan_argmax(target[searches.sets], axis=1)]
    return float(np.mean(picked(values, searches)[0] == best))


def mean_at_pick(values: np.ndarray, figure: np.ndarray, searches: Searches) -> float:
    """Mean over the searches of `figure` ([sets, seeds]) of the run each one keeps."""
    sets, seeds = picked(values, searches)
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(figure[sets, seeds]))


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, ties sharing their mean rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    plain = np.empty(len(x))
    plain[order] = np.arange(1, len(x) + 1)
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=plain) / counts)[group]


def spearman(values: np.ndarray, target: np.ndarray) -> float:
    """Spearman correlation of each seed's values ([sets, seeds]) with `target` ([sets]) across
    sets, averaged over seeds (runs without a value left out; NaN when nothing varies)."""
    found = []
    for r in range(values.shape[1]):
        ok = np.isfinite(values[:, r]) & np.isfinite(target)
        a, b = ranks(values[ok, r]), ranks(target[ok])
        if ok.sum() >= 2 and a.std() > 0 and b.std() > 0:
            found.append(float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(found)) if found else float("nan")


def seed_sd(values: np.ndarray) -> float:
    """Mean over sets of the standard deviation of the value over seeds (NaN for one seed)."""
    if values.shape[1] < 2:
        return float("nan")
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(np.nanstd(values, axis=1, ddof=1)))


def set_spread(values: np.ndarray) -> float:
    """Standard deviation over sets of each set's mean value over seeds."""
    with np.errstate(invalid="ignore"):
        return float(np.nanstd(np.nanmean(values, axis=1), ddof=1))


def definition_figures(definition: tv.Definition, curves: dict[str, np.ndarray],
                       target: np.ndarray, searches: Searches) -> dict[str, Any]:
    """Every figure of one definition (see the module docstring)."""
    values, chosen = apply_definition(definition, curves["val_page_top1"],
                                      curves["val_page_map"])
    with np.errstate(invalid="ignore"):
        own = np.nanmean(values, axis=1)
        mean_epoch = float(np.mean(chosen[chosen >= 0]) + 1) if (chosen >= 0).any() else None
    return {"summary": definition.summary,
            "agreement": agreement(values, target, searches),
            "agreement_own": agreement(values, own, searches),
            "test_map_of_pick": mean_at_pick(values, at_epoch(curves["test_page_map"], chosen),
                                             searches),
            "test_top1_of_pick": mean_at_pick(values, at_epoch(curves["test_page_top1"], chosen),
                                              searches),
            "spearman": spearman(values, target), "seed_sd": seed_sd(values),
            "set_spread": set_spread(values), "mean_epoch": mean_epoch}


def compare(curves: dict[str, np.ndarray], searches: Searches,
            definitions: Sequence[tv.Definition] = tuple(tv.DEFINITIONS.values())
            ) -> dict[str, dict[str, Any]]:
    """The figures of every definition, judged against the same truth and searches."""
    target = truth(curves["test_page_map"])
    return {d.name: definition_figures(d, curves, target, searches) for d in definitions}


def winner(figures: dict[str, dict[str, Any]]) -> str:
    """The definition with the highest agreement; ties go to the higher test mAP of the pick."""
    return max(figures, key=lambda n: (figures[n]["agreement"],
                                       np.nan_to_num(figures[n]["test_map_of_pick"], nan=-1.0)))


def table_text(figures: dict[str, dict[str, Any]], best: str) -> str:
    """The human-readable comparison (the winner starred)."""
    import pandas as pd

    frame = pd.DataFrame([{"definition": name + (" *" if name == best else ""),
                           **{k: v for k, v in f.items() if k != "summary"}}
                          for name, f in figures.items()])
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}")


# ---------------------------------------------------------------- the command line

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--writers", type=int, default=12, help="synthetic writers (default: 12)")
    add("--pages_per_writer", type=int, default=28,
        help="pages per writer (default: 28: 20 train, 4 val, 4 test)")
    add("--sets", type=int, default=10, help="hyperparameter sets sampled (default: 10)")
    add("--seeds", type=int, default=3, help=f"seeds per set, from {FIRST_SEED} (default: 3)")
    add("--epochs", type=int, default=8, help="epochs per run, all trained (default: 8)")
    add("--img_height", type=int, default=32, help="default: 32")
    add("--img_width", type=int, default=320, help="default: 320")
    add("--lines_per_writer", type=int, default=40,
        help="training lines per writer and epoch (default: 40)")
    add("--processes", type=int, default=2, help="runs trained side by side (default: 2)")
    add("--searches", type=int, default=4000, help="simulated searches (default: 4000)")
    add("--search_size", type=int, default=4,
        help="sets each simulated search compares (default: 4)")
    add("--json", default=None, help="write the figures here (default: none)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> str:
    """'' when the flags make sense, else the one-line error."""
    _, val, test = split_counts(args.pages_per_writer)
    if val < 2 or test < 2:
        enough = next(n for n in range(4, 100) if min(split_counts(n)[1:]) >= 2)
        return (f"--pages_per_writer {args.pages_per_writer} gives {val} validation and {test} "
                f"test pages per writer; retrieval needs 2 of each: pass {enough} or more")
    if not 2 <= args.search_size <= args.sets:
        return f"--search_size {args.search_size} must be from 2 to --sets ({args.sets})"
    if min(args.seeds, args.epochs, args.processes, args.searches) < 1:
        return "--seeds, --epochs, --processes and --searches must be at least 1"
    return ""


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Make the data and train every set under every seed; the runs' results."""
    from psearch.writer_id.hardware import pick_device
    from psearch.writer_id.objective import load_index, make_bundle
    from psearch.writer_id.synthetic import make_synthetic

    with tempfile.TemporaryDirectory(prefix="bench_trial_value_") as tmp:
        data = make_synthetic(Path(tmp) / "lines", writers=args.writers,
                              pages_per_writer=args.pages_per_writer, lines_per_page=4,
                              height=args.img_height, similarity=0.75, seed=DATA_SEED)
        cfg = search_config(data, Path(tmp) / "runs", args)
        make_bundle(cfg, *load_index(cfg))   # the image cache, once, before the workers load it
        device = str(pick_device())
        hps = sample_hparams(args.sets, args.epochs)
        runs = [Run(i, r, FIRST_SEED + r, hp, cfg, device, str(Path(tmp) / f"set{i}_seed{r}"))
                for r in range(args.seeds) for i, hp in enumerate(hps)]
        return train_all(runs, args.processes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    error = check_args(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    results = measure(args)
    curves = assemble(results, args.sets, args.seeds, args.epochs)
    figures = compare(curves, draw_searches(args.sets, args.seeds, args.searches,
                                            args.search_size))
    best = winner(figures)
    _, val, test = split_counts(args.pages_per_writer)
    result = {"definitions": figures, "winner": best, "sets": args.sets, "seeds": args.seeds,
              "epochs": args.epochs, "writers": args.writers, "val_pages": val * args.writers,
              "test_pages": test * args.writers, "searches": args.searches,
              "search_size": args.search_size, "size": f"{args.img_height}x{args.img_width}",
              "lines_per_writer": args.lines_per_writer,
              "truth": [round(float(v), 4) for v in truth(curves["test_page_map"])],
              "failed_runs": sum(bool(r["error"]) for r in results),
              "run_seconds_median": round(float(np.median([r["seconds"] for r in results])), 1),
              "seconds": round(time.perf_counter() - started)}
    print(table_text(figures, best))
    print(f"winner: {best} (chance agreement {1 / args.search_size:.2f}); {args.sets} sets x "
          f"{args.seeds} seeds x {args.epochs} epochs in {result['seconds']} s")
    if args.json:
        atomic.write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
