"""Which devices the parallel search uses, which worker runs where, and how CPU cores are split.

Everything here is pure (plain strings, lists and dicts in, new values out) except `probe_gpus`,
the one function that asks the machine. Workers are pinned by the id the parent itself sees in
CUDA_VISIBLE_DEVICES (an index, a `GPU-…` UUID or a `MIG-…` id), never by a renumbered 0..n-1:
with CUDA_VISIBLE_DEVICES=0,1,3 the workers get 0, 1 and 3.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
from typing import Callable, Mapping, Sequence

from psearch.engine.errors import UsageError
from psearch.engine.worker_env import WorkerIdentity

logger = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Workers per core beyond which nothing runs faster, only slower (and 8 workers always allowed).
WORKERS_PER_CORE = 4
MIN_WORKER_LIMIT = 8


@dataclasses.dataclass(frozen=True)
class WorkerSlot:
    """One worker process to run: its label (gpu3, gpu3w1, gpu0+1, cpu0), rank and device id."""

    label: str
    rank: int
    device: str | None  # its CUDA_VISIBLE_DEVICES value ("3", "0,1"), None for a CPU worker

    @property
    def gpus(self) -> tuple[str, ...]:
        """The GPU ids this worker's trials use (several with --gpus_per_trial)."""
        return tuple(self.device.split(",")) if self.device is not None else ()

    def describe(self) -> str:
        """Human words for the device: "GPU 3", "GPU 3 (gpu3w1)", "GPUs 0,1", "CPU (cpu0)"."""
        if self.device is None:
            return f"CPU ({self.label})"
        if len(self.gpus) > 1:
            return f"GPUs {self.device}"
        plain = f"GPU {self.device}"
        return plain if self.label == gpu_label(self.device) else f"{plain} ({self.label})"


def parse_id_list(text: str, source: str) -> list[str]:
    """Split a comma list of device ids; UsageError on empty entries or duplicates."""
    ids = [part.strip() for part in text.split(",")]
    if any(not i for i in ids):
        raise UsageError(f"{source}={text!r} has an empty entry; use a comma list such as 0,1,3")
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UsageError(f"{source}={text!r} lists GPU {', '.join(dupes)} more than once; "
                         "name each GPU once (use --workers_per_gpu K for K workers per GPU)")
    return ids


def visible_from_env(environ: Mapping[str, str]) -> list[str] | None:
    """The ids in CUDA_VISIBLE_DEVICES as given; [] when empty or -1; None when unset."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    if value.strip() in ("", "-1"):
        return []
    return parse_id_list(value, "CUDA_VISIBLE_DEVICES")


def resolve_gpus(gpus_flag: str | None, environ: Mapping[str, str],
                 probe: Callable[[], list[str]]) -> list[str]:
    """The GPU ids to use: --gpus, else CUDA_VISIBLE_DEVICES, else what `probe` finds."""
    visible = visible_from_env(environ)
    if gpus_flag is None:
        return visible if visible is not None else list(probe())
    wanted = parse_id_list(gpus_flag, "--gpus")
    if visible is None:
        return wanted  # trusted as given: ids as nvidia-smi numbers them
    shown = ",".join(visible) or "(none)"
    if len(wanted) > len(visible):
        raise UsageError(f"{len(wanted)} gpus requested (--gpus {gpus_flag}), but only "
                         f"{len(visible)} were specified visible (CUDA_VISIBLE_DEVICES={shown})")
    unknown = [g for g in wanted if g not in visible]
    if unknown:
        raise UsageError(f"--gpus {gpus_flag}: GPU {', '.join(unknown)} is not in "
                         f"CUDA_VISIBLE_DEVICES={shown}; name GPUs from that list or drop --gpus")
    return wanted


def gpu_label(device: str) -> str:
    """A file-name-safe label for a GPU id: gpu3, or gpu-GPU-8f3e… for a UUID / MIG id."""
    if device.isdigit():
        return f"gpu{device}"
    return "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")


def group_label(group: Sequence[str]) -> str:
    """The label of a worker on several GPUs: gpu0+1, or the GPUs' labels joined by + (pure)."""
    if all(g.isdigit() for g in group):
        return "gpu" + "+".join(group)
    return "+".join(gpu_label(g) for g in group)


def group_gpus(gpus: Sequence[str], per_trial: int) -> tuple[list[tuple[str, ...]], list[str]]:
    """The GPUs in slots of `per_trial`, in the order given, and those left over (pure)."""
    used = len(gpus) // per_trial * per_trial
    groups = [tuple(gpus[i:i + per_trial]) for i in range(0, used, per_trial)]
    return groups, list(gpus[used:])


