"""A test objective that sleeps like a GPU-bound trial and records where and when it ran.

SLEEPY_SECONDS sets the sleep (default 1). SLEEPY_WAIT_FOR=N first waits until N trials of the
study have started (a barrier that only parallel workers can pass). Each trial folder gets
`env.json`: the worker label, CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS, pid, start and end times.
"""
import json
import os
import time


def _started(checkpoint_dir):
    return len(list(checkpoint_dir.glob("trial_*/env.json")))


def objective(trial, trial_dir):
    x = trial.suggest_float("x", 0.0, 1.0)
    record = {"worker": os.environ.get("PARALLEL_SEARCH_WORKER"),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "pid": os.getpid(), "start": time.time()}
    (trial_dir / "env.json").write_text(json.dumps(record))
    wait_for = int(os.environ.get("SLEEPY_WAIT_FOR", "0"))
    deadline = time.time() + 60
    while _started(trial_dir.parent) < wait_for:
        if time.time() > deadline:
            raise RuntimeError(f"fewer than {wait_for} trials ever ran at once")
        time.sleep(0.1)
    time.sleep(float(os.environ.get("SLEEPY_SECONDS", "1")))
    record["end"] = time.time()
    (trial_dir / "env.json").write_text(json.dumps(record))
    return x
