"""
Tests for L{mailserver.smtp.data}: the DATA-phase decoder (dot-unstuffing, the terminator,
pipelined bytes after it, the size limit, bare CR / LF) and L{LineEndingCheck} for BDAT.

Every framing property is checked under several chunkings of the same input: in one piece, one
byte at a time, split in two at every offset, and in random pieces with a fixed seed. The
results must not depend on how TCP cut the stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from twisted.trial.unittest import SynchronousTestCase

from mailserver.smtp.data import DataDecoder, LineEndingCheck, has_bare_line_ending

SEED = 20240521
"""The fixed seed of the random chunkings, so that a failure can be replayed."""

LIMIT = 1000


def decode(chunks: list[bytes], limit: int = LIMIT) -> tuple[bytes, bytes | None, bool, bool, int]:
    """
    Feed C{chunks} to a new L{DataDecoder} as a server would: until C{rest} is returned, after
    which the remaining chunks are the next commands.

    @return: C{(content, rest, too_big, bare_line_ending, size)}; C{rest} is C{None} if the
        terminator was never found.
    """
    decoder = DataDecoder(limit)
    content: list[bytes] = []
    rest: bytes | None = None
    for chunk in chunks:
        if rest is not None:
            rest += chunk
            continue
        piece, rest = decoder.feed(chunk)
        content.append(piece)
    return b"".join(content), rest, decoder.too_big, decoder.bare_line_ending, decoder.size


def one_piece(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def two_pieces(data: bytes) -> Iterator[list[bytes]]:
    """Every way to cut C{data} in two (including an empty first or second piece)."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def random_pieces(data: bytes, rng: random.Random, max_piece: int = 7) -> list[bytes]:
    """C{data} cut in random pieces of 1 to C{max_piece} octets."""
    out = []
    i = 0
    while i < len(data):
        n = rng.randint(1, max_piece)
        out.append(data[i : i + n])
        i += n
    return out


def chunkings(data: bytes, seed: int = SEED, randoms: int = 50) -> Iterator[list[bytes]]:
    """One piece, one byte at a time, every two-piece cut, then C{randoms} random chunkings."""
    yield one_piece(data)
    yield bytewise(data)
    yield from two_pieces(data)
    rng = random.Random(seed)
    for _ in range(randoms):
        yield random_pieces(data, rng)


class ChunkingMixin:
    """Helpers to check that a result does not depend on the chunking."""

    def assertSameForAllChunkings(
        self, data: bytes, expected: tuple[bytes, bytes | None, bool, bool], limit: int = LIMIT
    ) -> None:
        """
        Decoding C{data} gives C{(content, rest, too_big, bare_line_ending)} equal to
        C{expected} however it is cut.
        """
        for chunks in chunkings(data):
            content, rest, too_big, bare, _ = decode(chunks, limit)
            self.assertEqual(  # type: ignore[attr-defined]
                (content, rest, too_big, bare), expected, f"chunking: {chunks!r}"
            )


