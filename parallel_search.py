"""Parallel hyperparameter search: one worker per GPU, all drawing trials from one Optuna study.

    python parallel_search.py --data_root D --checkpoint_dir C --n_trials 24 --use_all_writers
    CUDA_VISIBLE_DEVICES=0,1,3 python parallel_search.py ...      # workers on GPUs 0, 1 and 3
    python parallel_search.py ... --cpu_workers 2                  # no GPU: two CPU workers
    python parallel_search.py --demo                               # synthetic data, a few minutes

The launcher itself is psearch/engine/launcher.py, here with the built-in writer-identification
objective as its default (psearch/writer_id/builtin.py; installed: `parallel-search`).
"""
import sys

if __name__ == "__main__":  # first of all: a password typed in --storage leaves `ps` at once
    from psearch.engine import urls

    urls.hide_url_passwords(sys.argv[1:])

from psearch.writer_id.builtin import launcher_main as main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
