"""
Tests for L{mailserver.imap.parser}: the command framer (literals, continuations, limits,
resynchronisation) and the grammar helpers (strings, numbers, sets, dates, flags, FETCH, STORE,
APPEND, SEARCH, mailbox names and modified UTF-7).

Framing is checked under several chunkings of the same input (one piece, one byte at a time,
every cut in two, random pieces with a fixed seed): the events must not depend on how TCP cut
the stream.
"""

from __future__ import annotations

import datetime as dt
import random
import tracemalloc
from collections.abc import Iterator
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailserver.imap.parser import (
    AgeKey,
    AllKey,
    AndKey,
    BadCharset,
    Command,
    CommandFramer,
    DateKey,
    Event,
    FetchAtt,
    FetchCommand,
    FlagKey,
    HeaderKey,
    Literal,
    LiteralInfo,
    LiteralTooBig,
    Malformed,
    ModSeqKey,
    NeedContinuation,
    NotKey,
    OrKey,
    ParseError,
    Reader,
    SearchCommand,
    SearchKey,
    Section,
    SeqKey,
    SequenceSet,
    SizeKey,
    TextKey,
    TooLong,
    decode_mutf7,
    encode_mutf7,
    frame,
    parse_append,
    parse_command,
    parse_fetch,
    parse_search,
    parse_store,
)

SEED = 20240611
"""The fixed seed of the random chunkings, so that a failure can be replayed."""


# -- helpers -------------------------------------------------------------------------------------


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def chunkings(data: bytes, randoms: int = 30, cuts: bool = True) -> Iterator[list[bytes]]:
    """One piece, one byte at a time, every cut in two (if C{cuts}), then random pieces."""
    yield [data]
    yield bytewise(data)
    if cuts:
        for i in range(1, len(data)):
            yield [data[:i], data[i:]]
    rng = random.Random(SEED)
    for _ in range(randoms):
        pieces, i = [], 0
        while i < len(data):
            n = rng.randint(1, 9)
            pieces.append(data[i : i + n])
            i += n
        yield pieces


def run(chunks: list[bytes], framer: CommandFramer | None = None, **limits: Any) -> list[Event]:
    """Feed C{chunks}, sending every continuation asked for; all the events, in order."""
    framer = framer if framer is not None else CommandFramer(**limits)
    out: list[Event] = []
    for chunk in chunks:
        events = framer.feed(chunk)
        while True:
            out.extend(events)
            if events and isinstance(events[-1], NeedContinuation):
                events = framer.proceed()
            else:
                break
    return out


def cmd(tag: str | None, *lines: bytes, literals: tuple[bytes, ...] = ()) -> Command:
    """An in-memory command, as the framer builds it."""
    lits = []
    for line, data in zip(lines, literals, strict=False):
        lits.append(
            Literal(len(data), data, binary=b"~{" in line[-30:], nonsync=line.endswith(b"+}"))
        )
    return Command(tag, lines, tuple(lits))


def cont(tag: str | None, name: str | None, index: int, size: int) -> NeedContinuation:
    return NeedContinuation(LiteralInfo(tag, name, index, size, False, False))


def reader(text: bytes, utf8: bool = False) -> Reader:
    """A reader at the start of C{text} (a command's arguments; literals allowed)."""
    return skip_tag(Reader(frame(b"t " + text + b"\r\n"), utf8=utf8))


def skip_tag(r: Reader) -> Reader:
    r.atom()
    r.sp()
    return r


def whole(text: bytes, method: str, utf8: bool = False) -> object:
    """Read C{text} with one reader method, which must take all of it."""
    r = reader(text, utf8)
    value = getattr(r, method)()
    r.end()
    return value


def args(text: bytes, utf8: bool = False) -> Reader:
    """The reader L{parse_command} gives for C{t X<text>}: positioned after the name."""
    return parse_command(frame(b"t X" + text + b"\r\n"), utf8=utf8).args


class RecordingSink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = False
        self.discarded = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.chunks.append(data)

    def close(self) -> None:
        self.closed = True

    def discard(self) -> None:
        self.discarded = True


class SinkOpener:
    def __init__(self) -> None:
        self.opened: list[tuple[LiteralInfo, RecordingSink]] = []

    def __call__(self, info: LiteralInfo) -> RecordingSink:
        sink = RecordingSink()
        self.opened.append((info, sink))
        return sink


# -- framing -------------------------------------------------------------------------------------

# Streams and the events they must give, however they are cut.
STREAMS: list[tuple[bytes, list[Event]]] = [
    (b"a NOOP\r\n", [cmd("a", b"a NOOP")]),
    (b"a NOOP\r\nb CAPABILITY\r\n", [cmd("a", b"a NOOP"), cmd("b", b"b CAPABILITY")]),
    # Empty lines between commands are ignored.
    (b"\r\n\r\na NOOP\r\n\r\n", [cmd("a", b"a NOOP")]),
    (
        b"a LOGIN {5}\r\nalice {6}\r\nsecret\r\nb NOOP\r\n",
        [
            cont("a", "LOGIN", 0, 5),
            cont("a", "LOGIN", 1, 6),
            cmd("a", b"a LOGIN {5}", b" {6}", b"", literals=(b"alice", b"secret")),
            cmd("b", b"b NOOP"),
        ],
    ),
    # Non-synchronizing literals ask for no continuation.
    (
        b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n",
        [cmd("a", b"a LOGIN {5+}", b" {6+}", b"", literals=(b"alice", b"secret"))],
    ),
    # Literal data is data: CRLF, markers and commands inside it are not framing.
    (
        b"a APPEND x {17+}\r\nb NOOP\r\nc X {3}\r\n\r\nd NOOP\r\n",
        [
            cmd("a", b"a APPEND x {17+}", b"", literals=(b"b NOOP\r\nc X {3}\r\n",)),
            cmd("d", b"d NOOP"),
        ],
    ),
    # A zero-length literal, and a literal8.
    (
        b'a X {0}\r\n ~{3+}\r\n\x00\x01\x02 "q"\r\n',
        [
            cont("a", "X", 0, 0),
            cmd("a", b"a X {0}", b" ~{3+}", b' "q"', literals=(b"", b"\x00\x01\x02")),
        ],
    ),
    # A UID command is named by both words.
    (
        b"a uid fetch 1 {1}\r\nx\r\n",
        [cont("a", "UID FETCH", 0, 1), cmd("a", b"a uid fetch 1 {1}", b"", literals=(b"x",))],
    ),
    # An invalid tag is None (the grammar answers * BAD).
    (b"+a NOOP\r\n", [cmd(None, b"+a NOOP")]),
]