class DotUnstuffingTests(ChunkingMixin, SynchronousTestCase):
    """RFC 5321 §4.5.2: a leading dot is removed from every line; only C{.} alone ends."""

    def test_double_dot_line_prefix_becomes_single_dot(self) -> None:
        """A line C{..x} is delivered as C{.x}."""
        self.assertSameForAllChunkings(b"..x\r\n.\r\n", (b".x\r\n", b"", False, False))

    def test_three_dots_become_two(self) -> None:
        """A line C{...} is delivered as C{..}."""
        self.assertSameForAllChunkings(b"a\r\n...\r\n.\r\n", (b"a\r\n..\r\n", b"", False, False))

    def test_two_dots_line_becomes_one_dot_and_does_not_end_the_message(self) -> None:
        """A line C{..} is content (a line C{.}), not the terminator."""
        self.assertSameForAllChunkings(
            b"..\r\nafter\r\n.\r\n", (b".\r\nafter\r\n", b"", False, False)
        )

    def test_only_one_leading_dot_is_removed_per_line(self) -> None:
        """Every line starting with a dot loses exactly one dot, the first line included."""
        data = b".a\r\n..b\r\nc\r\n....d\r\n.\r\n"
        self.assertSameForAllChunkings(data, (b"a\r\n.b\r\nc\r\n...d\r\n", b"", False, False))

    def test_dots_not_at_line_start_are_kept(self) -> None:
        """Dots inside or at the end of a line are content, untouched."""
        data = b"a.b\r\n x..\r\nend.\r\n.\r\n"
        self.assertSameForAllChunkings(data, (b"a.b\r\n x..\r\nend.\r\n", b"", False, False))

    def test_lone_dot_line_terminates(self) -> None:
        """The line C{.} ends the message and is not part of the content."""
        self.assertSameForAllChunkings(
            b"Subject: x\r\n\r\nbody\r\n.\r\n", (b"Subject: x\r\n\r\nbody\r\n", b"", False, False)
        )

    def test_dot_with_trailing_space_does_not_terminate(self) -> None:
        """A line C{. } is not the terminator: it is content, unstuffed to C{" "}."""
        self.assertSameForAllChunkings(b". \r\nx\r\n.\r\n", (b" \r\nx\r\n", b"", False, False))

    def test_empty_message(self) -> None:
        """C{.CRLF} right after C{354} is an empty message."""
        self.assertSameForAllChunkings(b".\r\n", (b"", b"", False, False))

    def test_empty_lines_are_kept(self) -> None:
        """Empty lines (the header/body separator, blank body lines) are content."""
        self.assertSameForAllChunkings(b"\r\n\r\n.\r\n", (b"\r\n\r\n", b"", False, False))

    def test_content_is_returned_in_whole_lines(self) -> None:
        """An incomplete line is held back until its CRLF arrives."""
        decoder = DataDecoder(LIMIT)
        self.assertEqual(decoder.feed(b"abc"), (b"", None))
        self.assertEqual(decoder.feed(b"def\r"), (b"", None))
        self.assertEqual(decoder.feed(b"\n.."), (b"abcdef\r\n", None))
        self.assertEqual(decoder.feed(b"x\r\n.\r\n"), (b".x\r\n", b""))

    def test_size_counts_unstuffed_octets(self) -> None:
        """C{size} counts the content as stored, after dot-unstuffing."""
        content, rest, _, _, size = decode([b"..x\r\n.\r\n"])
        self.assertEqual((content, rest, size), (b".x\r\n", b"", 4))


class RestTests(ChunkingMixin, SynchronousTestCase):
    """What follows the terminator is returned as C{rest}: the client's next commands."""

    def test_pipelined_commands_after_terminator_are_rest(self) -> None:
        """The octets after C{CRLF.CRLF} come back exactly, for the command parser."""
        self.assertSameForAllChunkings(
            b"Hi\r\n.\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n",
            (b"Hi\r\n", b"MAIL FROM:<a@b.example>\r\nQUIT\r\n", False, False),
        )

    def test_second_terminator_in_rest_is_not_consumed(self) -> None:
        """Only the first terminator ends the message; a second one is left in C{rest}."""
        self.assertSameForAllChunkings(
            b"a\r\n.\r\nb\r\n.\r\n", (b"a\r\n", b"b\r\n.\r\n", False, False)
        )

    def test_rest_after_empty_message(self) -> None:
        """After an empty message, C{rest} holds the next command."""
        self.assertSameForAllChunkings(b".\r\nQUIT\r\n", (b"", b"QUIT\r\n", False, False))

    def test_no_rest_until_terminator(self) -> None:
        """Without the terminator, C{rest} stays C{None}, whatever else arrived."""
        for chunks in chunkings(b"a\r\n.x\r\n. \r\n..\r\n"):
            self.assertIsNone(decode(chunks)[1], chunks)

    def test_random_chunkings_of_long_dialogue_agree(self) -> None:
        """
        A long message with stuffed dots, empty lines and a pipelined tail decodes the same
        in 500 random chunkings (seeded) as in one piece.
        """
        lines = [b"Subject: test", b""]
        rng = random.Random(SEED)
        for i in range(200):
            lines.append(b"." * rng.randint(0, 3) + b"line %d" % i)
        data = b"\r\n".join(lines) + b"\r\n.\r\nRSET\r\nQUIT\r\n"
        expected = decode([data], limit=100_000)
        self.assertEqual(expected[1:4], (b"RSET\r\nQUIT\r\n", False, False))
        for _ in range(500):
            chunks = random_pieces(data, rng, max_piece=40)
            self.assertEqual(decode(chunks, limit=100_000), expected)
        self.assertEqual(decode(bytewise(data), limit=100_000), expected)


