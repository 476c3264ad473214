# -*- test-case-name: tests.test_maildir -*-
"""
Durability primitives (DESIGN.md §3): write a file under a temporary name, fsync it, rename it
into place, fsync the directory. Blocking: call them from the I/O thread pool.
"""

from __future__ import annotations

import os
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
        with os.fdopen(fd, "wb", buffering=256 * 1024, closefd=False) as f:
            write(f)
            f.flush()
            size = f.tell()
        os.fsync(fd)
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
