# -*- test-case-name: tests.test_maildir -*-
"""
L{MessageBody}: the octets of one message being received, kept in memory while small and in an
anonymous temporary file beyond a threshold, so that many large messages at once cannot exhaust
memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

SPILL_THRESHOLD = 256 * 1024
_COPY_CHUNK = 1024 * 1024


class MessageBody:
    """
    Message content, appended in pieces, read back once or more by L{write_to}.

    The spill file is created unlinked (C{tempfile.TemporaryFile}), so nothing is left behind
    when the process dies. Writing it happens on the caller's thread: these are page-cache
    writes with no fsync, and only messages past the threshold use them.
    """

    def __init__(self, spill_dir: Path | None = None, threshold: int = SPILL_THRESHOLD) -> None:
        self._spill_dir = spill_dir
        self._threshold = threshold
        self._chunks: list[bytes] = []
        self._file: BinaryIO | None = None
        self.size = 0

    def append(self, data: bytes) -> None:
        """Add C{data} at the end."""
        if not data:
            return
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > self._threshold and self._spill_dir is not None:
            self._file = tempfile.TemporaryFile(dir=self._spill_dir)  # noqa: SIM115
            self._file.writelines(self._chunks)
            self._chunks = []

    def write_to(self, out: BinaryIO) -> None:
        """Write the whole content to C{out} (may be called from another thread, once done)."""
        if self._file is None:
            out.writelines(self._chunks)
            return
        self._file.flush()
        fd = self._file.fileno()
        offset = 0
        while offset < self.size:
            chunk = os.pread(fd, min(_COPY_CHUNK, self.size - offset), offset)
            if not chunk:
                raise OSError("spill file shorter than the message")
            out.write(chunk)
            offset += len(chunk)

    def read(self) -> bytes:
        """The whole content in memory (for tests and small messages)."""
        if self._file is None:
            return b"".join(self._chunks)
        self._file.flush()
        return os.pread(self._file.fileno(), self.size, 0)

    def close(self) -> None:
        """Let go of memory and the spill file."""
        self._chunks = []
        if self._file is not None:
            self._file.close()
            self._file = None
