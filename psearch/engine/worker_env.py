"""A worker's environment, the one contract between the launcher that writes it and the worker
that reads it: who the worker is (its label, rank, the launcher's pid and run, its share of the
cores). Pinning to a device (CUDA_VISIBLE_DEVICES, thread limits) is devices.worker_env's; the
storage URL is config.child_env's. Pure."""
from __future__ import annotations

import dataclasses
from typing import Mapping

PREFIX = "PARALLEL_SEARCH_"
LABEL, RANK, N_WORKERS = PREFIX + "WORKER", PREFIX + "RANK", PREFIX + "N_WORKERS"
MANAGED, PARENT_PID, CPU_THREADS = PREFIX + "MANAGED", PREFIX + "PARENT_PID", PREFIX + "CPU_THREADS"
RUN_VAR = PREFIX + "RUN"  # kept across a stand-alone worker's restart after a time-out


@dataclasses.dataclass(frozen=True)
class WorkerIdentity:
    """Who this process is, as the launcher's environment says (defaults: a stand-alone run)."""

    label: str = "single"
    rank: int = 0
    n_workers: int = 1
    managed: bool = False
    parent_pid: int | None = None
    cpu_threads: int | None = None
    run: str = ""  # the launcher run this worker belongs to (its own identity when stand-alone)

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> "WorkerIdentity":
        """Read the PARALLEL_SEARCH_* variables (pure)."""
        def _int(name: str) -> int | None:
            return int(env[name]) if env.get(name, "").strip() else None

        return cls(label=env.get(LABEL, "single"), rank=_int(RANK) or 0,
                   n_workers=_int(N_WORKERS) or 1, managed=env.get(MANAGED) == "1",
                   parent_pid=_int(PARENT_PID), cpu_threads=_int(CPU_THREADS),
                   run=env.get(RUN_VAR, ""))

    def environ(self) -> dict[str, str]:
        """The variables that make a child this worker (the inverse of from_environ) (pure)."""
        env = {LABEL: self.label, RANK: str(self.rank), N_WORKERS: str(self.n_workers),
               MANAGED: "1" if self.managed else "0", RUN_VAR: self.run}
        if self.parent_pid is not None:
            env[PARENT_PID] = str(self.parent_pid)
        if self.cpu_threads is not None:
            env[CPU_THREADS] = str(self.cpu_threads)
        return env
