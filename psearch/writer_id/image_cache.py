"""Decode and preprocess every line image once into a memory-mapped uint8 cache.

The cache is keyed by the image files (path, size, mtime) and the image size, so all trials and
all worker processes of a search share one decode; a different --img_height/--img_width gives a
new cache beside the old one. Files in CACHE_DIR:

    lines_<key>.npy    uint8 [N, H, W] (np.lib.format, opened with mmap)
    lines_<key>.json   paths, ok mask, failures, height, width, data root; written last = complete
    lines_<key>.lock   flock so that two processes never build the same cache at once

Opening checks the cache: the sidecar parses and lists these files at this size, the .npy header
says uint8 [N, H, W] and the file is as long as that. A damaged cache (a killed copy, a full disk)
is rebuilt under the lock with one warning; a reader that finds damage only waits for the lock,
so it never touches a cache that another process is writing.

A process holds a shared flock on the .npy for as long as it uses the cache (see _map_pixels).
After building a cache, the other caches of its family (same data root and image size, so older
data: pages added, files changed) are deleted, each only if nobody builds it (its lock is free)
and nobody uses it (its .npy can be locked exclusively); the others stay until a later build.
Empty .lock files are never deleted: a process may be waiting on one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

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
    # the open .npy whose shared flock tells other processes that this cache is in use
    in_use: IO[bytes] | None = field(default=None, repr=False, compare=False)
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
        return _open_cache, (self.file, self.pixels.shape, self.paths, self.ok, self.failures)


def _open_cache(file: str, shape: tuple[int, ...], paths: tuple[str, ...], ok: np.ndarray,
                failures: tuple[tuple[str, str], ...]) -> ImageCache:
    pixels, in_use = _map_pixels(Path(file), shape)
    return ImageCache(pixels, paths, ok, file, failures, in_use)


class _Damaged(Exception):
    """The cache file `file` cannot be used; the message says why."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(" ".join(reason.split()))   # one log line, whatever the library said
        self.file = file


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
                        processes: int = 1, data_root: str | None = None) -> ImageCache:
    """The cache of these files at this size, built first (once, under a lock) if missing or
    damaged; building it removes the unused older caches of `data_root` at this size."""
    unique = tuple(sorted(set(paths)))
    if not unique:
        raise ValueError("build_or_load_cache needs at least one image path")
    key = cache_key(unique, height, width)
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    npy, meta = folder / f"lines_{key}.npy", folder / f"lines_{key}.json"
    try:
        cache = _load(npy, meta, unique, height, width)
    except _Damaged:
        cache = None  # looked at again under the lock: another process may be rebuilding it
    if cache is None:
        with locks.file_lock(folder / f"lines_{key}.lock", waiting="Waiting for another "
                             f"process to finish the image cache in {folder}"):
            cache = _load_or_build(unique, height, width, npy, meta, processes,
                                   _family(data_root, height, width))
    _warn_failures(cache.failures, meta)
    return cache


def _load_or_build(paths: tuple[str, ...], height: int, width: int, npy: Path, meta: Path,
                   processes: int, family: dict[str, Any] | None) -> ImageCache:
    """Under the cache's lock: the cache if another process finished it while we waited, else a
    new build (a damaged cache is rebuilt with a warning), then the family's older caches go."""
    try:
        cache = _load(npy, meta, paths, height, width)
        if cache is not None:
            return cache
    except _Damaged as exc:
        logger.warning("Image cache %s is damaged (%s); rebuilding it", exc.file, exc)
    _build(paths, height, width, npy, meta, processes, family)
    cache = _load(npy, meta, paths, height, width)
    assert cache is not None, f"image cache {npy} missing right after building it"
    _remove_older(npy, family)
    return cache


def _family(data_root: str | None, height: int, width: int) -> dict[str, Any] | None:
    """What the caches of one data root at one image size record; None = no family."""
    if data_root is None:
        return None
    return {"data_root": os.path.abspath(data_root), "height": height, "width": width}


def _load(npy: Path, meta: Path, paths: tuple[str, ...], height: int,
          width: int) -> ImageCache | None:
    """The complete cache at `npy`/`meta`; None without a sidecar (not built, or being built);
    _Damaged when its files are unreadable, cut short or disagree with each other or `paths`."""
    if not meta.exists():
        return None
    info = _read_sidecar(meta, paths, height, width)
    pixels, in_use = _map_pixels(npy, (len(paths), height, width))
    failures = tuple((p, e) for p, e in info["failures"])
    return ImageCache(pixels, paths, np.array(info["ok"], dtype=bool), str(npy), failures, in_use)


def _read_sidecar(meta: Path, paths: tuple[str, ...], height: int, width: int) -> dict:
    """The sidecar's contents, checked against the files and size it must describe."""
    try:
        info = json.loads(meta.read_bytes())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are both
        raise _Damaged(meta, f"unreadable sidecar: {type(exc).__name__}: {exc}") from None
    problem = _sidecar_problem(info)
    if not problem and (info["height"], info["width"]) != (height, width):
        problem = f"records {info['height']}x{info['width']} images, expected {height}x{width}"
    if not problem and tuple(info["paths"]) != paths:
        problem = f"lists {len(info['paths'])} other files than the {len(paths)} of its key"
    if problem:
        raise _Damaged(meta, problem)
    return info


