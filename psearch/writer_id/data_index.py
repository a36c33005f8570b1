"""Index a writer-identification data set of line images: splits, writers, pages.

Layouts understood (a *page* is any folder that holds line images directly, at any depth):

    DATA_ROOT/{train,val[,test]}/<writer>/<page>/line_001.png
    DATA_ROOT/{train,val[,test]}/<writer>/<book>/<page>/line_001.png
    DATA_ROOT/<writer>/.../<page>/line_001.png     (no train/: split by page, deterministically)

Pure file-system scanning; no torch, no image decoding.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from psearch.engine.errors import UsageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})  # lower-cased
SPLITS = ("train", "val", "test")


class DataError(UsageError):
    """The data root cannot be used: one line naming the path and the fix (exit code 2)."""


@dataclass(frozen=True)
class LineRecord:
    """One line image."""

    path: str    # absolute path
    writer: str
    page: str    # unique across the data set: "<split>/<writer>/<sub/path/of/page>"


@dataclass(frozen=True)
class DataIndex:
    """Every usable line of a data root, per split."""

    root: str
    writers: tuple[str, ...]                      # sorted writer names from train/
    splits: Mapping[str, tuple[LineRecord, ...]]  # "train", "val" and, if present, "test"
    notes: tuple[str, ...]                        # human-readable warnings for the caller to log


def is_image(name: str) -> bool:
    """True for a visible file name with an image extension, in any letter case."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())


def scan_writer(writer_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Pages of one writer folder: {sub/path: sorted image paths}, and empty leaf folders."""
    pages: dict[str, list[str]] = {}
    empty: list[str] = []
    for dirpath, dirnames, filenames in os.walk(writer_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # prune hidden folders
        images = sorted(os.path.join(dirpath, f) for f in filenames if is_image(f))
        rel = Path(dirpath).relative_to(writer_dir).as_posix()
        rel = "" if rel == "." else rel
        if images:
            pages[rel] = images
        elif not dirnames:
            empty.append(rel)
    return pages, empty


def _page_id(split: str, writer: str, rel: str) -> str:
    return "/".join(part for part in (split, writer, rel) if part)


def _records(split: str, writer: str, pages: Mapping[str, list[str]]) -> list[LineRecord]:
    return [LineRecord(os.path.abspath(p), writer, _page_id(split, writer, rel))
            for rel, paths in pages.items() for p in paths]


def _scan_split(split_dir: Path, split: str, notes: list[str]) -> dict[str, list[LineRecord]]:
    """{writer: records} for one split folder; notes empty pages and writers without lines."""
    out: dict[str, list[LineRecord]] = {}
    for writer_dir in _visible_dirs(split_dir):
        pages, empty = scan_writer(writer_dir)
        _note_empty(notes, split, writer_dir.name, empty)
        if not pages:
            notes.append(f"{split}/{writer_dir.name}: no line images, writer ignored in {split}")
            continue
        out[writer_dir.name] = _records(split, writer_dir.name, pages)
    return out


def _note_empty(notes: list[str], split: str, writer: str, empty: Iterable[str]) -> None:
    for rel in empty:
        if rel:  # the writer folder itself being empty is reported as "no line images"
            notes.append(f"{_page_id(split, writer, rel)}: empty folder (no line images), "
                         "not a page")


def split_counts(n_pages: int) -> tuple[int, int, int]:
    """(train, val, test) page counts for the automatic ~70/15/15 split of one writer.

    Page retrieval needs two validation pages of a writer (one is the query, one the answer), so
    val gets two as soon as a writer has four pages; test (optional) comes after that.
    """
    if n_pages < 2:
        return n_pages, 0, 0
    n_val = max(2, round(0.15 * n_pages)) if n_pages >= 4 else 1
    n_test = max(1, round(0.15 * n_pages)) if n_pages >= 6 else 0
    return n_pages - n_val - n_test, n_val, n_test


def stable_order(keys: Iterable[str], salt: str = "") -> list[str]:
    """Keys in a fixed pseudo-random order (by hash): same on every run, independent of --seed."""
    return sorted(keys, key=lambda k: (hashlib.sha256(f"{salt}\0{k}".encode()).hexdigest(), k))


def _auto_split(root: Path, notes: list[str]) -> dict[str, dict[str, list[LineRecord]]]:
    """Split each writer's pages of a flat layout into train/val/test, page-disjoint."""
    splits: dict[str, dict[str, list[LineRecord]]] = {s: {} for s in SPLITS}
    for writer_dir in _visible_dirs(root):
        writer = writer_dir.name
        pages, empty = scan_writer(writer_dir)
        _note_empty(notes, "", writer, empty)
        if not pages:
            notes.append(f"{writer}: no line images, writer ignored")
            continue
        order = stable_order(sorted(pages), salt=writer)
        n_train, n_val, _ = split_counts(len(order))
        if n_val == 0:
            notes.append(f"{writer}: only 1 page, used for training only (no validation page)")
        chunks = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
                  "test": order[n_train + n_val:]}
        for split, rels in chunks.items():
            if rels:
                splits[split][writer] = _records(split, writer, {r: pages[r] for r in rels})
    return splits


