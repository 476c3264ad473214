# -*- test-case-name: tests.test_imap_parser -*-
"""
IMAP command parsing, in two layers, with no I/O.

1. L{CommandFramer} cuts the octets a client sends into whole commands. A command is a line
   ending in CRLF; a line that ends with a literal marker (C{{n}}, C{{n+}}, or C{~{n}} /
   C{~{n+}} for a literal8, RFC 3516) is followed by exactly n octets of literal data and then
   by more of the command, up to a line that ends without a marker. The framer knows only that
   much of the grammar: it reports when a synchronizing literal needs a continuation request
   (L{NeedContinuation}), enforces the limits (line length, literal size, octets held in memory,
   number of literals) and, after refusing a command, stays in step with the client: a refused
   synchronizing literal is never sent by the client (RFC 3501 §7.5), a refused
   non-synchronizing literal is sent anyway (RFC 7888 §4) and is swallowed, octet for octet,
   without being kept.

2. L{parse_command} and L{Reader} read the grammar of RFC 3501 §9 (with the RFC 9051 forms
   clients rely on) out of a framed L{Command}: a command handler reads its arguments with the
   reader's helpers (L{Reader.astring}, L{Reader.sequence_set}, L{Reader.mailbox}, ...) or with
   the whole-command parsers L{parse_fetch}, L{parse_store}, L{parse_search} and
   L{parse_append}. Every syntax error raises L{ParseError}, which carries the tag when it is
   known, so that the server answers C{tag BAD message} and goes on.

Decisions (see the tests for each):

 - Only CRLF ends a line. A line holding a bare CR or LF, or a NUL, is refused as a whole
   (L{Malformed}) once its CRLF arrives; a client that ends lines with LF alone is never answered
   until its line grows too long or the session times out. This keeps one reading of where a
   command ends, as the SMTP side does (docs/design.md).
 - Empty lines between commands are ignored (some clients send an extra CRLF after a literal).
 - A line that ends in something like C{{abc}} or C{{-1}} is not a literal marker: the line is a
   complete command, which the grammar then refuses. A marker with an absurd size such as
   C{{99999999999999999999}} is a literal that is too big (L{LiteralTooBig}); if it was
   non-synchronizing the framer swallows that many octets, so the protocol should close the
   connection rather than wait.
 - Literals larger than C{inline_literal_max} (64 KiB) go to a sink from C{open_literal} when
   one is given (APPEND spills to disk); smaller ones, or all of them without C{open_literal},
   are kept in memory as a list of chunks joined once.
 - With UTF8=ACCEPT enabled (RFC 6855) quoted strings may hold UTF-8 (which must be valid), and
   mailbox names are UTF-8 as sent; without it, 8-bit octets are refused in quoted strings and
   mailbox names, which are decoded from modified UTF-7 (RFC 3501 §5.1.3), strictly.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeAlias, TypeVar

T = TypeVar("T")

MAX_LINE = 64 * 1024
"""Longest line outside literals (without its CRLF), as Dovecot's C{imap_max_line_length}."""

DEFAULT_MAX_LITERAL = 26 * 1024 * 1024
"""Largest literal: a 25 MiB message plus slack. The server passes its own."""

DEFAULT_MAX_COMMAND = 1024 * 1024
"""Most octets of one command held in memory: its lines and the literals not given to a sink."""

INLINE_LITERAL_MAX = 64 * 1024
"""Literals up to this size are kept in memory; larger ones go to C{open_literal}'s sink."""

MAX_LITERALS = 1000
"""Most literals in one command (MULTIAPPEND sends one per message)."""

MAX_DEPTH = 32
"""Deepest nesting of parenthesized lists."""

MAX_SEARCH_DEPTH = 256
"""Deepest nesting of search keys (parentheses, NOT, OR): clients build long OR chains."""

_TAIL = 64
"""Octets kept from the end of an over-long line: enough to find a literal marker there."""

_HUGE = 2**64
"""The size given to a literal marker whose number has more than 20 digits."""

MAX_NUMBER = 2**32 - 1  # RFC 3501 §9: number, nz-number
MAX_NUMBER64 = 2**63 - 1  # RFC 9051 §9: number64, mod-sequence-value (RFC 7162)


class ParseError(Exception):
    """
    A command the server cannot read: answer C{tag BAD message} (or C{* BAD} without a tag).

    @ivar message: text for the client (it never quotes more than a few octets of the command).
    @ivar tag: the command's tag, when it was read.
    @ivar code: a response code for the reply (C{TOOBIG}, C{BADCHARSET ...}), or C{None}.
    """

    def __init__(self, message: str, tag: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.tag = tag
        self.code = code


class BadCharset(ParseError):
    """
    SEARCH named a charset we do not support. RFC 3501 §6.4.4 asks for a tagged
    C{NO [BADCHARSET (UTF-8 US-ASCII)]}, not BAD.
    """

    def __init__(self, charset: str, tag: str | None = None) -> None:
        super().__init__(f"unsupported charset {charset}", tag, "BADCHARSET (UTF-8 US-ASCII)")
        self.charset = charset


# -- framing ------------------------------------------------------------------------------------


class LiteralSink(Protocol):
    """
    Where a large literal's octets go as they arrive (an APPEND spilling to disk).

    The framer calls C{write} with the octets in order and C{close} once all of them came. If
    the command is then dropped (a later limit, or L{CommandFramer.close}), it calls C{discard};
    C{discard} may follow C{close}. A sink whose command is delivered belongs to the caller.
    """

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LiteralInfo:
    """A literal announced by the client, before its data."""

    tag: str | None
    name: str | None
    """The command name, upper-cased (C{APPEND}, C{UID FETCH}), when the first line has one."""
    index: int
    """Which literal of the command (0 for the first)."""
    size: int
    nonsync: bool
    binary: bool
    """A literal8 (C{~{n}}, RFC 3516)."""


@dataclass(frozen=True, slots=True)
class Literal:
    """The data of one literal: in memory (C{data}) or in the sink the caller gave (C{sink})."""

    size: int
    data: bytes | None = None
    sink: LiteralSink | None = None
    binary: bool = False
    nonsync: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    """
    One complete command, as framed: C{lines[i]} is the text before literal C{i} (ending with
    its marker), and the last line is the text after the last literal, all without CRLF.
    """

    tag: str | None
    lines: tuple[bytes, ...]
    literals: tuple[Literal, ...] = ()


@dataclass(frozen=True, slots=True)
class NeedContinuation:
    """
    The client announced a synchronizing literal and waits. Send C{+ Ready} and call
    L{CommandFramer.proceed}, or answer the command (BAD/NO) and call L{CommandFramer.refuse}.
    """

    info: LiteralInfo

    @property
    def tag(self) -> str | None:
        return self.info.tag

    @property
    def size(self) -> int:
        return self.info.size


@dataclass(frozen=True, slots=True)
class TooLong:
    """
    A limit was hit: C{reason} is C{"line"} (a line over C{max_line}), C{"command"} (more than
    C{max_command} octets held) or C{"literals"} (more than C{max_literals}). Answer BAD once;
    the framer drops the rest of the command.
    """

    tag: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class LiteralTooBig:
    """
    A literal over the limit. Answer BAD (RFC 7888 §4: C{[TOOBIG]}). A synchronizing one is
    never sent by the client; a non-synchronizing one is swallowed (C{size} octets).
    """

    tag: str | None
    size: int
    nonsync: bool


@dataclass(frozen=True, slots=True)
class Malformed:
    """A command refused by the framer (NUL octet, bare CR or LF). Answer BAD with C{message}."""

    tag: str | None
    message: str


Event: TypeAlias = Command | NeedContinuation | TooLong | LiteralTooBig | Malformed


class _Marker(NamedTuple):
    start: int
    size: int
    nonsync: bool
    binary: bool


def _literal_marker(line: bytes, truncated: bool = False) -> _Marker | None:
    """
    The literal marker that ends C{line}, if any. C{truncated}: C{line} is only the tail of an
    over-long line, so a marker whose opening brace was cut off (a run of digits) counts as one
    of absurd size.
    """
    if not line.endswith(b"}"):
        return None
    brace = line.rfind(b"{")
    body = line[brace + 1 : -1]
    nonsync = body.endswith(b"+")
    if nonsync:
        body = body[:-1]
    if not body or not body.isdigit():
        return None
    if brace < 0:
        return _Marker(0, _HUGE, nonsync, False) if truncated else None
    digits = body.lstrip(b"0")
    size = int(digits or b"0") if len(digits) <= 20 else _HUGE
    binary = line[brace - 1 : brace] == b"~" if brace > 0 else False
    return _Marker(brace - 1 if binary else brace, size, nonsync, binary)


# RFC 3501 §9: atom-specials are ( ) { SP CTL % * " \ ]; CHAR is 7-bit.
_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+')
_ASTRING_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\]+')  # ASTRING-CHAR adds "]"
_LIST_ATOM = re.compile(rb'[^\x00-\x20\x7f-\xff(){"\\]+')  # list-char adds % * ]
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')  # any ASTRING-CHAR except "+"
_DIGITS = re.compile(rb"[0-9]+")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_UNESCAPE = re.compile(rb'\\(["\\])')


