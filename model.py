"""The writer-identification networks (small CNN, ConvNeXt-Tiny, rectangular-patch ViT) and
loading a saved best model:

    from model import load_best_model          # or: from psearch.writer_id.model import ...
    net, writers, meta = load_best_model("runs/search1/best_overall/best_model.pth")

The code is psearch/writer_id/model.py (the backbones: psearch/writer_id/backbones.py).
"""
from psearch.writer_id.model import *  # noqa: F401,F403