def _sidecar_problem(info: Any) -> str:
    """What is wrong with a parsed sidecar's fields ('' if nothing)."""
    if not isinstance(info, dict):
        return f"holds a {type(info).__name__}, not an object"
    missing = [k for k in ("height", "width", "paths", "ok", "failures") if k not in info]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not (isinstance(info["paths"], list) and all(isinstance(p, str) for p in info["paths"])):
        return "paths is not a list of file names"
    ok, failures = info["ok"], info["failures"]
    if not (isinstance(ok, list) and len(ok) == len(info["paths"])
            and all(isinstance(v, bool) for v in ok)):
        return f"ok is not {len(info['paths'])} true/false values, one per path"
    if not (isinstance(failures, list) and all(
            isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) for x in f)
            for f in failures)):
        return "failures is not a list of [path, error] pairs"
    if len(failures) != ok.count(False):
        return f"{ok.count(False)} paths marked unreadable but {len(failures)} failures listed"
    return ""


def _map_pixels(npy: Path, shape: tuple[int, ...]) -> tuple[np.memmap, IO[bytes]]:
    """The checked .npy mapped read-only, and its open file holding a shared flock: the mark that
    this process uses the cache, which _remove_older respects. _Damaged if it cannot be used."""
    try:
        fh = open(npy, "rb")
    except FileNotFoundError:
        raise _Damaged(npy, "missing beside its sidecar") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_SH)  # waits only while a remover holds it (a moment)
        try:
            same = os.path.samestat(os.fstat(fh.fileno()), os.stat(npy))
        except FileNotFoundError:
            same = False
        if not same:  # removed or replaced between open() and the lock
            raise _Damaged(npy, "removed or replaced while it was being opened")
        offset = _check_npy(fh, npy, shape)
        return np.memmap(fh, dtype=np.uint8, mode="r", offset=offset, shape=shape), fh
    except BaseException:
        fh.close()
        raise


def _check_npy(fh: IO[bytes], npy: Path, shape: tuple[int, ...]) -> int:
    """Offset of the pixels in the open .npy `fh`, after checking its header and length."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(fh)
        if version not in readers:
            raise ValueError(f".npy format version {version[0]}.{version[1]}")
        got_shape, fortran, dtype = readers[version](fh)
    except Exception as exc:  # numpy raises ValueError, TokenError or SyntaxError for garbage
        raise _Damaged(npy, f"unreadable .npy header: {type(exc).__name__}: {exc}") from None
    if got_shape != shape or fortran or dtype != np.uint8:
        raise _Damaged(npy, f"header says {dtype} {got_shape}{' (Fortran order)' * fortran}, "
                            f"expected uint8 {shape}")
    offset = fh.tell()
    size, expected = os.fstat(fh.fileno()).st_size, offset + int(np.prod(shape))
    if size != expected:
        raise _Damaged(npy, f"{size} bytes, expected {expected} for uint8 {shape}"
                            f"{' (cut short)' if size < expected else ''}")
    return offset


def _build(paths: tuple[str, ...], height: int, width: int, npy: Path, meta: Path,
           processes: int, family: dict[str, Any] | None) -> None:
    """Decode every file straight into a new memmap; write the .npy, then the .json (= complete)."""
    start = time.monotonic()
    # a damaged cache's sidecar goes first: readers then wait for the lock instead of pairing it
    # with the new .npy
    meta.unlink(missing_ok=True)
    _remove_temporaries(npy)
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
    atomic.write_json(meta, {**(family or {}), "version": CACHE_VERSION, "height": height,
                             "width": width, "paths": list(paths), "ok": ok.tolist(),
                             "failures": [list(f) for f in failures]})
    logger.info("Cached %d line images (%d unreadable) in %.1f s: %s (%.1f MiB)", len(paths),
                len(failures), time.monotonic() - start, npy, npy.stat().st_size / 2**20)


def _remove_temporaries(npy: Path) -> None:
    """Delete what a killed builder of `npy` left (call with its lock held: nobody writes them)."""
    meta = npy.with_suffix(".json")
    for stale in [*npy.parent.glob(f".{npy.name}.*.tmp"), *npy.parent.glob(f".{meta.name}.*.tmp")]:
        stale.unlink(missing_ok=True)


def _remove_older(keep: Path, family: dict[str, Any] | None) -> None:
    """Delete the caches of `family` other than `keep` that no process builds or uses."""
    if family is None:
        return
    for meta in sorted(keep.parent.glob("lines_*.json")):
        npy = meta.with_suffix(".npy")
        if npy == keep or _recorded_family(meta) != family:
            continue
        try:
            removed = _remove_unused(npy, meta)
        except OSError as exc:  # another user's files, say: the search goes on without this
            logger.warning("Could not remove the older image cache %s: %s", npy, exc)
            continue
        if removed:
            logger.info("Removed the older image cache %s (same data root and image size)", npy)
        else:
            logger.info("Kept the older image cache %s (same data root and image size): another "
                        "process is building or using it", npy)


def _recorded_family(meta: Path) -> dict[str, Any] | None:
    """The family a sidecar records; None if it records none or cannot be read."""
    try:
        info = json.loads(meta.read_bytes())
        return {k: info[k] for k in ("data_root", "height", "width")}
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _remove_unused(npy: Path, meta: Path) -> bool:
    """Delete a cache unless a process builds it (holds its lock) or uses it (see _map_pixels)."""
    with _lock_if_free(meta.with_suffix(".lock"), "a+b") as free:
        if not free:
            return False
        if npy.exists():
            # r+b: where flock is emulated (NFS), an exclusive lock needs a writable file
            with _lock_if_free(npy, "r+b") as unused:
                if not unused:
                    return False
                meta.unlink(missing_ok=True)  # first: without its sidecar a cache is absent
                npy.unlink()
        meta.unlink(missing_ok=True)
        _remove_temporaries(npy)
    return True


@contextlib.contextmanager
def _lock_if_free(path: Path, mode: str) -> Iterator[bool]:
    """Yield True holding an exclusive flock on `path`, or False at once if another open file
    holds a lock on it (where locks.file_lock would wait)."""
    with open(path, mode) as fh:  # closing it releases the flock
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        yield free


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
