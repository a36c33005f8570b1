"""One rank of train.Trainer under DistributedDataParallel, for tests/test_ddp.py:
    python ddp_trainer.py DATA CACHE OUT MODE     (MODE: end_at_2 | patience_1)
Rank 0's on_epoch raises at epoch 2 (end_at_2, as a pruned trial does), or patience 1 stops early
(patience_1). Every rank writes OUT/rankR.json: the epochs it trained, how it left, and a checksum
of its weights (DistributedDataParallel keeps them equal)."""
import json
import sys
from pathlib import Path

import torch

from psearch.engine import ranks
from psearch.writer_id import data_index, dataset, distributed, model as model_lib
from psearch.writer_id.train import RankEnded, TrainConfig, Trainer


def train():
    data_root, cache, out, mode = sys.argv[1:5]
    dist = distributed.from_env()
    index = data_index.index_dataset(data_root)
    data = dataset.make_datasets(index, index.writers, 32, 256, cache, 20, 0, processes=1)
    torch.manual_seed(dist.rank)   # different on purpose: DDP must start every rank from rank 0's
    net = model_lib.build_model(model_lib.ModelSpec("small", len(data.writers), 64, 32, 256,
                                                    pretrained=False))
    tc = TrainConfig(epochs=4, patience=1 if mode == "patience_1" else 10, batch_size=4, lr=1e-3,
                     weight_decay=0.0, lines_per_writer=8)
    trainer = Trainer(net, data, tc, dist.device, Path(out) / "trial", {}, dist=dist)
    (Path(out) / "trial").mkdir(exist_ok=True)
    seen = []

    def on_epoch(epoch, row):
        seen.append(epoch)
        if mode == "end_at_2" and epoch == 2:
            raise RuntimeError("rank 0 ends the trial at epoch 2")

    left = "returned"
    try:
        result = trainer.fit(on_epoch)
        left = result["status"]
    except RankEnded:
        left = "RankEnded"
    finally:
        checksum = sum(float(p.detach().double().sum()) for p in trainer.model.parameters())
        Path(out, f"rank{dist.rank}.json").write_text(json.dumps(
            {"epochs": trainer.state.epoch, "left": left, "on_epoch": seen,
             "checksum": checksum, "batches": len(trainer.train_loader)}))
    distributed.close()
    return left


if __name__ == "__main__":
    ranks.rank_main(train)
