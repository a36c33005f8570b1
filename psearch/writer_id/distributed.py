"""Inside one rank of a trial trained on several devices: the process group, this rank's device,
decisions every rank takes together. torch only (no Optuna, no CLI flags).

`engine/ranks.py` starts the ranks with torchrun's variables; `from_env` joins them: NCCL on GPUs
(rank r on `cuda:r` of the trial's GPUs), gloo on the CPU. A trial on one device gets a `Dist` of
one, and every method here is then a no-op, so the training code has one path.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from typing import Any

import torch
import torch.distributed as torch_dist

from psearch.writer_id.hardware import DeviceUnavailable, pick_device

logger = logging.getLogger(__name__)
# A rank waits this long for the others (rank 0 validating a large split, writing checkpoints)
# before it gives up; a rank that dies is noticed by the worker at once, not after this.
COLLECTIVE_TIMEOUT_S = 4 * 3600


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in its trial: rank, world size and device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: validates, writes checkpoints and talks to Optuna."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def agree(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a decision: go on, stop early, end the trial)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place (epoch loss sums)."""
        if self.distributed:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    @property
    def _comm_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def single(device: torch.device) -> Dist:
    """A trial on one device."""
    return Dist(0, 1, device)


def rank_device(local_rank: int, world_size: int) -> torch.device:
    """cuda:LOCAL_RANK of the trial's GPUs, or the CPU when none was pinned; DeviceUnavailable
    when GPUs were pinned but fewer than the ranks are usable."""
    device = pick_device()
    if device.type != "cuda":
        return device
    found = torch.cuda.device_count()
    if found < world_size:
        raise DeviceUnavailable(f"a trial of {world_size} ranks needs {world_size} GPUs, but "
                                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')} "
                                f"shows {found}")
    return torch.device("cuda", local_rank)


def from_env(timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Dist:
    """Join the trial's process group from torchrun's variables (a Dist of one without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(local, world)
    if world == 1:
        return single(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, rank=rank, world_size=world,
                                  timeout=dt.timedelta(seconds=timeout_s))
    logger.info("Rank %d of %d on %s (%s)", rank, world, device, backend)
    return Dist(rank, world, device)


def close() -> None:
    """Leave the process group (at the end of a rank)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
