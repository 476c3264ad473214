"""
Tests for L{mailserver.smtp.address}: parsing C{MAIL FROM:} / C{RCPT TO:} arguments, mailboxes
and ESMTP parameters, with the reply each refusal gives (code and RFC 3463 enhanced code).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailserver.smtp.address import (
    MAX_LOCAL_PART,
    Path,
    parse_envid,
    parse_mailbox,
    parse_notify,
    parse_orcpt,
    parse_params,
    parse_path_argument,
    parse_ret,
    require_ascii,
    split_address,
    unknown_parameter,
    xtext_decode,
    xtext_encode,
)
from mailserver.smtp.codes import Reply


class _ReplyAssertions(SynchronousTestCase):
    def assertReply(self, reply: Reply, code: int, enhanced: str) -> None:
        """C{reply} has C{code} and C{enhanced}, and its wire line starts with them."""
        self.assertEqual((reply.code, reply.enhanced), (code, enhanced))
        self.assertTrue(
            reply.line().startswith(b"%d %s " % (code, enhanced.encode())), reply.line()
        )
        self.assertTrue(reply.line().endswith(b"\r\n"))

    def mail(self, arg: str) -> Path:
        return parse_path_argument(arg, "FROM", sender=True)

    def rcpt(self, arg: str) -> Path:
        return parse_path_argument(arg, "TO", sender=False)


class MailFromTests(_ReplyAssertions):
    """C{MAIL FROM:} arguments."""

    def test_plain_address(self) -> None:
        """C{FROM:<a@b>} gives the address and no parameters."""
        self.assertEqual(self.mail("FROM:<bob@example.com>"), Path("bob@example.com", {}))

    def test_space_after_colon_is_accepted(self) -> None:
        """C{FROM: <a@b>}, which many clients send, is accepted."""
        self.assertEqual(self.mail("FROM: <bob@example.com>"), Path("bob@example.com", {}))

    def test_keyword_is_case_insensitive(self) -> None:
        """C{from:<a@b>} is accepted like C{FROM:<a@b>}."""
        self.assertEqual(self.mail("from:<bob@example.com>").address, "bob@example.com")

    def test_null_sender(self) -> None:
        """C{FROM:<>} is the null reverse-path (bounces): address C{""}."""
        self.assertEqual(self.mail("FROM:<>"), Path("", {}))

    def test_null_sender_with_parameters(self) -> None:
        """The null sender can carry parameters."""
        self.assertEqual(self.mail("FROM:<> SIZE=10"), Path("", {"SIZE": "10"}))

    def test_parameters_after_path(self) -> None:
        """Parameters follow the path, names upper-cased, values kept as sent."""
        self.assertEqual(
            self.mail("FROM:<a@example.com> size=1000 Body=8bitmime SMTPUTF8"),
            Path("a@example.com", {"SIZE": "1000", "BODY": "8bitmime", "SMTPUTF8": None}),
        )

    def test_domain_is_lower_cased_local_part_kept(self) -> None:
        """The domain is folded to lower case; the local part is case-sensitive and kept."""
        self.assertEqual(self.mail("FROM:<Bob.Smith@EXAMPLE.Com>").address, "Bob.Smith@example.com")

    def test_source_route_is_stripped(self) -> None:
        """RFC 5321 §4.1.1.3: an old source route C{@a,@b:} is ignored."""
        self.assertEqual(
            self.mail("FROM:<@relay.example,@other.example:user@Example.ORG>").address,
            "user@example.org",
        )

    def test_bare_postmaster_is_not_a_sender(self) -> None:
        """C{<postmaster>} without domain is only special as a recipient: 501 5.1.7 here."""
        with self.assertRaises(Reply) as cm:
            self.mail("FROM:<postmaster>")
        self.assertReply(cm.exception, 501, "5.1.7")

    def test_missing_brackets_gets_501_5_1_7(self) -> None:
        """C{FROM:a@b} without angle brackets is refused with 501 5.1.7."""
        with self.assertRaises(Reply) as cm:
            self.mail("FROM:bob@example.com")
        self.assertReply(cm.exception, 501, "5.1.7")

    def test_unbalanced_bracket_gets_501(self) -> None:
        """C{FROM:<a@b} without the closing bracket is refused with 501 5.1.7."""
        with self.assertRaises(Reply) as cm:
            self.mail("FROM:<bob@example.com")
        self.assertReply(cm.exception, 501, "5.1.7")

    def test_wrong_keyword_gets_501_5_5_2(self) -> None:
        """C{MAIL TO:<a@b>} is a syntax error: 501 5.5.2."""
        with self.assertRaises(Reply) as cm:
            self.mail("TO:<bob@example.com>")
        self.assertReply(cm.exception, 501, "5.5.2")

    def test_missing_colon_gets_501_5_5_2(self) -> None:
        """C{MAIL FROM <a@b>} without colon is a syntax error: 501 5.5.2."""
        with self.assertRaises(Reply) as cm:
            self.mail("FROM <bob@example.com>")
        self.assertReply(cm.exception, 501, "5.5.2")

    def test_empty_argument_gets_501(self) -> None:
        """C{MAIL} with nothing after it is a syntax error."""
        with self.assertRaises(Reply) as cm:
            self.mail("")
        self.assertReply(cm.exception, 501, "5.5.2")

    def test_path_too_long_gets_501(self) -> None:
        """A path longer than 256 octets is refused."""
        with self.assertRaises(Reply) as cm:
            self.mail("FROM:<" + "a" * 60 + "@" + ".".join(["b" * 60] * 4) + ">")
        self.assertReply(cm.exception, 501, "5.1.7")

    def test_bad_parameter_syntax_gets_501_5_5_2(self) -> None:
        """A parameter that is not C{keyword[=value]} is a syntax error."""
        for arg in ("FROM:<a@b.example> =x", "FROM:<a@b.example> SIZE=", "FROM:<a@b.example> -X"):
            with self.assertRaises(Reply) as cm:
                self.mail(arg)
            self.assertReply(cm.exception, 501, "5.5.2")


class RcptToTests(_ReplyAssertions):
    """C{RCPT TO:} arguments."""

    def test_plain_address(self) -> None:
        """C{TO:<a@b>} gives the address."""
        self.assertEqual(self.rcpt("TO:<alice@example.org>"), Path("alice@example.org", {}))

    def test_space_after_colon_is_accepted(self) -> None:
        """C{TO: <a@b>} is accepted."""
        self.assertEqual(self.rcpt("TO: <alice@example.org>").address, "alice@example.org")

    def test_null_recipient_gets_501_5_1_3(self) -> None:
        """C{TO:<>} is not a recipient: 501 5.1.3."""
        with self.assertRaises(Reply) as cm:
            self.rcpt("TO:<>")
        self.assertReply(cm.exception, 501, "5.1.3")

    def test_postmaster_recipient(self) -> None:
        """C{TO:<postmaster>} (no domain, RFC 5321 §4.1.1.3) gives C{"postmaster"}."""
        self.assertEqual(self.rcpt("TO:<postmaster>"), Path("postmaster", {}))

    def test_postmaster_is_case_insensitive(self) -> None:
        """C{<PostMaster>} is the same special recipient, folded to C{"postmaster"}."""
        self.assertEqual(self.rcpt("TO:<PostMaster>").address, "postmaster")
        self.assertEqual(self.rcpt("TO:<POSTMASTER>").address, "postmaster")

    def test_postmaster_with_domain_is_an_ordinary_address(self) -> None:
        """C{<Postmaster@Example.org>} is a normal mailbox, domain lower-cased."""
        self.assertEqual(self.rcpt("TO:<Postmaster@Example.ORG>").address, "Postmaster@example.org")

    def test_other_local_name_without_domain_gets_501(self) -> None:
        """A recipient without domain other than postmaster is refused: 501 5.1.3."""
        with self.assertRaises(Reply) as cm:
            self.rcpt("TO:<alice>")
        self.assertReply(cm.exception, 501, "5.1.3")

    def test_source_route_is_stripped(self) -> None:
        """A source route before the recipient is ignored."""
        self.assertEqual(
            self.rcpt("TO:<@hop.example:alice@example.org>").address, "alice@example.org"
        )

    def test_quoted_local_part(self) -> None:
        """A quoted-string local part with spaces, C{@} and C{>} inside is accepted whole."""
        self.assertEqual(self.rcpt('TO:<"john doe"@example.org>').address, '"john doe"@example.org')
        self.assertEqual(
            self.rcpt('TO:<"a>b@c"@Example.org> NOTIFY=NEVER'),
            Path('"a>b@c"@example.org', {"NOTIFY": "NEVER"}),
        )

    def test_quoted_local_part_with_escape(self) -> None:
        """A backslash-escaped quote inside a quoted local part is accepted."""
        self.assertEqual(self.rcpt('TO:<"a\\"b"@example.org>').address, '"a\\"b"@example.org')

    def test_utf8_address(self) -> None:
        """A UTF-8 address (RFC 6531) parses; its domain is lower-cased."""
        self.assertEqual(self.rcpt("TO:<用户@例子.广告>").address, "用户@例子.广告")
        self.assertEqual(self.rcpt("TO:<JÖRG@BÜCHER.DE>").address, "JÖRG@bücher.de")

    def test_missing_brackets_gets_501_5_1_3(self) -> None:
        """C{TO:a@b} without brackets is refused with 501 5.1.3."""
        with self.assertRaises(Reply) as cm:
            self.rcpt("TO:alice@example.org")
        self.assertReply(cm.exception, 501, "5.1.3")

    def test_duplicate_parameter_gets_501(self) -> None:
        """The same parameter twice (any case) is refused with 501 5.5.2."""
        with self.assertRaises(Reply) as cm:
            self.rcpt("TO:<alice@example.org> NOTIFY=NEVER notify=SUCCESS")
        self.assertReply(cm.exception, 501, "5.5.2")


class ParseMailboxTests(_ReplyAssertions):
    """L{parse_mailbox}: C{local@domain} syntax and length limits."""

    def test_local_part_of_64_octets_is_accepted(self) -> None:
        """RFC 5321 §4.5.3.1.1: 64 octets is the longest local part."""
        local = "a" * MAX_LOCAL_PART
        self.assertEqual(parse_mailbox(f"{local}@example.org"), f"{local}@example.org")

    def test_local_part_of_65_octets_gets_501(self) -> None:
        """A local part of 65 octets is refused with 501."""
        with self.assertRaises(Reply) as cm:
            parse_mailbox("a" * 65 + "@example.org")
        self.assertReply(cm.exception, 501, "5.1.3")

    def test_local_part_length_counts_utf8_octets(self) -> None:
        """The limit is in octets: 22 three-octet characters (66 octets) are too long."""
        with self.assertRaises(Reply) as cm:
            parse_mailbox("用" * 22 + "@example.org")
        self.assertReply(cm.exception, 501, "5.1.3")
        self.assertEqual(parse_mailbox("用" * 21 + "@example.org"), "用" * 21 + "@example.org")

    def test_long_local_part_through_rcpt_gets_501(self) -> None:
        """C{RCPT TO:} with a 65-octet local part is refused with 501 5.1.3."""
        with self.assertRaises(Reply) as cm:
            parse_path_argument("TO:<" + "x" * 65 + "@example.org>", "TO", sender=False)
        self.assertReply(cm.exception, 501, "5.1.3")

    def test_domain_too_long_gets_501(self) -> None:
        """A domain over 255 octets is refused."""
        domain = ".".join(["d" * 63] * 5)
        with self.assertRaises(Reply) as cm:
            parse_mailbox(f"a@{domain}")
        self.assertReply(cm.exception, 501, "5.1.3")

    def test_bad_syntax_samples_get_501(self) -> None:
        """Missing parts, bad dots, bad labels and spaces are refused with 501."""
        for text in (
            "no-at-sign",
            "@example.org",
            "alice@",
            "a..b@example.org",
            ".a@example.org",
            "a.@example.org",
            "a b@example.org",
            "a@-example.org",
            "a@example-.org",
            "a@example..org",
            "a@exa mple.org",
            '"unterminated@example.org',
        ):
            with self.assertRaises(Reply, msg=text) as cm:
                parse_mailbox(text)
            self.assertReply(cm.exception, 501, "5.1.3")

    def test_enhanced_code_given_by_caller(self) -> None:
        """The caller chooses the enhanced code (sender or recipient syntax)."""
        with self.assertRaises(Reply) as cm:
            parse_mailbox("bad", "5.1.7")
        self.assertReply(cm.exception, 501, "5.1.7")

    def test_address_literals(self) -> None:
        """IPv4 and IPv6 address literals are accepted as domains."""
        self.assertEqual(parse_mailbox("a@[192.0.2.1]"), "a@[192.0.2.1]")
        self.assertEqual(parse_mailbox("a@[IPv6:2001:db8::1]").lower(), "a@[ipv6:2001:db8::1]")

    def test_split_address_splits_at_last_at(self) -> None:
        """L{split_address} splits at the last C{@}, so a quoted C{@} stays local."""
        self.assertEqual(split_address('"a@b"@example.org'), ('"a@b"', "example.org"))
        self.assertEqual(split_address("postmaster"), ("", "postmaster"))


class ParseParamsTests(_ReplyAssertions):
    """L{parse_params}: ESMTP parameters."""

    def test_empty(self) -> None:
        """No text, or only spaces, means no parameters."""
        self.assertEqual(parse_params(""), {})
        self.assertEqual(parse_params("   "), {})

    def test_names_are_upper_cased_values_kept(self) -> None:
        """Names are folded to upper case; values keep their case."""
        self.assertEqual(
            parse_params(" size=100 body=8bitMime x-Foo=Bar"),
            {"SIZE": "100", "BODY": "8bitMime", "X-FOO": "Bar"},
        )

    def test_parameter_without_value_is_none(self) -> None:
        """A keyword alone (C{SMTPUTF8}) has the value C{None}."""
        self.assertEqual(parse_params("SMTPUTF8"), {"SMTPUTF8": None})

    def test_several_spaces_between_parameters(self) -> None:
        """Extra spaces between parameters are tolerated."""
        self.assertEqual(parse_params("A=1   B"), {"A": "1", "B": None})

    def test_duplicate_gets_501(self) -> None:
        """A repeated parameter is refused with 501 5.5.2."""
        for text in ("SIZE=1 SIZE=2", "SIZE=1 size=1", "SMTPUTF8 smtputf8"):
            with self.assertRaises(Reply, msg=text) as cm:
                parse_params(text)
            self.assertReply(cm.exception, 501, "5.5.2")

    def test_bad_syntax_gets_501(self) -> None:
        """Empty names, empty values, C{=} inside values and a bad first character: 501."""
        for text in ("=1", "A=", "A=b=c", "-A", "A\tB", "A=\x7f"):
            with self.assertRaises(Reply, msg=text) as cm:
                parse_params(text)
            self.assertReply(cm.exception, 501, "5.5.2")

    def test_utf8_value_accepted(self) -> None:
        """RFC 6531 allows UTF-8 in parameter values."""
        self.assertEqual(parse_params("ENVID=é"), {"ENVID": "é"})


class RequireAsciiTests(_ReplyAssertions):
    """L{require_ascii} and L{unknown_parameter}."""

    def test_ascii_address_is_fine_either_way(self) -> None:
        """An ASCII address needs no SMTPUTF8."""
        require_ascii("bob@example.com", False)
        require_ascii("bob@example.com", True)
        require_ascii("", False)

    def test_non_ascii_without_smtputf8_gets_553_5_6_7(self) -> None:
        """RFC 6531 §3.7.5: a non-ASCII address without SMTPUTF8 gets 553 5.6.7."""
        with self.assertRaises(Reply) as cm:
            require_ascii("jörg@example.de", False)
        self.assertReply(cm.exception, 553, "5.6.7")

    def test_non_ascii_with_smtputf8_is_accepted(self) -> None:
        """With SMTPUTF8 declared, a non-ASCII address passes."""
        require_ascii("jörg@bücher.de", True)

    def test_unknown_parameter_is_555_5_5_4(self) -> None:
        """An unimplemented parameter gets 555 (RFC 5321 §4.1.1.11) with 5.5.4."""
        reply = unknown_parameter("FOO")
        self.assertReply(reply, 555, "5.5.4")
        self.assertIn(b"FOO", reply.line())


class XtextTests(SynchronousTestCase):
    """RFC 3461 §4 xtext."""

    def test_decode(self) -> None:
        self.assertEqual(xtext_decode(""), "")
        self.assertEqual(xtext_decode("plain!~"), "plain!~")
        self.assertEqual(xtext_decode("a+2Bb+3Dc+20d"), "a+b=c d")
        self.assertEqual(xtext_decode("+2b"), "+")

    def test_decode_refuses(self) -> None:
        """A lone C{+}, a bad hex pair, a raw C{=}, a space, a control or non-ASCII character."""
        for bad in ("a+", "a+2", "a+ZZ", "a=b", "a b", "a\x01", "\u00e9"):
            self.assertRaises(ValueError, xtext_decode, bad)

    def test_round_trip(self) -> None:
        text = "id+1=2 <x@y>"
        self.assertEqual(xtext_encode(text), "id+2B1+3D2+20<x@y>")
        self.assertEqual(xtext_decode(xtext_encode(text)), text)


class DSNParameterTests(_ReplyAssertions):
    """RET, ENVID, NOTIFY and ORCPT values; every refusal is 501 5.5.4."""

    def refused(self, parse: object, value: str | None) -> None:
        e = self.assertRaises(Reply, parse, value)
        self.assertReply(e, 501, "5.5.4")

    def test_ret(self) -> None:
        self.assertEqual(parse_ret("full"), "FULL")
        self.assertEqual(parse_ret("HDRS"), "HDRS")
        for bad in (None, "", "ALL"):
            self.refused(parse_ret, bad)

    def test_envid(self) -> None:
        self.assertEqual(parse_envid("abc+2Bdef"), "abc+def")
        self.assertEqual(parse_envid("x" * 100), "x" * 100)
        for bad in (None, "", "x" * 101, "a+ZZ", "a+0D+0Ab"):
            self.refused(parse_envid, bad)

    def test_notify(self) -> None:
        self.assertEqual(parse_notify("NEVER"), frozenset({"NEVER"}))
        self.assertEqual(
            parse_notify("success,Failure,DELAY"), frozenset({"SUCCESS", "FAILURE", "DELAY"})
        )
        self.assertEqual(parse_notify("DELAY"), frozenset({"DELAY"}))
        for bad in (None, "", "NEVER,SUCCESS", "SUCCESS,", "ALWAYS", "SUCCESS;FAILURE"):
            self.refused(parse_notify, bad)

    def test_orcpt(self) -> None:
        """Type folded to lower case, address decoded from xtext."""
        self.assertEqual(parse_orcpt("rfc822;bob@example.org"), "rfc822;bob@example.org")
        self.assertEqual(parse_orcpt("RFC822;b+2Bx@example.org"), "rfc822;b+x@example.org")
        self.assertEqual(parse_orcpt("rfc822;a+20b@x"), "rfc822;a b@x")

    def test_orcpt_utf8_kept_as_sent(self) -> None:
        """RFC 6533's utf-8 type is kept in its own encoding, not read as xtext."""
        self.assertEqual(
            parse_orcpt("utf-8;j\\x{00F6}rg@example.org"), "utf-8;j\\x{00F6}rg@example.org"
        )

    def test_orcpt_refused(self) -> None:
        for bad in (
            None,
            "",
            "bob@example.org",
            "rfc822;",
            ";bob@example.org",
            "rfc 822;bob@example.org",
            "rfc822;b+ZZ@example.org",
            "rfc822;b+0A@example.org",
            "rfc822;" + "x" * 500,
        ):
            self.refused(parse_orcpt, bad)
