"""Crash-safe file writes: a reader sees the old content or the new, never a torn or mixed one.

- :func:`atomic_write`: one file. Written to a temporary file in the same directory, flushed, fsynced, then
  renamed over the target (``os.replace`` is atomic on POSIX within a file system).
- :func:`atomic_directory`: a group of files that must change together (an adapter's weights and config, a
  checkpoint's shards and index). Written into a fresh sibling directory, then swapped with the target in one
  ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it (Linux >= 3.15), else by two renames (the target is
  briefly absent, never mixed). Entries of the old directory that the new one does not write are dropped, or
  carried over as hard links when ``keep`` accepts their name.
- :func:`read_together`: the reading side of :func:`atomic_directory`: several files of one directory, all
  from the same version of it even while a writer swaps it.

Temporary files and directories are hidden siblings of the target (``.<name>.<random>.tmp``); a process killed
mid-write leaves one behind, never a damaged target. New files get the mode a plain ``open`` would give them
(0o666 less the umask) or the mode of the file they replace.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO


def _fsync_directory(directory: Path) -> None:
    # Make renames and new entries durable (POSIX: a directory entry is persisted by fsyncing the directory).
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sibling_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"


def _create_file(path: Path) -> tuple[int, Path]:
    # O_EXCL on a random name (as mkstemp) but with mode 0o666, so the umask applies as for a plain open().
    while True:
        tmp = _sibling_name(path, ".tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def _create_directory(path: Path) -> Path:
    while True:
        tmp = _sibling_name(path, ".tmp")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def _resolved(path: str | os.PathLike) -> Path:
    # Write through a symlink to its target (replacing the link itself would detach it from what it named).
    return Path(os.path.realpath(os.fspath(path)))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was.
    ``mode``: "wb" or "w" (text, UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = _resolved(path)
    fd, tmp = _create_file(path)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, path.stat().st_mode & 0o7777)  # keep the replaced file's permissions
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


@functools.cache
def _renameat2() -> Callable | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
    except OSError:
        return None
    return getattr(libc, "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically with renameat2(RENAME_EXCHANGE); False where unsupported.

    Raises OSError for a failure that is not "unsupported" (permissions, a vanished entry).
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None, str(b))


def _link_tree(src: str, dst: Path) -> None:
    # A copy of src at dst that shares the files' data: hard links (a copy where the file system has none).
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        os.mkdir(dst)
        shutil.copystat(src, dst)
        for entry in os.scandir(src):
            _link_tree(entry.path, dst / entry.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(Path(directory))


def _contains_cwd(path: Path) -> bool:
    try:
        cwd = Path(os.getcwd()).resolve()
    except OSError:
        return False
    return cwd == path or path in cwd.parents


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on a clean exit it replaces ``path`` as a whole.

    Write every file of the new version into the yielded directory. On an exception it is deleted and ``path``
    is untouched. ``path`` may not exist yet (its parent is created); if it exists it must be a directory, and
    not the working directory or one above it (the swap would move the process's working directory away).

    ``keep``: entries (by top-level name) of the current ``path`` that the new version does not write and
    ``keep(name)`` accepts are carried into it as hard links (no data copied); None: nothing is carried.
    Entries that another process adds to ``path`` while the new version is written are lost.
    """
    path = _resolved(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if _contains_cwd(path):
        raise ValueError(f"{path} is the working directory or holds it; write into a subdirectory instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging: Path | None = _create_directory(path)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(staging, path.stat().st_mode & 0o7777)
        yield staging
        _fsync_tree(staging)
        if keep is not None and path.is_dir():
            for entry in os.scandir(path):
                target = staging / entry.name
                if not os.path.lexists(target) and keep(entry.name):
                    _link_tree(entry.path, target)
            _fsync_directory(staging)
        if not path.exists():
            os.rename(staging, path)
            staging = None
        elif not _exchange(staging, path):
            old = _sibling_name(path, ".old")
            os.rename(path, old)
            try:
                os.rename(staging, path)
            except BaseException:
                os.rename(old, path)
                raise
            staging = old  # removed below
        # Else staging now holds the old version, removed below.
        _fsync_directory(path.parent)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def read_together(directory: str | os.PathLike, names: Iterable[str], retries: int = 100) -> dict[str, bytes | None]:
    """The bytes of the files ``names`` of ``directory`` (None for an absent one), all of one version of it.

    Every file is opened through one handle on the directory, which is then checked to still be the one at
    ``directory``: a writer that swapped in a new version (:func:`atomic_directory`) in between makes it try
    again, up to ``retries`` times. Raises FileNotFoundError / NotADirectoryError for a bad ``directory``.
    """
    names = list(names)
    if os.open not in os.supports_dir_fd:  # Windows: no directory handles (and no atomic directory swap either)
        return {name: _read_file(Path(directory) / name) for name in names}
    for _ in range(retries):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        fds: dict[str, int | None] = {}
        try:
            for name in names:
                try:
                    fds[name] = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
                except FileNotFoundError:
                    fds[name] = None
            now, opened = os.stat(directory), os.fstat(dir_fd)
            if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
                out = {}
                for name, fd in fds.items():
                    out[name] = None if fd is None else _read_all(fd)
                return out
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
            os.close(dir_fd)
    raise OSError(f"{directory} was replaced {retries} times while being read; giving up")


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_all(fd: int) -> bytes:
    with os.fdopen(os.dup(fd), "rb") as f:
        return f.read()
