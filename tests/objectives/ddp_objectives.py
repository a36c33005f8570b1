"""A custom objective that trains each trial as K ranks, the pattern docs/CLUSTERS.md documents: the
objective suggests, `ranks.run_ranks` runs `ddp_rank.py` once per device, rank 0's value returns.
DDP_FAIL_TRIAL=N makes rank 1 of trial N fail (as if it ran out of memory)."""
import sys
from pathlib import Path

from psearch.engine import ranks

RANK_SCRIPT = Path(__file__).with_name("ddp_rank.py")


def objective(trial, trial_dir):
    x = trial.suggest_float("x", 0.0, 1.0)
    result = ranks.run_ranks([sys.executable, str(RANK_SCRIPT), repr(x), str(trial.number)],
                             trial_dir)
    trial.set_user_attr("world_size", result["world_size"])
    return result["value"]
