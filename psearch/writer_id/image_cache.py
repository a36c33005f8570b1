"""Decode and preprocess every line image once into a memory-mapped uint8 cache.

The cache is keyed by the image files (path, size, mtime) and the image size, so all trials and
all worker processes of a search share one decode; a different --img_height/--img_width or
changed files give a new cache beside the old one. Files in CACHE_DIR:

    lines_<key>.npy    uint8 [N, H, W] (np.lib.format, opened with mmap)
    lines_<key>.json   paths, ok mask, failures, height, width; written last = cache complete
    lines_<key>.lock   flock so that two processes never build the same cache at once
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from psearch.engine import atomic, locks

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0
CACHE_VERSION = 1   # bump when preprocess() changes, so old caches are not reused
WHITE = 255


def _to_gray(img: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit grayscale 'L'; transparency is composed over white paper."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit scans use 0..65535; an "I" image whose values stay within 0..255 is 8-bit data
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (WHITE, WHITE, WHITE, 255))
        return Image.alpha_composite(paper, rgba).convert("L")
    return img if img.mode == "L" else img.convert("L")


def preprocess(img: Image.Image, height: int, width: int) -> np.ndarray:
    """uint8 [height, width] gray line at `height` (aspect kept), white-padded or centre-cropped."""
    gray = _to_gray(img)
    w, h = gray.size
    scale = height / h
    new_w = max(1, round(w * scale))
    if new_w <= width:
        out = np.full((height, width), WHITE, dtype=np.uint8)
        out[:, :new_w] = np.asarray(gray.resize((new_w, height), Image.Resampling.BILINEAR))
        return out
    # resize only the centre window that survives the crop, not the whole wide line
    src_w = width / scale
    left = (w - src_w) / 2
    window = gray.resize((width, height), Image.Resampling.BILINEAR, box=(left, 0, left + src_w, h))
    return np.asarray(window, dtype=np.uint8).copy()


def _decode(path: str, height: int, width: int) -> np.ndarray:
    """Open, fully decode and preprocess one file (raises on unreadable or truncated files)."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            # let libjpeg decode at a reduced scale: much faster for big scans, same final size
            img.draft("L", (max(1, img.width * height // img.height), height))
        img.load()
        return preprocess(img, height, width)


def _default_signals() -> None:
    """Pool processes: leave Ctrl+C to the parent and die quietly when the pool is closed,
    instead of running the parent's graceful-stop handlers (inherited through fork)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _decode_job(job: tuple[int, str, int, int]) -> tuple[int, np.ndarray | None, str]:
    """Pool worker: (row, pixels or None, error text)."""
    row, path, height, width = job
    try:
        return row, _decode(path, height, width), ""
    except Exception as exc:  # any decoder failure means "unreadable", whatever the library raises
        return row, None, f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class ImageCache:
    """Preprocessed pixels of every cached line, read-only and memory-mapped."""

    pixels: np.ndarray      # np.memmap uint8 [N, H, W], read-only
    paths: tuple[str, ...]
    ok: np.ndarray          # bool [N]; False = unreadable, never to be used
    file: str = ""          # the .npy behind `pixels`, so pickling reopens it instead of copying
    failures: tuple[tuple[str, str], ...] = ()   # (path, error text) of the unreadable files
    _rows: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rows", {p: i for i, p in enumerate(self.paths)})

    def row(self, path: str) -> int:
        """Row of `path` in `pixels`; KeyError if the path was not cached."""
        try:
            return self._rows[path]
        except KeyError:
            raise KeyError(f"{path!r} is not in the image cache {self.file!r}") from None

    def __reduce__(self):
        # DataLoader workers started by spawn/forkserver get the file name, not gigabytes of pixels
        if not self.file:
            return ImageCache, (np.asarray(self.pixels), self.paths, self.ok, "", self.failures)
        return _open_cache, (self.file, self.paths, self.ok, self.failures)


def _open_cache(file: str, paths: tuple[str, ...], ok: np.ndarray,
                failures: tuple[tuple[str, str], ...]) -> ImageCache:
    return ImageCache(np.load(file, mmap_mode="r"), paths, ok, file, failures)


def cache_key(paths: Sequence[str], height: int, width: int) -> str:
    """Hash of the sorted (path, size, mtime_ns) of every file and the image size."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {height}x{width}\n".encode())
    for path in sorted(set(paths)):
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # cached as unreadable; the file appearing later changes the key
            size = mtime = -1
        digest.update(f"{path}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


def build_or_load_cache(paths: Sequence[str], height: int, width: int, cache_dir: str | Path,
                        processes: int = 1) -> ImageCache:
    """The cache of these files at this size, built first (once, under a lock) if missing."""
    unique = tuple(sorted(set(paths)))
    if not unique:
        raise ValueError("build_or_load_cache needs at least one image path")
    key = cache_key(unique, height, width)
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    npy, meta = folder / f"lines_{key}.npy", folder / f"lines_{key}.json"
    cache = _load(npy, meta, unique, height, width)
    if cache is None:
        with locks.file_lock(folder / f"lines_{key}.lock", waiting="Waiting for another "
                             f"process to finish the image cache in {folder}"):
            # another process may have finished this cache while we waited for the lock
            cache = _load(npy, meta, unique, height, width)
            if cache is None:
                _build(unique, height, width, npy, meta, processes)
                cache = _load(npy, meta, unique, height, width)
    assert cache is not None, f"image cache {npy} unreadable right after building it"
    _warn_failures(cache.failures, meta)
    return cache


def _load(npy: Path, meta: Path, paths: tuple[str, ...], height: int,
          width: int) -> ImageCache | None:
    """The complete cache at `npy`/`meta`, or None if absent or not matching these files."""
    if not meta.exists():
        return None
    info = json.loads(meta.read_text(encoding="utf-8"))
    pixels = np.load(npy, mmap_mode="r") if npy.exists() else None
    if (pixels is None or tuple(info["paths"]) != paths or len(info["ok"]) != len(paths)
            or pixels.shape != (len(paths), height, width)):
        logger.warning("Image cache %s does not match its files; rebuilding it", npy)
        return None
    failures = tuple((p, e) for p, e in info["failures"])
    return ImageCache(pixels, paths, np.array(info["ok"], dtype=bool), str(npy), failures)


def _build(paths: tuple[str, ...], height: int, width: int, npy: Path, meta: Path,
           processes: int) -> None:
    """Decode every file straight into a new memmap; write the .npy, then the .json (= complete)."""
    start = time.monotonic()
    for stale in [*npy.parent.glob(f".{npy.name}.*.tmp"), *npy.parent.glob(f".{meta.name}.*.tmp")]:
        stale.unlink(missing_ok=True)  # left by a killed builder; we hold the lock, so not in use
    logger.info("Caching %d line images at %dx%d into %s (%d process%s)", len(paths), height,
                width, npy.parent, processes, "" if processes == 1 else "es")
    ok = np.zeros(len(paths), dtype=bool)
    failures: list[tuple[str, str]] = []
    progress = _Progress(len(paths))
    with atomic.atomic_path(npy) as tmp:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                           shape=(len(paths), height, width))
        _reserve(tmp)
        for row, arr, error in _decode_all(paths, height, width, processes):
            if arr is None:
                pixels[row] = WHITE
                failures.append((paths[row], error))
            else:
                pixels[row] = arr
                ok[row] = True
            progress.step()
        pixels.flush()
        del pixels
    atomic.write_json(meta, {"height": height, "width": width, "paths": list(paths),
                             "ok": ok.tolist(), "failures": [list(f) for f in failures]})
    logger.info("Cached %d line images (%d unreadable) in %.1f s: %s (%.1f MiB)", len(paths),
                len(failures), time.monotonic() - start, npy, npy.stat().st_size / 2**20)


def _reserve(path: Path) -> None:
    """Allocate the whole (sparse) file now: on a full disk this fails with ENOSPC, where
    writing through the memory map later would kill the process with SIGBUS."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
            raise
    finally:
        os.close(fd)


# Starting decoder processes costs about a second; below this many images one process is faster.
MIN_IMAGES_FOR_POOL = 256


def _decode_all(paths: tuple[str, ...], height: int, width: int,
                processes: int) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """(row, pixels or None, error) for every path, in order; a Pool when processes > 1."""
    jobs = ((row, path, height, width) for row, path in enumerate(paths))
    if processes <= 1 or len(paths) < MIN_IMAGES_FOR_POOL:
        yield from map(_decode_job, jobs)
        return
    chunksize = max(1, min(32, len(paths) // (processes * 16)))
    # spawn, not fork: the caller may already run threads (torch, heartbeats, logging), and a
    # forked child can inherit one of their locks held, then wait on it forever.
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_default_signals) as pool:
        # imap hands results back in order as they finish: only a few images are in RAM at once
        yield from pool.imap(_decode_job, jobs, chunksize=chunksize)


class _Progress:
    """Logs "Caching line images: done/total (pct%)" at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S and self.done < self.total:
            self.last = now
            logger.info("Caching line images: %d/%d (%d%%)", self.done, self.total,
                        100 * self.done // self.total)


def _warn_failures(failures: Sequence[tuple[str, str]], meta: Path) -> None:
    if failures:
        shown = ", ".join(repr(p) for p, _ in failures[:5])
        logger.warning("%d unreadable line image(s) skipped, excluded from training and evaluation "
                       "(errors in %s): %s%s", len(failures), meta, shown,
                       " ..." if len(failures) > 5 else "")
