"""Run the CPU benchmarks in one go and write bench/RESULTS.md (what `make bench` does; about
25 minutes on 2 cores, 8 of them for trial_value.py). Each benchmark runs as its own process and hands its figures over as JSON;
one that fails is reported in the file and makes the exit code 1. RESULTS.md and
pruner_curves.csv are written atomically.

    python bench/run_all.py [--out bench/RESULTS.md] [--quick]

--quick shrinks every benchmark (a smoke run of a minute or two; not figures to keep).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from results_md import render  # noqa: E402  (bench/, the script's folder, is on sys.path)

from psearch.engine import atomic  # noqa: E402

# (name, script, arguments for `make bench`, arguments for --quick)
BENCHMARKS = (
    ("cache", "cache_vs_decode.py", ["--repeats", "5"], ["--repeats", "1", "--writers", "2"]),
    ("augment", "augment_cpu.py", [], ["--seconds", "0.3", "--repeats", "1"]),
    ("throughput", "train_throughput.py", ["--seconds", "15"],
     ["--sizes", "32x320", "--seconds", "1", "--steps", "1", "--batch", "2"]),
    ("pruners", "pruners.py", ["--budget_s", "80", "--img_height", "32", "--img_width", "320",
                               "--curve_csv", str(BENCH / "pruner_curves.csv")],
     ["--budget_s", "8", "--pruners", "asha,none", "--writers", "4", "--img_height", "32",
      "--img_width", "320", "--epochs", "3"]),
    ("launcher", "launcher_vs_optuna.py", ["--repeats", "2"], ["--repeats", "1", "--quick"]),
    ("ddp", "ddp_scaling.py", ["--repeats", "2"],
     ["--repeats", "1", "--trials", "1", "--epochs", "1", "--height", "32", "--width", "256",
      "--writers", "4", "--lines_per_writer", "16"]),
    ("trial_value", "trial_value.py", ["--sets", "12", "--seeds", "3", "--epochs", "16"],
     ["--sets", "3", "--seeds", "2", "--epochs", "3", "--writers", "4", "--searches", "200",
      "--search_size", "2"]),
)


def machine() -> dict:
    """What the figures were measured on."""
    import optuna
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or "unknown")
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "optuna": optuna.__version__, "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else "none",
            "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg())}


def machine_busy_s() -> float:
    """CPU-seconds every process of this machine has used since boot (Linux /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run(name: str, script: str, args: list[str], folder: Path) -> tuple[dict | None, str, dict]:
    """(figures or None, error text, timing) of one benchmark process. The timing says how much
    of the machine's CPU other processes took meanwhile: what lowers absolute rates."""
    out = folder / f"{name}.json"
    started, mine, busy = time.perf_counter(), os.times(), machine_busy_s()
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)],
                          capture_output=True, text=True, cwd=BENCH.parent)
    seconds, mine_after = time.perf_counter() - started, os.times()
    used = (mine_after.children_user + mine_after.children_system
            - mine.children_user - mine.children_system)
    others = max(0.0, machine_busy_s() - busy - used) / (seconds * os.cpu_count())
    timing = {"name": name, "seconds": round(seconds), "others_cpu": f"{others:.0%}"}
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0 or not out.exists():
        timing["status"] = "failed"
        return None, f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}", timing
    timing["status"] = "ok"
    return json.loads(out.read_text()), "", timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"),
                        help="the results file (default: bench/RESULTS.md)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: check that every "
                        "benchmark runs (default: the full settings)")
    args = parser.parse_args(argv)
    info, figures, errors, timings = machine(), {}, {}, []
    with tempfile.TemporaryDirectory(prefix="bench_all_") as tmp:
        for name, script, full, quick in BENCHMARKS:
            print(f"== {script}", flush=True)
            found, error, timing = run(name, script, quick if args.quick else full, Path(tmp))
            figures[name] = found
            timings.append(timing)
            if error:
                errors[name] = error
                print(f"   failed: {error}", file=sys.stderr)
    info["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    atomic.write_text(Path(args.out), render(info, figures, errors, timings, args.quick))
    print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
