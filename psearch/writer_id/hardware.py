"""Where a trial runs: the device and the cores this process may use (no optuna, no CLI)."""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may use (honours taskset/SLURM cpusets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pick_device() -> torch.device:
    """cuda:0 (the launcher pins a GPU through CUDA_VISIBLE_DEVICES) or, with a warning, the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda:0")
    logger.warning("CUDA is not available: running on the CPU (slow)")
    return torch.device("cpu")
