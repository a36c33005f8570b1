"""Stand-alone searches of the built-in objective started as a user starts them
(`single_gpu_hyperparameter_search.py` on tiny synthetic data), for the tests of real trials."""
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--models", "small", "--img_height", "32", "--img_width", "256", "--batch_size", "8",
        "--lines_per_writer", "16", "--num_workers", "0", "--use_all_writers"]


def search(data, ckpt, n_trials, epochs, extra=(), **popen):
    """The search, run to its end (a CompletedProcess), or started (a Popen) given `popen`."""
    cmd = [sys.executable, str(ROOT / "single_gpu_hyperparameter_search.py"), "--data_root",
           str(data), "--checkpoint_dir", str(ckpt), "--n_trials", str(n_trials), "--epochs",
           str(epochs), *TINY, *extra]
    if popen:
        return subprocess.Popen(cmd, **popen)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def interrupt_after_first_epoch(proc, ckpt) -> None:
    """Ctrl+C the search once trial 0 has a row in its history.csv (it saved its last.pth)."""
    history = Path(ckpt) / "trial_000" / "history.csv"
    deadline = time.time() + 240
    while time.time() < deadline and not (history.exists() and
                                          len(history.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
