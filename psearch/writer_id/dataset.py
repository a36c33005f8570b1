"""Torch data for one trial: line datasets over the image cache, the balanced sampler, and how a
batch of a split becomes the model's input (augmentation: augment.py, on the batch's device).

Items are the cached uint8 pixels as they are: a data loader only copies them (no per-image work
in its processes), and a GPU receives a quarter of the bytes of float images. Everything random is
seeded from (seed, epoch[, writer, cycle]), never from global or per-process state, so a batch is
the same with 0 or 8 DataLoader workers and a resumed trial continues exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from psearch.writer_id.augment import augment_batch, epoch_generator, to_unit
from psearch.writer_id.data_index import (DataError, DataIndex, LineRecord, index_paths,
                                          search_subset)
from psearch.writer_id.image_cache import ImageCache, build_or_load_cache

logger = logging.getLogger(__name__)

_TAG_ORDER, _TAG_CYCLE = 1, 2   # keep the sampler's random streams apart (augment.py uses 3)


def _rng(*keys: int) -> np.random.Generator:
    """A generator determined by integer keys only (negative seeds folded into range)."""
    return np.random.default_rng([int(k) % 2**64 for k in keys])


class LineDataset(torch.utils.data.Dataset):
    """Cached lines as (uint8 [1, H, W], label, index); 0 = black ink, 255 = white paper.

    An index k >= len(self) means line k % len(self) (the WriterBalancedSampler's later cycles:
    a line drawn twice in one epoch sits at two places of its batches, so it is augmented twice
    differently). The returned index is always the line, k % len(self).
    """

    def __init__(self, cache: ImageCache, rows: Sequence[int], labels: Sequence[int], train: bool,
                 seed: int) -> None:
        if len(rows) != len(labels):
            raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.train, self.seed = bool(train), int(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int]:
        k = int(k)
        if k < 0 or not len(self.rows):
            raise IndexError(f"index {k} out of range for {len(self.rows)} lines")
        i = k % len(self.rows)
        img = np.array(self.cache.pixels[self.rows[i]])  # a private copy of the read-only memmap
        return torch.from_numpy(img).unsqueeze(0), int(self.labels[i]), i

    def batch_transform(self, epoch: int, device: torch.device, stream: int = 0
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
        """uint8 batch on `device` → the model's float input in [0, 1] for `epoch`: augmented
        (seeded by this dataset's seed, the epoch and the rank's `stream`) for training data,
        only scaled otherwise."""
        if not self.train:
            return to_unit
        gen = epoch_generator(self.seed, epoch, device, stream)
        return lambda pixels: augment_batch(pixels, gen)


class WriterBalancedSampler(torch.utils.data.Sampler[int]):
    """Exactly `lines_per_writer` draws per writer and epoch, shuffled together.

    Each writer's lines form an endless stream of permutations (cycles): within a cycle no line
    repeats, epoch e takes stream positions [e*L, (e+1)*L), so an epoch never runs dry, epochs
    continue where the last one stopped, and epoch e is computed without replaying 0..e-1.
    Yields `line + len(labels) * cycle` (see LineDataset); `% len(labels)` gives the line.
    """

    def __init__(self, labels: Sequence[int], lines_per_writer: int = 300, seed: int = 0) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0 or lines_per_writer < 1:
            raise ValueError(f"need lines and lines_per_writer >= 1, got {labels.size} lines and "
                             f"lines_per_writer={lines_per_writer}")
        self.num_lines = int(labels.size)
        self.writer_lines = {int(w): np.flatnonzero(labels == w) for w in np.unique(labels)}
        self.lines_per_writer, self.seed, self.epoch = int(lines_per_writer), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to draw (call before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.writer_lines) * self.lines_per_writer

    def __iter__(self):
        return iter(self.epoch_indices(self.epoch).tolist())

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """All draws of `epoch`, shuffled (encoded as line + num_lines * cycle)."""
        draws = np.concatenate([self._writer_draws(w, lines, epoch)
                                for w, lines in self.writer_lines.items()])
        return draws[_rng(self.seed, _TAG_ORDER, epoch).permutation(draws.size)]

    def _writer_draws(self, writer: int, lines: np.ndarray, epoch: int) -> np.ndarray:
        quota = self.lines_per_writer
        positions = np.arange(epoch * quota, (epoch + 1) * quota, dtype=np.int64)
        cycles, offsets = np.divmod(positions, lines.size)
        out = np.empty(quota, dtype=np.int64)
        for cycle in np.unique(cycles):
            perm = _rng(self.seed, _TAG_CYCLE, writer, cycle).permutation(lines.size)
            sel = cycles == cycle
            out[sel] = lines[perm[offsets[sel]]] + self.num_lines * cycle
        return out


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rank `rank`'s share of a WriterBalancedSampler's epoch: every `world_size`-th draw, the
    same count on every rank (DistributedDataParallel needs as many batches on each), so the
    ranks together see each drawn line once (a remainder of fewer than `world_size` is left)."""

    def __init__(self, base: WriterBalancedSampler, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.base, self.rank, self.world_size = base, int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) // self.world_size

    def __iter__(self):
        draws = self.base.epoch_indices(self.base.epoch)
        return iter(draws[self.rank:len(self) * self.world_size:self.world_size].tolist())


