# -*- test-case-name: tests.test_smtp_data -*-
"""
The DATA phase, framed in chunks (not a callback per line), with no I/O.

RFC 5321 §4.1.1.4: only C{CRLF . CRLF} ends the message; §4.5.2: a line that begins with a dot
has that dot removed. We keep the store canonical: a message with a bare CR or a bare LF (one not
part of a CRLF pair) is read to its end and then refused (C{554 5.6.0}), so a stored message
always has CRLF line endings and no sequence in it can be taken as an end of data by anyone
downstream ("SMTP smuggling"). See docs/design.md.
"""

from __future__ import annotations

_END = b"\r\n.\r\n"
_MID_LINE = b"x"  # stands for "not at the start of a line" in a trimmed buffer


class DataDecoder:
    """
    Turns the octets that follow C{354} into message content.

    Feed it with L{feed}; it returns the un-dot-stuffed content complete so far (whole lines)
    and, once the terminating line has been seen, the octets that follow it (the next
    commands, when the client pipelines).

    @ivar size: octets of content (after un-stuffing) seen so far, counted past the limit.
    @ivar too_big: the content went over C{limit}; later content is dropped, not returned.
    @ivar bare_line_ending: a bare CR or LF was seen.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = b""  # always starts at the start of a line, unless it starts with _MID_LINE
        self.size = 0
        self.too_big = False
        self.bare_line_ending = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """
        Consume C{data}.

        @return: C{(content, rest)}: C{content} to append to the message (possibly empty);
            C{rest} is C{None} while the message goes on, else what followed the terminator.
        """
        buf = self._buf + data if self._buf else data
        if buf.startswith(b".\r\n"):
            self._buf = b""
            return b"", buf[3:]
        idx = buf.find(_END)
        if idx >= 0:
            self._buf = b""
            return self._content(buf[: idx + 2]), buf[idx + 5 :]
        cut = buf.rfind(b"\r\n")
        if cut < 0:
            self._buf = buf
            content = b""
        else:
            self._buf = buf[cut + 2 :]
            content = self._content(buf[: cut + 2])
        if len(self._buf) > max(self._limit - self.size, 4):
            # A "line" longer than the whole size limit: count it and keep only its tail, which
            # is all that the terminator search needs. A short rest (4 octets or fewer) is kept
            # whole: it may be the start of the terminating line (C{.} or C{.CR}), which the
            # mid-line marker would hide.
            self.size += len(self._buf)
            self.too_big = True
            self._buf = _MID_LINE + self._buf[-4:]
        return content, None

    def _content(self, chunk: bytes) -> bytes:
        """Un-stuff whole lines (C{chunk} starts at a line start and ends with CRLF)."""
        if self.too_big:
            self.size += len(chunk)  # an upper bound is enough once refused
            return b""
        if chunk[:1] == b".":
            chunk = chunk[1:]
        chunk = chunk.replace(b"\r\n.", b"\r\n")
        self.size += len(chunk)
        if self.size > self._limit:
            self.too_big = True
            return b""
        if not self.bare_line_ending and has_bare_line_ending(chunk):
            self.bare_line_ending = True
        return chunk


class LineEndingCheck:
    """
    Finds a bare CR or LF in content that arrives in arbitrary pieces (BDAT chunks), where a CRLF
    pair may be split between two pieces.
    """

    def __init__(self) -> None:
        self._pending_cr = False
        self.bad = False

    def feed(self, data: bytes) -> None:
        """Look at the next piece of content."""
        if self.bad or not data:
            return
        if self._pending_cr:
            if data[:1] != b"\n":
                self.bad = True
                return
            data = data[1:]
        self._pending_cr = data.endswith(b"\r")
        if self._pending_cr:
            data = data[:-1]
        if has_bare_line_ending(data):
            self.bad = True

    def finish(self) -> bool:
        """Whether the content seen, now complete, had a bare CR or LF."""
        return self.bad or self._pending_cr


def has_bare_line_ending(data: bytes) -> bool:
    """Whether C{data} holds a CR or LF that is not part of a CRLF pair."""
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf
