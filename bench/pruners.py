"""Which pruner reaches the best validation value for the same device time: the built-in objective
on synthetic similar-writer data (`dataset.py make-synthetic --similarity 0.75`), run by the real
launcher (`parallel_search.py --cpu_workers 1`) once per `--pruner`, each with the same budget of
device-seconds: the summed durations of its trials, what a GPU would spend on them. When a run has
spent its budget it is stopped like a user stops it (Ctrl+C: the running trial is recorded as
interrupted and counts for nothing). All runs use the same --seed, so they start from the same
sampled hyperparameters. Run it on an otherwise idle machine: other processes taking cores slow
the trials of whichever pruner runs then (bench/run_all.py reports how much CPU they took).

    python bench/pruners.py [--budget_s 300] [--pruners median,asha,hyperband,none]
        [--curve_csv curves.csv] [--json out.json]

Reports per pruner: trials finished (complete / pruned), the best validation page top-1 among the
complete trials, and the device-seconds at which it was first reached; the curve CSV holds the
best value so far against device-seconds spent.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from psearch.engine import atomic, layout  # noqa: E402
from psearch.engine.config import DEFAULT_STUDY_NAME, PRUNER_CHOICES  # noqa: E402

POLL_S = 1.0   # how often the budget is checked (and how far a run may overshoot it)


def search_argv(data: Path, ckpt: Path, pruner: str, args: argparse.Namespace) -> list[str]:
    """The launcher's command line for one pruner (a trial budget it never reaches)."""
    return [sys.executable, str(ROOT / "parallel_search.py"), "--cpu_workers", "1",
            "--data_root", str(data), "--checkpoint_dir", str(ckpt), "--n_trials", "1000",
            "--pruner", pruner, "--models", "small", "--img_height", str(args.img_height),
            "--img_width", str(args.img_width), "--epochs", str(args.epochs), "--patience",
            str(args.epochs), "--lines_per_writer", str(args.lines_per_writer), "--num_workers",
            "0", "--seed", str(args.seed), "--no_summary",
            # the figures it reports are best-epoch page top-1 (compared across versions)
            "--trial_value", "top1_best"]


def device_seconds(trials: Sequence, now: float) -> float:
    """Seconds the device has spent on trials: finished ones whole, running ones so far (pure)."""
    total = 0.0
    for t in trials:
        if t.datetime_start is not None:
            end = t.datetime_complete.timestamp() if t.datetime_complete else now
            total += end - t.datetime_start.timestamp()
    return total


def best_curve(trials: Sequence) -> list[tuple[float, float | None, int]]:
    """(device-seconds spent when a trial finished, best complete value so far, trial number),
    trials taken in the order they finished (one device: one after another) (pure)."""
    finished = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                                          TrialState.FAIL)
                       and t.datetime_complete is not None), key=lambda t: t.datetime_complete)
    spent, best, curve = 0.0, None, []
    for t in finished:
        spent += (t.datetime_complete - t.datetime_start).total_seconds()
        if t.state == TrialState.COMPLETE and (best is None or t.value > best):
            best = t.value
        curve.append((round(spent, 1), best, t.number))
    return curve