def _tag_of(line: bytes, complete: bool = True) -> str | None:
    """The tag that starts C{line}, if it is a valid one (followed by SP or the end)."""
    m = _TAG.match(line)
    if m is None:
        return None
    end = m.end()
    if end < len(line):
        if line[end] != 0x20:
            return None
    elif not complete:
        return None  # the tag may go on in octets not seen
    return m.group().decode("ascii")


def _name_of(line: bytes) -> str | None:
    """The upper-cased command name of a first line (C{UID FETCH} for a UID command)."""
    words = line.split(b" ", 3)
    if len(words) < 2 or not _ATOM.fullmatch(words[1]):
        return None
    name = words[1].decode("ascii").upper()
    if name == "UID" and len(words) > 2 and _ATOM.fullmatch(words[2]):
        name += " " + words[2].decode("ascii").upper()
    return name


_LINE, _LITERAL, _WAIT = "line", "literal", "wait"


class CommandFramer:
    """
    Cuts a client's octets into L{Command}s, fed in chunks of any size.

    C{feed} returns the events the chunk completes, in order. After a L{NeedContinuation} (always
    the last event of a list) the framer holds any further input until the caller calls
    L{proceed} (it sent C{+ Ready}) or L{refuse} (it answered the command instead), which return
    the events of the input held meanwhile. A caller that decides asynchronously should pause
    the transport meanwhile: held input is not limited.

    @param max_line: longest line outside literals, without CRLF.
    @param max_literal: largest literal.
    @param max_nonsync_literal: largest non-synchronizing literal (4096 for LITERAL-, RFC 7888);
        by default C{max_literal} (LITERAL+).
    @param max_command: most octets of one command held in memory: its lines and the literals
        kept in memory (without C{open_literal}, that is every literal).
    @param max_literals: most literals in one command.
    @param inline_literal_max: literals up to this size stay in memory.
    @param open_literal: called for a larger literal when its data is about to come; the data
        goes to the sink it returns.
    """

    def __init__(
        self,
        *,
        max_line: int = MAX_LINE,
        max_literal: int = DEFAULT_MAX_LITERAL,
        max_nonsync_literal: int | None = None,
        max_command: int = DEFAULT_MAX_COMMAND,
        max_literals: int = MAX_LITERALS,
        inline_literal_max: int = INLINE_LITERAL_MAX,
        open_literal: Callable[[LiteralInfo], LiteralSink] | None = None,
    ) -> None:
        self._max_line = max_line
        self._max_literal = max_literal
        self._max_nonsync = max_literal if max_nonsync_literal is None else max_nonsync_literal
        self._max_command = max_command
        self._max_literals = max_literals
        self._inline_max = inline_literal_max
        self._open_literal = open_literal
        self._state = _LINE
        self._buf = bytearray()  # the line so far; only its tail once it is too long
        self._overflow = False
        self._pending = bytearray()  # input held while waiting for proceed/refuse
        self._waiting: LiteralInfo | None = None
        # The literal being read.
        self._lit_info: LiteralInfo | None = None
        self._lit_remaining = 0
        self._lit_chunks: list[bytes] = []
        self._lit_sink: LiteralSink | None = None
        self._lit_discard = False
        # The command being framed.
        self._tag: str | None = None
        self._name: str | None = None
        self._lines: list[bytes] = []
        self._literals: list[Literal] = []
        self._held = 0
        self._doomed = False  # refused: its error was reported, the rest is dropped

    @property
    def waiting(self) -> LiteralInfo | None:
        """The synchronizing literal awaiting L{proceed} or L{refuse}, if any."""
        return self._waiting

    @property
    def busy(self) -> bool:
        """
        Whether part of a command has been received (a STARTTLS handler checks that nothing
        was sent after the command: RFC 3501 §6.2.1).
        """
        return bool(
            self._buf or self._lines or self._doomed or self._state != _LINE or self._pending
        )

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Take the next octets from the client; return the events they complete."""
        events: list[Event] = []
        self._run(bytes(data), events)
        return events

    def proceed(self) -> list[Event]:
        """The continuation request was sent: read the literal (and the input held meanwhile)."""
        info = self._waiting
        if info is None:
            raise RuntimeError("no literal awaits a continuation")
        self._waiting = None
        self._start_literal(info)
        return self._resume()

    def refuse(self) -> list[Event]:
        """
        The command was answered instead of continued: the client will not send the literal,
        so the command ends here and what follows is the next command.
        """
        if self._waiting is None:
            raise RuntimeError("no literal awaits a continuation")
        self._waiting = None
        self._state = _LINE
        self._end_command(None)
        return self._resume()

    def close(self) -> None:
        """The connection is gone: let go of the command in progress and its sinks."""
        if self._lit_sink is not None:
            self._lit_sink.discard()
            self._lit_sink = None
        self._end_command(None)
        self._state = _LINE
        self._buf = bytearray()
        self._pending = bytearray()
        self._overflow = False
        self._waiting = None
        self._lit_chunks = []
        self._lit_discard = False

    # -- the machine ------------------------------------------------------------------------

    def _resume(self) -> list[Event]:
        held, self._pending = bytes(self._pending), bytearray()
        events: list[Event] = []
        self._run(held, events)
        return events

    def _run(self, data: bytes, events: list[Event]) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._state == _WAIT:
                self._pending += data[pos:]
                return
            if self._state == _LITERAL:
                take = min(self._lit_remaining, n - pos)
                if not self._lit_discard:
                    chunk = data[pos : pos + take]
                    if self._lit_sink is not None:
                        self._lit_sink.write(chunk)
                    else:
                        self._lit_chunks.append(chunk)
                pos += take
                self._lit_remaining -= take
                if self._lit_remaining == 0:
                    self._end_literal()
                continue
            pos = self._scan_line(data, pos, events)

    def _scan_line(self, data: bytes, pos: int, events: list[Event]) -> int:
        """Look for the end of the current line in C{data[pos:]}; return where to go on."""
        buf = self._buf
        if buf and buf[-1] == 0x0D and data[pos] == 0x0A:  # CRLF split between two chunks
            line = bytes(buf[:-1])
            pos += 1
        else:
            idx = data.find(b"\r\n", pos)
            if idx < 0:
                buf += data[pos:]
                if self._overflow:
                    del buf[:-_TAIL]
                elif len(buf) - (buf[-1] == 0x0D) > self._max_line:
                    if not self._lines and not self._doomed:
                        self._tag = _tag_of(bytes(buf[:256]), complete=False)
                    self._doom(events, TooLong(self._tag, "line"))
                    self._overflow = True
                    del buf[:-_TAIL]
                return len(data)
            line = bytes(buf) + data[pos:idx] if buf else data[pos:idx]
            pos = idx + 2
        self._buf = bytearray()
        truncated, self._overflow = self._overflow, False
        if not truncated and len(line) > self._max_line:
            if not self._lines and not self._doomed:
                self._tag = _tag_of(line[:256], complete=False)
            self._doom(events, TooLong(self._tag, "line"))
            truncated = True
            line = line[-_TAIL:]
        self._end_line(line, truncated, events)
        return pos

    def _doom(self, events: list[Event], event: Event) -> None:
        """Refuse the command in progress: report C{event} once and drop the rest."""
        if not self._doomed:
            self._doomed = True
            events.append(event)

    def _end_line(self, line: bytes, truncated: bool, events: list[Event]) -> None:
        marker = _literal_marker(line, truncated)
        if not self._doomed:
            if not self._lines:
                if not line:
                    return  # an empty line between commands
                self._tag = _tag_of(line)
                self._name = _name_of(line)
            if b"\x00" in line:
                self._doom(events, Malformed(self._tag, "NUL octet in command"))
            elif b"\r" in line or b"\n" in line:
                self._doom(events, Malformed(self._tag, "bare CR or LF: lines end with CRLF"))
            elif self._held + len(line) > self._max_command:
                self._doom(events, TooLong(self._tag, "command"))
            else:
                self._lines.append(line)
                self._held += len(line)
        if marker is None:
            self._end_command(events)
            return
        size, nonsync = marker.size, marker.nonsync
        if not self._doomed:
            in_memory = self._open_literal is None or size <= self._inline_max
            if len(self._literals) >= self._max_literals:
                self._doom(events, TooLong(self._tag, "literals"))
            elif (
                size > (self._max_nonsync if nonsync else self._max_literal)
                or in_memory
                and self._held + size > self._max_command
            ):
                self._doom(events, LiteralTooBig(self._tag, size, nonsync))
        if self._doomed:
            if nonsync:
                # RFC 7888 §4: the client sends it anyway; read past it, keeping nothing.
                self._lit_discard = True
                self._lit_remaining = size
                self._state = _LITERAL
                if size == 0:
                    self._end_literal()
            else:
                # RFC 3501 §7.5: refused instead of continued, the client sends no literal.
                self._end_command(None)
            return
        info = LiteralInfo(self._tag, self._name, len(self._literals), size, nonsync, marker.binary)
        if nonsync:
            self._start_literal(info)
        else:
            self._waiting = info
            self._state = _WAIT
            events.append(NeedContinuation(info))

    def _start_literal(self, info: LiteralInfo) -> None:
        self._lit_info = info
        self._lit_remaining = info.size
        self._lit_discard = False
        self._lit_chunks = []
        if info.size > self._inline_max and self._open_literal is not None:
            self._lit_sink = self._open_literal(info)
        self._state = _LITERAL
        if info.size == 0:
            self._end_literal()

    def _end_literal(self) -> None:
        self._state = _LINE
        if self._lit_discard:
            self._lit_discard = False
            return
        info = self._lit_info
        assert info is not None
        if self._lit_sink is not None:
            sink, self._lit_sink = self._lit_sink, None
            sink.close()
            literal = Literal(info.size, sink=sink, binary=info.binary, nonsync=info.nonsync)
        else:
            data = b"".join(self._lit_chunks)
            self._lit_chunks = []
            self._held += info.size
            literal = Literal(info.size, data=data, binary=info.binary, nonsync=info.nonsync)
        self._literals.append(literal)

    def _end_command(self, events: list[Event] | None) -> None:
        """The command ends: append it to C{events} (unless refused or C{None}), start afresh."""
        if events is not None and not self._doomed:
            events.append(Command(self._tag, tuple(self._lines), tuple(self._literals)))
        else:
            for literal in self._literals:
                if literal.sink is not None:
                    literal.sink.discard()
        self._tag = self._name = None
        self._lines = []
        self._literals = []
        self._held = 0
        self._doomed = False


def frame(data: bytes) -> Command:
    """
    The one command in C{data} (literals included, as if every continuation had been sent).
    For tests and tools; raises C{ValueError} if C{data} is not exactly one complete command.
    """
    framer = CommandFramer()
    events = framer.feed(data)
    while events and isinstance(events[-1], NeedContinuation):
        events = events[:-1] + framer.proceed()
    if len(events) != 1 or not isinstance(events[0], Command) or framer.busy:
        raise ValueError(f"not one complete command: {events!r}")
    return events[0]


# -- modified UTF-7 (RFC 3501 §5.1.3) ------------------------------------------------------------

_B64_CHARS = re.compile(r"[A-Za-z0-9+,]*")


def encode_mutf7(name: str) -> str:
    """
    C{name} in modified UTF-7: printable US-ASCII as itself (C{&} as C{&-}), every other run of
    characters as C{&}, modified BASE64 of its UTF-16BE (C{,} for C{/}, no padding), C{-}.

    @raise ValueError: C{name} holds a lone surrogate.
    """
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + b64 + "-")
            run.clear()

    for ch in name:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def decode_mutf7(name: str) -> str:
    """
    The mailbox name that C{name}, in modified UTF-7, stands for.

    Strict, as RFC 3501 §5.1.3 asks: only printable US-ASCII; every C{&} closed by C{-}; no
    BASE64 for characters that can stand for themselves; no two encoded runs side by side; no
    padding and no stray bits; whole UTF-16 (no lone surrogate). A name is valid exactly when
    L{encode_mutf7} gives it back.

    @raise ValueError: C{name} is not valid modified UTF-7.
    """
    out: list[str] = []
    i, n = 0, len(name)
    while i < n:
        ch = name[i]
        if not " " <= ch <= "~":
            raise ValueError("not printable US-ASCII")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        j = name.find("-", i + 1)
        if j < 0:
            raise ValueError("'&' without its '-'")
        b64 = name[i + 1 : j]
        i = j + 1
        if not b64:
            out.append("&")
            continue
        if not _B64_CHARS.fullmatch(b64) or len(b64) % 4 == 1:
            raise ValueError("bad modified BASE64")
        try:
            raw = base64.b64decode(b64.replace(",", "/") + "=" * (-len(b64) % 4), validate=True)
            out.append(raw.decode("utf-16-be"))
        except (binascii.Error, UnicodeDecodeError) as e:
            raise ValueError("bad modified BASE64") from e
    decoded = "".join(out)
    if encode_mutf7(decoded) != name:
        raise ValueError("not the canonical modified UTF-7 form")
    return decoded


# -- grammar ------------------------------------------------------------------------------------

_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    )
}
_DATE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_DATE_TIME = re.compile(
    rb'"( [0-9]|[0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) '
    rb'([+-])([0-9]{2})([0-9]{2})"'
)
_SEQ = re.compile(rb"[0-9:*,$]+")
_SYSTEM_FLAGS = {
    f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")
}

Range: TypeAlias = tuple[int | None, int | None]
"""One element of a sequence set: C{(first, last)} as written, C{None} standing for C{*}."""

Value: TypeAlias = "str | bytes | None | list[Value]"
"""A generic argument: an atom (C{str}), a string (C{bytes}), NIL (C{None}) or a list."""


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """
    A sequence set (C{1:4,7,*}, C{*:3}) or UID set as written, or C{$} (RFC 5182 SEARCHRES: the
    saved search result, which the handler substitutes; then C{ranges} is empty).
    """

    ranges: tuple[Range, ...]
    saved: bool = False

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """
        The set as ascending, disjoint, merged intervals within C{1..largest}, C{*} standing
        for C{largest} (the number of messages, or the highest UID). C{n:*} with C{n} above
        C{largest} is C{largest} alone (RFC 3501 §6.4.8).

        @raise ValueError: for C{$}.
        """
        if self.saved:
            raise ValueError("'$' stands for the saved search result")
        spans = []
        for first, last in self.ranges:
            a = largest if first is None else first
            b = largest if last is None else last
            lo, hi = max(1, min(a, b)), min(largest, max(a, b))
            if lo <= hi:
                spans.append((lo, hi))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return merged

    def contains(self, number: int, largest: int) -> bool:
        """Whether C{number} is in the set, C{*} standing for C{largest}."""
        return any(lo <= number <= hi for lo, hi in self.resolve(largest))

    def __str__(self) -> str:
        if self.saved:
            return "$"

        def num(v: int | None) -> str:
            return "*" if v is None else str(v)

        return ",".join(num(a) if a == b else f"{num(a)}:{num(b)}" for a, b in self.ranges)


class Reader:
    """
    A cursor over one framed command's arguments. Each helper reads one syntactic element at
    the cursor and moves past it, or raises L{ParseError} (with the tag). Helpers never read a
    space before their element: the handler calls L{sp} between arguments and L{end} after the
    last one.

    @param utf8: UTF8=ACCEPT is enabled (RFC 6855): quoted strings may hold UTF-8, mailbox
        names are UTF-8.
    @param max_depth: deepest nesting of parenthesized lists.
    """

    def __init__(self, command: Command, *, utf8: bool = False, max_depth: int = MAX_DEPTH) -> None:
        if len(command.lines) != len(command.literals) + 1:
            raise ValueError("a command has one line more than literals")
        self.tag = command.tag
        self.utf8 = utf8
        self._max_depth = max_depth
        self._depth = 0
        self._lines = command.lines
        self._literals = command.literals
        self._ends: list[int] = []
        for line, literal in zip(command.lines, command.literals, strict=False):
            marker = _literal_marker(line)
            if marker is None or marker.size != literal.size:
                raise ValueError("a line before a literal ends with its marker")
            self._ends.append(marker.start)
        self._ends.append(len(command.lines[-1]))
        self._i = 0
        self._line = self._lines[0]
        self._pos = 0
        self._end = self._ends[0]

    # -- cursor ---------------------------------------------------------------------------

    def error(self, message: str, code: str | None = None) -> ParseError:
        """A L{ParseError} for this command (to raise)."""
        return ParseError(message, self.tag, code)

    def peek(self) -> bytes:
        """The next octet (C{b""} at a literal or at the end)."""
        return self._line[self._pos : self._pos + 1] if self._pos < self._end else b""

    def at_literal(self) -> bool:
        return self._pos == self._end and self._i < len(self._literals)

    def at_end(self) -> bool:
        return self._pos == self._end and self._i == len(self._literals)

    def end(self) -> None:
        """The command must end here."""
        if not self.at_end():
            raise self.error("unexpected extra arguments")

    def sp(self) -> None:
        """Exactly one space."""
        if self.peek() != b" ":
            raise self.error("missing argument" if self.at_end() else "expected a space")
        self._pos += 1

    def accept(self, octet: bytes) -> bool:
        """Move past C{octet} if it comes next."""
        if self.peek() == octet:
            self._pos += 1
            return True
        return False

    def expect(self, octet: bytes) -> None:
        if not self.accept(octet):
            raise self.error(f"expected {octet.decode('ascii')!r}")

    def _match(self, regex: re.Pattern[bytes]) -> bytes | None:
        m = regex.match(self._line, self._pos, self._end)
        if m is None:
            return None
        self._pos = m.end()
        return m.group()

    # -- atoms and numbers -------------------------------------------------------------------

    def atom(self) -> str:
        """An atom (RFC 3501 §9), as written."""
        value = self._match(_ATOM)
        if value is None:
            raise self.error("missing argument" if self.at_end() else "expected an atom")
        return value.decode("ascii")

    def keyword(self) -> str:
        """An atom, upper-cased (command and option names are case-insensitive)."""
        return self.atom().upper()

    def peek_keyword(self) -> str | None:
        """The atom at the cursor, upper-cased, without moving; C{None} if there is none."""
        m = _ATOM.match(self._line, self._pos, self._end)
        return None if m is None else m.group().decode("ascii").upper()

    def _number(self, limit: int, nonzero: bool) -> int:
        digits = self._match(_DIGITS)
        if digits is None:
            raise self.error("expected a number")
        if nonzero and digits[:1] == b"0":
            raise self.error("expected a non-zero number")
        if len(digits) > 20 or int(digits) > limit:
            raise self.error("number out of range")
        return int(digits)

    def number(self) -> int:
        """A 32-bit unsigned number (RFC 3501 C{number})."""
        return self._number(MAX_NUMBER, False)

    def nz_number(self) -> int:
        """A non-zero 32-bit number, without leading zeros (C{nz-number})."""
        return self._number(MAX_NUMBER, True)

    def number64(self) -> int:
        """A 63-bit number (RFC 9051 C{number64}; RFC 7162 C{mod-sequence-valzer})."""
        return self._number(MAX_NUMBER64, False)

    def nz_number64(self) -> int:
        """A non-zero 63-bit number (C{nz-number64}; RFC 7162 C{mod-sequence-value})."""
        return self._number(MAX_NUMBER64, True)

    # -- strings ----------------------------------------------------------------------------

    def literal(self, binary: bool = False) -> Literal:
        """
        A literal as framed (its data may be in a sink): APPEND's message. C{binary}: a literal8
        (C{~{n}}) is allowed too.
        """
        if not self.at_literal():
            raise self.error("expected a literal")
        literal = self._literals[self._i]
        if literal.binary and not binary:
            raise self.error("literal8 not allowed here")
        self._i += 1
        self._line = self._lines[self._i]
        self._pos = 0
        self._end = self._ends[self._i]
        return literal

    def _quoted(self) -> bytes:
        m = _QUOTED.match(self._line, self._pos, self._end)
        if m is None:
            raise self.error("invalid quoted string")
        self._pos = m.end()
        value = _UNESCAPE.sub(rb"\1", m.group(1))
        if not value.isascii():
            if not self.utf8:
                raise self.error("8-bit octets in a quoted string (send a literal)")
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise self.error("invalid UTF-8 in a quoted string") from None
        return value

    def string(self) -> bytes:
        """A quoted string or a literal (RFC 3501 C{string})."""
        if self.peek() == b'"':
            return self._quoted()
        if self.at_literal():
            literal = self.literal()
            if literal.data is None:
                raise self.error("literal too large for this argument", "TOOBIG")
            if b"\x00" in literal.data:
                raise self.error("NUL octet in a literal")
            return literal.data
        raise self.error("missing argument" if self.at_end() else "expected a string")

    def astring(self) -> bytes:
        """An atom (with C{]}) or a string (RFC 3501 C{astring})."""
        value = self._match(_ASTRING_ATOM)
        return self.string() if value is None else value

    def nstring(self) -> bytes | None:
        """A string or NIL (C{None})."""
        if self.peek() == b'"' or self.at_literal():
            return self.string()
        if self.peek_keyword() == "NIL":
            self.atom()
            return None
        raise self.error("missing argument" if self.at_end() else "expected a string or NIL")

    def text(self, value: bytes) -> str:
        """C{value} (a string just read) as text: UTF-8, strictly."""
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error("invalid UTF-8") from None

    # -- mailbox names ------------------------------------------------------------------------

    def _mailbox_name(self, raw: bytes) -> str:
        if self.utf8:
            name = self.text(raw)  # RFC 6855 §3: names are UTF-8, not modified UTF-7
        else:
            if not raw.isascii():
                raise self.error("8-bit mailbox name (modified UTF-7 expected)")
            try:
                name = decode_mutf7(raw.decode("ascii"))
            except ValueError:
                raise self.error("mailbox name is not valid modified UTF-7") from None
        if any(ch < " " or ch == "\x7f" for ch in name):
            raise self.error("control character in mailbox name")
        return name

    def mailbox(self) -> str:
        """
        A mailbox name (C{mailbox}), decoded; C{INBOX} in any case is C{INBOX} (RFC 3501 §5.1).
        """
        name = self._mailbox_name(self.astring())
        return "INBOX" if name.upper() == "INBOX" else name

    def list_mailbox(self) -> str:
        """A LIST pattern (C{list-mailbox}: wildcards C{%} and C{*} allowed), decoded."""
        raw = self._match(_LIST_ATOM)
        return self._mailbox_name(self.string() if raw is None else raw)

    # -- sets, dates, flags -------------------------------------------------------------------

    def sequence_set(self) -> SequenceSet:
        """A sequence set or UID set: C{1:4,7,*}, C{*:3}, or C{$} (RFC 5182)."""
        token = self._match(_SEQ)
        if token is None:
            raise self.error("expected a sequence set")
        if token == b"$":
            return SequenceSet((), saved=True)
        ranges: list[Range] = []
        for element in token.split(b","):
            ends = element.split(b":")
            if len(ends) > 2:
                raise self.error("invalid sequence set")
            values = [self._seq_number(e) for e in ends]
            ranges.append((values[0], values[-1]))
        return SequenceSet(tuple(ranges))

    def _seq_number(self, text: bytes) -> int | None:
        if text == b"*":
            return None
        if not text.isdigit() or text[:1] == b"0" or len(text) > 10 or int(text) > MAX_NUMBER:
            raise self.error("invalid sequence set")
        return int(text)

    def date(self) -> dt.date:
        """A date, C{1-Feb-1994}, optionally quoted (SEARCH BEFORE/ON/SINCE...)."""
        quoted = self.accept(b'"')
        m = _DATE.match(self._line, self._pos, self._end)
        if m is None:
            raise self.error("invalid date (expected d-Mon-yyyy)")
        self._pos = m.end()
        if quoted:
            self.expect(b'"')
        day, month, year = (g.decode("ascii") for g in m.groups())
        try:
            return dt.date(int(year), _MONTHS[month.upper()], int(day))
        except (KeyError, ValueError):
            raise self.error("invalid date") from None

    def date_time(self) -> dt.datetime:
        """
        A date-time, C{"17-Jul-1996 02:44:25 -0700"} (APPEND), as an aware datetime. A day
        of one digit without its padding space is taken too (a lenient reading).
        """
        m = _DATE_TIME.match(self._line, self._pos, self._end)
        if m is None:
            raise self.error('invalid date-time (expected "dd-Mon-yyyy hh:mm:ss +zzzz")')
        day, month, year, hh, mm, ss, sign, zh, zm = (g.decode("ascii") for g in m.groups())
        try:
            if int(zm) > 59:
                raise ValueError("zone minutes")
            offset = dt.timedelta(hours=int(zh), minutes=int(zm))
            zone = dt.timezone(-offset if sign == "-" else offset)
            value = dt.datetime(
                int(year), _MONTHS[month.upper()], int(day), int(hh), int(mm), int(ss), 0, zone
            )
        except (KeyError, ValueError):
            raise self.error("invalid date-time") from None
        self._pos = m.end()
        return value

    def flag(self, perm: bool = False) -> str:
        """
        A flag: a system flag (canonical spelling), a keyword (as written), or C{\\*} when
        C{perm}. C{\\Recent} and unknown C{\\} flags are refused: a client cannot set them.
        """
        if self.accept(b"\\"):
            if perm and self.accept(b"*"):
                return "\\*"
            name = "\\" + self.atom()
            canonical = _SYSTEM_FLAGS.get(name.upper())
            if canonical is None or canonical == "\\Recent":
                raise self.error(f"invalid flag {name}")
            return canonical
        return self.atom()

    def flag_list(self, perm: bool = False) -> tuple[str, ...]:
        """C{(flag *(SP flag))}, possibly empty; duplicates (in any case) dropped."""
        return _dedupe(self.paren_list(lambda: self.flag(perm), allow_empty=True))

    # -- lists ------------------------------------------------------------------------------

    def paren_list(self, item: Callable[[], T], allow_empty: bool = False) -> list[T]:
        """C{"(" item *(SP item) ")"}, nested at most C{max_depth} deep."""
        self.expect(b"(")
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise self.error("too deeply nested")
            items: list[T] = []
            if self.accept(b")"):
                if not allow_empty:
                    raise self.error("empty list")
                return items
            while True:
                items.append(item())
                if self.accept(b")"):
                    return items
                self.sp()
        finally:
            self._depth -= 1

    def value(self) -> Value:
        """
        A generic argument (for extensions such as ID): an atom, NIL, a string or a
        parenthesized list of them, nested at most C{max_depth} deep.
        """
        if self.peek() == b"(":
            return self.paren_list(self.value, allow_empty=True)
        if self.peek() == b'"' or self.at_literal():
            return self.string()
        word = self.atom()
        return None if word.upper() == "NIL" else word


def _dedupe(flags: list[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for f in flags:
        if f.upper() not in seen:
            seen.add(f.upper())
            out.append(f)
    return tuple(out)


class ParsedCommand(NamedTuple):
    tag: str
    name: str
    """Upper-cased; C{UID FETCH} (two words) for a UID command."""
    args: Reader
    """Positioned right after the name."""


def parse_command(
    command: Command, *, utf8: bool = False, max_depth: int = MAX_DEPTH
) -> ParsedCommand:
    """
    The tag and name of a framed command, and a L{Reader} for its arguments.

    @raise ParseError: no valid tag (then C{tag} is C{None}: answer C{* BAD}) or no name.
    """
    reader = Reader(command, utf8=utf8, max_depth=max_depth)
    tag = reader._match(_TAG)
    if tag is None or command.tag != tag.decode("ascii") or reader.peek() not in (b" ", b""):
        raise ParseError("invalid or missing tag")
    if reader.at_end():
        raise reader.error("missing command name")
    reader.sp()
    name = reader.keyword()
    if name == "UID":
        reader.sp()
        name += " " + reader.keyword()
    return ParsedCommand(command.tag, name, reader)


# -- FETCH (RFC 3501 §6.4.5, RFC 3516 BINARY, RFC 7162 CHANGEDSINCE/VANISHED) --------------------

_FETCH_SIMPLE = frozenset(
    {
        "ENVELOPE",
        "FLAGS",
        "INTERNALDATE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.SIZE",
        "RFC822.TEXT",
        "BODY",
        "BODYSTRUCTURE",
        "UID",
        "MODSEQ",
    }
)
_FETCH_NAME = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_TEXT = re.compile(rb"HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME", re.IGNORECASE)
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 §3.6.8 ftext
_SAFE_ATOM = re.compile(r'[^\x00-\x20\x7f(){%*"\\\]]+')


@dataclass(frozen=True, slots=True)
class Section:
    """
    A body section: C{1.2.MIME} is C{Section((1, 2), "MIME")}, C{HEADER.FIELDS (From To)} is
    C{Section((), "HEADER.FIELDS", ("From", "To"))}; C{Section()} is the whole message.
    """

    part: tuple[int, ...] = ()
    text: str | None = None
    """C{HEADER}, C{HEADER.FIELDS}, C{HEADER.FIELDS.NOT}, C{TEXT}, C{MIME} or C{None}."""
    fields: tuple[str, ...] = ()
    """Header field names as the client wrote them (match them case-insensitively)."""

    def __str__(self) -> str:
        out = ".".join(str(p) for p in self.part)
        if self.text is not None:
            out += ("." if out else "") + self.text
        if self.fields:
            names = (f if _SAFE_ATOM.fullmatch(f) else '"' + f + '"' for f in self.fields)
            out += " (" + " ".join(names) + ")"
        return out


@dataclass(frozen=True, slots=True)
class FetchAtt:
    """
    One fetch attribute. C{name} is upper-cased: a simple one (C{FLAGS}, C{RFC822.SIZE}, ...),
    C{BODY} (with C{section}: C{BODY[...]} or C{BODY.PEEK[...]}; without: the non-extensible
    body structure), C{BINARY} or C{BINARY.SIZE}.
    """

    name: str
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None
    """C{<offset.length>}."""

    def response_name(self) -> str:
        """The name the FETCH response gives it: C{BODY[1.2]<0>} for C{BODY.PEEK[1.2]<0.100>}."""
        if self.section is None:
            return self.name
        out = f"{self.name}[{self.section}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}>"
        return out


_MACROS = {
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}


@dataclass(frozen=True, slots=True)
class FetchCommand:
    sequence_set: SequenceSet
    atts: tuple[FetchAtt, ...]
    changedsince: int | None = None
    vanished: bool = False


def fetch_att(r: Reader) -> FetchAtt:
    """One fetch attribute (C{fetch-att}), e.g. C{BODY.PEEK[HEADER.FIELDS (From To)]<0.100>}."""
    raw = r._match(_FETCH_NAME)
    if raw is None:
        raise r.error("expected a fetch attribute")
    name = raw.decode("ascii").upper()
    if name in ("BODY", "BODY.PEEK") and r.peek() == b"[":
        section = _section(r)
        return FetchAtt("BODY", section, name == "BODY.PEEK", _partial(r))
    if name in ("BINARY", "BINARY.PEEK", "BINARY.SIZE"):
        r.expect(b"[")
        part = _section_part(r) if r.peek() != b"]" else ()
        r.expect(b"]")
        partial = _partial(r) if name != "BINARY.SIZE" else None
        return FetchAtt(name.removesuffix(".PEEK"), Section(part), name == "BINARY.PEEK", partial)
    if name not in _FETCH_SIMPLE:
        raise r.error(f"unknown fetch attribute {name[:30]}")
    return FetchAtt(name)


def _section_part(r: Reader) -> tuple[int, ...]:
    part = [r.nz_number()]
    while r.peek() == b"." and r._line[r._pos + 1 : r._pos + 2].isdigit():
        r.expect(b".")
        part.append(r.nz_number())
    return tuple(part)


def _section(r: Reader) -> Section:
    r.expect(b"[")
    if r.accept(b"]"):
        return Section()
    part: tuple[int, ...] = ()
    if r.peek().isdigit():
        part = _section_part(r)
        if r.accept(b"]"):
            return Section(part)
        r.expect(b".")
    raw = r._match(_SECTION_TEXT)
    if raw is None:
        raise r.error("invalid section")
    text = raw.decode("ascii").upper()
    if text == "MIME" and not part:
        raise r.error("MIME needs a part number")
    fields: tuple[str, ...] = ()
    if text.startswith("HEADER.FIELDS"):
        r.sp()
        fields = tuple(r.paren_list(lambda: _field_name(r)))
    r.expect(b"]")
    return Section(part, text, fields)


def _field_name(r: Reader) -> str:
    raw = r.astring()
    name = raw.decode("ascii", "replace")
    if not _FIELD_NAME.fullmatch(name):
        raise r.error("invalid header field name")
    return name


def _partial(r: Reader) -> tuple[int, int] | None:
    if not r.accept(b"<"):
        return None
    offset = r.number64()
    r.expect(b".")
    length = r.nz_number64()
    r.expect(b">")
    return (offset, length)


def parse_fetch(r: Reader, uid: bool = False) -> FetchCommand:
    """
    The arguments of FETCH (C{uid}: UID FETCH), from right after the name to the end:
    C{SP sequence-set SP (macro / fetch-att / "(" fetch-att *(SP fetch-att) ")")
    [SP "(" modifier *(SP modifier) ")"]}, modifiers C{CHANGEDSINCE n} and (UID FETCH only,
    with CHANGEDSINCE) C{VANISHED} (RFC 7162 §3.1.4, §3.2.6).
    """
    r.sp()
    sequence_set = r.sequence_set()
    r.sp()
    if r.peek() == b"(":
        atts = tuple(r.paren_list(lambda: fetch_att(r)))
    else:
        macro = _MACROS.get(r.peek_keyword() or "")
        if macro is not None:
            r.atom()
            atts = tuple(FetchAtt(name) for name in macro)
        else:
            atts = (fetch_att(r),)
    changedsince: int | None = None
    vanished = False
    if not r.at_end():
        r.sp()

        def modifier() -> str:
            name = r.keyword()
            if name == "CHANGEDSINCE":
                r.sp()
                nonlocal changedsince
                # RFC 7162 asks for a mod-sequence-value (non-zero); 0 harmlessly means "all".
                changedsince = r.number64()
            elif name != "VANISHED" or not uid:
                raise r.error(f"invalid fetch modifier {name[:30]}")
            return name

        names = r.paren_list(modifier)
        if len(set(names)) != len(names):
            raise r.error("fetch modifier given twice")
        vanished = "VANISHED" in names
        if vanished and changedsince is None:
            raise r.error("VANISHED needs CHANGEDSINCE")
    r.end()
    return FetchCommand(sequence_set, atts, changedsince, vanished)


# -- STORE (RFC 3501 §6.4.6, RFC 7162 UNCHANGEDSINCE) ------------------------------------------

_STORE_ITEM = re.compile(rb"([+-]?)FLAGS(\.SILENT)?", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class StoreCommand:
    sequence_set: SequenceSet
    mode: str
    """C{""} (replace), C{"+"} (add) or C{"-"} (remove)."""
    silent: bool
    flags: tuple[str, ...]
    unchangedsince: int | None = None


def parse_store(r: Reader) -> StoreCommand:
    """
    The arguments of STORE: C{SP sequence-set [SP "(" UNCHANGEDSINCE n ")"]
    SP ["+" / "-"] FLAGS[.SILENT] SP (flag-list / flag *(SP flag))}.
    """
    r.sp()
    sequence_set = r.sequence_set()
    r.sp()
    unchangedsince: int | None = None
    if r.peek() == b"(":

        def modifier() -> int:
            if r.keyword() != "UNCHANGEDSINCE":
                raise r.error("invalid store modifier")
            r.sp()
            return r.number64()

        values = r.paren_list(modifier)
        if len(values) != 1:
            raise r.error("store modifier given twice")
        unchangedsince = values[0]
        r.sp()
    m = _STORE_ITEM.match(r._line, r._pos, r._end)
    if m is None or r._line[m.end() : m.end() + 1] not in (b" ", b""):
        raise r.error("expected FLAGS, +FLAGS or -FLAGS")
    r._pos = m.end()
    r.sp()
    if r.peek() == b"(":
        flags = r.flag_list()
    else:
        items = [r.flag()]
        while not r.at_end():
            r.sp()
            items.append(r.flag())
        flags = _dedupe(items)
    r.end()
    return StoreCommand(
        sequence_set, m.group(1).decode("ascii"), m.group(2) is not None, flags, unchangedsince
    )


# -- APPEND (RFC 3501 §6.3.11, RFC 3502 MULTIAPPEND, RFC 3516 literal8, RFC 6855 UTF8) ----------


@dataclass(frozen=True, slots=True)
class AppendMessage:
    flags: tuple[str, ...]
    internal_date: dt.datetime | None
    data: Literal
    """The message; its octets may be in the sink the framer's C{open_literal} gave."""
    utf8: bool = False
    """Sent as C{UTF8 (~{n}...)} (RFC 6855 §4)."""