class FramingTests(SynchronousTestCase):
    def test_streams_under_every_chunking(self) -> None:
        """Each stream gives the same events however it is cut."""
        for data, expected in STREAMS:
            for chunks in chunkings(data):
                self.assertEqual(run(chunks), expected, (data, chunks))

    def test_literal8_is_marked_binary(self) -> None:
        """C{~{n}} is a literal8: its Literal says so; C{{n}} is not."""
        (command,) = run([b"a X ~{1+}\r\nx {1+}\r\ny\r\n"])
        assert isinstance(command, Command)
        self.assertEqual(
            [(lit.binary, lit.nonsync) for lit in command.literals],
            [(True, True)] * 1 + [(False, True)],
        )

    def test_continuation_holds_input_until_proceed(self) -> None:
        """After NeedContinuation, input is held (not read as a literal) until proceed()."""
        framer = CommandFramer()
        self.assertEqual(
            framer.feed(b"a NOOP\r\nb LOGIN {5}\r\n"),
            [cmd("a", b"a NOOP"), cont("b", "LOGIN", 0, 5)],
        )
        self.assertEqual(framer.waiting, LiteralInfo("b", "LOGIN", 0, 5, False, False))
        self.assertEqual(framer.feed(b"alice x\r\nc NOOP\r\n"), [])
        self.assertEqual(
            framer.proceed(),
            [cmd("b", b"b LOGIN {5}", b" x", literals=(b"alice",)), cmd("c", b"c NOOP")],
        )
        self.assertIsNone(framer.waiting)
        self.assertFalse(framer.busy)

    def test_refuse_drops_the_command(self) -> None:
        """After refuse(), the client sends no literal: the next line is a new command."""
        framer = CommandFramer()
        self.assertEqual(framer.feed(b"a APPEND nosuch {5}\r\n"), [cont("a", "APPEND", 0, 5)])
        self.assertEqual(framer.feed(b"b NOOP\r\n"), [])
        self.assertEqual(framer.refuse(), [cmd("b", b"b NOOP")])

    def test_refuse_discards_earlier_sinks(self) -> None:
        """A refused command's literals already in sinks are discarded."""
        opener = SinkOpener()
        framer = CommandFramer(inline_literal_max=2, open_literal=opener)
        framer.feed(b"a APPEND x {3+}\r\nabc {5}\r\n")
        framer.refuse()
        ((_, sink),) = opener.opened
        self.assertTrue(sink.closed)
        self.assertTrue(sink.discarded)

    def test_proceed_or_refuse_without_a_literal(self) -> None:
        """proceed() and refuse() outside a pending continuation are programming errors."""
        framer = CommandFramer()
        self.assertRaises(RuntimeError, framer.proceed)
        self.assertRaises(RuntimeError, framer.refuse)

    def test_busy(self) -> None:
        """busy says whether part of a command has been received."""
        framer = CommandFramer()
        self.assertFalse(framer.busy)
        framer.feed(b"a NO")
        self.assertTrue(framer.busy)
        framer.feed(b"OP\r\n")
        self.assertFalse(framer.busy)
        framer.feed(b"a X {2+}\r\nx")
        self.assertTrue(framer.busy)

    def test_frame(self) -> None:
        """frame() gives the one command of complete input and refuses anything else."""
        self.assertEqual(frame(b"a X {1}\r\nz\r\n"), cmd("a", b"a X {1}", b"", literals=(b"z",)))
        for bad in (b"a NOOP", b"a NOOP\r\nb NOOP\r\n", b"a X {5}\r\nab", b"a NOOP\r\nb"):
            self.assertRaises(ValueError, frame, bad)


class LineEndingTests(SynchronousTestCase):
    """Only CRLF ends a line; a bare CR or LF, or a NUL, makes the command Malformed."""

    CASES = [
        (b"a NOOP\nb NOOP\r\nc NOOP\r\n", [Malformed("a", "bare CR or LF: lines end with CRLF")]),
        (b"a NO\rOP\r\nc NOOP\r\n", [Malformed("a", "bare CR or LF: lines end with CRLF")]),
        (b"a LOGIN x\x00y z\r\nc NOOP\r\n", [Malformed("a", "NUL octet in command")]),
        (b"a NOOP\r\r\nc NOOP\r\n", [Malformed("a", "bare CR or LF: lines end with CRLF")]),
        # A NUL in a line after a non-synchronizing literal: the rest is still framed.
        (
            b"a X {2+}\r\nab \x00 {3+}\r\nxyz\r\nc NOOP\r\n",
            [Malformed("a", "NUL octet in command")],
        ),
        # ... and a synchronizing one after the error is never sent by the client.
        (b"a X \x00 {3}\r\nc NOOP\r\n", [Malformed("a", "NUL octet in command")]),
    ]

    def test_refused_and_resynchronised(self) -> None:
        """Each case is refused once, and the next command is read normally."""
        for data, errors in self.CASES:
            for chunks in chunkings(data):
                self.assertEqual(run(chunks), errors + [cmd("c", b"c NOOP")], data)

    def test_lf_alone_ends_nothing(self) -> None:
        """A client ending lines with LF alone gets no event until a CRLF comes."""
        framer = CommandFramer()
        self.assertEqual(framer.feed(b"a NOOP\nb NOOP\n"), [])
        self.assertTrue(framer.busy)

    def test_nul_in_literal_data_is_framed(self) -> None:
        """NULs inside literal data are the grammar's business, not the framer's."""
        self.assertEqual(
            run([b"a X {3+}\r\n\x00\r\n\r\n"]),
            [cmd("a", b"a X {3+}", b"", literals=(b"\x00\r\n",))],
        )


class LineLimitTests(SynchronousTestCase):
    """Over-long lines are answered once; the stream resynchronises at the next CRLF."""

    def test_exactly_the_limit_passes(self) -> None:
        """A line of exactly max_line octets (without CRLF) is accepted."""
        line = b"a " + b"x" * 18  # 20 octets
        for chunks in chunkings(line + b"\r\n"):
            self.assertEqual(run(chunks, max_line=20), [cmd("a", line)])

    def test_over_the_limit(self) -> None:
        """One octet more gives TooLong with the tag, and the next line is a new command."""
        data = b"a " + b"x" * 19 + b"\r\nb NOOP\r\n"
        for chunks in chunkings(data):
            self.assertEqual(run(chunks, max_line=20), [TooLong("a", "line"), cmd("b", b"b NOOP")])

    def test_much_longer_answered_once(self) -> None:
        """A line many times the limit (with bare CRs, a NUL and an LF) gives one TooLong."""
        data = b"abc FETCH " + b"y" * 1000 + b"\r\x00\rmore\n" + b"z" * 500 + b"\r\nb NOOP\r\n"
        for chunks in chunkings(data, cuts=False):
            self.assertEqual(
                run(chunks, max_line=20), [TooLong("abc", "line"), cmd("b", b"b NOOP")]
            )

    def test_over_long_line_is_not_kept(self) -> None:
        """Reading past a 4 MiB line holds no more than a chunk or two of it."""
        framer = CommandFramer()
        chunk = bytearray(b"l" * 65536)
        tracemalloc.start()
        try:
            events = [e for _ in range(64) for e in framer.feed(chunk)]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(events, [TooLong(None, "line")])
        self.assertLess(peak, 512 * 1024)
        self.assertEqual(framer.feed(b"\r\nb NOOP\r\n"), [cmd("b", b"b NOOP")])

    def test_answered_once_per_command(self) -> None:
        """However many limits the rest of a refused command breaks, it is answered once."""
        long = b"k" * 30
        for data in [
            b"a X " + long + b" {3+}\r\nabc " + long + b" {2+}\r\nxy " + long + b"\r\n",
            b"a X {50+}\r\n" + b"d" * 50 + b" " + long + b" {3+}\r\nabc\r\n",
            b"a X \x00 {3+}\r\nabc " + long + b"\r\n",
        ]:
            for chunks in chunkings(data + b"b NOOP\r\n", cuts=False):
                events = run(chunks, max_line=20, max_literal=10)
                self.assertEqual(len(events), 2, (data, events))
                self.assertEqual(events[1], cmd("b", b"b NOOP"))

    def test_tag_unknown(self) -> None:
        """A line too long to show its tag gets TooLong(None)."""
        data = b"x" * 50 + b"\r\nb NOOP\r\n"
        for chunks in chunkings(data):
            self.assertEqual(run(chunks, max_line=20), [TooLong(None, "line"), cmd("b", b"b NOOP")])

    def test_too_long_after_a_literal(self) -> None:
        """A line after a literal can be too long too; the tag is the first line's."""
        data = b"t1 X {2+}\r\nab " + b"q" * 40 + b"\r\nb NOOP\r\n"
        for chunks in chunkings(data):
            self.assertEqual(run(chunks, max_line=20), [TooLong("t1", "line"), cmd("b", b"b NOOP")])

    def test_too_long_line_ending_with_nonsync_literal(self) -> None:
        """The literal announced at the end of an over-long line is swallowed."""
        data = b"a X " + b"p" * 40 + b" {10+}\r\nb NOOP\r\n\r\n\r\nc NOOP\r\n"
        for chunks in chunkings(data):
            self.assertEqual(run(chunks, max_line=20), [TooLong("a", "line"), cmd("c", b"c NOOP")])

    def test_too_long_line_ending_with_sync_literal(self) -> None:
        """A synchronizing literal at the end of an over-long line is never sent: no swallow."""
        data = b"a X " + b"p" * 40 + b" {10}\r\nb NOOP\r\n"
        for chunks in chunkings(data):
            self.assertEqual(run(chunks, max_line=20), [TooLong("a", "line"), cmd("b", b"b NOOP")])

    def test_command_size(self) -> None:
        """Lines plus literals held in memory are limited (max_command)."""
        data = b"a X {5+}\r\n12345 {5+}\r\n12345 yyyy\r\nb NOOP\r\n"  # 8 + 5 + 5 + 5 + 5
        self.assertEqual(
            run([data], max_command=28)[0],
            cmd("a", b"a X {5+}", b" {5+}", b" yyyy", literals=(b"12345", b"12345")),
        )
        self.assertEqual(
            run([data], max_command=27), [TooLong("a", "command"), cmd("b", b"b NOOP")]
        )
        self.assertEqual(
            run([data], max_command=22), [LiteralTooBig("a", 5, True), cmd("b", b"b NOOP")]
        )
        data = b"a X {5+}\r\n12345 " + b"y" * 20 + b"\r\nb NOOP\r\n"
        self.assertEqual(
            run([data], max_command=30), [TooLong("a", "command"), cmd("b", b"b NOOP")]
        )

    def test_literal_count(self) -> None:
        """max_literals literals pass; one more refuses the command (the rest is swallowed)."""
        data = b"a X {1+}\r\n1 {1+}\r\n2 {1+}\r\n3\r\nb NOOP\r\n"
        self.assertEqual(
            run([data], max_literals=3),
            [
                cmd("a", b"a X {1+}", b" {1+}", b" {1+}", b"", literals=(b"1", b"2", b"3")),
                cmd("b", b"b NOOP"),
            ],
        )
        self.assertEqual(
            run([data], max_literals=2), [TooLong("a", "literals"), cmd("b", b"b NOOP")]
        )