def run_pruner(data: Path, folder: Path, pruner: str, args: argparse.Namespace) -> dict:
    """One launcher run, stopped with SIGINT once its trials have used the budget."""
    ckpt = folder / pruner
    url = layout.default_storage_url(str(ckpt))
    study = None
    with open(folder / f"{pruner}.log", "wb") as log:
        proc = subprocess.Popen(search_argv(data, ckpt, pruner, args), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(POLL_S)
            # (once the first trial folder exists, the launcher has made the database and study)
            if study is None and layout.trial_dir(str(ckpt), 0).exists():
                study = optuna.load_study(study_name=DEFAULT_STUDY_NAME, storage=url)
            if study and device_seconds(study.get_trials(deepcopy=False),
                                        time.time()) >= args.budget_s:
                proc.send_signal(signal.SIGINT)   # graceful: the running trial is interrupted
                proc.wait()
    if proc.returncode not in (0, 128 + signal.SIGINT):
        tail = (folder / f"{pruner}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"--pruner {pruner}: the launcher exited with {proc.returncode}:\n"
                           f"{tail}")
    trials = optuna.load_study(study_name=DEFAULT_STUDY_NAME, storage=url).get_trials()
    return {"pruner": pruner, "trials": trials, "curve": best_curve(trials)}


def summary_row(run: dict, budget_s: float) -> dict:
    """One table row: counts, the best value and when it was first reached (pure)."""
    trials, curve = run["trials"], run["curve"]
    counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE,
                                                              TrialState.PRUNED)}
    best = curve[-1][1] if curve else None
    reached = next((spent for spent, value, _ in curve if best is not None and value == best),
                   None)
    epochs = sum(len(t.intermediate_values) for t in trials)
    # trial 0 has the same hyperparameters in every run (the sampler is seeded): its value shows
    # how much one training varies from run to run
    first = next((t for t in trials if t.number == 0), None)
    first_value = (round(first.value, 4) if first is not None and first.state ==
                   TrialState.COMPLETE else None)
    return {"pruner": run["pruner"], "budget_s": budget_s, "complete": counts[TrialState.COMPLETE],
            "pruned": counts[TrialState.PRUNED], "epochs_trained": epochs,
            "best_val_page_top1": None if best is None else round(best, 4),
            "best_reached_at_s": reached, "trial0_val_page_top1": first_value}


def make_data(folder: Path, writers: int) -> Path:
    """The synthetic similar-writers data set, made by the real command line."""
    data = folder / "lines"
    subprocess.run([sys.executable, str(ROOT / "dataset.py"), "make-synthetic", str(data),
                    "--writers", str(writers), "--similarity", "0.75"], cwd=ROOT, check=True,
                   capture_output=True)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruners", default=",".join(PRUNER_CHOICES),
                        help=f"comma list (default: {','.join(PRUNER_CHOICES)})")
    parser.add_argument("--budget_s", type=float, default=300.0,
                        help="device-seconds of trials per pruner (default: 300)")
    parser.add_argument("--writers", type=int, default=8, help="default: 8")
    parser.add_argument("--img_height", type=int, default=64, help="default: 64")
    parser.add_argument("--img_width", type=int, default=640, help="default: 640")
    parser.add_argument("--epochs", type=int, default=9, help="per trial; also the patience "
                        "(default: 9: ASHA's rungs at 1, 3, 9 epochs)")
    parser.add_argument("--lines_per_writer", type=int, default=16, help="default: 16")
    parser.add_argument("--seed", type=int, default=42, help="default: 42")
    parser.add_argument("--curve_csv", default=None, help="best value against device-seconds, "
                        "every pruner (default: none)")
    parser.add_argument("--json", default=None, help="write the table here (default: none)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_pruners_") as tmp:
        data = make_data(Path(tmp), args.writers)
        runs = []
        for pruner in args.pruners.split(","):
            runs.append(run_pruner(data, Path(tmp), pruner, args))
            print(json.dumps(summary_row(runs[-1], args.budget_s)), flush=True)
    result = {"settings": {k: getattr(args, k) for k in ("budget_s", "writers", "img_height",
                                                         "img_width", "epochs",
                                                         "lines_per_writer", "seed")},
              "rows": [summary_row(r, args.budget_s) for r in runs]}
    if args.curve_csv:
        lines = ["pruner,device_s,best_val_page_top1,trial"] + [
            f"{r['pruner']},{s},{'' if v is None else round(v, 4)},{n}"
            for r in runs for s, v, n in r["curve"]]
        atomic.write_text(Path(args.curve_csv), "\n".join(lines) + "\n")
    if args.json:
        atomic.write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