@dataclass(frozen=True, slots=True)
class AppendCommand:
    mailbox: str
    messages: tuple[AppendMessage, ...]


def parse_append(r: Reader) -> AppendCommand:
    """
    The arguments of APPEND: C{SP mailbox 1*(SP [flag-list SP] [date-time SP] message)}, a
    message being a literal, a literal8, or C{UTF8 (literal8)}. More than one message is
    MULTIAPPEND. CATENATE is not supported. NUL octets in a message are not checked here.
    """
    r.sp()
    mailbox = r.mailbox()
    messages: list[AppendMessage] = []
    while True:
        r.sp()
        flags: tuple[str, ...] = ()
        when: dt.datetime | None = None
        if r.peek() == b"(":
            flags = r.flag_list()
            r.sp()
        if r.peek() == b'"':
            when = r.date_time()
            r.sp()
        utf8 = r.peek_keyword() == "UTF8"
        if utf8:
            r.atom()
            r.sp()
            r.expect(b"(")
            data = r.literal(binary=True)
            if not data.binary:
                raise r.error("UTF8 takes a literal8")
            r.expect(b")")
        else:
            data = r.literal(binary=True)
        messages.append(AppendMessage(flags, when, data, utf8))
        if r.at_end():
            return AppendCommand(mailbox, tuple(messages))


