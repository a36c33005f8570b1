"""One trial on K devices (--gpus_per_trial K) against one device: the same built-in search through
the real launcher, K = 1 and K = 2, runs interleaved. Reports per trial: wall time, the epochs'
share of it, what starting the ranks costs, and training lines per second.

    python bench/ddp_scaling.py [--device cpu|gpu] [--repeats 2] [--json F]

On the CPU (`--cpu_workers 1`) the K ranks share the machine's cores, so this measures the cost of
the ranks (start-up, gradient all-reduce) rather than a speed-up; with `--device gpu` (two GPUs or
more) it measures the speed-up of an epoch on two GPUs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from psearch.engine import atomic  # noqa: E402


def search_argv(data: Path, ckpt: Path, k: int, args: argparse.Namespace) -> list[str]:
    devices = ["--cpu_workers", "1"] if args.device == "cpu" else \
        ["--gpus", ",".join(str(i) for i in range(k))]
    return [sys.executable, str(ROOT / "parallel_search.py"), "--data_root", str(data),
            "--checkpoint_dir", str(ckpt), "--n_trials", str(args.trials), "--epochs",
            str(args.epochs), "--models", args.model, "--img_height", str(args.height),
            "--img_width", str(args.width), "--lines_per_writer", str(args.lines_per_writer),
            "--batch_size", str(args.batch), "--num_workers", "0", "--pruner", "none",
            "--gpus_per_trial", str(k), "--no_summary", "--no_pretrained", *devices]


def trial_figures(ckpt: Path, writers: int, lines_per_writer: int) -> list[dict]:
    """Per finished trial: wall seconds, seconds in epochs, the rest, lines/s (from the study's
    times and each trial's history.csv)."""
    import optuna
    import pandas as pd

    rows = []
    study = optuna.load_study(study_name="writer_id_search",
                              storage=f"sqlite:///{ckpt}/optuna_study.db")
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        history = pd.read_csv(ckpt / f"trial_{t.number:03d}" / "history.csv")
        epochs_s = float(history["epoch_time_s"].sum())
        rows.append({"wall_s": wall, "epochs_s": epochs_s, "other_s": wall - epochs_s,
                     "lines_per_s": len(history) * writers * lines_per_writer / epochs_s})
    return rows


def summarize(runs: dict[int, list[dict]]) -> list[dict]:
    """Median per K over every trial of every run, and the epoch speed relative to K = 1 (pure)."""
    out = []
    for k, rows in sorted(runs.items()):
        med = {key: round(statistics.median(r[key] for r in rows), 2)
               for key in ("wall_s", "epochs_s", "other_s", "lines_per_s")}
        out.append({"k": k, "trials": len(rows), **med})
    base = next((r for r in out if r["k"] == 1), None)
    for r in out:
        r["epoch_speedup"] = round(r["lines_per_s"] / base["lines_per_s"], 2) if base else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="train on CPU processes or GPUs (default: cpu)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per K, interleaved (default: 2)")
    parser.add_argument("--trials", type=int, default=2, help="trials per run (default: 2)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (default: 3)")
    parser.add_argument("--model", default="small", help="model type (default: small)")
    parser.add_argument("--height", type=int, default=64, help="image height (default: 64)")
    parser.add_argument("--width", type=int, default=640, help="image width (default: 640)")
    parser.add_argument("--writers", type=int, default=8, help="synthetic writers (default: 8)")
    parser.add_argument("--lines_per_writer", type=int, default=64,
                        help="training lines per writer and epoch (default: 64)")
    parser.add_argument("--batch", type=int, default=16, help="batch size per device (default: 16)")
    parser.add_argument("--json", default=None, help="write the figures here (default: none)")
    args = parser.parse_args(argv)

    from psearch.writer_id.synthetic import make_synthetic

    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        data = make_synthetic(Path(tmp) / "lines", writers=args.writers, pages_per_writer=6,
                              lines_per_page=6, height=args.height)
        for rep in range(args.repeats):
            for k in (1, 2):
                ckpt = Path(tmp) / f"k{k}_{rep}"
                started = time.perf_counter()
                proc = subprocess.run(search_argv(data, ckpt, k, args), capture_output=True,
                                      text=True, cwd=ROOT)
                if proc.returncode != 0:
                    print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                    return 1
                rows = trial_figures(ckpt, args.writers, args.lines_per_writer)
                runs[k] += rows
                print(f"K={k} run {rep + 1}: {time.perf_counter() - started:.1f} s, "
                      f"{[round(r['wall_s'], 1) for r in rows]} s per trial", flush=True)
    result = {"device": args.device, "repeats": args.repeats, "trials": args.trials,
              "epochs": args.epochs, "model": args.model, "size": f"{args.height}x{args.width}",
              "lines_per_epoch": args.writers * args.lines_per_writer, "batch": args.batch,
              "rows": summarize(runs)}
    print(json.dumps(result))
    if args.json:
        atomic.write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
