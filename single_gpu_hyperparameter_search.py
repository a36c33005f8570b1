"""The sequential search on one device (also the worker the parallel launcher starts per GPU).

    python single_gpu_hyperparameter_search.py --data_root D --checkpoint_dir C \
        --n_trials 20 --use_all_writers

The code is psearch/engine/worker.py, here with the built-in writer-identification objective as
its default (psearch/writer_id/builtin.py; installed: `single-gpu-search`).
"""
from psearch.writer_id.builtin import worker_main as main

if __name__ == "__main__":
    raise SystemExit(main())
