"""The writer-identification data: line datasets over the image cache, augmentation, the
writer-balanced sampler; and a synthetic data set in the real layout:

    python dataset.py make-synthetic demo_data --writers 8            # train/val/test layout
    python dataset.py make-synthetic demo_flat --writers 8 --flat     # writer folders only

The code is psearch/writer_id/ (dataset.py, data_index.py, image_cache.py, synthetic.py).
"""
import sys

if __name__ == "__main__":  # the command line draws PNGs: no torch needed
    from psearch.writer_id.synthetic import main

    sys.exit(main())

from psearch.writer_id.dataset import *  # noqa: E402,F401,F403
