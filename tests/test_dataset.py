"""Line datasets (uint8 items, the batch transform per split), the writer-balanced sampler and
make_datasets. The augmentation itself: test_augment.py."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from psearch.writer_id import data_index, dataset as ds
from psearch.writer_id.image_cache import ImageCache
from psearch.writer_id.synthetic import make_synthetic


def labels_of(sizes: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, w) for w, n in enumerate(sizes)])


def test_sampler_draws_exactly_the_quota_per_writer_and_never_runs_dry():
    labels = labels_of([3, 10, 500])
    sampler = ds.WriterBalancedSampler(labels, lines_per_writer=40, seed=1)
    assert len(sampler) == 120
    for epoch in range(6):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == 120
        per_writer = Counter(int(labels[i % len(labels)]) for i in drawn)
        assert per_writer == {0: 40, 1: 40, 2: 40}


def test_sampler_cycles_without_replacement_across_epochs():
    labels = labels_of([7, 4])
    n = len(labels)
    sampler = ds.WriterBalancedSampler(labels, lines_per_writer=5, seed=3)
    draws = np.concatenate([sampler.epoch_indices(e) for e in range(5)])   # 25 per writer
    for writer, size in ((0, 7), (1, 4)):
        mine = [int(d) for d in draws if labels[d % n] == writer]
        cycles: dict[int, list[int]] = {}
        for d in mine:
            cycles.setdefault(d // n, []).append(d % n)
        lines = set(np.flatnonzero(labels == writer).tolist())
        for cycle, members in cycles.items():
            assert len(members) == len(set(members)), (writer, cycle)   # no repeat in a cycle
            if cycle < max(cycles):
                assert set(members) == lines                            # full cycles see all
        assert len(cycles) == -(-25 // size)   # epochs continue the stream, never restart it


def test_sampler_shuffles_and_is_deterministic_without_history():
    labels = labels_of([30, 30, 30])
    a = ds.WriterBalancedSampler(labels, lines_per_writer=20, seed=5)
    for epoch in range(4):
        a.set_epoch(epoch)
        list(a)
    b = ds.WriterBalancedSampler(labels, lines_per_writer=20, seed=5)
    b.set_epoch(3)
    assert list(a) == list(b)                      # resumed at epoch 3 without epochs 0..2
    assert list(b) != b.epoch_indices(2).tolist()
    assert b.epoch_indices(3).tolist() != ds.WriterBalancedSampler(labels, 20, 6).epoch_indices(
        3).tolist()
    first = [int(labels[i % 90]) for i in b.epoch_indices(0)]
    assert first != sorted(first)                  # writers are interleaved, not in blocks


def toy_cache(n: int = 6) -> ImageCache:
    pixels = np.stack([np.full((8, 16), 10 * k + 5, dtype=np.uint8) for k in range(n)])
    return ImageCache(pixels, tuple(f"/p{k}" for k in range(n)), np.ones(n, dtype=bool))


def test_line_dataset_hands_over_the_cached_uint8_pixels():
    cache = toy_cache()
    plain = ds.LineDataset(cache, [4, 1], [7, 3], train=False, seed=0)
    x, label, index = plain[0]
    assert x.shape == (1, 8, 16) and x.dtype == torch.uint8 and (label, index) == (7, 0)
    assert (x == 45).all()
    assert plain[1 + 2 * 5][1:] == (3, 1)          # a later cycle's draw is the same line
    x[...] = 0
    assert (plain[0][0] == 45).all()               # items are copies, never the cache itself


def test_batch_transform_augments_training_batches_reproducibly_per_epoch():
    cache = toy_cache()
    val = ds.LineDataset(cache, list(range(6)), [0] * 6, train=False, seed=0)
    batch = torch.stack([val[k][0] for k in range(6)])
    assert torch.equal(val.batch_transform(1, torch.device("cpu"))(batch), batch.float() / 255)
    train = ds.LineDataset(cache, list(range(6)), [0] * 6, train=True, seed=0)
    runs = {e: train.batch_transform(e, torch.device("cpu"))(batch) for e in (0, 1)}
    assert torch.equal(runs[0], train.batch_transform(0, torch.device("cpu"))(batch))
    assert not torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], batch.float() / 255)
    other_seed = ds.LineDataset(cache, list(range(6)), [0] * 6, train=True, seed=1)
    assert not torch.equal(runs[0], other_seed.batch_transform(0, torch.device("cpu"))(batch))


def test_loader_batches_do_not_depend_on_worker_count():
    cache = toy_cache(12)
    data = ds.LineDataset(cache, list(range(12)), [k % 3 for k in range(12)], train=True, seed=4)
    sampler = ds.WriterBalancedSampler(data.labels, lines_per_writer=8, seed=4)
    batches = []
    for workers in (0, 2):
        sampler.set_epoch(2)
        loader = torch.utils.data.DataLoader(data, batch_size=6, sampler=sampler,
                                             num_workers=workers)
        batches.append([(x, y, i) for x, y, i in loader])
    for (x0, y0, i0), (x1, y1, i1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(i0, i1)


def test_make_datasets_on_messy_data(tmp_path):
    root = make_synthetic(tmp_path / "data", writers=4, pages_per_writer=6, lines_per_page=3,
                          height=32, mess=True)
    index = data_index.index_dataset(str(root))
    writers = data_index.select_writers(index.writers, 3)
    bundle = ds.make_datasets(index, writers, 32, 128, tmp_path / "cache",
                              max_val_pages_per_writer=1, seed=0, processes=1)
    assert bundle.writers == writers
    cache = bundle.train.cache
    skipped = [p for p, ok in zip(cache.paths, cache.ok) if not ok]
    assert sorted(os.path.basename(p) for p in skipped) == ["line_900.png", "line_901.png"]
    usable_train = [r for r in index.splits["train"] if r.writer in writers
                    and r.path not in skipped]
    assert len(bundle.train) == len(usable_train)
    assert Counter(bundle.train_labels.tolist()) == Counter(writers.index(r.writer)
                                                            for r in usable_train)
    # one validation page per writer (the cap), each split into two half-pages for retrieval
    assert sorted(bundle.val_page_writer) == [0, 0, 1, 1, 2, 2]
    assert len(bundle.val) == 9 and len(bundle.val_page_ids) == 9
    for item, page in enumerate(bundle.val_page_ids):
        assert bundle.val[item][1] == bundle.val_page_writer[page]
        assert f"/{writers[bundle.val_page_writer[page]]}/" in cache.paths[bundle.val.rows[item]]
    assert bundle.test is not None and len(bundle.test) == 9
    assert sorted(bundle.test_page_writer) == [0, 0, 1, 1, 2, 2]    # likewise one test page
    assert bundle.test_page_ids.shape == (9,)
    rows = set(bundle.train.rows) | set(bundle.val.rows) | set(bundle.test.rows)
    assert all(cache.ok[r] for r in rows) and len(rows) == len(bundle.train) + 18
