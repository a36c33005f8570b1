"""The report of bench/gpu_check.sh: reads what it left in OUT_DIR (the search's study and trial
folders, nvidia-smi's samples, the throughput JSON, the pytest log) and writes OUT_DIR/gpu_check.md.

    python bench/gpu_check_report.py OUT_DIR
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from psearch.engine import atomic, layout  # noqa: E402
from psearch.engine.config import DEFAULT_STUDY_NAME  # noqa: E402

SMI_COLUMNS = ["timestamp", "util_pct", "mem_used_mib", "mem_total_mib"]


def search_lines(search: Path) -> tuple[int, float]:
    """Training lines of every epoch of every trial, and the seconds those epochs took."""
    lines = seconds = 0.0
    for trial in sorted(search.glob("trial_*")):
        history, config = trial / "history.csv", trial / "config.json"
        if not (history.exists() and config.exists()):
            continue
        cfg = json.loads(config.read_text())
        per_epoch = len(cfg["writers"]) * cfg["settings"]["lines_per_writer"]
        batch = cfg["settings"]["batch_size"]
        epochs = pd.read_csv(history)
        # (the loader drops a last partial batch)
        lines += len(epochs) * (per_epoch // batch * batch)
        seconds += float(epochs["epoch_time_s"].sum())
    return int(lines), seconds


def gpu_samples(csv: Path, start: dt.datetime, end: dt.datetime) -> pd.DataFrame:
    """nvidia-smi's samples taken while trials ran."""
    smi = pd.read_csv(csv, names=SMI_COLUMNS, skipinitialspace=True)
    smi["timestamp"] = pd.to_datetime(smi["timestamp"], format="%Y/%m/%d %H:%M:%S.%f")
    return smi[(smi["timestamp"] >= start) & (smi["timestamp"] <= end)]


def report(out: Path) -> str:
    """The markdown report."""
    search = out / "search"
    trials = optuna.load_study(study_name=DEFAULT_STUDY_NAME,
                               storage=layout.default_storage_url(search)).get_trials()
    ran = [t for t in trials if t.datetime_start and t.datetime_complete]
    start, end = min(t.datetime_start for t in ran), max(t.datetime_complete for t in ran)
    busy = (end - start).total_seconds()
    lines, epoch_s = search_lines(search)
    smi = gpu_samples(out / "nvidia_smi.csv", start, end)
    throughput = json.loads((out / "throughput.json").read_text())
    workers = sorted({t.user_attrs.get("worker", "?") for t in ran})
    rows = [
        ("trials", ", ".join(f"{n} {state.lower()}" for state, n
                             in sorted(Counter(t.state.name for t in trials).items()))),
        ("workers on the GPU", ", ".join(workers)),
        ("training lines/s, the GPU (both workers, while trials ran)", f"{lines / busy:.1f}"),
        ("training lines/s, per trial (epochs incl. validation)", f"{lines / epoch_s:.1f}"),
        ("GPU utilisation while trials ran, mean / max (%)",
         f"{smi['util_pct'].mean():.0f} / {smi['util_pct'].max():.0f} ({len(smi)} samples)"),
        ("GPU memory used, peak (MiB, both workers)",
         f"{smi['mem_used_mib'].max():.0f} of {smi['mem_total_mib'].max():.0f}"),
        ("precision", throughput["rows"][0]["precision"]),
    ]
    text = [f"# GPU check: {throughput['device_name']}", "",
            f"{dt.datetime.now():%Y-%m-%d %H:%M}; search: 2 workers on one GPU, 4 trials of "
            "small/convnext, 3 epochs, 160x1760, batch 16, random weights", "",
            "| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
            "AMP training step (uint8 batch, augmentation on the GPU, forward, backward, AdamW):",
            "", "| model | size | batch | lines/s | precision | peak GiB |",
            "|---|---|---|---|---|---|",
            *[f"| {r['model']} | {r['size']} | {r['batch']} | {r['lines_per_s']} | "
              f"{r['precision']} | {r['peak_gib']} |" for r in throughput["rows"]], "",
            "Memory after a forced out-of-memory trial, and augmentation on the GPU: "
            + (out / "pytest.log").read_text().strip().splitlines()[-1], ""]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python bench/gpu_check_report.py OUT_DIR (the folder gpu_check.sh filled)",
              file=sys.stderr)
        return 2
    out = Path(args[0])
    text = report(out)
    atomic.write_text(out / "gpu_check.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
