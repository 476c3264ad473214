# -*- test-case-name: tests.test_maildir -*-
"""
Durability primitives (DESIGN.md §3): write a file under a temporary name, fsync it, rename it
into place, fsync the directory. Blocking: call them from the I/O thread pool.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make the entries of directory C{path} (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySync:
    """
    Group commit for directory fsyncs: a caller whose directory entry change (a rename or a
    link) is done calls L{changed}, which returns once an fsync of the directory that began
    after that change has completed. Concurrent callers share one fsync: while one runs, the
    others wait for it or for the next, instead of each paying for its own.
    """

    def __init__(self, sync: Callable[[Path], None] | None = None) -> None:
        self._sync = sync if sync is not None else fsync_dir
        self._lock = threading.Lock()
        self._dirs: dict[Path, _DirState] = {}

    def changed(self, path: Path) -> None:
        """An entry of C{path} has changed: return once that change is durable."""
        with self._lock:
            state = self._dirs.get(path)
            if state is None:
                state = self._dirs[path] = _DirState()
        with state.cond:
            state.changes += 1
            mine = state.changes
            while state.synced < mine:
                if state.syncing:
                    state.cond.wait()
                    continue
                state.syncing = True
                upto = state.changes
                ok = False
                state.cond.release()
                try:
                    self._sync(path)
                    ok = True
                finally:
                    state.cond.acquire()
                    state.syncing = False
                    if ok:
                        state.synced = max(state.synced, upto)
                    state.cond.notify_all()


class _DirState:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.changes = 0  # entry changes announced so far
        self.synced = 0  # changes covered by a completed fsync
        self.syncing = False


def fill_and_sync(fd: int, write: Callable[[BinaryIO], object]) -> int:
    """
    Fill the open file C{fd} with C{write} and fsync it.

    @return: the file's size in octets.
    """
    with os.fdopen(fd, "wb", buffering=256 * 1024, closefd=False) as f:
        write(f)
        f.flush()
        size = f.tell()
    os.fsync(fd)
    return size


def make_dirs_durably(path: Path, mode: int = 0o700) -> None:
    """
    Create C{path} and missing parents, fsyncing each parent whose entries changed, so that the
    new directories survive a crash.
    """
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def write_new_file(path: Path, write: Callable[[BinaryIO], object], mode: int = 0o600) -> int:
    """
    Create C{path} exclusively (never overwrite), fill it with C{write}, fsync it.

    On failure the partial file is removed. The caller renames it into place and fsyncs the
    directory.

    @return: the file's size in octets.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        size = fill_and_sync(fd, write)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)
    return size


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace C{path} with C{data}: write a temporary file, fsync, rename, fsync the dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _unlink_quietly(tmp)
    write_new_file(tmp, lambda f: f.write(data), mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