def index_dataset(root: str) -> DataIndex:
    """Scan `root` (either layout) into a DataIndex; DataError naming the path and the fix."""
    root_path = Path(os.path.abspath(os.path.expanduser(str(root))))
    if not root_path.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist or is not a folder; pass "
                        "--data_root pointing at a folder with train/ val/ [test/] or writer "
                        "folders")
    notes: list[str] = []
    auto = not (root_path / "train").is_dir()
    if auto:
        _check_flat_root(root_path)
        notes.append(f"{root_path}: no train/ folder, so each writer's pages were split ~70/15/15 "
                     "into train/val/test by a fixed hash (page-disjoint, identical on every run, "
                     "independent of --seed)")
        raw = _auto_split(root_path, notes)
    else:
        raw = {s: _scan_split(root_path / s, s, notes) for s in SPLITS if (root_path / s).is_dir()}
    return _assemble(root_path, raw, auto, notes)


def _check_flat_root(root: Path) -> None:
    for name in ("val", "test"):
        if (root / name).is_dir():
            raise DataError(f"data root {str(root)!r} has {name}/ but no train/; add "
                            "train/<writer>/<page>/ images, or put writer folders directly "
                            "under the root")
    if not _visible_dirs(root):
        raise DataError(f"data root {str(root)!r} holds no writer folders; expected train/ val/ "
                        "[test/] or <writer>/<page>/line images")


