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


BUILDER = r"""
import json, sys
from psearch.writer_id import image_cache as ic
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