class SizeLimitTests(ChunkingMixin, SynchronousTestCase):
    """Over the size limit, content is dropped, but the terminator is still found."""

    def test_message_exactly_at_limit_is_not_too_big(self) -> None:
        """Content of exactly C{limit} octets is accepted, however it arrives."""
        self.assertSameForAllChunkings(
            b"abc\r\n.\r\nQUIT\r\n", (b"abc\r\n", b"QUIT\r\n", False, False), limit=5
        )

    def test_message_just_under_limit_with_terminator_split(self) -> None:
        """One or two octets below the limit, a split terminator is still recognised."""
        for limit in (6, 7):
            self.assertSameForAllChunkings(
                b"abc\r\n.\r\nQUIT\r\n", (b"abc\r\n", b"QUIT\r\n", False, False), limit=limit
            )

    def test_one_octet_over_limit_is_too_big(self) -> None:
        """Content of C{limit + 1} octets sets C{too_big}; the terminator is still found."""
        for chunks in chunkings(b"abcd\r\n.\r\nQUIT\r\n"):
            content, rest, too_big, _, _ = decode(chunks, limit=5)
            self.assertEqual((rest, too_big), (b"QUIT\r\n", True), chunks)
            self.assertLessEqual(len(content), 5, chunks)

    def test_content_is_dropped_once_too_big(self) -> None:
        """After the limit is crossed, no more content is returned."""
        decoder = DataDecoder(10)
        self.assertEqual(decoder.feed(b"12345678\r\n"), (b"12345678\r\n", None))
        self.assertEqual(decoder.feed(b"x\r\n"), (b"", None))
        self.assertTrue(decoder.too_big)
        self.assertEqual(decoder.feed(b"more\r\nlines\r\n"), (b"", None))
        self.assertEqual(decoder.feed(b".\r\nNOOP\r\n"), (b"", b"NOOP\r\n"))

    def test_oversized_many_lines_terminator_found(self) -> None:
        """A message of many lines far over the limit still ends at its terminator."""
        data = b"line of text\r\n" * 200 + b".\r\nMAIL FROM:<a@b.example>\r\n"
        for chunks in [one_piece(data), bytewise(data)] + [
            random_pieces(data, random.Random(SEED + i), 50) for i in range(20)
        ]:
            content, rest, too_big, _, size = decode(chunks, limit=100)
            self.assertEqual(rest, b"MAIL FROM:<a@b.example>\r\n")
            self.assertTrue(too_big)
            self.assertLessEqual(len(content), 100)
            self.assertGreater(size, 100)

    def test_giant_line_without_crlf_terminator_still_found(self) -> None:
        """
        One line far longer than the limit, without any CRLF, is counted and dropped; the
        terminator after it is still found and C{rest} is exact.
        """
        data = b"A" * 20000 + b"\r\n.\r\nQUIT\r\n"
        rng = random.Random(SEED)
        cuts = [one_piece(data), [data[i : i + 1000] for i in range(0, len(data), 1000)]]
        cuts += [random_pieces(data, rng, 3000) for _ in range(20)]
        for chunks in cuts:
            content, rest, too_big, _, size = decode(chunks, limit=100)
            self.assertEqual((content, rest, too_big), (b"", b"QUIT\r\n", True))
            self.assertGreaterEqual(size, 20000)

    def test_giant_line_byte_at_a_time_terminator_still_found(self) -> None:
        """Fed one byte at a time, an over-long line does not hide the terminator."""
        data = b"B" * 300 + b"\r\n.\r\nQUIT\r\n"
        content, rest, too_big, _, _ = decode(bytewise(data), limit=50)
        self.assertEqual((content, rest, too_big), (b"", b"QUIT\r\n", True))

    def test_giant_line_then_terminator_at_every_split(self) -> None:
        """
        Whatever the cut, an over-long line followed by the terminator gives C{too_big} and
        the exact C{rest}, including when a piece ends with C{CRLF.} or C{CRLF.CR}.
        """
        data = b"A" * 40 + b"\r\n.\r\nNOOP\r\n"
        for chunks in two_pieces(data):
            _, rest, too_big, _, _ = decode(chunks, limit=10)
            self.assertEqual((rest, too_big), (b"NOOP\r\n", True), chunks)

    def test_giant_line_with_cr_at_piece_end(self) -> None:
        """A CR at the end of a piece of an over-long line still pairs with the next LF."""
        _, rest, too_big, _, _ = decode([b"A" * 500 + b"\r", b"\n.\r", b"\nQUIT\r\n"], limit=10)
        self.assertEqual((rest, too_big), (b"QUIT\r\n", True))