# -- SEARCH (RFC 3501 §6.4.4, RFC 4731/9051 RETURN, RFC 7162 MODSEQ, RFC 5032 OLDER/YOUNGER) ---


@dataclass(frozen=True, slots=True)
class AllKey:
    pass


@dataclass(frozen=True, slots=True)
class FlagKey:
    """Messages with (C{present}) or without the flag (system flag or keyword)."""

    flag: str
    present: bool = True


@dataclass(frozen=True, slots=True)
class TextKey:
    """C{field} is BCC, BODY, CC, FROM, SUBJECT, TEXT or TO; substring, case-insensitive."""

    field: str
    value: str


@dataclass(frozen=True, slots=True)
class HeaderKey:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class DateKey:
    """C{which}: BEFORE, ON, SINCE (internal date) or SENTBEFORE, SENTON, SENTSINCE."""

    which: str
    date: dt.date


@dataclass(frozen=True, slots=True)
class SizeKey:
    larger: bool
    size: int


@dataclass(frozen=True, slots=True)
class AgeKey:
    """RFC 5032: OLDER (C{older}) or YOUNGER than C{seconds}."""

    older: bool
    seconds: int


@dataclass(frozen=True, slots=True)
class SeqKey:
    sequence_set: SequenceSet
    uid: bool = False