class LiteralLimitTests(SynchronousTestCase):
    def test_sync_too_big_refused_before_data(self) -> None:
        """An oversized synchronizing literal is refused with no continuation asked."""
        data = b"a APPEND INBOX {101}\r\nb NOOP\r\n"
        for chunks in chunkings(data):
            self.assertEqual(
                run(chunks, max_literal=100), [LiteralTooBig("a", 101, False), cmd("b", b"b NOOP")]
            )

    def test_at_the_limit(self) -> None:
        """A literal of exactly max_literal octets is accepted."""
        self.assertEqual(
            run([b"a X {3}\r\nabc\r\n"], max_literal=3)[-1],
            cmd("a", b"a X {3}", b"", literals=(b"abc",)),
        )

    def test_nonsync_too_big_swallowed_exactly(self) -> None:
        """The data of an oversized non-synchronizing literal is skipped, octet for octet."""
        body = b"x NOOP\r\ny LOGOUT\r\n" * 7  # commands inside must never be read as such
        data = b"a APPEND INBOX {%d+}\r\n" % len(body) + body + b"\r\nb NOOP\r\n"
        for chunks in chunkings(data, cuts=False):
            self.assertEqual(
                run(chunks, max_literal=100),
                [LiteralTooBig("a", len(body), True), cmd("b", b"b NOOP")],
            )

    def test_nonsync_multiappend_swallowed(self) -> None:
        """After a refused literal, the command's further literals are swallowed too."""
        data = b"a APPEND x {200+}\r\n" + b"1" * 200 + b" {3+}\r\nabc\r\nb NOOP\r\n"
        for chunks in chunkings(data, cuts=False):
            self.assertEqual(
                run(chunks, max_literal=100), [LiteralTooBig("a", 200, True), cmd("b", b"b NOOP")]
            )

    def test_literal_minus(self) -> None:
        """LITERAL- (RFC 7888): non-synchronizing literals over 4096 refused, synchronizing ok."""
        big = b"z" * 5000
        self.assertEqual(
            run(
                [b"a X {5000+}\r\n" + big + b"\r\nb NOOP\r\n"],
                max_nonsync_literal=4096,
                max_command=10**6,
            ),
            [LiteralTooBig("a", 5000, True), cmd("b", b"b NOOP")],
        )
        self.assertEqual(
            run([b"a X {5000}\r\n" + big + b"\r\n"], max_nonsync_literal=4096, max_command=10**6),
            [cont("a", "X", 0, 5000), cmd("a", b"a X {5000}", b"", literals=(big,))],
        )

    def test_swallowed_literal_is_not_kept(self) -> None:
        """Swallowing 4 MiB in 64 KiB chunks holds no more than a chunk or two."""
        framer = CommandFramer(max_literal=1000)
        size = 4 * 1024 * 1024
        self.assertEqual(
            framer.feed(b"a APPEND x {%d+}\r\n" % size), [LiteralTooBig("a", size, True)]
        )
        chunk = bytearray(b"m" * 65536)  # fed as bytearray: the framer must copy to keep it
        tracemalloc.start()
        try:
            for _ in range(size // len(chunk)):
                self.assertEqual(framer.feed(chunk), [])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 512 * 1024)
        self.assertEqual(framer.feed(b"\r\nb NOOP\r\n"), [cmd("b", b"b NOOP")])

    def test_absurd_sizes(self) -> None:
        """A marker with a huge number is a literal too big; a non-synchronizing one is swallowed
        (the stream never recovers: the protocol should close the connection)."""
        self.assertEqual(
            run([b"a X {99999999999999999999}\r\nb NOOP\r\n"]),
            [LiteralTooBig("a", 99999999999999999999, False), cmd("b", b"b NOOP")],
        )
        framer = CommandFramer()
        self.assertEqual(
            framer.feed(b"a X {%s+}\r\nb NOOP\r\n" % (b"9" * 60)),
            [LiteralTooBig("a", 2**64, True)],
        )
        self.assertTrue(framer.busy)
        # Leading zeros do not make a number big.
        line = b"a X {" + b"0" * 30 + b"1+}"
        self.assertEqual(run([line + b"\r\nq\r\n"]), [cmd("a", line, b"", literals=(b"q",))])

    def test_marker_cut_off_an_over_long_line(self) -> None:
        """An over-long line ending in a run of digits, brace unseen, counts as an absurd
        literal: a non-synchronizing one is swallowed rather than read as commands."""
        framer = CommandFramer(max_line=20)
        line = b"a X {" + b"0" * 100 + b"5+}\r\n"
        self.assertEqual(framer.feed(line), [TooLong("a", "line")])
        self.assertEqual(framer.feed(b"hello\r\nb NOOP\r\n"), [])
        self.assertTrue(framer.busy)
        framer = CommandFramer(max_line=20)
        line = b"a X {" + b"0" * 100 + b"5}\r\n"
        self.assertEqual(
            framer.feed(line + b"b NOOP\r\n"), [TooLong("a", "line"), cmd("b", b"b NOOP")]
        )

    def test_bad_markers_are_not_literals(self) -> None:
        """{abc}, {-1}, {}, {+}, { 5}, {5 }: no literal; the line is a command (BAD later)."""
        for marker in (b"{abc}", b"{-1}", b"{}", b"{+}", b"{ 5}", b"{5 }", b"{5++}", b"{0x5}"):
            line = b"a LOGIN " + marker
            self.assertEqual(run([line + b"\r\nb NOOP\r\n"]), [cmd("a", line), cmd("b", b"b NOOP")])
            self.assertRaises(ParseError, lambda: args(b" " + marker).astring())


