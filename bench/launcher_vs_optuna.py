"""This launcher against plain Optuna processes, on trials that only sleep (so every second not
spent sleeping is the tools' own overhead). Two scenarios, the runs of each interleaved, the
median of --repeats runs reported:

- 24 trials x 8 s on 8 workers: effective parallelism = sum of trial durations / (wall x workers),
  and the time from launch to the first trial's start; launcher vs 8 plain processes each
  `optimize(n_trials=3)` vs one process `optimize(n_jobs=8)` (threads).
- 160 trials x 0.5 s on 8 workers: wall time of the launcher vs 8 plain processes each
  `optimize(n_trials=20)` on one SQLite study vs `n_jobs=8` threads, and a sequential process
  (run once: it takes 80 s and more and varies little).

Trial times come from the study's records (datetime_start / datetime_complete), wall times from
this process's clock around the processes it starts (interpreter and import time included).

    python bench/launcher_vs_optuna.py [--repeats 3] [--workers 8] [--json out.json]
    python bench/launcher_vs_optuna.py --methods launcher,plain --baseline /tmp/old_checkout
        # this checkout's launcher against an older one's (`launcher@baseline`), interleaved
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import optuna

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
from psearch.engine import atomic, layout  # noqa: E402
from psearch.engine.config import DEFAULT_STUDY_NAME  # noqa: E402

OBJECTIVE = f"{BENCH / 'sleepy_objective.py'}:objective"


@dataclass(frozen=True)
class Scenario:
    name: str
    n_trials: int
    sleep_s: float
    methods: tuple[str, ...]


SCENARIOS = (Scenario("24 x 8 s", 24, 8.0, ("launcher", "plain", "n_jobs")),
             Scenario("160 x 0.5 s", 160, 0.5, ("launcher", "plain", "n_jobs", "sequential")))
QUICK = (Scenario("8 x 1 s", 8, 1.0, ("launcher", "plain", "n_jobs")),
         Scenario("16 x 0.2 s", 16, 0.2, ("launcher", "plain", "n_jobs", "sequential")))
RUN_ONCE = ("sequential",)


def trial_figures(trials: Sequence, launched: dt.datetime, wall_s: float, workers: int) -> dict:
    """Finished count, time to the first trial, busy seconds and effective parallelism (pure)."""
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    first = (min(starts) - launched).total_seconds() if starts else float("nan")
    return {"finished": len(done), "wall_s": round(wall_s, 2), "first_trial_s": round(first, 2),
            "busy_s": round(busy, 2), "parallelism": round(busy / (wall_s * workers), 3)}


BASELINE = "launcher@baseline"


def commands(method: str, scenario: Scenario, folder: Path, workers: int,
             baseline: Path | None = None) -> list[list[str]]:
    """The processes one run starts (argv lists, run from the repository root)."""
    py = sys.executable
    if method in ("launcher", BASELINE):
        root = baseline if method == BASELINE else ROOT
        return [[py, str(root / "parallel_search.py"), "--objective", OBJECTIVE,
                 "--checkpoint_dir", str(folder), "--n_trials", str(scenario.n_trials),
                 "--cpu_workers", str(workers), "--no_summary"]]
    url, plain = layout.default_storage_url(str(folder)), str(BENCH / "plain_optuna.py")
    if method == "plain":
        per = scenario.n_trials // workers
        return [[py, plain, url, DEFAULT_STUDY_NAME, str(per), "--seed", str(k), "--workers",
                 str(workers)] for k in range(workers)]
    jobs = workers if method == "n_jobs" else 1
    return [[py, plain, url, DEFAULT_STUDY_NAME, str(scenario.n_trials), "--n_jobs", str(jobs)]]


def run_once(method: str, scenario: Scenario, folder: Path, workers: int,
             baseline: Path | None = None) -> dict:
    """Start the method's processes, wait for all, and read the study they filled."""
    folder.mkdir(parents=True)
    url = layout.default_storage_url(str(folder))
    if method not in ("launcher", BASELINE):  # plain Optuna needs the study made first
        optuna.create_study(study_name=DEFAULT_STUDY_NAME, storage=url, direction="maximize")
    env = {**os.environ, "BENCH_SLEEP_S": str(scenario.sleep_s)}
    launched, start = dt.datetime.now(), time.perf_counter()
    with open(folder / "output.log", "wb") as log:
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                 for cmd in commands(method, scenario, folder, workers, baseline)]
        codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    if any(codes):
        tail = (folder / "output.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{method} on {scenario.name} exited with {codes}:\n{tail}")
    trials = optuna.load_study(study_name=DEFAULT_STUDY_NAME, storage=url).get_trials()
    used = 1 if method == "sequential" else workers
    return {"method": method, **trial_figures(trials, launched, wall, used)}