@dataclass(frozen=True, slots=True)
class ModSeqKey:
    """RFC 7162 §3.1.5; C{entry} is the flag of C{"/flags/\\\\Seen"} and its type, if given."""

    modseq: int
    entry: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True, slots=True)
class NotKey:
    key: SearchKey


@dataclass(frozen=True, slots=True)
class OrKey:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class AndKey:
    keys: tuple[SearchKey, ...]


SearchKey: TypeAlias = (
    "AllKey | FlagKey | TextKey | HeaderKey | DateKey | SizeKey | AgeKey | SeqKey | ModSeqKey"
    " | NotKey | OrKey | AndKey"
)


@dataclass(frozen=True, slots=True)
class SearchCommand:
    charset: str | None
    """Upper-cased (C{UTF-8} or C{US-ASCII}), or C{None} if not given."""
    key: SearchKey
    """The keys ANDed (an L{AndKey} when there is more than one)."""
    result_options: tuple[str, ...] | None = None
    """ESEARCH C{RETURN (...)}: MIN, MAX, ALL, COUNT, SAVE; C{None} without RETURN."""


_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "RECENT": ("\\Recent", True),
    "SEEN": ("\\Seen", True),
    "OLD": ("\\Recent", False),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_TEXT_KEYS = frozenset({"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"})