class SinkTests(SynchronousTestCase):
    def test_large_literal_goes_to_sink(self) -> None:
        """A literal over inline_literal_max is written to the sink as it arrives."""
        body = bytes(range(256)) * 4
        data = b"a APPEND INBOX {%d+}\r\n" % len(body) + body + b" {3+}\r\nabc\r\n"
        for chunks in chunkings(data, cuts=False):
            opener = SinkOpener()
            events = run(chunks, CommandFramer(inline_literal_max=100, open_literal=opener))
            ((info, sink),) = opener.opened
            self.assertEqual(info, LiteralInfo("a", "APPEND", 0, len(body), True, False))
            self.assertEqual(b"".join(sink.chunks), body)
            self.assertTrue(sink.closed)
            self.assertFalse(sink.discarded)
            (command,) = events
            assert isinstance(command, Command)
            self.assertEqual(command.literals[0], Literal(len(body), None, sink, False, True))
            self.assertEqual(command.literals[1].data, b"abc")  # small: in memory

    def test_sink_opened_after_continuation(self) -> None:
        """A synchronizing literal's sink is opened only once the caller proceeds."""
        opener = SinkOpener()
        framer = CommandFramer(inline_literal_max=1, open_literal=opener)
        self.assertEqual(framer.feed(b"a APPEND x {3}\r\n"), [cont("a", "APPEND", 0, 3)])
        self.assertEqual(opener.opened, [])
        self.assertEqual(framer.proceed(), [])
        self.assertEqual(len(opener.opened), 1)

    def test_sink_literals_do_not_count_in_memory(self) -> None:
        """Literals given to a sink do not count toward max_command."""
        opener = SinkOpener()
        framer = CommandFramer(inline_literal_max=10, open_literal=opener, max_command=100)
        events = run([b"a APPEND x {500+}\r\n" + b"y" * 500 + b"\r\n"], framer)
        self.assertEqual(len(events), 1)
        self.assertIsInstance(events[0], Command)

    def test_discarded_when_command_later_refused(self) -> None:
        """A sink whose command is refused later (a line too long) is discarded."""
        opener = SinkOpener()
        framer = CommandFramer(inline_literal_max=1, open_literal=opener, max_line=20)
        events = run([b"a APPEND x {3+}\r\nabc " + b"!" * 30 + b"\r\n"], framer)
        self.assertEqual(events, [TooLong("a", "line")])
        ((_, sink),) = opener.opened
        self.assertTrue(sink.discarded)

    def test_close_discards(self) -> None:
        """close() (connection lost) discards the sink of a literal half received."""
        opener = SinkOpener()
        framer = CommandFramer(inline_literal_max=1, open_literal=opener)
        framer.feed(b"a APPEND x {30+}\r\nabc")
        framer.close()
        ((_, sink),) = opener.opened
        self.assertEqual((sink.closed, sink.discarded), (False, True))
        self.assertFalse(framer.busy)
        self.assertEqual(framer.feed(b"b NOOP\r\n"), [cmd("b", b"b NOOP")])

    def test_refused_literal_opens_no_sink(self) -> None:
        """A literal refused as too big opens no sink: its octets go nowhere."""
        opener = SinkOpener()
        framer = CommandFramer(inline_literal_max=1, open_literal=opener, max_literal=10)
        run([b"a APPEND x {30+}\r\n" + b"w" * 30 + b"\r\n"], framer)
        self.assertEqual(opener.opened, [])


# -- grammar: commands, atoms, strings, numbers --------------------------------------------------


class CommandTests(SynchronousTestCase):
    def test_tag_and_name(self) -> None:
        """The tag as sent; the name upper-cased, two words for UID commands."""
        for data, tag, name in [
            (b"a1 NOOP\r\n", "a1", "NOOP"),
            (b"A.b] capability\r\n", "A.b]", "CAPABILITY"),
            (b"x uid fetch 1 FLAGS\r\n", "x", "UID FETCH"),
            (b"x Uid Expunge 1\r\n", "x", "UID EXPUNGE"),
        ]:
            parsed = parse_command(frame(data))
            self.assertEqual((parsed.tag, parsed.name), (tag, name))

    def test_bad_commands(self) -> None:
        """A bad tag is a ParseError without tag; a missing or bad name one with the tag."""
        for data, tag in [
            (b"+a NOOP\r\n", None),
            (b"* NOOP\r\n", None),
            (b'"a" NOOP\r\n', None),
            (b"a\r\n", "a"),
            (b"a  NOOP\r\n", "a"),
            (b"a (NOOP)\r\n", "a"),
            (b"a UID\r\n", "a"),
            (b"a UID {1}\r\nx\r\n", "a"),
        ]:
            e = self.assertRaises(ParseError, parse_command, frame(data))
            self.assertEqual(e.tag, tag, data)

    def test_args_start_after_name(self) -> None:
        """The reader is left right after the name: end() there passes, extra text fails."""
        r = parse_command(frame(b"a NOOP\r\n")).args
        r.end()
        r = parse_command(frame(b"a NOOP x\r\n")).args
        e = self.assertRaises(ParseError, r.end)
        self.assertEqual((e.tag, e.message), ("a", "unexpected extra arguments"))

    def test_reader_checks_command_shape(self) -> None:
        """A Command whose lines and literals do not match is a programming error."""
        self.assertRaises(ValueError, Reader, Command("a", (b"a X",), (Literal(1, b"x"),)))
        self.assertRaises(ValueError, Reader, Command("a", (b"a X {2}", b""), (Literal(1, b"x"),)))


class StringTests(SynchronousTestCase):
    VALID = [
        (b"abc", b"abc"),
        (b"a]b", b"a]b"),  # ASTRING-CHAR includes "]"
        (b'""', b""),
        (b'"a b"', b"a b"),
        (b'"a\\\\b\\"c"', b'a\\b"c'),
        (b"{4}\r\nx\r\ny", b"x\r\ny"),
        (b"{3+}\r\n\xc3\xa9!", b"\xc3\xa9!"),  # 8-bit is fine in a literal
        (b"{0}\r\n", b""),
    ]
    INVALID = [
        b"",
        b'"abc',
        b'"a\\b"',  # only \\ and \" may be escaped
        b'"\xc3\xa9"',  # 8-bit in a quoted string without UTF8=ACCEPT
        b"(abc)",
        b"a%b",
        b"a*",
        b"~{1}\r\nx",  # literal8 only where binary data is allowed
        b"{2}\r\na\x00",  # NUL in a literal
        b"{abc}",
    ]

    def test_astring(self) -> None:
        """Atoms (with ]), quoted strings with their escapes and literals are astrings."""
        for text, value in self.VALID:
            r = reader(text)
            self.assertEqual(r.astring(), value, text)
            r.end()
        for text in self.INVALID:
            e = self.assertRaises(ParseError, whole, text, "astring")
            self.assertEqual(e.tag, "t")

    def test_string_refuses_atoms(self) -> None:
        """string() takes quoted strings and literals, not atoms."""
        self.assertEqual(reader(b'"x"').string(), b"x")
        self.assertRaises(ParseError, reader(b"x").string)

    def test_utf8_quoted(self) -> None:
        """With UTF8=ACCEPT, quoted strings may hold UTF-8, and only valid UTF-8."""
        self.assertEqual(reader(b'"caf\xc3\xa9"', utf8=True).astring(), b"caf\xc3\xa9")
        self.assertRaises(ParseError, reader(b'"caf\xe9"', utf8=True).astring)
        self.assertRaises(ParseError, reader(b'"\xed\xa0\x80"', utf8=True).astring)  # surrogate

    def test_nul_in_quoted(self) -> None:
        """A NUL in a quoted string is refused (even if the framer let it through)."""
        r = skip_tag(Reader(Command("t", (b't "a\x00b"',))))
        self.assertRaises(ParseError, r.astring)

    def test_literal_in_sink_refused_as_string(self) -> None:
        """A literal held by a sink is too big for a string argument: TOOBIG."""
        r = skip_tag(Reader(Command("t", (b"t {5}", b""), (Literal(5, sink=RecordingSink()),))))
        e = self.assertRaises(ParseError, r.astring)
        self.assertEqual(e.code, "TOOBIG")

    def test_nstring(self) -> None:
        """NIL in any case is None; a quoted NIL is the string NIL."""
        for text, value in [
            (b"NIL", None),
            (b"nil", None),
            (b'"NIL"', b"NIL"),
            (b"{1}\r\nx", b"x"),
        ]:
            self.assertEqual(reader(text).nstring(), value, text)
        for text in (b"NILX", b"abc", b""):
            self.assertRaises(ParseError, reader(text).nstring)

    def test_atom(self) -> None:
        """Atoms stop at atom-specials; anything else is refused."""
        self.assertEqual(reader(b"FLAGS.SILENT").atom(), "FLAGS.SILENT")
        self.assertEqual(reader(b"x]").atom(), "x")  # "]" ends an atom
        for text in (b"(x", b'"x"', b"\\x", b"", b"{1}\r\nx"):
            self.assertRaises(ParseError, reader(text).atom)

    def test_sp(self) -> None:
        """sp() takes exactly one space."""
        r = reader(b"a  b")
        r.atom()
        r.sp()
        self.assertRaises(ParseError, r.atom)
        self.assertRaises(ParseError, reader(b"a").sp)

    def test_text(self) -> None:
        """text() decodes UTF-8 strictly."""
        self.assertEqual(reader(b"x").text(b"caf\xc3\xa9"), "café")
        self.assertRaises(ParseError, reader(b"x").text, b"\xff")


