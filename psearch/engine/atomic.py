"""Atomic writes: every file a later step reads is written to a temporary file in the same folder
and renamed over the target, so a reader never sees a half-written file; a whole folder
(best_overall/) is built beside its target and swapped in with one atomic rename exchange."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    # mkstemp makes the file 0600; give it the mode an ordinary open() would (shared machines)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write bytes, flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (NaN is written as null: JSON has no NaN)."""
    write_text(path, json.dumps(_nan_to_none(obj), indent=2, sort_keys=False, default=str) + "\n")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """Atomically save a matplotlib figure; the format follows the target's suffix."""
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", **kwargs)


# ---------------------------------------------------------------- whole folders

AT_FDCWD = -100
RENAME_EXCHANGE = 2


def copy_durably(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file and flush it to disk (before a folder swap makes it visible)."""
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as fh:
        os.fsync(fh.fileno())


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where that is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


def process_tag() -> str:
    """'host-pid': names this process's scratch files uniquely even when the processes of
    several nodes share a folder."""
    return f"{socket.gethostname()}-{os.getpid()}"


def swap_in_folder(new: Path, target: Path) -> Path | None:
    """Make `new` become `target` so that a reader sees the old or the new folder, never none;
    returns where the old folder now lies, for the caller to delete a little later."""
    if not target.exists():
        os.rename(new, target)
        return None
    retired = target.with_name(f".{target.name}.old-{process_tag()}")
    shutil.rmtree(retired, ignore_errors=True)
    if exchange_paths(new, target):
        os.rename(new, retired)  # `new` names the old folder now
    else:
        os.rename(target, retired)  # readers may miss the folder for this instant only
        os.rename(new, target)
    return retired