_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})
_RETURN_OPTIONS = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE"})
_CHARSETS = {"UTF-8": "utf-8", "US-ASCII": "ascii"}


class _SearchParser:
    def __init__(self, r: Reader, codec: str) -> None:
        self.r = r
        self.codec = codec

    def text(self) -> str:
        raw = self.r.astring()
        try:
            return raw.decode(self.codec)
        except UnicodeDecodeError:
            raise self.r.error("search string not valid in its charset") from None

    def key(self, depth: int) -> SearchKey:
        r = self.r
        if depth > MAX_SEARCH_DEPTH:
            raise r.error("search keys nested too deeply")
        first = r.peek()
        if first == b"(":
            keys = r.paren_list(lambda: self.key(depth + 1))
            return keys[0] if len(keys) == 1 else AndKey(tuple(keys))
        if first.isdigit() or first in (b"*", b"$"):
            return SeqKey(r.sequence_set())
        word = r.keyword()
        if word == "ALL":
            return AllKey()
        if word == "NEW":
            return AndKey((FlagKey("\\Recent"), FlagKey("\\Seen", False)))
        if word in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[word]
            return FlagKey(flag, present)
        r.sp()
        if word in ("KEYWORD", "UNKEYWORD"):
            return FlagKey(r.atom(), word == "KEYWORD")
        if word in _TEXT_KEYS:
            return TextKey(word, self.text())
        if word == "HEADER":
            name = _field_name(r)
            r.sp()
            return HeaderKey(name, self.text())
        if word in _DATE_KEYS:
            return DateKey(word, r.date())
        if word in ("LARGER", "SMALLER"):
            return SizeKey(word == "LARGER", r.number64())
        if word in ("OLDER", "YOUNGER"):
            return AgeKey(word == "OLDER", r.nz_number())
        if word == "UID":
            return SeqKey(r.sequence_set(), uid=True)
        if word == "NOT":
            return NotKey(self.key(depth + 1))
        if word == "OR":
            left = self.key(depth + 1)
            r.sp()
            return OrKey(left, self.key(depth + 1))
        if word == "MODSEQ":
            entry: str | None = None
            entry_type: str | None = None
            if r.peek() == b'"':
                name = r.string().decode("ascii", "replace")
                if not name.lower().startswith("/flags/") or len(name) == 7:
                    raise r.error("invalid MODSEQ entry name")
                entry = name[7:]
                r.sp()
                entry_type = r.keyword()
                if entry_type not in ("PRIV", "SHARED", "ALL"):
                    raise r.error("invalid MODSEQ entry type")
                r.sp()
            return ModSeqKey(r.number64(), entry, entry_type)
        raise r.error(f"unknown search key {word[:30]}")