def plan_workers(gpus: Sequence[str], workers_per_gpu: int = 1,
                 cpu_workers: int | None = None, gpus_per_trial: int = 1) -> list[WorkerSlot]:
    """One slot per GPU (× workers_per_gpu), or per `gpus_per_trial` GPUs (the ids verbatim,
    comma-joined), or `cpu_workers` CPU slots (pure). GPUs that do not fill a slot get none."""
    if cpu_workers is not None:
        return [WorkerSlot(f"cpu{i}", i, None) for i in range(cpu_workers)]
    if gpus_per_trial > 1:
        groups, _ = group_gpus(gpus, gpus_per_trial)
        return [WorkerSlot(group_label(g), i, ",".join(g)) for i, g in enumerate(groups)]
    slots = []
    for device in gpus:
        for k in range(workers_per_gpu):
            suffix = f"w{k}" if workers_per_gpu > 1 else ""
            slots.append(WorkerSlot(gpu_label(device) + suffix, len(slots), device))
    return slots


def per_trial_words(slots: Sequence[WorkerSlot], per_trial: int) -> str:
    """'2 GPUs per trial' ('2 processes per trial' on the CPU); '' for one device (pure)."""
    if per_trial <= 1:
        return ""
    return f"{per_trial} {'GPUs' if any(s.device for s in slots) else 'processes'} per trial"