class NumberTests(SynchronousTestCase):
    def test_numbers(self) -> None:
        """Each number helper takes its whole range, leading zeros only where allowed."""
        cases = [
            ("number", b"0", 0),
            ("number", b"007", 7),
            ("number", b"4294967295", 4294967295),
            ("nz_number", b"1", 1),
            ("nz_number", b"4294967295", 4294967295),
            ("number64", b"9223372036854775807", 2**63 - 1),
            ("nz_number64", b"12345678901234", 12345678901234),
        ]
        for method, text, value in cases:
            self.assertEqual(getattr(reader(text), method)(), value, (method, text))

    def test_invalid_numbers(self) -> None:
        """Out of range, zero for nz-numbers, signs, and 5000-digit numbers are refused."""
        cases = [
            ("number", b"4294967296"),
            ("number", b"-1"),
            ("number", b"x"),
            ("number", b"9" * 5000),  # never handed to int()
            ("nz_number", b"0"),
            ("nz_number", b"01"),
            ("number64", b"9223372036854775808"),
            ("number64", b"99999999999999999999999"),
            ("nz_number64", b"0"),
        ]
        for method, text in cases:
            self.assertRaises(ParseError, getattr(reader(text), method))


# -- sequence sets, dates, flags, lists -----------------------------------------------------------


class SequenceSetTests(SynchronousTestCase):
    VALID = [
        (b"1", ((1, 1),)),
        (b"1:4,7,*", ((1, 4), (7, 7), (None, None))),
        (b"*:3", ((None, 3),)),
        (b"5:2", ((5, 2),)),
        (b"1:*", ((1, None),)),
        (b"4294967295", ((4294967295, 4294967295),)),
    ]
    INVALID = [
        b"0",
        b"01",
        b"1:",
        b":1",
        b"1,,2",
        b"1,",
        b"1:2:3",
        b"$,1",
        b"1,$",
        b"4294967296",
        b"*:",
        b"",
        b"x",
        b"**",
    ]

    def test_valid(self) -> None:
        """Sequence sets parse to their ranges as written, and print back the same."""
        for text, ranges in self.VALID:
            r = reader(text)
            seq = r.sequence_set()
            r.end()
            self.assertEqual(seq, SequenceSet(ranges), text)
            self.assertEqual(str(seq), text.decode())

    def test_saved(self) -> None:
        """$ is the saved search result, which cannot be resolved by itself."""
        seq = reader(b"$").sequence_set()
        self.assertEqual((seq.saved, str(seq)), (True, "$"))
        self.assertRaises(ValueError, seq.resolve, 10)

    def test_invalid(self) -> None:
        """Zero, leading zeros, empty elements, dangling colons, $ in a list are refused."""
        for text in self.INVALID:
            self.assertRaises(ParseError, whole, text, "sequence_set")

    def test_resolve(self) -> None:
        """resolve() gives merged intervals within 1..largest, * standing for largest."""
        cases = [
            (((1, 4), (7, 7), (None, None)), 10, [(1, 4), (7, 7), (10, 10)]),
            (((None, 3),), 10, [(3, 10)]),
            (((3, 5), (4, 8), (9, 9)), 20, [(3, 9)]),
            (((5, 100),), 7, [(5, 7)]),
            (((100, None),), 12, [(12, 12)]),  # n:* always names the last (RFC 3501 §6.4.8)
            (((1, None),), 0, []),
            (((8, 9),), 7, []),
        ]
        for ranges, largest, expected in cases:
            self.assertEqual(SequenceSet(ranges).resolve(largest), expected, (ranges, largest))
        seq = SequenceSet(((2, 3), (None, None)))
        self.assertEqual([n for n in range(8) if seq.contains(n, 6)], [2, 3, 6])


class DateTests(SynchronousTestCase):
    def test_date(self) -> None:
        """Dates, quoted or not, month names in any case; impossible dates refused."""
        for text, value in [
            (b"1-Feb-1994", dt.date(1994, 2, 1)),
            (b"01-feb-1994", dt.date(1994, 2, 1)),
            (b'"29-FEB-2024"', dt.date(2024, 2, 29)),
        ]:
            r = reader(text)
            self.assertEqual(r.date(), value, text)
            r.end()
        for text in (
            b"30-Feb-1994",
            b"1-Foo-1994",
            b"1-Feb-94",
            b"123-Feb-1994",
            b'"1-Feb-1994',
            b"1 Feb 1994",
            b"0-Jan-2000",
        ):
            self.assertRaises(ParseError, whole, text, "date")

    def test_date_time(self) -> None:
        """Date-times with their zone; unquoted, impossible or badly zoned ones refused."""
        west = dt.timezone(-dt.timedelta(hours=7))
        for text, value in [
            (b'"17-Jul-1996 02:44:25 -0700"', dt.datetime(1996, 7, 17, 2, 44, 25, 0, west)),
            (b'" 7-Jul-1996 02:44:25 -0700"', dt.datetime(1996, 7, 7, 2, 44, 25, 0, west)),
            (
                b'"7-jul-1996 02:44:25 +0530"',
                dt.datetime(
                    1996, 7, 7, 2, 44, 25, 0, dt.timezone(dt.timedelta(hours=5, minutes=30))
                ),
            ),
            (b'"31-Dec-2023 23:59:59 +0000"', dt.datetime(2023, 12, 31, 23, 59, 59, 0, dt.UTC)),
        ]:
            r = reader(text)
            self.assertEqual(r.date_time(), value, text)
            r.end()
        for text in [
            b"17-Jul-1996 02:44:25 -0700",  # not quoted
            b'"17-Jul-1996 02:44:25"',
            b'"17-Jul-1996 2:44:25 -0700"',
            b'"17-Jul-1996 24:00:00 -0700"',
            b'"17-Jul-1996 02:60:00 -0700"',
            b'"17-Jul-1996 02:44:60 -0700"',
            b'"31-Apr-1996 02:44:25 -0700"',
            b'"17-Jul-1996 02:44:25 -0760"',
            b'"17-Jul-1996 02:44:25 +2400"',
            b'"17-Jul-1996 02:44:25 0700"',
            b'"17-Xyz-1996 02:44:25 -0700"',
        ]:
            self.assertRaises(ParseError, reader(text).date_time)


