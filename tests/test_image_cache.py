"""Preprocessing and the decode-once memory-mapped image cache."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psearch.writer_id import image_cache as ic
from psearch.writer_id.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]


def ramp(w: int, h: int) -> Image.Image:
    """An 'L' image whose column x has value 255*x/(w-1): position is readable from pixels."""
    row = np.linspace(0, 255, w).round().astype(np.uint8)
    return Image.fromarray(np.tile(row, (h, 1)))


def write_images(folder: Path, n: int, w: int = 60, h: int = 12) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        arr = np.full((h, w), 40 + 20 * k, dtype=np.uint8)
        arr[:, : w // 2] = 255
        path = folder / f"line {k:02d}.png"
        Image.fromarray(arr).save(path)
        paths.append(str(path))
    return paths


def test_preprocess_keeps_aspect_and_pads_white_on_the_right():
    out = ic.preprocess(Image.new("L", (100, 20), 0), height=10, width=80)
    assert out.shape == (10, 80) and out.dtype == np.uint8
    assert (out[:, :50] == 0).all() and (out[:, 50:] == 255).all()


def test_preprocess_crops_the_centre_of_wide_lines():
    out = ic.preprocess(ramp(400, 20), height=10, width=80)   # scaled to 200 wide, then cropped
    assert out.shape == (10, 80)
    expected = np.linspace(0, 255, 200)[60:140]
    assert np.abs(out[5].astype(float) - expected).max() < 4


def test_preprocess_upscales_short_lines_to_the_height():
    out = ic.preprocess(Image.new("L", (30, 5), 0), height=20, width=200)
    assert (out[:, :120] == 0).all() and (out[:, 121:] == 255).all()


def palette_image() -> Image.Image:
    img = Image.new("P", (8, 4), 3)
    img.putpalette([0, 0, 0] * 3 + [90, 90, 90] + [255, 255, 255] * 252)
    return img


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("RGB", (8, 4), (200, 100, 50)), Image.new("RGB", (1, 1), (200, 100, 50))
     .convert("L").getpixel((0, 0))),
    (lambda: Image.new("RGBA", (8, 4), (0, 0, 0, 0)), 255),        # transparent = paper
    (lambda: Image.new("RGBA", (8, 4), (0, 0, 0, 255)), 0),
    (lambda: Image.new("LA", (8, 4), (0, 0)), 255),
    (lambda: Image.fromarray(np.full((4, 8), 65535, dtype=np.uint16)), 255),   # I;16
    (lambda: Image.fromarray(np.full((4, 8), 32896, dtype=np.uint16)), 128),
    (lambda: Image.new("I", (8, 4), 100), 100),                    # 8-bit data in 32-bit mode
    (lambda: Image.new("1", (8, 4), 1), 255),
    (lambda: palette_image(), 90),
])
def test_preprocess_turns_any_mode_into_gray(make, expected):
    out = ic.preprocess(make(), height=4, width=8)
    assert out.dtype == np.uint8 and out.shape == (4, 8)
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_cache_is_built_once_then_loaded_without_decoding(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "imgs", 4)
    calls = []
    real = ic._decode
    monkeypatch.setattr(ic, "_decode", lambda *a: calls.append(a[0]) or real(*a))
    first = ic.build_or_load_cache(paths, 8, 64, tmp_path / "cache")
    assert sorted(calls) == sorted(paths)
    key = ic.cache_key(paths, 8, 64)
    npy, meta = tmp_path / "cache" / f"lines_{key}.npy", tmp_path / "cache" / f"lines_{key}.json"
    stamp = (npy.stat().st_mtime_ns, meta.stat().st_mtime_ns)
    calls.clear()
    second = ic.build_or_load_cache(list(reversed(paths)), 8, 64, tmp_path / "cache")
    assert calls == []
    assert (npy.stat().st_mtime_ns, meta.stat().st_mtime_ns) == stamp
    assert isinstance(second.pixels, np.memmap) and not second.pixels.flags.writeable
    assert second.paths == tuple(sorted(paths)) and second.ok.all()
    np.testing.assert_array_equal(np.asarray(first.pixels), np.asarray(second.pixels))
    row = second.row(paths[2])
    with Image.open(paths[2]) as img:
        expected = ic.preprocess(img, 8, 64)
    np.testing.assert_array_equal(second.pixels[row], expected)
    assert json.loads(meta.read_text())["height"] == 8


def test_cache_key_follows_files_and_size(tmp_path):
    paths = write_images(tmp_path, 3)
    key = ic.cache_key(paths, 8, 64)
    assert ic.cache_key(paths[::-1], 8, 64) == key
    assert len({key, ic.cache_key(paths, 9, 64), ic.cache_key(paths, 8, 65),
                ic.cache_key(paths[:2], 8, 64)}) == 4
    os.utime(paths[0], ns=(0, 123))
    assert ic.cache_key(paths, 8, 64) != key


def test_unreadable_images_are_skipped_and_reported_once(tmp_path, caplog):
    paths = write_images(tmp_path, 3)
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(paths[0]).read_bytes()[:60])
    text = tmp_path / "text.PNG"
    text.write_text("not an image")
    bad = sorted(map(str, (zero, truncated, text)))
    with caplog.at_level(logging.INFO, logger="psearch.writer_id.image_cache"):
        cache = ic.build_or_load_cache(paths + bad, 8, 64, tmp_path / "cache")
    assert sorted(p for p, ok in zip(cache.paths, cache.ok) if not ok) == bad
    assert sorted(p for p, _ in cache.failures) == bad
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "3 unreadable" in warnings[0].getMessage()
    assert all(p in warnings[0].getMessage() for p in bad)
    for p in paths:
        assert cache.ok[cache.row(p)] and cache.pixels[cache.row(p)].min() < 255


def test_pool_decoding_matches_single_process(tmp_path, monkeypatch):
    monkeypatch.setattr(ic, "MIN_IMAGES_FOR_POOL", 2)   # use the pool even for a few images
    paths = write_images(tmp_path / "imgs", 9)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"\x89PNG broken")
    paths.append(str(tmp_path / "imgs" / "bad.png"))
    one = ic.build_or_load_cache(paths, 8, 64, tmp_path / "c1", processes=1)
    two = ic.build_or_load_cache(paths, 8, 64, tmp_path / "c2", processes=2)
    np.testing.assert_array_equal(np.asarray(one.pixels), np.asarray(two.pixels))
    np.testing.assert_array_equal(one.ok, two.ok)
    assert one.ok.sum() == 9


def test_progress_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ic, "PROGRESS_EVERY_S", 0.0)
    paths = write_images(tmp_path, 3)
    with caplog.at_level(logging.INFO, logger="psearch.writer_id.image_cache"):
        ic.build_or_load_cache(paths, 8, 64, tmp_path / "cache")
    messages = [r.getMessage() for r in caplog.records]
    assert "Caching line images: 1/3 (33%)" in messages
    assert any(m.startswith("Cached 3 line images (0 unreadable) in ") and "MiB" in m
               for m in messages)


def test_pickling_reopens_the_file_instead_of_copying_pixels(tmp_path):
    paths = write_images(tmp_path, 3)
    cache = ic.build_or_load_cache(paths, 100, 2000, tmp_path / "cache")
    blob = pickle.dumps(cache)
    assert len(blob) < 10_000 < cache.pixels.nbytes
    clone = pickle.loads(blob)
    assert isinstance(clone.pixels, np.memmap)
    np.testing.assert_array_equal(np.asarray(clone.pixels), np.asarray(cache.pixels))
    assert clone.row(paths[1]) == 1


def test_stale_temporary_files_of_a_killed_builder_are_removed(tmp_path):
    paths = write_images(tmp_path, 2)
    folder = tmp_path / "cache"
    folder.mkdir()
    stale = folder / f".lines_{ic.cache_key(paths, 8, 64)}.npy.abc123.tmp"
    stale.write_bytes(b"half a cache")
    ic.build_or_load_cache(paths, 8, 64, folder)
    assert not stale.exists()
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".lock", ".npy"]


# A process that builds or loads the cache once the test lets it: how often it decoded an image,
# and what the cache holds (its warnings on stderr, naming its pid).
BUILDER = r"""
import json, logging, sys
from psearch.writer_id import image_cache as ic
logging.basicConfig(level=logging.WARNING, format="%(process)d %(message)s")
calls = []
real = ic._decode
ic._decode = lambda *a: calls.append(1) or real(*a)
paths, cache_dir = json.loads(sys.argv[1]), sys.argv[2]
print("ready", flush=True)
cache = ic.build_or_load_cache(paths, 8, 64, cache_dir)
print(json.dumps({"calls": len(calls), "sum": int(cache.pixels.sum()), "ok": int(cache.ok.sum())}))
"""


def test_two_concurrent_builders_make_one_valid_cache(tmp_path):
    paths = write_images(tmp_path / "im'gs \"q\"", 6)
    cache_dir = tmp_path / "cache dir"
    cache_dir.mkdir()
    lock = cache_dir / f"lines_{ic.cache_key(paths, 8, 64)}.lock"
    with open(lock, "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)    # both builders must now queue behind this lock
        argv = [sys.executable, "-c", BUILDER, json.dumps(paths), str(cache_dir)]
        procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        time.sleep(0.5)
        assert not any(cache_dir.glob("*.json")) and all(p.poll() is None for p in procs)
        fcntl.flock(held, fcntl.LOCK_UN)
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(r["calls"] for r in results) == [0, 6]
    assert results[0]["sum"] == results[1]["sum"] and results[0]["ok"] == 6
    assert len(list(cache_dir.glob("*.npy"))) == 1 and not list(cache_dir.glob(".*.tmp"))


# ---------------------------------------------------------------- damaged and older caches

def cache_files(folder: Path, paths: list[str], h: int = 8, w: int = 64) -> tuple[Path, Path]:
    key = ic.cache_key(paths, h, w)
    return folder / f"lines_{key}.npy", folder / f"lines_{key}.json"


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def garble(path: Path) -> None:
    path.write_bytes(b"\x00\xff{not json")


def drop_ok(path: Path) -> None:
    info = json.loads(path.read_text())
    del info["ok"]
    path.write_text(json.dumps(info))


def wrong_shape(path: Path) -> None:   # a valid .npy of another shape
    np.save(path, np.load(path)[:, :, :56])


def wrong_dtype(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float32))


def garbled_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[10:40] = b"x" * 30
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, which, reason", [
    (truncate_half, ".npy", "cut short"),
    (garbled_header, ".npy", "unreadable .npy header"),
    (wrong_shape, ".npy", "expected uint8 ("),
    (wrong_dtype, ".npy", "header says float32"),
    (truncate_half, ".json", "JSONDecodeError"),
    (garble, ".json", "unreadable sidecar"),
    (drop_ok, ".json", "lacks ok"),
])
def test_a_damaged_cache_is_rebuilt_with_one_warning(tmp_path, caplog, damage, which, reason):
    paths = write_images(tmp_path / "imgs", 5)
    fresh = ic.build_or_load_cache(paths, 8, 64, tmp_path / "fresh")
    folder = tmp_path / "cache"
    ic.build_or_load_cache(paths, 8, 64, folder)
    npy, meta = cache_files(folder, paths)
    damaged = npy if which == ".npy" else meta
    damage(damaged)
    with caplog.at_level(logging.INFO, logger="psearch.writer_id.image_cache"):
        cache = ic.build_or_load_cache(paths, 8, 64, folder)
    messages = [r.getMessage() for r in caplog.records]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"Image cache {damaged} is damaged (")
    assert reason in warnings[0] and warnings[0].endswith("; rebuilding it")
    assert any(m.startswith("Cached 5 line images") for m in messages)   # rebuilt, not patched
    np.testing.assert_array_equal(np.asarray(cache.pixels), np.asarray(fresh.pixels))
    assert cache.paths == fresh.paths and cache.ok.all()
    fresh_meta = cache_files(tmp_path / "fresh", paths)[1]
    assert json.loads(meta.read_text()) == json.loads(fresh_meta.read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([npy.name, meta.name,
                                                                npy.with_suffix(".lock").name])


def test_a_sidecar_for_other_files_or_size_counts_as_damage(tmp_path, caplog):
    paths = write_images(tmp_path / "imgs", 3)
    folder = tmp_path / "cache"
    ic.build_or_load_cache(paths, 8, 64, folder)
    npy, meta = cache_files(folder, paths)
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "width": 65}))
    with caplog.at_level(logging.WARNING, logger="psearch.writer_id.image_cache"):
        ic.build_or_load_cache(paths, 8, 64, folder)
    assert [r.getMessage() for r in caplog.records] == [
        f"Image cache {meta} is damaged (records 8x65 images, expected 8x64); rebuilding it"]
    assert json.loads(meta.read_text()) == info


def test_a_missing_npy_beside_its_sidecar_is_rebuilt(tmp_path, caplog):
    paths = write_images(tmp_path / "imgs", 3)
    folder = tmp_path / "cache"
    first = np.asarray(ic.build_or_load_cache(paths, 8, 64, folder).pixels).copy()
    npy, _ = cache_files(folder, paths)
    npy.unlink()
    with caplog.at_level(logging.WARNING, logger="psearch.writer_id.image_cache"):
        again = ic.build_or_load_cache(paths, 8, 64, folder)
    assert "missing beside its sidecar" in caplog.records[0].getMessage()
    np.testing.assert_array_equal(np.asarray(again.pixels), first)


def test_concurrent_readers_of_a_damaged_cache_wait_and_one_rebuilds(tmp_path):
    """Three processes find a cut-short cache while the lock is held (as by a builder): none
    touches the files; after the lock is freed, one rebuilds and the others open its cache."""
    paths = write_images(tmp_path / "imgs", 6)
    folder = tmp_path / "cache"
    expected = int(np.asarray(ic.build_or_load_cache(paths, 8, 64, folder).pixels).sum())
    npy, meta = cache_files(folder, paths)
    truncate_half(npy)
    damaged = {p: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in (npy, meta)}
    with open(npy.with_suffix(".lock"), "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        argv = [sys.executable, "-c", BUILDER, json.dumps(paths), str(folder)]
        procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
        time.sleep(1.0)
        assert all(p.poll() is None for p in procs)
        assert {p: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
                for p in (npy, meta)} == damaged
        fcntl.flock(held, fcntl.LOCK_UN)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["calls"] for r in results) == [0, 0, 6]
    assert {r["sum"] for r in results} == {expected} and {r["ok"] for r in results} == {6}
    warnings = [line for _, err in outs for line in err.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and "cut short" in warnings[0]
    assert len(list(folder.glob("*.npy"))) == 1 and not list(folder.glob(".*.tmp"))


def add_page(root: Path, name: str) -> None:
    """A copy of a train page as page `name`: the data of this root has changed."""
    page = next(p for p in sorted((root / "train").rglob("*")) if p.is_dir() and any(
        f.is_file() for f in p.iterdir()))
    copy = page.with_name(name)
    copy.mkdir()
    for f in page.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())


def make_data(tmp_path: Path, height: int, width: int, root: Path) -> ic.ImageCache:
    """The cache of `root` in tmp_path/cache, as a search opens it (torch: imported here only)."""
    from psearch.writer_id import data_index, dataset

    index = data_index.index_dataset(str(root))
    return dataset.make_datasets(index, index.writers, height, width, tmp_path / "cache",
                                 20, 0, 1).train.cache


def test_a_cache_for_changed_data_replaces_the_older_one_of_its_family(tmp_path, caplog):
    root = make_synthetic(tmp_path / "data", writers=3, pages_per_writer=4, lines_per_page=2,
                          height=16)
    other_root = make_synthetic(tmp_path / "other", writers=3, pages_per_writer=4,
                                lines_per_page=2, height=16, seed=1)
    old = Path(make_data(tmp_path, 16, 64, root).file).name
    make_data(tmp_path, 16, 96, root)          # another size: another family
    make_data(tmp_path, 16, 64, other_root)    # another data root: another family
    folder = tmp_path / "cache"
    before = {p.name for p in folder.glob("*.npy")}
    assert len(before) == 3
    add_page(root, "added_1")
    with caplog.at_level(logging.INFO, logger="psearch.writer_id.image_cache"):
        cache = make_data(tmp_path, 16, 64, root)
    new = Path(cache.file).name
    assert new not in before
    assert {p.name for p in folder.glob("*.npy")} == before - {old} | {new}
    assert f"Removed the older image cache {folder / old} (same data root and image size)" \
        in [r.getMessage() for r in caplog.records]
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(p.stem for p in
                                                                  folder.glob("*.npy"))
    assert not list(folder.glob(".*.tmp"))


def test_an_older_cache_in_use_is_kept_until_a_later_build(tmp_path, caplog):
    root = make_synthetic(tmp_path / "data", writers=3, pages_per_writer=4, lines_per_page=2,
                          height=16)
    folder = tmp_path / "cache"
    in_use = make_data(tmp_path, 16, 64, root)   # held open, as by a running trial
    add_page(root, "added_1")
    with caplog.at_level(logging.INFO, logger="psearch.writer_id.image_cache"):
        make_data(tmp_path, 16, 64, root)
    assert f"Kept the older image cache {in_use.file} (same data root and image size): another " \
           "process is building or using it" in [r.getMessage() for r in caplog.records]
    assert Path(in_use.file).exists() and len(list(folder.glob("*.npy"))) == 2
    clone = pickle.loads(pickle.dumps(in_use))   # a spawned DataLoader worker reopens it by name
    np.testing.assert_array_equal(np.asarray(clone.pixels), np.asarray(in_use.pixels))
    old_file = in_use.file
    del in_use, clone
    add_page(root, "added_2")
    latest = make_data(tmp_path, 16, 64, root)
    assert [str(p) for p in folder.glob("*.npy")] == [latest.file]
    assert not Path(old_file).exists()


SEARCH_ARGS = ["--models", "small", "--img_height", "32", "--img_width", "128", "--batch_size",
               "8", "--lines_per_writer", "8", "--num_workers", "0", "--use_all_writers",
               "--epochs", "1"]


def test_a_search_reruns_over_a_cut_short_cache(tmp_path):
    data = make_synthetic(tmp_path / "data", writers=3, pages_per_writer=5, lines_per_page=3,
                          height=32)
    ckpt = tmp_path / "run"

    def search(n_trials: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "single_gpu_hyperparameter_search.py"),
                               "--data_root", str(data), "--checkpoint_dir", str(ckpt),
                               "--n_trials", str(n_trials), *SEARCH_ARGS],
                              capture_output=True, text=True, timeout=300)

    first = search(1)
    assert first.returncode == 0, first.stderr[-3000:]
    (npy,) = (ckpt / "cache").glob("lines_*.npy")
    truncate_half(npy)
    rerun = search(2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    line = f"Image cache {npy} is damaged ("
    assert line in rerun.stderr
    logs = [p.read_text() for p in (ckpt / "logs").glob("*.log")]
    assert any(line in text and "cut short" in text for text in logs)
    assert (ckpt / "trial_001" / "metrics.json").is_file()
