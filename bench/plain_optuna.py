"""One plain Optuna process on a shared study: `study.optimize(objective, n_trials, n_jobs)`, as
a user would start it by hand (what bench/launcher_vs_optuna.py compares the launcher with).

    python bench/plain_optuna.py STORAGE_URL STUDY_NAME N_TRIALS [--n_jobs K] [--seed S]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sleepy_objective import objective  # noqa: E402

from psearch.engine.study import make_sampler  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("storage", help="an RDB URL, e.g. sqlite:///study.db (required)")
    parser.add_argument("study_name", help="an existing study (required)")
    parser.add_argument("n_trials", type=int, help="trials this process runs (required)")
    parser.add_argument("--n_jobs", type=int, default=1, help="threads (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the study, "
                        "for the sampler's random start-up trials (default: 1)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the launcher's sampler and SQLite lock timeout: only the process management differs
    storage = optuna.storages.RDBStorage(args.storage,
                                         engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.load_study(study_name=args.study_name, storage=storage,
                              sampler=make_sampler(args.seed, max(args.workers, args.n_jobs)))
    study.optimize(objective, n_trials=args.n_trials, n_jobs=args.n_jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
