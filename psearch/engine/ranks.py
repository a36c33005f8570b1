"""One trial as K processes (DistributedDataParallel ranks): start them, watch them, end them.

Objective-agnostic and torch-free. `run_ranks` starts K copies of a command with the variables
`torchrun` sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: a free
loopback port per trial), so the command initialises its process group with
`torch.distributed.init_process_group(backend)` and nothing else. The ranks stay in the worker's
process group (the launcher's group kill reaches them) and die with the worker. The first rank
to fail ends the others and the trial, with its reason; a stop request ends them all; rank 0
hands its result back as JSON (`write_result`). A rank that raises writes one line for the
trial's fail reason (`rank_main` does both).

The pattern for a custom objective (docs/CLUSTERS.md, "One trial on several GPUs"):

    def objective(trial, trial_dir):
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        return ranks.run_ranks([sys.executable, "train_ddp.py", str(lr)], trial_dir)

    # train_ddp.py: each rank runs this; torch.distributed.init_process_group("nccl") (or "gloo"
    # on the CPU) finds the others through the variables above
    if __name__ == "__main__":
        ranks.rank_main(train)        # train() -> rank 0's value, returned by run_ranks
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from psearch.engine import atomic, faults
from psearch.engine.stopping import StopRequested, die_with_parent

logger = logging.getLogger(__name__)
# How many processes a trial runs as: the worker sets it from --gpus_per_trial for its objective.
WORLD_SIZE_VAR = "PARALLEL_SEARCH_GPUS_PER_TRIAL"
RESULT_VAR = "PARALLEL_SEARCH_RANK_RESULT"    # where rank 0 writes its result (JSON)
ERROR_VAR = "PARALLEL_SEARCH_RANK_ERROR"      # where a failing rank writes its one-line reason
PARENT_VAR = "PARALLEL_SEARCH_RANK_PARENT"    # the worker's pid: a rank dies with it
RANKS_DIR = ".ranks"                          # inside the trial folder, removed afterwards
POLL_S = 0.1
STOP_GRACE_S = 10.0    # after SIGTERM, the ranks get this long before SIGKILL
STOP_SETTLE_S = 1.0    # a rank ended by the signal that stops the worker is no failure


class RankFailed(RuntimeError):
    """A rank of a trial failed; the message is the trial's fail reason."""