def threads_per_worker(n_cores: int, n_workers: int) -> int:
    """CPU cores each worker may use (at least one)."""
    return max(1, n_cores // max(1, n_workers))


def loader_processes(requested: int, threads: int) -> int:
    """Data-loader processes per worker: the user's --num_workers, capped so that the worker's
    main process and its loaders fit in its share of cores."""
    return max(0, min(requested, threads - 1))


def worker_env(base: Mapping[str, str], slot: WorkerSlot, n_workers: int, parent_pid: int,
               threads: int, run: str = "") -> dict[str, str]:
    """The environment of one worker: a new dict from `base` with pinning and identity set."""
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = slot.device if slot.device is not None else ""
    # CUDA numbers GPUs fastest first unless told otherwise; nvidia-smi by PCI bus. Ids read off
    # nvidia-smi must name the same GPUs in the worker.
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env.update({name: str(threads) for name in THREAD_VARS})
    env.update(WorkerIdentity(label=slot.label, rank=slot.rank, n_workers=n_workers, managed=True,
                              parent_pid=parent_pid, cpu_threads=threads, run=run).environ())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse_nvidia_smi(output: str) -> list[str]:
    """GPU indices from `nvidia-smi --query-gpu=index --format=csv,noheader` output (pure)."""
    return [line.strip() for line in output.splitlines() if line.strip().isdigit()]


@dataclasses.dataclass(frozen=True)
class GpuInventory:
    """The GPUs the driver reports: their indices and UUIDs (GPU-… and MIG-…)."""

    indices: tuple[str, ...]
    uuids: tuple[str, ...]

    def knows(self, device: str) -> bool:
        """True when CUDA_VISIBLE_DEVICES=device names one of these GPUs: an index, or a UUID or
        a unique start of one, as CUDA accepts (pure)."""
        if device.isdigit():
            return device in self.indices
        return sum(u.startswith(device) for u in self.uuids) == 1

    def describe(self) -> str:
        return ", ".join(self.indices) if self.indices else "none"


def parse_nvidia_smi_list(output: str) -> GpuInventory:
    """The GPUs in `nvidia-smi -L` output: 'GPU 0: NAME (UUID: GPU-…)' lines, and indented
    'MIG … Device 0: (UUID: MIG-…)' lines under them (pure)."""
    indices = re.findall(r"^GPU (\d+):", output, flags=re.MULTILINE)
    uuids = re.findall(r"UUID: ((?:GPU|MIG)-[^)\s]+)\)", output)
    return GpuInventory(tuple(indices), tuple(uuids))


def unknown_gpus(ids: Sequence[str], inventory: GpuInventory) -> list[str]:
    """The ids that name no GPU of `inventory` (pure)."""
    return [i for i in ids if not inventory.knows(i)]


def check_gpus_exist(ids: Sequence[str], inventory: GpuInventory | None, source: str) -> None:
    """UsageError when an id names no GPU the driver reports (nothing checked without a driver
    tool: then the worker itself refuses a GPU that CUDA cannot use)."""
    if inventory is None or not ids:
        return
    missing = unknown_gpus(ids, inventory)
    if missing:
        raise UsageError(f"{source}: no GPU {', '.join(missing)} on this machine (nvidia-smi "
                         f"lists {inventory.describe()}); name GPUs from that list")


def probe_inventory(timeout_s: float = 15.0) -> GpuInventory | None:
    """What `nvidia-smi -L` reports, or None where there is no nvidia-smi to ask."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        result = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_s,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_nvidia_smi_list(result.stdout) if result.returncode == 0 else None


def max_workers(n_cores: int, memory_bytes: int | None, per_worker: int) -> int:
    """How many workers this machine can sensibly run: a few per core, and what fits in memory
    at `per_worker` bytes each (the objective's `worker_memory`: beyond it the launcher would be
    OOM-killed) (pure)."""
    by_cores = max(MIN_WORKER_LIMIT, WORKERS_PER_CORE * n_cores)
    if not memory_bytes:
        return by_cores
    return max(1, min(by_cores, memory_bytes // per_worker))


def check_worker_count(n_workers: int, limit: int, n_cores: int, memory_bytes: int | None,
                       flag: str, what: str = "workers") -> None:
    """UsageError naming the limit when more workers (or processes: `what`) are asked for than
    the machine can run."""
    if n_workers <= limit:
        return
    memory = f", {memory_bytes / (1 << 30):.1f} GiB memory" if memory_bytes else ""
    raise UsageError(f"{flag} asks for {n_workers} {what}; this machine can run at most {limit} "
                     f"({n_cores} cores{memory}); ask for {limit} or fewer")


def total_memory_bytes() -> int | None:
    """MemTotal from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def probe_gpus(timeout_s: float = 15.0) -> list[str]:
    """GPU indices on this machine, from NVML if importable, else nvidia-smi; [] when none.

    Never imports torch: the launcher must stay light and must not create a CUDA context.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, or no driver: try the command-line tool
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        result = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(result.stdout) if result.returncode == 0 else []


def choose_workers(gpus_flag: str | None, cpu_workers: int | None, workers_per_gpu: int,
                   environ: Mapping[str, str], probe: Callable[[], list[str]],
                   cpu_fallback: int | None = None, gpus_per_trial: int = 1) -> list[WorkerSlot]:
    """Validate the device flags and plan the workers; `cpu_fallback` CPU workers when no GPU
    is found (the demo), else UsageError with the hint to use --cpu_workers. GPUs that do not
    fill a slot of `gpus_per_trial` are named in a warning and left idle."""
    if workers_per_gpu < 1:
        raise UsageError(f"--workers_per_gpu must be at least 1, got {workers_per_gpu}")
    if gpus_per_trial < 1:
        raise UsageError(f"--gpus_per_trial must be at least 1, got {gpus_per_trial}")
    if gpus_per_trial > 1 and workers_per_gpu > 1:
        raise UsageError(f"--gpus_per_trial {gpus_per_trial} conflicts with --workers_per_gpu "
                         f"{workers_per_gpu}: a trial on several GPUs has them to itself; pass "
                         "one of them")
    if cpu_workers is not None:
        if gpus_flag is not None:
            raise UsageError(f"--gpus {gpus_flag} conflicts with --cpu_workers {cpu_workers}; "
                             "pass one of them")
        if cpu_workers < 1:
            raise UsageError(f"--cpu_workers must be at least 1, got {cpu_workers}")
        return plan_workers([], cpu_workers=cpu_workers)
    gpus = resolve_gpus(gpus_flag, environ, probe)
    if gpus and gpus_per_trial > len(gpus):
        raise UsageError(f"--gpus_per_trial {gpus_per_trial} needs {gpus_per_trial} GPUs, but only "
                         f"{len(gpus)} are available ({','.join(gpus)}); ask for "
                         f"--gpus_per_trial {len(gpus)} or fewer")
    if gpus:
        _, idle = group_gpus(gpus, gpus_per_trial)
        if idle:
            logger.warning("GPU %s left idle: %d GPUs do not fill slots of --gpus_per_trial %d",
                           ",".join(idle), len(gpus), gpus_per_trial)
        return plan_workers(gpus, workers_per_gpu, gpus_per_trial=gpus_per_trial)
    if cpu_fallback:
        return plan_workers([], cpu_workers=cpu_fallback)
    where = ("CUDA_VISIBLE_DEVICES is empty" if visible_from_env(environ) is not None
             else "nvidia-smi found none")
    raise UsageError(f"No GPUs available ({where}); pass --cpu_workers N to run N workers on "
                     "the CPU, or --gpus LIST")