class FlagTests(SynchronousTestCase):
    def test_flag_list(self) -> None:
        """System flags take their canonical spelling; duplicates are dropped."""
        for text, flags in [
            (b"()", ()),
            (b"(\\Seen)", ("\\Seen",)),
            (
                b"(\\seen \\ANSWERED \\Flagged \\Deleted \\Draft)",
                ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft"),
            ),
            (b"($Forwarded Junk junk \\Seen \\SEEN)", ("$Forwarded", "Junk", "\\Seen")),
        ]:
            r = reader(text)
            self.assertEqual(r.flag_list(), flags, text)
            r.end()

    def test_invalid(self) -> None:
        """\\Recent, unknown system flags, \\* and malformed lists are refused."""
        for text in [
            b"(\\Recent)",
            b"(\\Foo)",
            b"(\\*)",
            b"(\\Seen",
            b"\\Seen",
            b"((\\Seen))",
            b"(a]b)",
            b"( \\Seen)",
            b"(\\Seen )",
            b'("x")',
            b"(\\)",
        ]:
            self.assertRaises(ParseError, whole, text, "flag_list")

    def test_perm(self) -> None:
        """With perm, \\* is a flag."""
        self.assertEqual(reader(b"(\\* \\Seen)").flag_list(perm=True), ("\\*", "\\Seen"))


class ListTests(SynchronousTestCase):
    def test_value(self) -> None:
        """value() reads atoms, strings (literals too), NIL and nested lists."""
        r = reader(b'("name" "x" "version" NIL ({1}\r\nq atom) ())')
        self.assertEqual(r.value(), [b"name", b"x", b"version", None, [b"q", "atom"], []])
        r.end()

    def test_unbalanced(self) -> None:
        """Unbalanced parentheses are refused."""
        for text in (b"(a (b)", b"(a b", b"(a))", b"((a)"):
            self.assertRaises(ParseError, whole, text, "value")

    def test_nesting_limit(self) -> None:
        """32 levels are read; 33 are refused (no recursion without a bound)."""
        self.assertEqual(reader(b"(" * 32 + b")" * 32).value(), self._nested(32))
        e = self.assertRaises(ParseError, reader(b"(" * 33 + b")" * 33).value)
        self.assertEqual(e.message, "too deeply nested")
        self.assertRaises(ParseError, reader(b"(" * 5000).value)
        r = skip_tag(Reader(frame(b"t " + b"(" * 3 + b")" * 3 + b"\r\n"), max_depth=2))
        self.assertRaises(ParseError, r.value)

    def _nested(self, n: int) -> object:
        out: list[object] = []
        for _ in range(n - 1):
            out = [out]
        return out


# -- mailbox names -------------------------------------------------------------------------------


class MUTF7Tests(SynchronousTestCase):
    ROUND_TRIPS = [
        ("", ""),
        ("INBOX", "INBOX"),
        ("é", "&AOk-"),
        ("&", "&-"),
        ("Entwürfe", "Entw&APw-rfe"),
        ("a&b", "a&-b"),
        ("日本語", "&ZeVnLIqe-"),
        ("Входящие", "&BBIERQQ+BDQETwRJBDgENQ-"),
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
        ("😀", "&2D3eAA-"),  # a surrogate pair
        ("\t", "&AAk-"),
    ]
    MALFORMED = [
        "&",  # no "-"
        "&AOk",
        "&AGE-",  # "a" must stand for itself
        "&ACY-",  # so must "&"
        "&AOk-&AOk-",  # two encoded runs side by side
        "&AOl-",  # stray bits
        "&AOk=-",  # padding
        "&A-",  # a lone sextet
        "&AO-",  # half a character
        "&2D0-",  # a lone surrogate
        "&2D3eAA",
        "&AOk/-",  # "/" is "," in modified BASE64
        "é",  # 8-bit
        "a\tb",  # control
    ]

    def test_round_trips(self) -> None:
        """encode_mutf7 and decode_mutf7 are inverse on these names."""
        for text, encoded in self.ROUND_TRIPS:
            self.assertEqual(encode_mutf7(text), encoded, text)
            self.assertEqual(decode_mutf7(encoded), text, encoded)

    def test_malformed(self) -> None:
        """Every way modified UTF-7 can be malformed or non-canonical is refused."""
        for encoded in self.MALFORMED:
            self.assertRaises(ValueError, decode_mutf7, encoded)


class MailboxTests(SynchronousTestCase):
    def test_mailbox(self) -> None:
        """Mailbox names are decoded from modified UTF-7; INBOX in any case is INBOX."""
        for text, name in [
            (b"inbox", "INBOX"),
            (b'"InBoX"', "INBOX"),
            (b"INBOX.Sent", "INBOX.Sent"),
            (b"Entw&APw-rfe", "Entwürfe"),
            (b'"&AOk- &-"', "é &"),
            (b"{5}\r\nab]cd", "ab]cd"),
        ]:
            self.assertEqual(reader(text).mailbox(), name, text)

    def test_invalid(self) -> None:
        """Malformed modified UTF-7, 8-bit and control characters are refused."""
        for text in (b"&AOk", b'"&AGE-"', b"{2}\r\n\xc3\xa9", b'"a\tb"', b"(x)", b"a*", b""):
            self.assertRaises(ParseError, whole, text, "mailbox")

    def test_utf8_mode(self) -> None:
        """With UTF8=ACCEPT, names are UTF-8 as sent: no modified UTF-7 decoding."""
        self.assertEqual(reader(b'"Entw\xc3\xbcrfe"', utf8=True).mailbox(), "Entwürfe")
        self.assertEqual(reader(b"a&AOk-", utf8=True).mailbox(), "a&AOk-")
        self.assertRaises(ParseError, reader(b"{1}\r\n\xff", utf8=True).mailbox)

    def test_list_mailbox(self) -> None:
        """LIST patterns keep their wildcards and are decoded too."""
        for text, pattern in [
            (b"*", "*"),
            (b"%", "%"),
            (b"Entw&APw-*", "Entwü*"),
            (b'""', ""),
            (b"a]%", "a]%"),
        ]:
            self.assertEqual(reader(text).list_mailbox(), pattern, text)
        self.assertRaises(ParseError, reader(b"&Z-*").list_mailbox)


# -- FETCH, STORE, APPEND ------------------------------------------------------------------------


def body(
    section: Section | None = Section(), peek: bool = False, partial: tuple[int, int] | None = None
) -> FetchAtt:
    return FetchAtt("BODY", section, peek, partial)


