"""One rank of ddp_objectives.objective: joins the gloo group run_ranks set up, all-reduces
x * (rank + 1), and rank 0 returns the sum (so the value proves every rank took part)."""
import os
import sys

import torch
import torch.distributed as dist

from psearch.engine import ranks


def train():
    dist.init_process_group("gloo")
    x, number = float(sys.argv[1]), int(sys.argv[2])
    if os.environ.get("DDP_FAIL_TRIAL") == str(number) and dist.get_rank() == 1:
        raise MemoryError("rank 1 ran out of memory (test)")
    total = torch.tensor([x * (dist.get_rank() + 1)], dtype=torch.float64)
    dist.all_reduce(total)
    return {"value": total.item(), "world_size": dist.get_world_size()}


if __name__ == "__main__":
    ranks.rank_main(train)