class BareLineEndingTests(ChunkingMixin, SynchronousTestCase):
    """A bare CR or LF is flagged; only C{CRLF.CRLF} ends the message."""

    def test_bare_lf_is_flagged(self) -> None:
        """C{a LF b} sets C{bare_line_ending}."""
        self.assertSameForAllChunkings(b"a\nb\r\n.\r\n", (b"a\nb\r\n", b"", False, True))

    def test_bare_cr_is_flagged(self) -> None:
        """C{a CR b} sets C{bare_line_ending}."""
        self.assertSameForAllChunkings(b"a\rb\r\n.\r\n", (b"a\rb\r\n", b"", False, True))

    def test_cr_before_crlf_is_flagged(self) -> None:
        """C{CR CR LF}: the first CR is bare."""
        self.assertSameForAllChunkings(b"a\r\r\n.\r\n", (b"a\r\r\n", b"", False, True))

    def test_lf_after_crlf_is_flagged(self) -> None:
        """C{CR LF LF}: the second LF is bare."""
        self.assertSameForAllChunkings(b"a\r\n\n\r\n.\r\n", (b"a\r\n\n\r\n", b"", False, True))

    def test_clean_crlf_is_not_flagged(self) -> None:
        """Only CRLF line endings: not flagged, whatever the chunking."""
        self.assertSameForAllChunkings(
            b"a\r\nb\r\n\r\nc\r\n.\r\n", (b"a\r\nb\r\n\r\nc\r\n", b"", False, False)
        )

    def test_lf_dot_lf_does_not_end_data(self) -> None:
        """
        C{LF . LF} (SMTP smuggling) does not end the message: what follows is content, up to
        the real terminator, and the message is flagged.
        """
        data = b"x\r\n\n.\nMAIL FROM:<evil@example.net>\r\n.\r\nQUIT\r\n"
        self.assertSameForAllChunkings(
            data, (b"x\r\n\n.\nMAIL FROM:<evil@example.net>\r\n", b"QUIT\r\n", False, True)
        )

    def test_crlf_dot_lf_does_not_end_data(self) -> None:
        """C{CRLF . LF} does not end the message (the dot is unstuffed as for any line)."""
        data = b"x\r\n.\nMAIL FROM:<evil@example.net>\r\n.\r\nQUIT\r\n"
        self.assertSameForAllChunkings(
            data, (b"x\r\n\nMAIL FROM:<evil@example.net>\r\n", b"QUIT\r\n", False, True)
        )

    def test_lf_dot_crlf_does_not_end_data(self) -> None:
        """C{LF . CRLF} does not end the message."""
        data = b"x\n.\r\nMAIL FROM:<evil@example.net>\r\n.\r\nQUIT\r\n"
        self.assertSameForAllChunkings(
            data, (b"x\n.\r\nMAIL FROM:<evil@example.net>\r\n", b"QUIT\r\n", False, True)
        )

    def test_cr_dot_crlf_does_not_end_data(self) -> None:
        """C{CR . CRLF} does not end the message."""
        data = b"x\r.\r\nMAIL FROM:<evil@example.net>\r\n.\r\nQUIT\r\n"
        self.assertSameForAllChunkings(
            data, (b"x\r.\r\nMAIL FROM:<evil@example.net>\r\n", b"QUIT\r\n", False, True)
        )

    def test_crlf_dot_cr_cr_lf_does_not_end_data(self) -> None:
        """C{CRLF . CR CR LF} is a dot line with a bare CR, not the terminator."""
        data = b"x\r\n.\r\r\nQUIT\r\n.\r\n"
        self.assertSameForAllChunkings(data, (b"x\r\n\r\r\nQUIT\r\n", b"", False, True))

    def test_bare_lf_only_message_never_ends(self) -> None:
        """A client using LF line endings only never reaches the end of the data."""
        for chunks in chunkings(b"a\n.\nb\n.\n"):
            self.assertIsNone(decode(chunks)[1], chunks)

    def test_cr_and_lf_split_across_pieces_is_not_bare(self) -> None:
        """A CRLF pair split between two feeds is a proper line ending."""
        self.assertEqual(decode([b"a\r", b"\nb\r", b"\n.\r\n"])[3], False)

    def test_cr_at_piece_end_followed_by_other_octet_is_bare(self) -> None:
        """A CR at the end of a feed, followed by something other than LF, is bare."""
        self.assertEqual(decode([b"a\r", b"b\r\n.\r\n"])[3], True)