class FetchTests(SynchronousTestCase):
    ATTS = [
        (b"FLAGS", FetchAtt("FLAGS")),
        (b"rfc822.size", FetchAtt("RFC822.SIZE")),
        (b"BODY", FetchAtt("BODY")),
        (b"BODYSTRUCTURE", FetchAtt("BODYSTRUCTURE")),
        (b"MODSEQ", FetchAtt("MODSEQ")),
        (b"BODY[]", body()),
        (b"BODY.PEEK[]<0.100>", body(peek=True, partial=(0, 100))),
        (b"BODY[TEXT]", body(Section((), "TEXT"))),
        (b"body.peek[1.2.mime]", body(Section((1, 2), "MIME"), peek=True)),
        (b"BODY[1.2]", body(Section((1, 2)))),
        (b"BODY[3.HEADER]", body(Section((3,), "HEADER"))),
        (
            b"BODY[HEADER.FIELDS (From To)]<0.100>",
            body(Section((), "HEADER.FIELDS", ("From", "To")), partial=(0, 100)),
        ),
        (
            b'BODY[2.HEADER.FIELDS.NOT ("X-Spam" {4}\r\nDate)]',
            body(Section((2,), "HEADER.FIELDS.NOT", ("X-Spam", "Date"))),
        ),
        (b"BINARY[1]", FetchAtt("BINARY", Section((1,)))),
        (b"BINARY.PEEK[1.2]<5.10>", FetchAtt("BINARY", Section((1, 2)), True, (5, 10))),
        (b"BINARY[]", FetchAtt("BINARY", Section())),
        (b"BINARY.SIZE[3]", FetchAtt("BINARY.SIZE", Section((3,)))),
    ]
    INVALID_ATTS = [
        b"FOO",
        b"RFC822.FOO",
        b"BODY[",
        b"BODY[1.]",
        b"BODY[0]",
        b"BODY[01]",
        b"BODY[MIME]",
        b"BODY[FOO]",
        b"BODY[HEADER.FIELDS]",
        b"BODY[HEADER.FIELDS ()]",
        b"BODY[HEADER.FIELDS (a:b)]",
        b"BODY[TEXT.MIME]",
        b"BODY[]<0>",
        b"BODY[]<0.0>",
        b"BODY[]<-1.5>",
        b"BODY.PEEK",
        b"BINARY[TEXT]",
        b"BINARY",
        b"BINARY.SIZE[1]<0.1>",
        b"BODY[1.2",
        b"BODY[]<0.99999999999999999999>",
    ]

    def fetch(self, text: bytes, uid: bool = False) -> FetchCommand:
        return parse_fetch(args(b" " + text), uid)

    def test_attributes(self) -> None:
        """Each fetch attribute parses alone and in a list."""
        for text, att in self.ATTS:
            self.assertEqual(self.fetch(b"1 " + text).atts, (att,), text)
            self.assertEqual(
                self.fetch(b"1 (UID " + text + b")").atts, (FetchAtt("UID"), att), text
            )

    def test_invalid_attributes(self) -> None:
        """Malformed attributes are refused alone and in a list."""
        for text in self.INVALID_ATTS:
            self.assertRaises(ParseError, self.fetch, b"1 " + text)
            self.assertRaises(ParseError, self.fetch, b"1 (FLAGS " + text + b")")

    def test_macros(self) -> None:
        """ALL, FAST and FULL expand; inside a list they are refused."""
        names = lambda text: [a.name for a in self.fetch(text).atts]  # noqa: E731
        self.assertEqual(names(b"1 ALL"), ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"])
        self.assertEqual(names(b"1 fast"), ["FLAGS", "INTERNALDATE", "RFC822.SIZE"])
        self.assertEqual(
            names(b"1 FULL"), ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]
        )
        self.assertRaises(ParseError, self.fetch, b"1 (ALL)")  # macros stand alone

    def test_command(self) -> None:
        """The sequence set and the CHANGEDSINCE / VANISHED modifiers are read."""
        fetch = self.fetch(b"1:4,7,* (FLAGS) (CHANGEDSINCE 12345)")
        self.assertEqual(str(fetch.sequence_set), "1:4,7,*")
        self.assertEqual(fetch.changedsince, 12345)
        self.assertFalse(fetch.vanished)
        fetch = self.fetch(b"1:* FLAGS (VANISHED CHANGEDSINCE 9)", uid=True)
        self.assertEqual((fetch.changedsince, fetch.vanished), (9, True))

    def test_invalid_commands(self) -> None:
        """Malformed FETCH arguments and misused modifiers are refused."""
        for text, uid in [
            (b"1 ()", False),
            (b"1 (FLAGS", False),
            (b"1 (FLAGS))", False),
            (b"1 FLAGS UID", False),
            (b"1  FLAGS", False),
            (b"0 FLAGS", False),
            (b"1 FLAGS (CHANGEDSINCE)", False),
            (b"1 FLAGS (CHANGEDSINCE x)", False),
            (b"1 FLAGS (CHANGEDSINCE 1 CHANGEDSINCE 2)", False),
            (b"1 FLAGS (VANISHED CHANGEDSINCE 9)", False),  # VANISHED only with UID FETCH
            (b"1 FLAGS (VANISHED)", True),  # ... and with CHANGEDSINCE
            (b"1 FLAGS (FOO)", False),
            (b"1 FLAGS ()", False),
            (b"1", False),
        ]:
            self.assertRaises(ParseError, self.fetch, text, uid)

    def test_response_name(self) -> None:
        """response_name() drops .PEEK and the partial length, keeps field names."""
        for text, name in [
            (b"BODY.PEEK[1.2]<0.100>", "BODY[1.2]<0>"),
            (b"body[header.fields (From To)]", "BODY[HEADER.FIELDS (From To)]"),
            (b'BODY[HEADER.FIELDS ("a(b" c)]', 'BODY[HEADER.FIELDS ("a(b" c)]'),
            (b"BINARY.PEEK[1]<5.5>", "BINARY[1]<5>"),
            (b"BINARY.SIZE[]", "BINARY.SIZE[]"),
            (b"rfc822.header", "RFC822.HEADER"),
            (b"BODY[]", "BODY[]"),
        ]:
            self.assertEqual(self.fetch(b"1 " + text).atts[0].response_name(), name)


class StoreTests(SynchronousTestCase):
    def test_store(self) -> None:
        """STORE's mode, .SILENT, flags (listed or bare) and UNCHANGEDSINCE."""
        for text, expected in [
            (b"1 FLAGS (\\Seen)", ("", False, ("\\Seen",), None)),
            (b"1:* +FLAGS.SILENT (\\Deleted $Junk)", ("+", True, ("\\Deleted", "$Junk"), None)),
            (b"2 -flags \\Seen \\flagged", ("-", False, ("\\Seen", "\\Flagged"), None)),
            (b"2 FLAGS ()", ("", False, (), None)),
            (
                b"2 (UNCHANGEDSINCE 320162338) +FLAGS.SILENT (\\Deleted)",
                ("+", True, ("\\Deleted",), 320162338),
            ),
            (b"2 (unchangedsince 0) FLAGS x", ("", False, ("x",), 0)),
        ]:
            store = parse_store(args(b" " + text))
            self.assertEqual(
                (store.mode, store.silent, store.flags, store.unchangedsince), expected, text
            )

    def test_invalid(self) -> None:
        """Malformed STORE arguments are refused."""
        for text in [
            b"1 FLAGS",
            b"1 FLAGS ",
            b"1 FLAGS (\\Recent)",
            b"1 FLAGS \\Foo",
            b"1 *FLAGS (x)",
            b"1 FLAGSX (x)",
            b"1 FLAGS.LOUD (x)",
            b"1 +FLAGS (x",
            b"1 FLAGS (x) y",
            b"1 (UNCHANGEDSINCE) FLAGS x",
            b"1 (FOO 1) FLAGS x",
            b"1 (UNCHANGEDSINCE 1 UNCHANGEDSINCE 2) FLAGS x",
            b"x FLAGS (y)",
        ]:
            self.assertRaises(ParseError, parse_store, args(b" " + text))


