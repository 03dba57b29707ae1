"""Crash-safe file writes: a reader sees the old content or the new, never a torn or mixed one.

- :func:`atomic_write`: one file. Written to a temporary file in the same directory, flushed, fsynced, then
  renamed over the target (``os.replace`` is atomic on POSIX within a file system).
- :func:`atomic_directory`: a group of files that must change together (an adapter's weights and config, a
  checkpoint's shards and index). Written into a fresh sibling directory, then swapped with the target in one
  ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it (Linux >= 3.15), else by two renames (the target is
  briefly absent, never mixed). Files of the old directory that the new one does not write are dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _fsync_directory(directory: Path) -> None:
    # Make the rename itself durable (POSIX: a directory entry is persisted by fsyncing the directory).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was.
    ``mode``: "wb" or "w" (text, UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically with renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on a clean exit it replaces ``path`` as a whole.

    Write every file of the new version into the yielded directory. On an exception it is deleted and ``path``
    is untouched. ``path`` may not exist yet (its parent is created); if it exists it must be a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if not path.exists():
            os.rename(staging, path)
            staging = None
        elif _exchange(staging, path):
            pass  # staging now holds the old version, removed below
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, old / "d")
            os.rename(staging, path)
            shutil.rmtree(old, ignore_errors=True)
            staging = None
        _fsync_directory(path.parent)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