class LineEndingCheckTests(SynchronousTestCase):
    """L{LineEndingCheck} finds bare CR / LF in content cut in arbitrary pieces."""

    def check(self, pieces: list[bytes]) -> bool:
        check = LineEndingCheck()
        for piece in pieces:
            check.feed(piece)
        return check.finish()

    def test_clean_content_in_one_piece(self) -> None:
        """CRLF-only content is clean."""
        self.assertFalse(self.check([b"a\r\nb\r\n"]))

    def test_no_content_is_clean(self) -> None:
        """No content at all (or only empty pieces) is clean."""
        self.assertFalse(self.check([]))
        self.assertFalse(self.check([b"", b""]))

    def test_crlf_split_between_pieces_is_clean(self) -> None:
        """A CR ending one piece and an LF starting the next are one CRLF."""
        self.assertFalse(self.check([b"a\r", b"\nb\r\n"]))

    def test_crlf_split_with_empty_piece_between_is_clean(self) -> None:
        """An empty piece between the CR and the LF does not break the pair."""
        self.assertFalse(self.check([b"a\r", b"", b"\nb"]))

    def test_every_cut_of_clean_content_is_clean(self) -> None:
        """Clean content stays clean in every two-piece cut and one byte at a time."""
        data = b"\r\nab\r\n\r\n.c\r\n"
        for pieces in list(two_pieces(data)) + [bytewise(data)]:
            self.assertFalse(self.check(pieces), pieces)

    def test_cr_followed_by_other_octet_in_next_piece_is_bare(self) -> None:
        """A CR ending a piece, followed by a non-LF, is bare."""
        self.assertTrue(self.check([b"a\r", b"b"]))

    def test_cr_followed_by_crlf_in_next_piece_is_bare(self) -> None:
        """C{CR | CR LF}: the first CR is bare."""
        self.assertTrue(self.check([b"a\r", b"\r\n"]))

    def test_trailing_cr_at_end_is_bare(self) -> None:
        """Content that ends with a CR has a bare CR."""
        self.assertTrue(self.check([b"a\r\nb\r"]))

    def test_lf_at_start_of_piece_is_bare(self) -> None:
        """An LF starting a piece, with no CR before it, is bare."""
        self.assertTrue(self.check([b"a", b"\nb"]))

    def test_bare_lf_and_cr_inside_piece(self) -> None:
        """A bare LF or CR inside one piece is found."""
        self.assertTrue(self.check([b"a\nb"]))
        self.assertTrue(self.check([b"a\rb"]))

    def test_every_cut_of_bad_content_is_bad(self) -> None:
        """Each bad sample is found bad in every two-piece cut and one byte at a time."""
        for data in (b"a\nb", b"a\rb", b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"a\r\r\n", b"\r"):
            for pieces in list(two_pieces(data)) + [bytewise(data)]:
                self.assertTrue(self.check(pieces), pieces)

    def test_stays_bad_after_later_clean_content(self) -> None:
        """Once bad, later clean pieces do not clear the finding."""
        check = LineEndingCheck()
        check.feed(b"a\nb")
        check.feed(b"\r\nclean\r\n")
        self.assertTrue(check.bad)
        self.assertTrue(check.finish())


class HasBareLineEndingTests(SynchronousTestCase):
    """L{has_bare_line_ending} on complete content."""

    def test_samples(self) -> None:
        """CRLF-only content is clean; any lone CR or LF is found."""
        for data, expected in [
            (b"", False),
            (b"abc", False),
            (b"a\r\nb\r\n", False),
            (b"\r\n\r\n", False),
            (b"a\n", True),
            (b"a\r", True),
            (b"\n\r", True),
            (b"\r\r\n", True),
            (b"\r\n\n", True),
        ]:
            self.assertEqual(has_bare_line_ending(data), expected, data)