class AppendTests(SynchronousTestCase):
    def test_append(self) -> None:
        """APPEND with flags, an internal date and a literal."""
        append = parse_append(
            args(b' saved-messages (\\Seen) "17-Jul-1996 02:44:25 -0700" {5}\r\nhello')
        )
        self.assertEqual(append.mailbox, "saved-messages")
        (message,) = append.messages
        self.assertEqual(message.flags, ("\\Seen",))
        self.assertEqual(
            message.internal_date,
            dt.datetime(1996, 7, 17, 2, 44, 25, 0, dt.timezone(-dt.timedelta(hours=7))),
        )
        self.assertEqual(message.data.data, b"hello")

    def test_multiappend_and_binary(self) -> None:
        """MULTIAPPEND, literal8 and UTF8 (literal8) messages."""
        append = parse_append(
            args(b" INBOX {1+}\r\na ~{2+}\r\n\x00b (x) {1+}\r\nc UTF8 (~{1+}\r\nd)")
        )
        self.assertEqual(
            [
                (m.flags, m.internal_date, m.data.data, m.data.binary, m.utf8)
                for m in append.messages
            ],
            [
                ((), None, b"a", False, False),
                ((), None, b"\x00b", True, False),
                (("x",), None, b"c", False, False),
                ((), None, b"d", True, True),
            ],
        )

    def test_invalid(self) -> None:
        """Missing or quoted messages, bad flags, dates, CATENATE and junk are refused."""
        for text in [
            b" INBOX",
            b' INBOX "hello"',
            b" INBOX (\\Seen)",
            b" INBOX (\\Recent) {1}\r\nx",
            b' INBOX "bad date" {1}\r\nx',
            b" INBOX {1}\r\nx ",
            b" INBOX {1}\r\nx junk",
            b" INBOX UTF8 ({1}\r\nx)",  # UTF8 takes a literal8
            b" INBOX UTF8 (~{1}\r\nx",
            b" INBOX CATENATE (TEXT {1}\r\nx)",
            b" &AOk {1}\r\nx",
        ]:
            self.assertRaises(ParseError, parse_append, args(text))


# -- SEARCH --------------------------------------------------------------------------------------


class SearchTests(SynchronousTestCase):
    KEYS: list[tuple[bytes, SearchKey]] = [
        (b"ALL", AllKey()),
        (b"seen", FlagKey("\\Seen")),
        (b"UNSEEN", FlagKey("\\Seen", False)),
        (b"NEW", AndKey((FlagKey("\\Recent"), FlagKey("\\Seen", False)))),
        (b"OLD", FlagKey("\\Recent", False)),
        (b"KEYWORD $Junk", FlagKey("$Junk")),
        (b"UNKEYWORD foo", FlagKey("foo", False)),
        (b'FROM "Smith"', TextKey("FROM", "Smith")),
        (b"subject {5}\r\nhi yo", TextKey("SUBJECT", "hi yo")),
        (b"HEADER X-Spam yes", HeaderKey("X-Spam", "yes")),
        (b'HEADER "Message-ID" ""', HeaderKey("Message-ID", "")),
        (b"SINCE 1-Feb-1994", DateKey("SINCE", dt.date(1994, 2, 1))),
        (b'SENTBEFORE "1-Feb-1994"', DateKey("SENTBEFORE", dt.date(1994, 2, 1))),
        (b"LARGER 10000", SizeKey(True, 10000)),
        (b"SMALLER 5", SizeKey(False, 5)),
        (b"OLDER 3600", AgeKey(True, 3600)),
        (b"1:4,*", SeqKey(SequenceSet(((1, 4), (None, None))))),
        (b"$", SeqKey(SequenceSet((), saved=True))),
        (b"UID 5:*", SeqKey(SequenceSet(((5, None),)), uid=True)),
        (b"NOT DELETED", NotKey(FlagKey("\\Deleted"))),
        (b"OR SEEN FLAGGED", OrKey(FlagKey("\\Seen"), FlagKey("\\Flagged"))),
        (b"(SEEN)", FlagKey("\\Seen")),
        (b"(SEEN DRAFT)", AndKey((FlagKey("\\Seen"), FlagKey("\\Draft")))),
        (
            b"OR (FROM a TO b) NOT (ANSWERED)",
            OrKey(
                AndKey((TextKey("FROM", "a"), TextKey("TO", "b"))), NotKey(FlagKey("\\Answered"))
            ),
        ),
        (b"MODSEQ 620162338", ModSeqKey(620162338)),
        (b'MODSEQ "/flags/\\\\draft" all 620162338', ModSeqKey(620162338, "\\draft", "ALL")),
    ]
    INVALID = [
        b"",
        b"FOO",
        b"FROM",
        b"KEYWORD \\Seen",
        b"SINCE 31-Feb-1994",
        b"LARGER x",
        b"OR SEEN",
        b"NOT",
        b"(SEEN",
        b"SEEN)",
        b"()",
        b"UID",
        b"0:4",
        b"MODSEQ",
        b'MODSEQ "/foo/x" all 5',
        b'MODSEQ "/flags/x" mine 5',
        b"HEADER a:b c",
        b'FROM "\xc3\xa9"',  # 8-bit quoted without UTF8=ACCEPT
        b"RETURN (MIN)",
        b"RETURN (BOGUS) ALL",
        b"CHARSET",
        b"SEEN  DRAFT",
    ]

    def search(self, text: bytes, utf8: bool = False) -> SearchCommand:
        return parse_search(args(b" " + text, utf8))

    def test_keys(self) -> None:
        """Each search key gives its key object."""
        for text, key in self.KEYS:
            search = self.search(text)
            self.assertEqual(search.key, key, text)
            self.assertEqual((search.charset, search.result_options), (None, None))

    def test_keys_anded(self) -> None:
        """Several keys are ANDed."""
        search = self.search(b"UNSEEN 1:3 FROM x")
        self.assertEqual(
            search.key,
            AndKey(
                (FlagKey("\\Seen", False), SeqKey(SequenceSet(((1, 3),))), TextKey("FROM", "x"))
            ),
        )

    def test_invalid(self) -> None:
        """Unknown keys, missing arguments and malformed ones are refused."""
        for text in self.INVALID:
            self.assertRaises(ParseError, self.search, text)

    def test_charset(self) -> None:
        """Strings are decoded in the charset given (UTF-8 by default), strictly."""
        search = self.search(b"CHARSET utf-8 BODY {2}\r\n\xc3\xa9")
        self.assertEqual((search.charset, search.key), ("UTF-8", TextKey("BODY", "é")))
        search = self.search(b'CHARSET "US-ASCII" TEXT x')
        self.assertEqual(search.charset, "US-ASCII")
        self.assertRaises(ParseError, self.search, b"CHARSET US-ASCII TEXT {2}\r\n\xc3\xa9")
        self.assertRaises(ParseError, self.search, b"TEXT {1}\r\n\xff")  # default: UTF-8
        self.assertEqual(self.search(b'TEXT "\xc3\xa9"', utf8=True).key, TextKey("TEXT", "é"))

    def test_bad_charset(self) -> None:
        """An unknown charset is BadCharset (answered NO [BADCHARSET ...]), a ParseError."""
        e = self.assertRaises(BadCharset, self.search, b"CHARSET KOI8-R TEXT x")
        self.assertEqual((e.tag, e.charset, e.code), ("t", "KOI8-R", "BADCHARSET (UTF-8 US-ASCII)"))
        self.assertIsInstance(e, ParseError)

    def test_return(self) -> None:
        """RETURN options are read, upper-cased; () is allowed."""
        search = self.search(b"RETURN (MIN max COUNT) CHARSET UTF-8 UNDELETED")
        self.assertEqual(search.result_options, ("MIN", "MAX", "COUNT"))
        self.assertEqual(self.search(b"RETURN () ALL").result_options, ())
        self.assertEqual(self.search(b"RETURN (SAVE) ALL").result_options, ("SAVE",))

    def test_depth(self) -> None:
        """Long OR chains are fine; nesting past the limits is refused, never RecursionError."""
        chain = b"OR " * 200 + b"SEEN " * 200 + b"SEEN"
        self.assertIsInstance(self.search(chain).key, OrKey)
        for deep in (
            b"NOT " * 300 + b"SEEN",
            b"OR " * 300 + b"SEEN " * 301,
            b"(" * 33 + b"SEEN" + b")" * 33,
            b"(NOT " * 3000 + b"SEEN" + b")" * 3000,
        ):
            e = self.assertRaises(ParseError, self.search, deep)
            self.assertIn("nested", e.message)
        self.assertEqual(self.search(b"(" * 32 + b"SEEN" + b")" * 32).key, FlagKey("\\Seen"))
