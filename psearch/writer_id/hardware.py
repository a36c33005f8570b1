"""Where a trial runs: the device and the cores this process may use (no optuna, no CLI)."""
from __future__ import annotations

import logging
import os
from typing import Mapping

import torch

from psearch.engine.errors import DeviceUnavailable

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may use (honours taskset/SLURM cpusets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pinned_gpu(environ: Mapping[str, str]) -> str | None:
    """The CUDA_VISIBLE_DEVICES value when it names a device; None when it is unset, empty or
    -1 (the CPU on purpose) (pure)."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    return None if value is None or value.strip() in ("", "-1") else value


def pick_device(environ: Mapping[str, str] | None = None) -> torch.device:
    """cuda:0 (the launcher pins a GPU through CUDA_VISIBLE_DEVICES), or the CPU when no GPU was
    named; DeviceUnavailable when one was named but CUDA cannot use it (a slot of a GPU run that
    quietly trained on the CPU would take days and skew the search)."""
    if torch.cuda.is_available():
        return torch.device("cuda:0")
    pinned = pinned_gpu(os.environ if environ is None else environ)
    if pinned is not None:
        raise DeviceUnavailable(f"CUDA_VISIBLE_DEVICES={pinned} but CUDA cannot use it "
                                f"({cuda_problem()}): refusing to train on the CPU (set "
                                "CUDA_VISIBLE_DEVICES= to train on the CPU on purpose)")
    logger.warning("CUDA is not available: running on the CPU (slow)")
    return torch.device("cpu")


def cuda_problem() -> str:
    """Why CUDA cannot be used, in a few words (torch's own first sentence where it has one)."""
    if not torch.backends.cuda.is_built():
        return f"this torch {torch.__version__} is built without CUDA"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - its message is the explanation
        return str(exc).strip().split(". ")[0].rstrip(".") or type(exc).__name__
    return f"torch.cuda.device_count() is {torch.cuda.device_count()}"
