# -*- test-case-name: tests.test_imap_message -*-
"""
The structure of a stored message, as IMAP FETCH needs it (RFC 3501 §6.4.5, §7.4.2).

L{parse_structure} reads a message file once, line by line for headers and in large blocks for
bodies, and records for each MIME entity where its header and body lie in the file (offset and
length) and their size in canonical CRLF form. Nothing here keeps a body in memory: a 25 MiB
attachment costs a few 64 KiB reads. From the resulting L{MessageStructure}:

  - L{envelope} gives the ENVELOPE list, L{body_structure} BODY and BODYSTRUCTURE;
  - L{section_range} resolves a C{BODY[section]} into byte ranges of the file (or, for
    C{HEADER.FIELDS}, the few bytes of the matching header lines), L{apply_partial} applies a
    C{<origin.count>}, and L{iter_section} streams the result, turning bare LFs into CRLF for
    files that are not canonical (L{MessageStructure.canonical}).

Malformed input never raises: a part whose Content-Type cannot be parsed, a multipart without
a usable boundary or without any part, and anything nested deeper than L{MAX_DEPTH} or beyond
L{MAX_PARTS} become C{text/plain} leaves; an unterminated multipart ends at its parent's
boundary or at the end of the file.

Where RFC 3501 leaves a choice we follow what Dovecot answers for the same message, since that
is what clients are used to; the deliberate differences are listed (with Dovecot's answer) in
C{tests/test_imap_message.py}. No I/O beyond the binary file object handed in; no Twisted.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

MAX_DEPTH = 50
"""Entities nested deeper than this are not looked into (a multipart or message/rfc822 there
becomes a text/plain leaf)."""

MAX_PARTS = 10_000
"""Entities recorded per message; past this, the rest of a multipart is left unsplit."""

MAX_FIELD_BYTES = 256 * 1024
"""Raw bytes kept per header field name of one entity (address lists can be long)."""

_CHUNK = 64 * 1024
_LINE_CHUNK = 64 * 1024
"""Header lines longer than this are read in pieces (the piece boundaries change nothing)."""
_BOUNDARY_LOOKAHEAD = 1024
"""How far past the boundary a line that starts with it is read to decide it is a boundary
line (transport padding)."""
MAX_BOUNDARY = 200
"""Longer boundaries are not used (RFC 2046 §5.1.1 allows 70): the multipart is text/plain."""

MISSING_MAILBOX = b"MISSING_MAILBOX"
MISSING_DOMAIN = b"MISSING_DOMAIN"
"""Placeholders for an address without a local part or domain (Dovecot's names, so clients
show the same thing)."""

_CONTENT_FIELDS = frozenset(
    {
        b"content-type",
        b"content-transfer-encoding",
        b"content-id",
        b"content-description",
        b"content-disposition",
        b"content-language",
        b"content-location",
        b"content-md5",
    }
)
_ENVELOPE_FIELDS = frozenset(
    {
        b"date",
        b"subject",
        b"from",
        b"sender",
        b"reply-to",
        b"to",
        b"cc",
        b"bcc",
        b"in-reply-to",
        b"message-id",
    }
)
_MESSAGE_FIELDS = _CONTENT_FIELDS | _ENVELOPE_FIELDS

_NUL_REPLACEMENT = "\ufffd".encode()


# --------------------------------------------------------------------------------- strings


def imap_string(value: bytes | str | None) -> bytes:
    """
    One IMAP C{nstring}: C{NIL} for C{None}, a quoted string when every byte is printable ASCII
    other than C{"} and C{\\}, else a literal C{{n}\\r\\n...} (RFC 3501 §4.3, §9 C{quoted}).

    A literal may hold any octet but NUL (RFC 3501 C{CHAR8}), so NULs become U+FFFD, as
    Dovecot does. Strings are sent as UTF-8.
    """
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        try:
            data = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = value.encode("utf-8", "replace")
    else:
        data = value
    if b"\x00" in data:
        data = data.replace(b"\x00", _NUL_REPLACEMENT)
    if _QUOTABLE.fullmatch(data):
        return b'"' + data + b'"'
    return b"{%d}\r\n" % len(data) + data


_QUOTABLE = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\x7e]*")


def _unfold(value: bytes) -> bytes:
    """A header value as one line (RFC 5322 §2.2.3): CR and LF removed, ends trimmed."""
    return value.replace(b"\r", b"").replace(b"\n", b"").strip(b" \t")


# --------------------------------------------------------------------------------- the model


@dataclass(slots=True)
class EnvelopeHeaders:
    """The raw header values an ENVELOPE is made of (RFC 3501 §7.4.2), of one message entity.

    Like Dovecot: for the single-valued fields the last occurrence wins; address fields that
    occur more than once are concatenated.
    """

    date: bytes | None = None
    subject: bytes | None = None
    in_reply_to: bytes | None = None
    message_id: bytes | None = None
    from_: list[bytes] = field(default_factory=list)
    sender: list[bytes] = field(default_factory=list)
    reply_to: list[bytes] = field(default_factory=list)
    to: list[bytes] = field(default_factory=list)
    cc: list[bytes] = field(default_factory=list)
    bcc: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class BodyPart:
    """
    One MIME entity: the whole message, a part of a multipart, or the message enclosed in a
    message/rfc822 part.

    Offsets and lengths are in the file (C{*_offset}, C{*_length}); sizes are octets of the
    canonical CRLF form (C{*_size}), which is what IMAP reports and sends. They differ only in a
    file with bare LFs. Header values are raw bytes, unfolded, as IMAP sends them: encoded-words
    stay encoded.
    """

    header_offset: int
    header_length: int
    header_size: int
    body_offset: int
    body_length: int
    body_size: int
    body_lines: int
    """Lines of the body (its LF count), reported for text/* and message/rfc822."""
    type: bytes = b"text"
    subtype: bytes = b"plain"
    """Media type as written (case kept, like Dovecot); compare with L{media_type}."""
    params: tuple[tuple[bytes, bytes], ...] = ()
    """Content-Type parameters, RFC 2231 continuations joined, quoted strings unquoted."""
    content_id: bytes | None = None
    description: bytes | None = None
    encoding: bytes | None = None
    md5: bytes | None = None
    disposition: bytes | None = None
    disposition_params: tuple[tuple[bytes, bytes], ...] = ()
    language: tuple[bytes, ...] = ()
    location: bytes | None = None
    boundary: bytes | None = None
    """The boundary of a multipart that was split into L{children}."""
    children: list[BodyPart] = field(default_factory=list)
    """The parts of a multipart (never empty for a multipart; empty for anything else)."""
    message: BodyPart | None = None
    """The enclosed message of a message/rfc822 part."""
    envelope: EnvelopeHeaders | None = None
    """Set on message entities (the root and each enclosed message)."""

    @property
    def media_type(self) -> str:
        """C{"text/plain"}: the type, lower case, for comparisons."""
        return (self.type + b"/" + self.subtype).decode("ascii", "replace").lower()

    @property
    def is_multipart(self) -> bool:
        return bool(self.children)

    @property
    def is_message(self) -> bool:
        """A message/rfc822 part (with its enclosed message in L{message})."""
        return self.message is not None

    @property
    def is_text(self) -> bool:
        return self.type.lower() == b"text"


@dataclass(slots=True)
class MessageStructure:
    """What L{parse_structure} found in one message file."""

    root: BodyPart
    canonical: bool
    """Every LF in the file is preceded by CR: ranges can be sent as they are. When false
    (a file placed by hand), L{iter_section} converts bare LFs to CRLF as it reads."""
    size: int
    """Octets of the whole message in CRLF form (the index's RFC822.SIZE is authoritative)."""
    file_size: int


# --------------------------------------------------------------------------------- scanning


@dataclass(frozen=True, slots=True)
class _Mark:
    """A position in the file and the LF / bare-LF counts before it."""

    offset: int
    lf: int
    bare: int


@dataclass(frozen=True, slots=True)
class _End:
    """How an entity's content ended: at a boundary line of L{level} in the stack, or at EOF
    (C{level == -1}). L{at} is where the entity ends: before the line break that precedes the
    boundary line, which belongs to the boundary (RFC 2046 §5.1.1)."""

    level: int
    close: bool
    at: _Mark


class _Scanner:
    """A read buffer over the file that keeps count of LFs and bare LFs consumed."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._buf = b""
        self._pos = 0
        self._base = 0
        self._eof = False
        self.lf = 0
        self.bare = 0
        self._prev_cr = False
        self._last_eol = 1
        self.at_line_start = True
        self.parts = 0

    def offset(self) -> int:
        return self._base + self._pos

    def mark(self) -> _Mark:
        return _Mark(self._base + self._pos, self.lf, self.bare)

    def _fill(self, n: int) -> None:
        """Have at least C{n} unconsumed bytes in the buffer, or everything up to EOF."""
        if len(self._buf) - self._pos >= n or self._eof:
            return
        pieces = [self._buf[self._pos :]]
        have = len(pieces[0])
        self._base += self._pos
        self._pos = 0
        while have < n:
            chunk = self._f.read(max(_CHUNK, n - have))
            if not chunk:
                self._eof = True
                break
            pieces.append(chunk)
            have += len(chunk)
        self._buf = b"".join(pieces)

    def _consume(self, end: int) -> None:
        """Account for C{buf[pos:end]} and move past it."""
        buf, pos = self._buf, self._pos
        if end <= pos:
            return
        lf = buf.count(b"\n", pos, end)
        if lf:
            crlf = buf.count(b"\r\n", pos, end)
            if self._prev_cr and buf[pos] == 0x0A:
                crlf += 1
            self.lf += lf
            self.bare += lf - crlf
        last = buf[end - 1]
        if last == 0x0A:
            before = buf[end - 2] == 0x0D if end - 2 >= pos else self._prev_cr
            self._last_eol = 2 if before else 1
            self.at_line_start = True
        else:
            self.at_line_start = False
        self._prev_cr = last == 0x0D
        self._pos = end

    def end_before_eol(self, floor: _Mark) -> _Mark:
        """The position before the line break that ended the previous line (we are at a line
        start), but not before C{floor}."""
        eol = self._last_eol
        here = self.mark()
        if here.offset - eol < floor.offset:
            return floor
        return _Mark(here.offset - eol, here.lf - 1, here.bare - (1 if eol == 1 else 0))

    def boundary(self, stack: Sequence[bytes]) -> tuple[int, bool] | None:
        """At a line start: is this line a boundary line of one of C{stack}? The innermost
        boundary is tried first; an outer one ends the inner entities too."""
        if not stack or not self.at_line_start:
            return None
        self._fill(2)
        buf, pos = self._buf, self._pos
        if buf[pos : pos + 2] != b"--":
            return None
        limit = max(len(b) for b in stack) + _BOUNDARY_LOOKAHEAD
        self._fill(limit)
        buf, pos = self._buf, self._pos
        nl = buf.find(b"\n", pos, pos + limit)
        if nl < 0:
            if not self._eof or len(buf) - pos > limit:
                return None
            nl = len(buf)
        line = buf[pos + 2 : nl].rstrip(b"\r")
        for level in range(len(stack) - 1, -1, -1):
            b = stack[level]
            if not line.startswith(b):
                continue
            rest = line[len(b) :]
            close = rest.startswith(b"--")
            if close:
                rest = rest[2:]
            # RFC 2046 §5.1.1: only transport padding (spaces, tabs) may follow.
            if rest.strip(b" \t") == b"":
                return level, close
        return None

    def skip_line(self) -> None:
        """Consume the rest of the current line (a boundary line)."""
        while True:
            self._fill(1)
            if self._pos >= len(self._buf):
                return
            nl = self._buf.find(b"\n", self._pos)
            if nl >= 0:
                self._consume(nl + 1)
                return
            self._consume(len(self._buf))

    def read_line(self) -> bytes:
        """The next line with its LF, or a piece of at most L{_LINE_CHUNK} bytes of a longer
        one; C{b""} at EOF."""
        self._fill(1)
        if self._pos >= len(self._buf):
            return b""
        nl = self._buf.find(b"\n", self._pos, self._pos + _LINE_CHUNK)
        if nl < 0 and not self._eof:
            self._fill(_LINE_CHUNK)
            nl = self._buf.find(b"\n", self._pos, self._pos + _LINE_CHUNK)
        if nl >= 0:
            end = nl + 1
        else:
            end = min(len(self._buf), self._pos + _LINE_CHUNK)
        line = self._buf[self._pos : end]
        self._consume(end)
        return line

    def scan(self, stack: Sequence[bytes], floor: _Mark) -> _End:
        """Skip content up to the next boundary line of C{stack} (consumed) or EOF."""
        while True:
            hit = self.boundary(stack)
            if hit is not None:
                at = self.end_before_eol(floor)
                self.skip_line()
                return _End(hit[0], hit[1], at)
            self._fill(3)
            buf, pos = self._buf, self._pos
            if pos >= len(buf):
                return _End(-1, False, self.mark())
            if not stack:
                self._consume(len(buf))
                continue
            # jump to the next line that starts with "--" and one of the boundaries
            found = _candidates(stack).search(buf, pos)
            if found is not None:
                self._consume(found.start() + 1)
            elif self._eof:
                self._consume(len(buf))
            else:
                # keep back what may be the start of a candidate cut by the buffer's end
                keep = max(len(b) for b in stack) + 3
                self._consume(max(pos + 1, len(buf) - keep))
                self._fill(len(self._buf) - self._pos + keep)


_CANDIDATES: dict[tuple[bytes, ...], re.Pattern[bytes]] = {}


def _candidates(stack: Sequence[bytes]) -> re.Pattern[bytes]:
    """A line break and a boundary line of the stack (compiled once per stack). C{\\Z} (the
    end of the buffer, not always of the file) makes a line cut by the buffer's end a
    candidate too; L{_Scanner.boundary} decides."""
    key = tuple(stack)
    pattern = _CANDIDATES.get(key)
    if pattern is None:
        if len(_CANDIDATES) > 256:
            _CANDIDATES.clear()
        alternatives = b"|".join(re.escape(b) for b in sorted(set(key), key=len, reverse=True))
        # the whole line, so that lines merely starting with a boundary cost nothing
        pattern = _CANDIDATES[key] = re.compile(
            b"\n--(?:" + alternatives + b")(?:--)?[ \t]*\r*(?:\n|\\Z)"
        )
    return pattern


# --------------------------------------------------------------------------------- headers


class _Fields:
    """The wanted fields of one header, raw values (folding kept), capped in size."""

    __slots__ = ("_wanted", "values", "_sizes", "_current")

    def __init__(self, wanted: frozenset[bytes]) -> None:
        self._wanted = wanted
        self.values: dict[bytes, list[bytearray]] = {}
        self._sizes: dict[bytes, int] = {}
        self._current: tuple[bytes, bytearray] | None = None

    def feed(self, line: bytes, line_start: bool) -> None:
        if line_start and line[:1] not in (b" ", b"\t"):
            self._current = None
            colon = line.find(b":")
            if colon <= 0:
                return  # not a field: skipped, as Dovecot does
            name = line[:colon].rstrip(b" \t").lower()
            if name not in self._wanted:
                return
            used = self._sizes.get(name, 0)
            if used >= MAX_FIELD_BYTES:
                return
            value = bytearray()
            self.values.setdefault(name, []).append(value)
            self._sizes[name] = used + 16
            self._current = (name, value)
            line = line[colon + 1 :]
        if self._current is not None:
            name, value = self._current
            room = MAX_FIELD_BYTES - self._sizes[name]
            if room > 0:
                piece = line[:room]
                value += piece
                self._sizes[name] += len(piece)

    def first(self, name: bytes) -> bytes | None:
        found = self.values.get(name)
        return bytes(found[0]) if found else None

    def last(self, name: bytes) -> bytes | None:
        found = self.values.get(name)
        return bytes(found[-1]) if found else None

    def all(self, name: bytes) -> list[bytes]:
        return [bytes(v) for v in self.values.get(name, ())]


def _read_header(
    scanner: _Scanner, stack: Sequence[bytes], fields: _Fields, floor: _Mark
) -> tuple[_Mark, _End | None]:
    """
    Read a header up to and including its empty line. Returns where the header ends and, when
    a boundary line or EOF came first, how the entity ended.
    """
    while True:
        hit = scanner.boundary(stack)
        if hit is not None:
            at = scanner.end_before_eol(floor)
            scanner.skip_line()
            return at, _End(hit[0], hit[1], at)
        line_start = scanner.at_line_start
        line = scanner.read_line()
        if not line:
            at = scanner.mark()
            return at, _End(-1, False, at)
        if line_start and (line == b"\r\n" or line == b"\n"):
            return scanner.mark(), None
        fields.feed(line, line_start)


# --------------------------------------------------------------------------------- MIME values


def _strip_comments(value: bytes) -> bytes:
    """Remove RFC 822 comments outside quoted strings (quoted strings are kept as they are)."""
    if b"(" not in value:
        return value
    out = bytearray()
    depth = 0
    quoted = False
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if quoted:
            out.append(c)
            if c == 0x5C and i + 1 < n:
                out.append(value[i + 1])
                i += 1
            elif c == 0x22:
                quoted = False
        elif depth:
            if c == 0x5C:
                i += 1
            elif c == 0x28:
                depth += 1
            elif c == 0x29:
                depth -= 1
                if not depth:
                    out.append(0x20)
        elif c == 0x28:
            depth = 1
        else:
            out.append(c)
            if c == 0x22:
                quoted = True
        i += 1
    return bytes(out)


def _split_semicolons(value: bytes) -> list[bytes]:
    """Split on C{;} outside quoted strings."""
    pieces: list[bytes] = []
    start = 0
    quoted = False
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if quoted:
            if c == 0x5C:
                i += 1
            elif c == 0x22:
                quoted = False
        elif c == 0x22:
            quoted = True
        elif c == 0x3B:
            pieces.append(value[start:i])
            start = i + 1
        i += 1
    pieces.append(value[start:])
    return pieces


def _unquote(value: bytes) -> bytes:
    """The content of a quoted string (up to its closing quote), or the value itself."""
    if not value.startswith(b'"'):
        return value
    out = bytearray()
    i = 1
    n = len(value)
    while i < n:
        c = value[i]
        if c == 0x5C and i + 1 < n:
            out.append(value[i + 1])
            i += 2
            continue
        if c == 0x22:
            break
        out.append(c)
        i += 1
    return bytes(out)


_TOKEN = re.compile(rb"[^\x00-\x20\x7f()<>@,;:\\\"/\[\]?=]+")
_CONTINUATION = re.compile(rb"(.+)\*([0-9]{1,4})(\*?)")
_ATTRIBUTE_CHAR = re.compile(rb"[!#$&+\-.0-9A-Z^_`a-z{|}~]")


def _parse_params(pieces: Sequence[bytes]) -> tuple[tuple[bytes, bytes], ...]:
    """C{name=value} pieces, RFC 2231 continuations (C{name*0}, C{name*1*}...) joined."""
    raw: list[tuple[bytes, bytes]] = []
    for piece in pieces:
        name, sep, value = piece.partition(b"=")
        name = name.strip(b" \t\r\n")
        if not sep or not _TOKEN.fullmatch(name):
            continue
        raw.append((name, _unquote(value.strip(b" \t\r\n"))))
    if not any(b"*" in name for name, _ in raw):
        return tuple(raw)
    return _join_continuations(raw)


def _join_continuations(raw: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """RFC 2231 §3: C{title*0*=us-ascii'en'This%20is; title*1="fun"} is one parameter,
    C{title*} = C{us-ascii'en'This%20isfun}. Sent joined, still encoded (clients decode)."""
    groups: dict[bytes, dict[int, tuple[bytes, bool]]] = {}
    first_name: dict[bytes, bytes] = {}
    for name, value in raw:
        m = _CONTINUATION.fullmatch(name)
        if m is None:
            continue
        base = m.group(1).lower()
        segments = groups.setdefault(base, {})
        segments.setdefault(int(m.group(2)), (value, bool(m.group(3))))
        first_name.setdefault(base, m.group(1))
    out: list[tuple[bytes, bytes]] = []
    emitted: set[bytes] = set()
    for name, value in raw:
        m = _CONTINUATION.fullmatch(name)
        if m is None:
            out.append((name, value))
            continue
        base = m.group(1).lower()
        segments = groups[base]
        if 0 not in segments:
            out.append((name, value))  # no start: keep as written
            continue
        if base in emitted:
            continue
        emitted.add(base)
        run: list[tuple[bytes, bool]] = []
        i = 0
        while i in segments:
            run.append(segments[i])
            i += 1
        if not any(extended for _, extended in run):
            out.append((first_name[base], b"".join(v for v, _ in run)))
            continue
        joined = bytearray()
        if not run[0][1]:
            joined += b"''"
        for value, extended in run:
            if extended:
                joined += value
            else:
                joined += b"".join(
                    bytes([c]) if _ATTRIBUTE_CHAR.fullmatch(bytes([c])) else b"%%%02X" % c
                    for c in value
                )
        out.append((first_name[base] + b"*", bytes(joined)))
    return tuple(out)


def _parse_content_type(
    value: bytes,
) -> tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...]] | None:
    """C{type/subtype; params}, or C{None} when the type is not usable."""
    pieces = _split_semicolons(_strip_comments(value.replace(b"\r", b"").replace(b"\n", b"")))
    mtype, slash, subtype = pieces[0].partition(b"/")
    mtype = mtype.strip(b" \t")
    subtype = subtype.strip(b" \t")
    if not slash or not _TOKEN.fullmatch(mtype) or not _TOKEN.fullmatch(subtype):
        return None
    return mtype, subtype, _parse_params(pieces[1:])


def _parse_disposition(value: bytes) -> tuple[bytes, tuple[tuple[bytes, bytes], ...]] | None:
    pieces = _split_semicolons(_strip_comments(value.replace(b"\r", b"").replace(b"\n", b"")))
    kind = pieces[0].strip(b" \t")
    if not _TOKEN.fullmatch(kind):
        return None
    return kind, _parse_params(pieces[1:])


def _first_token(value: bytes) -> bytes | None:
    words = _strip_comments(_unfold(value)).split()
    return words[0] if words else None


def _languages(value: bytes) -> tuple[bytes, ...]:
    return tuple(
        tag for tag in (t.strip(b" \t") for t in _strip_comments(_unfold(value)).split(b",")) if tag
    )


def _nstring_value(value: bytes | None) -> bytes | None:
    return None if value is None else _unfold(value)


# --------------------------------------------------------------------------------- parsing


def _describe(part: BodyPart, fields: _Fields, default: tuple[bytes, bytes]) -> None:
    """Fill in the Content-* data of C{part} from its header (the first occurrence of each
    field counts, as in Dovecot)."""
    ctype_raw = fields.first(b"content-type")
    parsed = _parse_content_type(ctype_raw) if ctype_raw is not None else None
    if parsed is None:
        part.type, part.subtype = default
        part.params = ()
    else:
        part.type, part.subtype, part.params = parsed
    cte = fields.first(b"content-transfer-encoding")
    part.encoding = _first_token(cte) if cte is not None else None
    part.content_id = _nstring_value(fields.first(b"content-id"))
    part.description = _nstring_value(fields.first(b"content-description"))
    part.md5 = _nstring_value(fields.first(b"content-md5"))
    part.location = _nstring_value(fields.first(b"content-location"))
    lang = fields.first(b"content-language")
    part.language = _languages(lang) if lang is not None else ()
    disp = fields.first(b"content-disposition")
    parsed_disp = _parse_disposition(disp) if disp is not None else None
    if parsed_disp is not None:
        part.disposition, part.disposition_params = parsed_disp


def _envelope_headers(fields: _Fields) -> EnvelopeHeaders:
    return EnvelopeHeaders(
        date=fields.last(b"date"),
        subject=fields.last(b"subject"),
        in_reply_to=fields.last(b"in-reply-to"),
        message_id=fields.last(b"message-id"),
        from_=fields.all(b"from"),
        sender=fields.all(b"sender"),
        reply_to=fields.all(b"reply-to"),
        to=fields.all(b"to"),
        cc=fields.all(b"cc"),
        bcc=fields.all(b"bcc"),
    )


def _degrade(part: BodyPart) -> None:
    """A multipart or message that could not be split is sent as text/plain."""
    part.type, part.subtype, part.params = b"text", b"plain", ()
    part.boundary = None
    part.children = []
    part.message = None


def _parse_entity(
    scanner: _Scanner,
    stack: list[bytes],
    depth: int,
    default: tuple[bytes, bytes],
    is_message: bool,
) -> tuple[BodyPart, _End]:
    scanner.parts += 1
    start = scanner.mark()
    fields = _Fields(_MESSAGE_FIELDS if is_message else _CONTENT_FIELDS)
    header_end, end = _read_header(scanner, stack, fields, start)
    part = BodyPart(0, 0, 0, 0, 0, 0, 0)
    _describe(part, fields, default)
    if is_message:
        part.envelope = _envelope_headers(fields)
    kind = part.type.lower(), part.subtype.lower()
    deep = depth >= MAX_DEPTH or scanner.parts >= MAX_PARTS
    body_start = scanner.mark()
    if end is not None:
        # the header ran into a boundary or EOF: no body
        if kind[0] == b"multipart" or kind == (b"message", b"rfc822"):
            _degrade(part)
    elif kind[0] == b"multipart":
        boundary = {k.lower(): v for k, v in part.params}.get(b"boundary")
        if not boundary or len(boundary) > MAX_BOUNDARY or deep:
            _degrade(part)
            end = scanner.scan(stack, start)
        else:
            child_default = (b"message", b"rfc822") if kind[1] == b"digest" else (b"text", b"plain")
            end = _parse_multipart_body(scanner, stack, boundary, depth, child_default, part)
            if part.children:
                part.boundary = boundary
            else:
                _degrade(part)
    elif kind == (b"message", b"rfc822") and not deep:
        # RFC 2046 §5.2.1; a base64 or quoted-printable one is parsed as it is, like Dovecot.
        enclosed, end = _parse_entity(scanner, stack, depth + 1, (b"text", b"plain"), True)
        part.message = enclosed
    else:
        if kind == (b"message", b"rfc822"):
            _degrade(part)
        # The line break before the boundary belongs to the boundary even when it is the
        # header's empty line (RFC 2046 §5.1.1 body-part grammar; Dovecot agrees).
        end = scanner.scan(stack, start)
    finish = end.at
    header_stop = header_end if header_end.offset <= finish.offset else finish
    body_from = body_start if body_start.offset <= finish.offset else finish
    part.header_offset = start.offset
    part.header_length = header_stop.offset - start.offset
    part.header_size = part.header_length + header_stop.bare - start.bare
    part.body_offset = body_from.offset
    part.body_length = finish.offset - body_from.offset
    part.body_size = part.body_length + finish.bare - body_from.bare
    part.body_lines = finish.lf - body_from.lf
    return part, end


def _parse_multipart_body(
    scanner: _Scanner,
    stack: list[bytes],
    boundary: bytes,
    depth: int,
    child_default: tuple[bytes, bytes],
    part: BodyPart,
) -> _End:
    stack.append(boundary)
    level = len(stack) - 1
    try:
        end = scanner.scan(stack, scanner.mark())  # the preamble
        while end.level == level and not end.close:
            if scanner.parts >= MAX_PARTS:
                # too many parts: the rest of this multipart stays unsplit
                del stack[level:]
                return scanner.scan(stack, scanner.mark())
            child, end = _parse_entity(scanner, stack, depth + 1, child_default, False)
            part.children.append(child)
        if end.level == level:  # closed: the epilogue runs to the parent's next boundary
            del stack[level:]
            end = scanner.scan(stack, scanner.mark())
        return end
    finally:
        del stack[level:]


def parse_structure(f: BinaryIO) -> MessageStructure:
    """
    Parse the message in C{f} (read from its start, in binary) into its MIME tree.

    Memory stays bounded whatever the message: bodies are skipped in 64 KiB blocks, only the
    header fields IMAP needs are kept (each capped at L{MAX_FIELD_BYTES}). Never raises on bad
    MIME; I/O errors from C{f} propagate.
    """
    f.seek(0)
    scanner = _Scanner(f)
    root, _ = _parse_entity(scanner, [], 0, (b"text", b"plain"), True)
    size = root.header_size + root.body_size
    return MessageStructure(root, scanner.bare == 0, size, scanner.offset())


# --------------------------------------------------------------------------------- addresses

Address = tuple[bytes | None, bytes | None, bytes | None, bytes | None]
"""(name, adl, mailbox, host) as in RFC 3501's C{address}; group start is
C{(None, None, name, None)}, group end C{(None, None, None, None)}."""

_GROUP_END: Address = (None, None, None, None)
_ADDR_SPECIALS = frozenset(b"<>@,;:.")
_ATOM_STOP = frozenset(b' \t\r\n(<>@,;:."[')
"""Bytes that end an atom: each starts another token (a stray C{)} or C{]} is atom text)."""

_Token = tuple[str, bytes]


def _address_tokens(data: bytes) -> list[_Token]:
    """RFC 5322 lexical tokens: atom, qstr (unquoted), comment (inner text), dlit, special."""
    tokens: list[_Token] = []
    i = 0
    n = len(data)
    while i < n:
        c = data[i]
        if c in b" \t\r\n":
            i += 1
        elif c == 0x28:  # (
            depth = 1
            i += 1
            out = bytearray()
            while i < n and depth:
                c = data[i]
                if c == 0x5C and i + 1 < n:
                    out.append(data[i + 1])
                    i += 2
                    continue
                if c == 0x28:
                    depth += 1
                elif c == 0x29:
                    depth -= 1
                    if not depth:
                        i += 1
                        break
                out.append(c)
                i += 1
            tokens.append(("comment", bytes(out)))
        elif c == 0x22:  # "
            i += 1
            out = bytearray()
            while i < n:
                c = data[i]
                if c == 0x5C and i + 1 < n:
                    out.append(data[i + 1])
                    i += 2
                    continue
                i += 1
                if c == 0x22:
                    break
                if c not in (0x0D, 0x0A):
                    out.append(c)
            tokens.append(("qstr", bytes(out)))
        elif c == 0x5B:  # [
            close = data.find(b"]", i)
            stop = n if close < 0 else close + 1
            tokens.append(("dlit", data[i:stop]))
            i = stop
        elif c in _ADDR_SPECIALS:
            tokens.append(("special", bytes([c])))
            i += 1
        else:
            start = i
            i += 1  # c itself is atom text, whatever it is: always progress
            while i < n and data[i] not in _ATOM_STOP:
                i += 1
            tokens.append(("atom", data[start:i]))
    return tokens


def _phrase(tokens: Sequence[_Token]) -> bytes:
    """Display-name words joined by single spaces; a C{.} (obs-phrase: C{John Q. Public})
    sticks to the word before it, other stray specials to both neighbours."""
    out = bytearray()
    glue = True
    for kind, value in tokens:
        if kind == "comment":
            continue
        if kind == "special":
            out += value
            glue = value != b"."
            continue
        if out and not glue:
            out += b" "
        out += value
        glue = False
    return bytes(out)


def _dot_run_start(words: Sequence[_Token], stop: int) -> int:
    """Index where the dot-atom (or quoted) local part that ends before C{stop} begins."""
    i = stop
    while i > 0:
        kind, value = words[i - 1]
        if kind in ("atom", "qstr"):
            i -= 1
            if i > 0 and words[i - 1] == ("special", b"."):
                i -= 1
                continue
            break
        if (kind, value) == ("special", b"."):
            i -= 1
            continue
        break
    return i


def _domain(words: Sequence[_Token], start: int) -> bytes:
    """A dot-atom or domain literal starting at C{start}; stops at anything else."""
    out = bytearray()
    expect_word = True
    for kind, value in words[start:]:
        if kind in ("atom", "dlit") and expect_word:
            out += value
            expect_word = False
        elif (kind, value) == ("special", b".") and not expect_word:
            out += b"."
            expect_word = True
        elif (kind, value) == ("special", b".") and out.endswith(b"."):
            continue
        else:
            break
    return bytes(out)


def _addr_spec(words: Sequence[_Token]) -> tuple[bytes, bytes, int]:
    """(local part, domain, index where the local part starts) of C{local@domain}."""
    at = words.index(("special", b"@"))
    begin = _dot_run_start(words, at)
    local = b"".join(v for _, v in words[begin:at])
    return local, _domain(words, at + 1), begin


def _is_dot_atom(words: Sequence[_Token]) -> bool:
    """C{atom *("." atom)}."""
    if len(words) % 2 == 0:
        return False
    for i, (kind, value) in enumerate(words):
        if i % 2 == 0 and kind != "atom":
            return False
        if i % 2 == 1 and (kind, value) != ("special", b"."):
            return False
    return True


def _mailbox(segment: Sequence[_Token]) -> Address | None:
    words = [t for t in segment if t[0] != "comment"]
    if not words:
        return None  # empty, or only a comment
    comments = [v for k, v in segment if k == "comment"]
    comment_name = (_unfold(comments[-1]) or None) if comments else None
    angle = next((i for i, t in enumerate(words) if t == ("special", b"<")), -1)
    if angle >= 0:
        name = _phrase(words[:angle]) or None
        close = next(
            (i for i in range(angle + 1, len(words)) if words[i] == ("special", b">")), len(words)
        )
        inner = words[angle + 1 : close]
        adl: bytes | None = None
        if inner and inner[0] == ("special", b"@"):
            colon = next((i for i, t in enumerate(inner) if t == ("special", b":")), -1)
            if colon >= 0:
                adl = b"".join(v for _, v in inner[:colon]) or None
                inner = inner[colon + 1 :]
        if ("special", b"@") in inner:
            local, domain, _ = _addr_spec(inner)
        else:
            local, domain = b"".join(v for _, v in inner), b""
        return (name, adl, local or MISSING_MAILBOX, domain or MISSING_DOMAIN)
    if ("special", b"@") in words:
        local, domain, begin = _addr_spec(words)
        name = comment_name or _phrase(words[:begin]) or None
        return (name, None, local or MISSING_MAILBOX, domain or MISSING_DOMAIN)
    if _is_dot_atom(words):
        # a bare local part ("nodomain")
        return (comment_name, None, b"".join(v for _, v in words), MISSING_DOMAIN)
    # words only: a display name without an address
    return (_phrase(words), None, MISSING_MAILBOX, MISSING_DOMAIN)


def parse_addresses(value: bytes) -> list[Address]:
    """
    An address-list header value as RFC 3501 envelope addresses. Groups become a start marker,
    their members and an end marker (RFC 3501 §7.4.2). Never raises: entries that make no sense
    are skipped or get L{MISSING_MAILBOX} / L{MISSING_DOMAIN}, and parsing goes on after them.
    """
    tokens = _address_tokens(value.replace(b"\r", b"").replace(b"\n", b""))
    out: list[Address] = []
    in_group = False
    i = 0
    n = len(tokens)
    while i < n:
        token = tokens[i]
        if token == ("special", b","):
            i += 1
            continue
        if token == ("special", b";"):
            if in_group:
                out.append(_GROUP_END)
                in_group = False
            i += 1
            continue
        j = i
        angle = False
        while j < n:
            kind, v = tokens[j]
            if kind == "special":
                if v == b"<":
                    angle = True
                elif v == b">":
                    angle = False
                elif not angle and v in (b",", b";", b":"):
                    break
            j += 1
        if j < n and tokens[j] == ("special", b":"):
            if not in_group:  # a nested group (not allowed) only loses its name
                out.append((None, None, _phrase(tokens[i:j]), None))
                in_group = True
            i = j + 1
            continue
        address = _mailbox(tokens[i:j])
        if address is not None:
            out.append(address)
        i = j
    if in_group:
        out.append(_GROUP_END)
    return out


def _address_list(values: Sequence[bytes]) -> list[Address]:
    out: list[Address] = []
    for value in values:
        out.extend(parse_addresses(value))
    return out


def _write_addresses(addresses: Sequence[Address]) -> bytes:
    if not addresses:
        return b"NIL"
    return (
        b"("
        + b"".join(
            b"(%s %s %s %s)" % tuple(imap_string(x) for x in address) for address in addresses
        )
        + b")"
    )


# --------------------------------------------------------------------------------- ENVELOPE


def _header_fields_of(data: bytes) -> EnvelopeHeaders:
    structure = parse_structure(io.BytesIO(data))
    assert structure.root.envelope is not None
    return structure.root.envelope


def envelope(source: MessageStructure | BodyPart | EnvelopeHeaders | bytes) -> bytes:
    """
    The ENVELOPE of a message (RFC 3501 §7.4.2): C{(date subject from sender reply-to to cc
    bcc in-reply-to message-id)}, as protocol bytes (literals may hold 8-bit text).

    C{source} is a parsed message, a message entity (the root, or the L{BodyPart.message} of a
    message/rfc822 part), or the bytes of a header. Values are the raw, unfolded header values;
    Sender and Reply-To that are absent or hold no address are the From addresses.
    """
    if isinstance(source, MessageStructure):
        source = source.root
    if isinstance(source, bytes):
        headers = _header_fields_of(source)
    elif isinstance(source, BodyPart):
        headers = source.envelope if source.envelope is not None else EnvelopeHeaders()
    else:
        headers = source
    from_ = _address_list(headers.from_)
    sender = _address_list(headers.sender) or from_
    reply_to = _address_list(headers.reply_to) or from_
    fields = [
        imap_string(_nstring_value(headers.date)),
        imap_string(_nstring_value(headers.subject)),
        _write_addresses(from_),
        _write_addresses(sender),
        _write_addresses(reply_to),
        _write_addresses(_address_list(headers.to)),
        _write_addresses(_address_list(headers.cc)),
        _write_addresses(_address_list(headers.bcc)),
        imap_string(_nstring_value(headers.in_reply_to)),
        imap_string(_nstring_value(headers.message_id)),
    ]
    return b"(" + b" ".join(fields) + b")"


# --------------------------------------------------------------------------------- BODYSTRUCTURE


def _write_params(params: Sequence[tuple[bytes, bytes]], default_charset: bool) -> bytes:
    """C{body-fld-param}; text/* without a charset gets C{"charset" "us-ascii"} (RFC 2045
    §5.2 default, which IMAP servers spell out)."""
    items = [imap_string(name) + b" " + imap_string(value) for name, value in params]
    if default_charset and not any(name.lower() == b"charset" for name, _ in params):
        items.append(b'"charset" "us-ascii"')
    if not items:
        return b"NIL"
    return b"(" + b" ".join(items) + b")"


def _write_extension(part: BodyPart) -> bytes:
    """C{body-fld-dsp SP body-fld-lang SP body-fld-loc} (RFC 3501 §9)."""
    if part.disposition is None:
        dsp = b"NIL"
    else:
        dsp = (
            b"("
            + imap_string(part.disposition)
            + b" "
            + _write_params(part.disposition_params, False)
            + b")"
        )
    if part.language:
        lang = b"(" + b" ".join(imap_string(tag) for tag in part.language) + b")"
    else:
        lang = b"NIL"
    return dsp + b" " + lang + b" " + imap_string(part.location)


def _write_body(part: BodyPart, extensible: bool, out: bytearray) -> None:
    if part.children:
        # body-type-mpart = 1*body SP media-subtype [SP body-ext-mpart]
        out += b"("
        for child in part.children:
            _write_body(child, extensible, out)
        out += b" " + imap_string(part.subtype)
        if extensible:
            out += b" " + _write_params(part.params, False) + b" " + _write_extension(part)
        out += b")"
        return
    # body-type-1part: media type, body-fields (param id desc enc octets), then per type
    out += b"(" + imap_string(part.type) + b" " + imap_string(part.subtype) + b" "
    out += _write_params(part.params, part.is_text)
    out += b" " + imap_string(part.content_id) + b" " + imap_string(part.description)
    out += b" " + imap_string(part.encoding or b"7bit") + b" %d" % part.body_size
    if part.message is not None:
        # body-type-msg = media-message SP body-fields SP envelope SP body SP body-fld-lines
        out += b" " + envelope(part.message) + b" "
        _write_body(part.message, extensible, out)
        out += b" %d" % part.body_lines
    elif part.is_text:
        # body-type-text = media-text SP body-fields SP body-fld-lines
        out += b" %d" % part.body_lines
    if extensible:
        # body-ext-1part = body-fld-md5 [SP body-fld-dsp [SP body-fld-lang [SP body-fld-loc]]]
        out += b" " + imap_string(part.md5) + b" " + _write_extension(part)
    out += b")"


def body_structure(source: MessageStructure | BodyPart, extensible: bool) -> bytes:
    """
    BODY (C{extensible=False}) or BODYSTRUCTURE (C{True}) of a message or entity, as protocol
    bytes, in the order of RFC 3501 §9 C{body}. Sizes are CRLF octets; lines are given for
    text/* and message/rfc822; the extension data is MD5 (the Content-MD5 value, usually
    NIL), disposition, language and location, for multiparts the parameters first.
    """
    part = source.root if isinstance(source, MessageStructure) else source
    out = bytearray()
    _write_body(part, extensible, out)
    return bytes(out)


# --------------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class SectionSpec:
    """A parsed C{section} of C{BODY[section]} (RFC 3501 §6.4.5)."""

    part: tuple[int, ...] = ()
    text: str = ""
    """C{""}, C{HEADER}, C{HEADER.FIELDS}, C{HEADER.FIELDS.NOT}, C{TEXT} or C{MIME}."""
    fields: tuple[bytes, ...] = ()


_SECTION_TEXTS = ("", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME")
_FIELD_NAME = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s()"{}]+)')


def parse_section(spec: str | bytes) -> SectionSpec:
    """
    C{1.2.HEADER.FIELDS (From "To")} -> L{SectionSpec}. Raises L{ValueError} when it is not a
    section (the server answers BAD): part numbers must be non-zero, C{MIME} needs a part
    number, and the field list must be a non-empty parenthesised list of astrings.
    """
    text = spec.decode("utf-8", "replace") if isinstance(spec, bytes) else spec
    head, _, rest = text.partition(" ")
    numbers: list[int] = []
    items = head.split(".") if head else []
    while items and items[0].isdigit() and items[0].isascii():
        number = int(items.pop(0))
        if number == 0:
            raise ValueError("section part numbers start at 1")
        numbers.append(number)
    which = ".".join(items).upper()
    if which not in _SECTION_TEXTS:
        raise ValueError(f"unknown section text {which!r}")
    if which == "MIME" and not numbers:
        raise ValueError("MIME needs a part number")
    fields: list[bytes] = []
    if which.startswith("HEADER.FIELDS"):
        rest = rest.strip()
        if not (rest.startswith("(") and rest.endswith(")")):
            raise ValueError("HEADER.FIELDS needs a list of field names")
        inner = rest[1:-1]
        pos = 0
        for m in _FIELD_NAME.finditer(inner):
            if inner[pos : m.start()].strip():
                raise ValueError("bad header field list")
            name = m.group(1) if m.group(1) is not None else m.group(2)
            if m.group(1) is not None:
                name = re.sub(r"\\(.)", r"\1", name)
            fields.append(name.encode("utf-8"))
            pos = m.end()
        if inner[pos:].strip() or not fields:
            raise ValueError("bad header field list")
    elif rest.strip():
        raise ValueError("unexpected text after section")
    return SectionSpec(tuple(numbers), which, tuple(fields))


@dataclass(frozen=True, slots=True)
class SectionData:
    """
    What a C{BODY[section]} sends: either L{data} (computed bytes, already CRLF) or the file
    L{ranges} (offset, length), L{size} octets in all. With L{convert}, the ranges hold bare
    LFs that are sent as CRLF, and the first L{skip} octets of that converted stream are left
    out (a partial fetch); L{iter_section} does both.
    """

    ranges: tuple[tuple[int, int], ...] = ()
    size: int = 0
    data: bytes | None = None
    convert: bool = False
    skip: int = 0


_EMPTY = SectionData()


def _find_part(root: BodyPart, numbers: Sequence[int]) -> BodyPart | None:
    """
    The entity a part number names (RFC 3501 §6.4.5). A non-multipart message has only part 1,
    itself; below a message/rfc822 part, numbers address its enclosed message. Like Dovecot,
    a leaf part of a multipart also answers to C{.1} (C{2.1} is C{2} when part 2 is
    text/plain), but the part 1 of a non-multipart message does not.
    """
    node: BodyPart | None = None
    for number in numbers:
        if node is None:
            container: BodyPart | None = root
        elif node.message is not None:
            container = node.message
        else:
            container = None
        scope = container if container is not None else node
        assert scope is not None
        if scope.children:
            if not 1 <= number <= len(scope.children):
                return None
            node = scope.children[number - 1]
        elif number == 1 and not (scope is root and node is not None):
            node = scope
        else:
            return None
    return node


def _header_range(part: BodyPart, canonical: bool) -> SectionData:
    return SectionData(
        ((part.header_offset, part.header_length),) if part.header_length else (),
        part.header_size,
        convert=not canonical,
    )


def _body_range(part: BodyPart, canonical: bool) -> SectionData:
    return SectionData(
        ((part.body_offset, part.body_length),) if part.body_length else (),
        part.body_size,
        convert=not canonical,
    )


def _iter_lines(f: BinaryIO, offset: int, length: int) -> Iterator[bytes]:
    f.seek(offset)
    remaining = length
    while remaining > 0:
        line = f.readline(min(remaining, _LINE_CHUNK))
        if not line:
            return
        remaining -= len(line)
        yield line


def filter_header(f: BinaryIO, part: BodyPart, names: Sequence[bytes], exclude: bool) -> bytes:
    """
    The lines of C{part}'s header whose field name is (C{exclude}: is not) one of C{names},
    compared case-insensitively, with their continuation lines, then the empty line: the
    content of C{HEADER.FIELDS} / C{HEADER.FIELDS.NOT}. Always CRLF.
    """
    wanted = {n.lower() for n in names}
    out = bytearray()
    keep = False
    line_start = True
    for line in _iter_lines(f, part.header_offset, part.header_length):
        if line_start and line[:1] not in (b" ", b"\t"):
            colon = line.find(b":")
            name = line[:colon].rstrip(b" \t").lower() if colon > 0 else None
            matched = name is not None and name in wanted
            keep = matched != exclude
            if line in (b"\r\n", b"\n"):
                keep = False
        if keep:
            out += line
        line_start = line.endswith(b"\n")
        if keep and line_start and out[-2:] != b"\r\n":
            out[-1:] = b"\r\n"
    if out and not out.endswith(b"\n"):
        out += b"\r\n"
    out += b"\r\n"
    return bytes(out)


def section_range(
    structure: MessageStructure, spec: SectionSpec | str | bytes, f: BinaryIO
) -> SectionData:
    """
    Resolve C{BODY[spec]} against C{structure}: file ranges to stream, or the computed bytes of
    C{HEADER.FIELDS[.NOT]} (read from C{f}, the same file). A part that does not exist, and
    C{HEADER}/C{TEXT} of a part that is not message/rfc822, give an empty section (as Dovecot
    answers). Raises L{ValueError} only for a C{spec} string that is not a section.
    """
    if not isinstance(spec, SectionSpec):
        spec = parse_section(spec)
    canonical = structure.canonical
    root = structure.root
    if spec.part:
        found = _find_part(root, spec.part)
        if found is None:
            return _EMPTY
        if spec.text == "":
            return _body_range(found, canonical)
        if spec.text == "MIME":
            return _header_range(found, canonical)
        if found.message is None:
            return _EMPTY
        target = found.message
    else:
        if spec.text == "":
            return SectionData(
                ((0, structure.file_size),) if structure.file_size else (),
                structure.size,
                convert=not canonical,
            )
        target = root
    if spec.text == "HEADER":
        return _header_range(target, canonical)
    if spec.text == "TEXT":
        return _body_range(target, canonical)
    data = filter_header(f, target, spec.fields, spec.text == "HEADER.FIELDS.NOT")
    return SectionData(size=len(data), data=data)


def apply_partial(section: SectionData, origin: int, count: int | None) -> SectionData:
    """
    C{BODY[...]<origin.count>}: the C{count} octets (all the rest for C{None}) from octet
    C{origin} of the section as sent (RFC 3501 §6.4.5); empty when C{origin} is past its end.
    """
    if origin < 0 or (count is not None and count < 0):
        raise ValueError("negative partial")
    available = max(0, section.size - origin)
    size = available if count is None else min(count, available)
    if size == 0:
        return _EMPTY
    if section.data is not None:
        data = section.data[origin : origin + size]
        return SectionData(size=len(data), data=data)
    if section.convert:
        return SectionData(section.ranges, size, convert=True, skip=section.skip + origin)
    ranges: list[tuple[int, int]] = []
    skip, want = origin, size
    for offset, length in section.ranges:
        if skip >= length:
            skip -= length
            continue
        take = min(length - skip, want)
        ranges.append((offset + skip, take))
        want -= take
        skip = 0
        if not want:
            break
    return SectionData(tuple(ranges), size)


def _read_ranges(
    f: BinaryIO, ranges: Sequence[tuple[int, int]], chunk_size: int
) -> Iterator[bytes]:
    for offset, length in ranges:
        f.seek(offset)
        left = length
        while left > 0:
            raw = f.read(min(chunk_size, left))
            if not raw:
                break
            left -= len(raw)
            yield raw


def _to_crlf(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Bare LFs as CRLF; a CR at the end of a piece waits for the next one."""
    held = b""
    for raw in pieces:
        raw = held + raw
        held = b""
        if raw.endswith(b"\r"):
            raw, held = raw[:-1], b"\r"
        if raw:
            yield raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if held:
        yield held


def iter_section(f: BinaryIO, section: SectionData, chunk_size: int = _CHUNK) -> Iterator[bytes]:
    """
    The octets of C{section}, in chunks of about C{chunk_size}, read from C{f}; exactly
    L{SectionData.size} of them in all (fewer only if the file shrank under us).
    """
    if section.data is not None:
        if section.data:
            yield section.data
        return
    remaining = section.size
    skip = section.skip
    pieces = _read_ranges(f, section.ranges, chunk_size)
    if section.convert:
        pieces = _to_crlf(pieces)
    for piece in pieces:
        if skip:
            dropped = min(skip, len(piece))
            piece = piece[dropped:]
            skip -= dropped
        piece = piece[:remaining]
        if piece:
            remaining -= len(piece)
            yield piece
        if remaining <= 0:
            return