@dataclass(frozen=True)
class DataBundle:
    """The datasets of one search and what page-level evaluation needs."""

    train: LineDataset
    val: LineDataset
    test: LineDataset | None
    writers: tuple[str, ...]                # label i <-> writers[i]
    val_page_ids: np.ndarray                # int page id per val item
    val_page_writer: np.ndarray             # label per val page id
    test_page_ids: np.ndarray | None
    test_page_writer: np.ndarray | None
    train_labels: np.ndarray


def _split_data(records: Sequence[LineRecord], cache: ImageCache, label_of: Mapping[str, int],
                train: bool, seed: int) -> tuple[LineDataset, np.ndarray, np.ndarray]:
    """Dataset of the readable lines, page id per line, label per page."""
    usable = [r for r in records if cache.ok[cache.row(r.path)]]
    page_id = {name: i for i, name in enumerate(sorted({r.page for r in usable}))}
    page_writer = np.zeros(len(page_id), dtype=np.int64)
    for r in usable:
        page_writer[page_id[r.page]] = label_of[r.writer]
    dataset = LineDataset(cache, [cache.row(r.path) for r in usable],
                          [label_of[r.writer] for r in usable], train, seed)
    return dataset, np.array([page_id[r.page] for r in usable], dtype=np.int64), page_writer


def make_datasets(index: DataIndex, writers: Sequence[str], height: int, width: int,
                  cache_dir: str | Path, max_val_pages_per_writer: int, seed: int,
                  processes: int) -> DataBundle:
    """Cache the selected writers' lines (train, fixed val subset, test) and build the datasets."""
    writers = tuple(writers)
    index = search_subset(index, writers, max_val_pages_per_writer)
    cache = build_or_load_cache(index_paths(index), height, width, cache_dir, processes,
                                data_root=index.root)
    label_of = {w: i for i, w in enumerate(writers)}
    train, _, _ = _split_data(index.splits["train"], cache, label_of, True, seed)
    _check_usable(train, writers, index.root)
    val, val_ids, val_writer = _split_data(index.splits["val"], cache, label_of, False, seed)
    if not len(val):
        raise DataError(f"{index.root!r}: no readable validation lines for the selected writers; "
                        "check the unreadable files listed above")
    test = test_ids = test_writer = None
    if index.splits.get("test"):
        test, test_ids, test_writer = _split_data(index.splits["test"], cache, label_of, False,
                                                  seed)
    return DataBundle(train=train, val=val, test=test, writers=writers, val_page_ids=val_ids,
                      val_page_writer=val_writer, test_page_ids=test_ids,
                      test_page_writer=test_writer, train_labels=train.labels.copy())


def _check_usable(train: LineDataset, writers: tuple[str, ...], root: str) -> None:
    """DataError unless 2+ writers have readable training lines; warn about the ones without."""
    present = set(np.unique(train.labels).tolist())
    missing = [w for i, w in enumerate(writers) if i not in present]
    if len(present) < 2:
        raise DataError(f"{root!r}: only {len(present)} writer(s) have readable training lines; "
                        "writer identification needs at least 2 (check the unreadable files)")
    if missing:
        logger.warning("%d writer(s) have no readable training lines and cannot be learned: %s",
                       len(missing), ", ".join(missing[:5]))
