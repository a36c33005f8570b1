"""A test objective that writes FILLS_DISK_MIB MiB into its trial folder (default 1), like a
trial saving checkpoints, then returns its x: on a small file system the trials fill the disk."""
import os


def objective(trial, trial_dir):
    x = trial.suggest_float("x", 0.0, 1.0)
    block = os.urandom(1 << 20)
    with open(trial_dir / "weights.bin", "wb") as fh:
        for _ in range(int(os.environ.get("FILLS_DISK_MIB", "1"))):
            fh.write(block)
    return x