def _assemble(root: Path, raw: Mapping[str, Mapping[str, list[LineRecord]]], auto: bool,
              notes: list[str]) -> DataIndex:
    """Check the scanned splits and build the index (writers come from train)."""
    where = str(root) if auto else str(root / "train")
    train = raw["train"]
    if not train:
        raise DataError(f"{where!r} holds no line images ({', '.join(sorted(IMAGE_EXTENSIONS))} in "
                        "<writer>/<page>/ folders); point --data_root at the data set")
    writers = tuple(sorted(train))
    if len(writers) < 2:
        raise DataError(f"{where!r} has line images of only {len(writers)} writer(s); writer "
                        "identification needs at least 2 writers with images")
    splits = {"train": _sorted_records(train, writers)}
    for split in ("val", "test"):
        if split not in raw:
            continue
        unknown = sorted(set(raw[split]) - set(writers))
        if unknown:
            notes.append(f"{split}/: {len(unknown)} writer(s) not in train/, their lines are "
                         f"dropped: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        records = _sorted_records(raw[split], writers)
        if records:
            splits[split] = records
        elif split == "test" and not auto:
            notes.append("test/: no line images of the train/ writers, test split ignored")
    if "val" not in splits:
        raise DataError(_no_val_message(root, auto, "val" in raw))
    return DataIndex(str(root), writers, splits, tuple(notes))


def _sorted_records(by_writer: Mapping[str, list[LineRecord]],
                    writers: Sequence[str]) -> tuple[LineRecord, ...]:
    return tuple(sorted((r for w in writers for r in by_writer.get(w, ())), key=lambda r: r.path))


def _no_val_message(root: Path, auto: bool, has_val_dir: bool) -> str:
    if auto:
        return (f"data root {str(root)!r}: no writer has 2 or more pages, so the automatic split "
                "has no validation pages; give writers at least 2 page folders or add train/ "
                "and val/")
    if has_val_dir:
        return (f"{str(root / 'val')!r} holds no line images of the train/ writers; add "
                "val/<writer>/<page>/ images for the writers in train/")
    return (f"data root {str(root)!r} has train/ but no val/; val/<writer>/<page>/ images are "
            "needed (or put writer folders directly under the root for an automatic split)")


def select_writers(writers: Sequence[str], num_writers_subset: int | None) -> tuple[str, ...]:
    """All writers (None) or the first K in sorted order; DataError when K exceeds the count."""
    ordered = tuple(sorted(writers))
    if num_writers_subset is None:
        return ordered
    if num_writers_subset > len(ordered):
        raise DataError(f"--num_writers_subset {num_writers_subset} asks for more writers than "
                        f"the {len(ordered)} with training lines; pass a number from 2 to "
                        f"{len(ordered)}")
    if num_writers_subset < 1:
        raise DataError(f"--num_writers_subset must be at least 1, got {num_writers_subset}")
    return ordered[:num_writers_subset]


def restrict_to_writers(index: DataIndex, writers: Sequence[str]) -> DataIndex:
    """The index with only `writers` (in every split); DataError for a writer it does not have."""
    missing = sorted(set(writers) - set(index.writers))
    if missing:
        raise DataError(f"writer(s) {', '.join(map(repr, missing[:5]))} not in the training data "
                        f"of {index.root!r}; choose from its {len(index.writers)} train/ writers")
    keep = set(writers)
    splits = {s: tuple(r for r in recs if r.writer in keep) for s, recs in index.splits.items()}
    return dataclasses.replace(index, writers=tuple(w for w in index.writers if w in keep),
                               splits=splits)


def _pages_by_writer(records: Iterable[LineRecord]) -> dict[str, set[str]]:
    pages: dict[str, set[str]] = defaultdict(set)
    for r in records:
        pages[r.writer].add(r.page)
    return pages


def validation_subset(records: Sequence[LineRecord],
                      max_pages_per_writer: int) -> tuple[LineRecord, ...]:
    """At most K pages per writer with all their lines, chosen by a fixed hash (no seed)."""
    chosen: set[str] = set()
    for writer, pages in _pages_by_writer(records).items():
        # hash order rather than the first K names, so the pages spread over books and volumes
        chosen.update(stable_order(pages, salt="validation")[:max_pages_per_writer])
    return tuple(sorted((r for r in records if r.page in chosen), key=lambda r: r.path))


def writers_with_few_pages(records: Iterable[LineRecord], minimum: int = 2,
                           writers: Sequence[str] | None = None) -> list[str]:
    """Sorted writers with under `minimum` pages in `records` (`writers` adds those with 0)."""
    pages = _pages_by_writer(records)
    names = set(pages) | set(writers or ())
    return sorted(w for w in names if len(pages.get(w, ())) < minimum)


def halve_single_pages(records: Sequence[LineRecord]) -> tuple[tuple[LineRecord, ...], list[str]]:
    """Split the page of each writer who has just one (of 2+ lines) into two half-pages.

    Leave-one-out page retrieval needs a second page of the writer to find; with one page per
    writer it is undefined. Splitting such a page into halves (first lines / last lines, as is
    done for the one-page writers of IAM in the writer-retrieval literature) makes it measurable.
    Returns the records (half-pages named '<page>#1' and '<page>#2') and the writers affected.
    """
    pages = _pages_by_writer(records)
    single = {w for w, ps in pages.items() if len(ps) == 1}
    lines: dict[str, list[LineRecord]] = defaultdict(list)
    for r in records:
        if r.writer in single:
            lines[r.page].append(r)
    halved = {page: {r.path: f"{page}#{1 + 2 * i // len(recs)}"
                     for i, r in enumerate(sorted(recs, key=lambda r: r.path))}
              for page, recs in lines.items() if len(recs) >= 2}
    out = tuple(dataclasses.replace(r, page=halved[r.page][r.path]) if r.page in halved else r
                for r in records)
    return out, sorted({r.writer for r in records if r.page in halved})


def search_subset(index: DataIndex, writers: Sequence[str],
                  max_val_pages_per_writer: int) -> DataIndex:
    """What a search uses: `index` cut to `writers`, val cut to its fixed validation subset, and
    the single page of a writer in val or test split into halves (see halve_single_pages)."""
    sub = restrict_to_writers(index, writers)
    splits, notes = dict(sub.splits), list(sub.notes)
    splits["val"] = validation_subset(sub.splits["val"], max_val_pages_per_writer)
    for split in ("val", "test"):
        if split in splits:
            splits[split], halved = halve_single_pages(splits[split])
            if halved:
                notes.append(f"{len(halved)} writer(s) have one {split} page, split into two "
                             f"half-pages so that page retrieval can be measured: "
                             f"{', '.join(halved[:5])}{' …' if len(halved) > 5 else ''}")
    return dataclasses.replace(sub, splits=splits, notes=tuple(notes))


def index_paths(index: DataIndex) -> list[str]:
    """Every line path of every split: the files an image cache of this index must hold."""
    return [r.path for records in index.splits.values() for r in records]


def fingerprint(index: DataIndex) -> dict[str, dict[str, Any]]:
    """What a search's values were measured on, per split: writers, pages, lines, and a digest
    of the line files' paths relative to the root (pure). Stored with the study: an image added,
    removed or renamed changes it, so a rerun on changed data is refused instead of mixing
    values measured on different pages."""
    out = {}
    for split, records in sorted(index.splits.items()):
        rel = sorted(os.path.relpath(r.path, index.root) for r in records)
        out[split] = {"writers": len({r.writer for r in records}),
                      "pages": len({r.page for r in records}), "lines": len(records),
                      "digest": hashlib.sha256("\n".join(rel).encode()).hexdigest()[:16]}
    return out