def world_size_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The processes per trial this worker was given (--gpus_per_trial; 1 outside a worker)."""
    value = (os.environ if environ is None else environ).get(WORLD_SIZE_VAR, "1")
    return max(1, int(value)) if value.isdigit() else 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def rank_env(base: Mapping[str, str], rank: int, world_size: int, port: int, files: Path,
             parent_pid: int) -> dict[str, str]:
    """The environment of rank `rank`: torchrun's variables and where its files go (pure).
    Every rank sees all of the trial's GPUs (CUDA_VISIBLE_DEVICES as given) and uses the one
    at its LOCAL_RANK."""
    return {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            RESULT_VAR: str(files / "result.json"), ERROR_VAR: str(error_file(files, rank)),
            PARENT_VAR: str(parent_pid)}


def error_file(files: Path, rank: int) -> Path:
    """Where rank `rank` leaves its one-line fail reason (pure)."""
    return files / f"rank{rank}.error"


def exit_reason(returncode: int, error_line: str | None) -> str:
    """Why a rank ended, in a few words (pure)."""
    if error_line:
        return error_line
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() \
            else f"signal {-returncode}"
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {returncode} (its traceback is in the worker log)"


def culprit(failed: Sequence[tuple[int, int, float | None]]) -> tuple[int, int]:
    """Of the ranks seen failed at once, (rank, code) of the one that caused it (pure): a rank
    killed by a signal first (the others then lose their peer), else the earliest error line."""
    killed = [f for f in failed if f[1] < 0]
    if killed:
        return killed[0][0], killed[0][1]
    rank, code, _ = min(failed, key=lambda f: (f[2] is None, f[2] or 0.0, f[0]))
    return rank, code


def run_ranks(argv: Sequence[str], trial_dir: Path, world_size: int | None = None,
              env: Mapping[str, str] | None = None,
              should_stop: Callable[[], bool] = lambda: False) -> Any:
    """Run `argv` as `world_size` ranks (default: this worker's --gpus_per_trial) and return
    what rank 0 passed to `write_result`. RankFailed when a rank fails (the others are ended);
    StopRequested when `should_stop` turns true (all are ended)."""
    world = world_size or world_size_from_env()
    files = Path(trial_dir) / RANKS_DIR
    files.mkdir(parents=True, exist_ok=True)
    for stale in [files / "result.json", *files.glob("rank*.error")]:  # of an earlier attempt
        stale.unlink(missing_ok=True)
    port, base = free_port(), dict(os.environ if env is None else env)
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(world):
            procs.append(subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                          env=rank_env(base, rank, world, port, files,
                                                       os.getpid())))
        logger.info("Started %d ranks (pids %s, port %d)", world,
                    ",".join(str(p.pid) for p in procs), port)
        return _watch(procs, files, should_stop)
    finally:
        end_ranks(procs)
        with contextlib.suppress(OSError):
            for leftover in files.iterdir():
                leftover.unlink()
            files.rmdir()


def _watch(procs: list[subprocess.Popen], files: Path, should_stop: Callable[[], bool]) -> Any:
    world = len(procs)
    while True:
        if should_stop():
            raise StopRequested("stopped while the ranks ran")
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            settle = time.monotonic() + STOP_SETTLE_S
            while time.monotonic() < settle and not should_stop():
                time.sleep(POLL_S)
            if should_stop():
                raise StopRequested("stopped while the ranks ran")
            rank, code = culprit([(r, c, _mtime(error_file(files, r))) for r, c in failed])
            raise RankFailed(f"rank {rank} of {world} failed: "
                             f"{exit_reason(code, _read_line(error_file(files, rank)))}")
        if all(c == 0 for c in codes):
            result = files / "result.json"
            if not result.exists():
                raise RankFailed(f"all {world} ranks ended without a result: rank 0 must call "
                                 "ranks.write_result(value) (or run under ranks.rank_main)")
            return json.loads(result.read_text())["result"]
        time.sleep(POLL_S)


def end_ranks(procs: Sequence[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every rank still running, SIGKILL those still there after `grace_s`; reap all."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _read_line(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


# ------------------------------------------------------------------ inside a rank
def rank() -> int:
    """This process's rank (0 outside a trial's ranks)."""
    return int(os.environ.get("RANK", "0"))


def write_result(value: Any) -> None:
    """Rank 0: hand `value` (anything JSON can hold) back to `run_ranks`."""
    path = os.environ.get(RESULT_VAR)
    if path is None:
        raise RuntimeError(f"{RESULT_VAR} is not set: this process was not started by run_ranks")
    atomic.write_json(Path(path), {"result": value})


def write_error(exc: BaseException) -> None:
    """Leave this rank's one-line fail reason for `run_ranks` (best effort)."""
    path = os.environ.get(ERROR_VAR)
    if path is not None:
        with contextlib.suppress(OSError):
            Path(path).write_text(faults.one_line(exc) + "\n")


def enter_rank() -> None:
    """What every rank does first: die with its worker, and leave Ctrl+C to the worker (which
    ends the ranks itself, so that it can tell a stop from a failure)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.environ.get(PARENT_VAR)
    if parent and parent.isdigit():
        die_with_parent(int(parent))


def rank_main(fn: Callable[[], Any]) -> None:
    """Run `fn` as a rank: rank 0's return value becomes run_ranks' result; an exception becomes
    the trial's fail reason (and its traceback goes to stderr, the worker log). Exits."""
    enter_rank()
    try:
        value = fn()
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the worker as a line
        write_error(exc)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if rank() == 0:
        write_result(value)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