def select_methods(scenarios: Sequence[Scenario], methods: str | None,
                   baseline: bool) -> tuple[Scenario, ...]:
    """The scenarios with only the methods asked for, the baseline's launcher right after this
    one's (pure)."""
    keep = None if methods is None else set(methods.split(","))
    chosen = []
    for scenario in scenarios:
        mine = [m for m in scenario.methods if keep is None or m in keep]
        if baseline and "launcher" in mine:
            mine.insert(mine.index("launcher") + 1, BASELINE)
        chosen.append(Scenario(scenario.name, scenario.n_trials, scenario.sleep_s, tuple(mine)))
    return tuple(chosen)


def summarize(runs: list[dict], sequential_wall: float | None) -> list[dict]:
    """Median of each method's runs, in the order the methods first appear (pure)."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        row = {"method": method, "runs": len(mine),
               "finished": "/".join(sorted({str(r["finished"]) for r in mine}))}
        for key in ("wall_s", "first_trial_s", "parallelism"):
            row[key] = round(statistics.median(r[key] for r in mine), 3)
        if sequential_wall:
            row["speedup_vs_sequential"] = round(sequential_wall / row["wall_s"], 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method, interleaved "
                        "(the median is reported; default: 3)")
    parser.add_argument("--workers", type=int, default=8, help="default: 8")
    parser.add_argument("--quick", action="store_true", help="two tiny scenarios instead, to "
                        "check that everything runs (default: the scenarios above)")
    parser.add_argument("--json", default=None, help="write the figures here (default: none)")
    parser.add_argument("--methods", default=None, help="comma list of the methods to run, of "
                        "launcher, plain, n_jobs, sequential (default: all)")
    parser.add_argument("--baseline", default=None, help="a checkout of another version of this "
                        f"project: its launcher runs too, as {BASELINE!r}, right after this one's "
                        "(default: none)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scenarios = select_methods(QUICK if args.quick else SCENARIOS, args.methods,
                               args.baseline is not None)
    baseline = Path(args.baseline).resolve() if args.baseline else None
    if args.workers < 1 or any(s.n_trials % args.workers for s in scenarios):
        print(f"error: --workers {args.workers} must divide the trial counts "
              f"{[s.n_trials for s in scenarios]} (plain processes split them evenly)",
              file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {s.name: [] for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="bench_launcher_") as tmp:
        for rep in range(args.repeats):
            for scenario in scenarios:
                for method in scenario.methods:
                    if method in RUN_ONCE and rep:
                        continue
                    folder = Path(tmp) / f"{rep}_{scenario.n_trials}_{method}"
                    runs[scenario.name].append(run_once(method, scenario, folder, args.workers,
                                                        baseline))
                    print(scenario.name, json.dumps(runs[scenario.name][-1]), flush=True)
    result = {"workers": args.workers, "repeats": args.repeats, "cores": os.cpu_count(),
              "ray_tune": "installed, not compared" if importlib.util.find_spec("ray")
              else "not installed (never required): not compared", "scenarios": {}}
    for scenario in scenarios:
        seq = [r["wall_s"] for r in runs[scenario.name] if r["method"] == "sequential"]
        result["scenarios"][scenario.name] = summarize(runs[scenario.name],
                                                       seq[0] if seq else None)
    print(json.dumps(result, indent=1))
    if args.json:
        atomic.write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
