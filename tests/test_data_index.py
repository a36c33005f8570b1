"""Indexing of data roots: layouts, odd names, auto split, writer selection, validation subset."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from psearch.engine.errors import UsageError
from psearch.writer_id import data_index as di
from psearch.writer_id.data_index import DataError


def img(path: Path) -> Path:
    """A tiny valid image at `path` (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
    Image.new("L", (12, 4), 200).save(path, format=fmt.get(path.suffix.lower(), "PNG"))
    return path


def lines(page: Path, n: int = 2, ext: str = ".png") -> None:
    for k in range(n):
        img(page / f"line_{k + 1:03d}{ext}")


def test_data_error_is_a_usage_error():
    assert issubclass(DataError, UsageError)


def test_split_layout_with_books_odd_names_and_mixed_extensions(tmp_path):
    odd = ["Writer 03 (Ibn Muqla)", "kātib, al-", "كاتب ٧", "O'Neill \"scribe\""]
    for w in odd:
        lines(tmp_path / "train" / w / "page 1", ext=".PNG")
        lines(tmp_path / "val" / w / "page 9", ext=".Jpg")
    book_page = tmp_path / "train" / odd[0] / "book (2)" / "folio, 3v"
    for ext in (".jpeg", ".TIFF", ".bmp", ".tif", ".JPG"):
        img(book_page / f"l{ext}")
    (book_page / "notes.txt").write_text("not an image")
    img(book_page / ".hidden.png")
    img(tmp_path / "train" / odd[0] / ".thumbs" / "p" / "x.png")
    index = di.index_dataset(str(tmp_path))
    assert index.writers == tuple(sorted(odd))
    assert set(index.splits) == {"train", "val"}
    train = index.splits["train"]
    assert len(train) == 4 * 2 + 5
    book = [r for r in train if "book (2)" in r.page]
    assert {r.page for r in book} == {f"train/{odd[0]}/book (2)/folio, 3v"}
    assert all(Path(r.path).is_absolute() and Path(r.path).exists() for r in train)
    assert [r.path for r in train] == sorted(r.path for r in train)
    assert not any("hidden" in r.path or ".thumbs" in r.path or r.path.endswith(".txt")
                   for r in train)


def test_empty_page_folder_is_not_a_page_and_is_noted(tmp_path):
    for w in ("a", "b"):
        lines(tmp_path / "train" / w / "p1")
        lines(tmp_path / "val" / w / "p2")
    (tmp_path / "train" / "a" / "empty page").mkdir()
    index = di.index_dataset(str(tmp_path))
    assert {r.page for r in index.splits["train"]} == {"train/a/p1", "train/b/p1"}
    assert any("train/a/empty page" in n and "empty" in n for n in index.notes)


def test_writer_without_lines_and_unknown_val_writer_are_dropped_with_notes(tmp_path):
    for w in ("a", "b"):
        lines(tmp_path / "train" / w / "p1")
        lines(tmp_path / "val" / w / "p2")
    (tmp_path / "train" / "c" / "p1").mkdir(parents=True)
    lines(tmp_path / "val" / "stranger" / "p1")
    lines(tmp_path / "test" / "a" / "p3")
    index = di.index_dataset(str(tmp_path))
    assert index.writers == ("a", "b")
    assert {r.writer for r in index.splits["val"]} == {"a", "b"}
    assert len(index.splits["test"]) == 2
    assert any("train/c" in n for n in index.notes)
    assert any("stranger" in n and "val/" in n for n in index.notes)


def test_images_directly_in_writer_folder_form_one_page(tmp_path):
    for w in ("a", "b"):
        lines(tmp_path / "train" / w)
        lines(tmp_path / "val" / w / "p")
    index = di.index_dataset(str(tmp_path))
    assert {r.page for r in index.splits["train"]} == {"train/a", "train/b"}


@pytest.mark.parametrize("layout, needle", [
    ("missing", "does not exist"),
    ("nothing", "no writer folders"),
    ("train_no_images", "no line images"),
    ("one_writer", "only 1 writer"),
    ("no_val", "val/"),
    ("val_other_writers", "val"),
    ("val_without_train", "no train/"),
    ("flat_single_pages", "2 or more pages"),
])
def test_bad_roots_raise_one_line_data_error(tmp_path, layout, needle):
    root = tmp_path / "root"
    if layout != "missing":
        root.mkdir()
    if layout == "train_no_images":
        (root / "train" / "a" / "p").mkdir(parents=True)
        (root / "val").mkdir()
    if layout in ("one_writer", "no_val", "val_other_writers"):
        lines(root / "train" / "a" / "p")
        if layout != "one_writer":
            lines(root / "train" / "b" / "p")
        lines(root / "val" / ("zzz" if layout == "val_other_writers" else "a") / "q")
        if layout == "no_val":
            shutil.rmtree(root / "val")
    if layout == "val_without_train":
        lines(root / "val" / "a" / "p")
    if layout == "flat_single_pages":
        lines(root / "a" / "p")
        lines(root / "b" / "p")
    with pytest.raises(DataError) as err:
        di.index_dataset(str(root))
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert str(root) in message


def test_split_counts_follow_the_rule():
    assert di.split_counts(1) == (1, 0, 0)
    assert di.split_counts(2) == (1, 1, 0)
    assert di.split_counts(3) == (2, 1, 0)
    assert di.split_counts(4) == (2, 2, 0)
    assert di.split_counts(6) == (3, 2, 1)
    assert di.split_counts(20) == (14, 3, 3)
    for n in range(1, 60):
        tr, va, te = di.split_counts(n)
        assert tr >= 1 and tr + va + te == n and (va >= 1) == (n >= 2)
        assert (va >= 2) == (n >= 4) and (te >= 1) == (n >= 6)


def make_flat(root: Path, pages: dict[str, int]) -> None:
    for w, n in pages.items():
        for p in range(n):
            lines(root / w / ("book" if p % 2 else "") / f"page {p:02d}", n=1)


def test_flat_layout_is_split_deterministically_and_page_disjoint(tmp_path):
    pages = {"one": 1, "two": 2, "three": 3, "seven": 7, "twenty": 20}
    make_flat(tmp_path / "r", pages)
    first, second = di.index_dataset(str(tmp_path / "r")), di.index_dataset(str(tmp_path / "r"))
    assert first == second
    assert any("no train/" in n for n in first.notes)
    assert any("one" in n and "1 page" in n for n in first.notes)
    rel = {s: {r.page.split("/", 1)[1] for r in recs} for s, recs in first.splits.items()}
    assert not (rel["train"] & rel["val"] or rel["train"] & rel["test"] or rel["val"] & rel["test"])
    for w, n in pages.items():
        counts = tuple(sum(r.writer == w for r in first.splits[s])
                       for s in ("train", "val", "test"))
        assert counts == di.split_counts(n), w
    # adding a writer leaves every other writer's split unchanged (no global shuffle)
    make_flat(tmp_path / "r", {"new": 5})
    third = di.index_dataset(str(tmp_path / "r"))
    for s in ("train", "val", "test"):
        assert [r for r in third.splits[s] if r.writer != "new"] == list(first.splits[s])


def test_select_writers():
    names = ["c", "a", "b", "d"]
    assert di.select_writers(names, None) == ("a", "b", "c", "d")
    assert di.select_writers(names, 2) == ("a", "b")
    with pytest.raises(DataError, match=r"--num_writers_subset 5 .* 4 "):
        di.select_writers(names, 5)


def small_index(tmp_path: Path) -> di.DataIndex:
    for w in ("a", "b", "c"):
        lines(tmp_path / "train" / w / "p", n=1)
        for p in range(6):
            lines(tmp_path / "val" / w / f"book {p % 2}" / f"v{p}", n=2)
        lines(tmp_path / "test" / w / "t", n=1)
    return di.index_dataset(str(tmp_path))


def test_restrict_to_writers_drops_other_writers_everywhere(tmp_path):
    index = small_index(tmp_path)
    sub = di.restrict_to_writers(index, ("a", "c"))
    assert sub.writers == ("a", "c")
    for split, recs in sub.splits.items():
        assert {r.writer for r in recs} == {"a", "c"}
        assert len(recs) == len(index.splits[split]) * 2 // 3
    with pytest.raises(DataError, match="zz"):
        di.restrict_to_writers(index, ("a", "zz"))


def test_validation_subset_is_fixed_and_complete_per_page(tmp_path):
    val = small_index(tmp_path).splits["val"]
    subset = di.validation_subset(val, 2)
    pages = {}
    for r in subset:
        pages.setdefault(r.writer, set()).add(r.page)
    assert {w: len(p) for w, p in pages.items()} == {"a": 2, "b": 2, "c": 2}
    chosen = {r.page for r in subset}
    assert [r for r in val if r.page in chosen] == list(subset)   # all lines of chosen pages
    shuffled = list(val)
    random.Random(7).shuffle(shuffled)
    assert di.validation_subset(shuffled, 2) == subset
    assert di.validation_subset(val, 2) == subset
    assert di.validation_subset(val, 100) == tuple(val)
    assert {r.page for r in di.validation_subset(val, 1)} < chosen   # a prefix of a fixed order


def test_writers_with_few_pages(tmp_path):
    val = small_index(tmp_path).splits["val"]
    few = [r for r in val if r.writer != "b" or r.page.endswith("v0")]
    assert di.writers_with_few_pages(few, 2) == ["b"]
    assert di.writers_with_few_pages(few, 2, writers=["a", "b", "c", "d"]) == ["b", "d"]
    assert di.writers_with_few_pages(val, 7) == ["a", "b", "c"]


def test_search_subset_and_its_paths(tmp_path):
    index = small_index(tmp_path)
    sub = di.search_subset(index, ("a", "b"), max_val_pages_per_writer=2)
    assert sub.splits["val"] == di.validation_subset(
        di.restrict_to_writers(index, ("a", "b")).splits["val"], 2)
    assert {r.writer for recs in sub.splits.values() for r in recs} == {"a", "b"}
    paths = di.index_paths(sub)
    assert len(paths) == len(set(paths)) == 2 + 2 * 2 * 2 + 2


def test_single_pages_are_halved_so_retrieval_has_a_second_page():
    rec = lambda w, p, i: di.LineRecord(path=f"/d/val/{w}/{p}/line_{i:02d}.png", writer=w,
                                        page=f"val/{w}/{p}")
    records = ([rec("a", "p1", i) for i in range(5)] + [rec("b", "p1", i) for i in range(2)]
               + [rec("b", "p2", i) for i in range(2)] + [rec("c", "p1", 0)])
    out, halved = di.halve_single_pages(records)
    assert halved == ["a"]                                   # b has two pages, c one line
    pages_a = [r.page for r in out if r.writer == "a"]
    assert pages_a == ["val/a/p1#1"] * 3 + ["val/a/p1#2"] * 2  # first lines / last lines
    assert [r.page for r in out if r.writer != "a"] == [r.page for r in records if r.writer != "a"]
    assert [r.path for r in out] == [r.path for r in records]
    assert di.writers_with_few_pages(out, 2) == ["c"]