def parse_search(r: Reader) -> SearchCommand:
    """
    The arguments of SEARCH: C{[SP RETURN (opts)] [SP CHARSET charset] 1*(SP search-key)}.
    Strings are decoded in the charset (UTF-8 when none is given: a superset of US-ASCII).

    @raise BadCharset: a charset other than UTF-8 or US-ASCII.
    """
    r.sp()
    options: tuple[str, ...] | None = None
    if r.peek_keyword() == "RETURN":
        r.atom()
        r.sp()
        opts = r.paren_list(r.keyword, allow_empty=True)
        for opt in opts:
            if opt not in _RETURN_OPTIONS:
                raise r.error(f"unknown search return option {opt[:30]}")
        options = tuple(dict.fromkeys(opts))
        r.sp()
    charset: str | None = None
    codec = "utf-8"
    if r.peek_keyword() == "CHARSET":
        r.atom()
        r.sp()
        charset = r.astring().decode("ascii", "replace").upper()
        if charset not in _CHARSETS:
            raise BadCharset(charset[:40], r.tag)
        codec = _CHARSETS[charset]
        r.sp()
    parser = _SearchParser(r, codec)
    keys = [parser.key(1)]
    while not r.at_end():
        r.sp()
        keys.append(parser.key(1))
    return SearchCommand(charset, keys[0] if len(keys) == 1 else AndKey(tuple(keys)), options)
