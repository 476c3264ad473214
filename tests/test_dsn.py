"""Tests for L{mailserver.queue.dsn}: notices parsed back with the stdlib C{email} package."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailserver.queue.dsn import (
    Original,
    Report,
    build_notice,
    compose,
    header_section,
    status_of,
    wanted,
)
from mailserver.queue.model import QueuedRecipient

ORIGINAL = (
    b"Received: from client by mail.example.org\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"Shall we?\r\n"
)
FAILED = Report(
    address="bob@example.net",
    action="failed",
    status="5.1.1",
    orcpt="rfc822;Bob@Example.NET",
    remote_mta="mx.example.net[192.0.2.1]",
    diagnostic="550 5.1.1 no such user",
)


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data)


def status_blocks(msg: Any) -> list[Any]:
    """The field blocks of the delivery-status part: per-message first, then per recipient."""
    part = msg.get_payload()[1]
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


class NoticeTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.write_bytes(ORIGINAL)

    def notice(self, kind: Any = "failure", reports: Any = (FAILED,), **kw: Any) -> Any:
        original = Original(
            queue_id="q1",
            sender=kw.pop("sender", "alice@example.org"),
            received=1_700_000_000.0,
            envid=kw.pop("envid", "env-42"),
            ret=kw.pop("ret", None),
            smtputf8=kw.pop("smtputf8", False),
        )
        self.raw = build_notice(
            kind,
            original,
            list(reports),
            self.path,
            hostname="mail.example.org",
            notice_id="q1.f1",
            now=1_700_003_600.0,
            **kw,
        )
        return parse(self.raw)


class FailureNoticeTests(NoticeTestCase):
    def test_headers(self) -> None:
        """
        From MAILER-DAEMON to the sender, auto-replied (RFC 3834), a multipart/report of type
        delivery-status with a fresh Message-ID and a Date.
        """
        msg = self.notice()
        self.assertEqual(msg["From"], "Mail Delivery System <MAILER-DAEMON@mail.example.org>")
        self.assertEqual(msg["To"], "<alice@example.org>")
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertEqual(msg["Message-ID"], "<q1.f1@mail.example.org>")
        self.assertIn("2023", msg["Date"])
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        parts = msg.get_payload()
        self.assertEqual(
            [p.get_content_type() for p in parts],
            ["text/plain", "message/delivery-status", "message/rfc822"],
        )
        self.assertFalse(msg.defects)
        self.assertTrue(all(line.endswith(b"\r") or not line for line in self.raw.split(b"\n")))

    def test_report_fields(self) -> None:
        """The RFC 3464 fields: per message and per recipient."""
        msg = self.notice()
        per_message, per_rcpt = status_blocks(msg)
        self.assertEqual(per_message["Reporting-MTA"], "dns; mail.example.org")
        self.assertEqual(per_message["Original-Envelope-Id"], "env-42")
        self.assertEqual(per_message["Arrival-Date"], "Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertEqual(per_rcpt["Final-Recipient"], "rfc822; bob@example.net")
        self.assertEqual(per_rcpt["Original-Recipient"], "rfc822; Bob@Example.NET")
        self.assertEqual(per_rcpt["Action"], "failed")
        self.assertEqual(per_rcpt["Status"], "5.1.1")
        self.assertEqual(per_rcpt["Remote-MTA"], "dns; mx.example.net")
        self.assertEqual(per_rcpt["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertIsNone(per_rcpt["Will-Retry-Until"])

    def test_human_part(self) -> None:
        """The first part says in English which recipient failed and what the host said."""
        msg = self.notice()
        text = msg.get_payload()[0].get_payload()
        self.assertIn("could not be delivered", text)
        self.assertIn("<bob@example.net>: host mx.example.net[192.0.2.1] said: 550 5.1.1", text)
        self.assertIn("Your message is attached.", text)

    def test_full_message_returned(self) -> None:
        """Without RET (or RET=FULL) the whole original comes back as message/rfc822."""
        for ret in (None, "FULL"):
            msg = self.notice(ret=ret)
            returned = msg.get_payload()[2].get_payload()[0]
            self.assertEqual(returned["Subject"], "lunch")
            self.assertEqual(returned.get_payload(), "Shall we?\r\n")
            self.assertTrue(self.raw.endswith(b"Shall we?\r\n\r\n--" + self.boundary() + b"--\r\n"))

    def boundary(self) -> bytes:
        b: str = parse(self.raw).get_boundary()
        return b.encode()

    def test_ret_hdrs(self) -> None:
        """RET=HDRS returns only the headers, as text/rfc822-headers."""
        msg = self.notice(ret="HDRS")
        part = msg.get_payload()[2]
        self.assertEqual(part.get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: lunch", part.get_payload())
        self.assertNotIn(b"Shall we?", self.raw)
        self.assertIn("headers of your message are attached", msg.get_payload()[0].get_payload())

    def test_large_original_headers_only(self) -> None:
        """An original over the limit is returned as headers only, and the text says why."""
        msg = self.notice(limit=len(ORIGINAL) - 1)
        self.assertEqual(msg.get_payload()[2].get_content_type(), "text/rfc822-headers")
        self.assertIn("too large", msg.get_payload()[0].get_payload())
        self.assertNotIn(b"Shall we?", self.raw)

    def test_no_envid_no_orcpt(self) -> None:
        """Without ENVID and ORCPT those fields are left out."""
        report = Report("bob@example.net", "failed", "5.0.0", detail="no MX or A record")
        msg = self.notice(reports=[report], envid=None)
        per_message, per_rcpt = status_blocks(msg)
        self.assertIsNone(per_message["Original-Envelope-Id"])
        self.assertIsNone(per_rcpt["Original-Recipient"])
        self.assertIsNone(per_rcpt["Diagnostic-Code"])
        self.assertIsNone(per_rcpt["Remote-MTA"])
        self.assertIn("<bob@example.net>: no MX or A record", msg.get_payload()[0].get_payload())

    def test_several_recipients(self) -> None:
        """One notice names every recipient given, each in its own block."""
        other = Report("carol@example.net", "failed", "4.4.7", detail="not delivered in time")
        msg = self.notice(reports=[FAILED, other])
        blocks = status_blocks(msg)
        self.assertEqual(
            [b["Final-Recipient"] for b in blocks[1:]],
            ["rfc822; bob@example.net", "rfc822; carol@example.net"],
        )
        self.assertEqual(blocks[2]["Status"], "4.4.7")

    def test_no_header_injection(self) -> None:
        """A remote reply with CR LF in it stays on its field's line."""
        evil = Report(
            "bob@example.net",
            "failed",
            "5.0.0",
            diagnostic="550 no\r\nAction: delivered\r\nX-Evil: 1",
            remote_mta="mx\r\nX-Evil: 2",
        )
        msg = self.notice(reports=[evil])
        per_rcpt = status_blocks(msg)[1]
        self.assertEqual(per_rcpt.get_all("Action"), ["failed"])
        self.assertIsNone(per_rcpt["X-Evil"])
        self.assertEqual(per_rcpt["Diagnostic-Code"], "smtp; 550 no Action: delivered X-Evil: 1")


class OtherNoticeTests(NoticeTestCase):
    def test_delay_notice(self) -> None:
        """A delay notice: Action delayed, Will-Retry-Until, headers only."""
        report = Report(
            "bob@example.net",
            "delayed",
            "4.3.0",
            remote_mta="mx.example.net[192.0.2.1]",
            diagnostic="451 4.3.0 try later",
            will_retry_until=1_700_432_000.0,
        )
        msg = self.notice("delay", [report])
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        per_rcpt = status_blocks(msg)[1]
        self.assertEqual(per_rcpt["Action"], "delayed")
        self.assertEqual(per_rcpt["Status"], "4.3.0")
        self.assertEqual(per_rcpt["Will-Retry-Until"], "Sun, 19 Nov 2023 22:13:20 GMT")
        self.assertEqual(msg.get_payload()[2].get_content_type(), "text/rfc822-headers")
        text = msg.get_payload()[0].get_payload()
        self.assertIn("keep trying until Sun, 19 Nov 2023", text)
        self.assertNotIn(b"Shall we?", self.raw)

    def test_relayed_notice(self) -> None:
        """NOTIFY=SUCCESS to a next hop without DSN: Action relayed, headers only."""
        report = Report(
            "bob@example.net",
            "relayed",
            "2.0.0",
            remote_mta="mx.example.net[192.0.2.1]",
            diagnostic="250 2.0.0 queued",
        )
        msg = self.notice("relayed", [report])
        per_rcpt = status_blocks(msg)[1]
        self.assertEqual(per_rcpt["Action"], "relayed")
        self.assertEqual(per_rcpt["Status"], "2.0.0")
        self.assertEqual(msg.get_payload()[2].get_content_type(), "text/rfc822-headers")
        self.assertIn("does not send delivery notifications", msg.get_payload()[0].get_payload())

    def test_utf8_addresses(self) -> None:
        """
        With SMTPUTF8, the report is message/global-delivery-status and a non-ASCII address
        has the utf-8 address type (RFC 6533).
        """
        report = Report("dörte@example.net", "failed", "5.1.1", diagnostic="550 5.1.1 unknown")
        msg = self.notice(reports=[report], smtputf8=True, sender="jörg@example.org")
        self.assertEqual(msg.get_param("report-type"), "global-delivery-status")
        parts = msg.get_payload()
        self.assertEqual(parts[1].get_content_type(), "message/global-delivery-status")
        self.assertEqual(parts[2].get_content_type(), "message/global")
        self.assertIn("Final-Recipient: utf-8; dörte@example.net".encode(), self.raw)
        self.assertIn("To: <jörg@example.org>".encode(), self.raw)
        self.assertIn(b"Content-Transfer-Encoding: 8bit", self.raw)


class RuleTests(SynchronousTestCase):
    def test_never_to_null_sender(self) -> None:
        """No notice of any kind goes to the null sender (that is also what stops loops)."""
        everything = QueuedRecipient("b@x", frozenset({"SUCCESS", "FAILURE", "DELAY"}))
        for kind in ("SUCCESS", "FAILURE", "DELAY"):
            self.assertFalse(wanted("", everything, kind))  # type: ignore[arg-type]
            self.assertTrue(wanted("a@y", everything, kind))  # type: ignore[arg-type]

    def test_notify_never(self) -> None:
        """NOTIFY=NEVER: no notice at all."""
        never = QueuedRecipient("b@x", frozenset({"NEVER"}))
        for kind in ("SUCCESS", "FAILURE", "DELAY"):
            self.assertFalse(wanted("a@y", never, kind))  # type: ignore[arg-type]

    def test_default_notify(self) -> None:
        """No NOTIFY: FAILURE and DELAY notices, no SUCCESS (RFC 3461 §4.1)."""
        default = QueuedRecipient("b@x")
        self.assertTrue(wanted("a@y", default, "FAILURE"))
        self.assertTrue(wanted("a@y", default, "DELAY"))
        self.assertFalse(wanted("a@y", default, "SUCCESS"))

    def test_status_of(self) -> None:
        """The status is the reply's enhanced code of the same class, else from the code."""
        self.assertEqual(status_of(550, "5.1.1 no such user", "failed"), "5.1.1")
        self.assertEqual(status_of(550, "no such user", "failed"), "5.0.0")
        self.assertEqual(status_of(550, "4.1.1 mixed up", "failed"), "5.0.0")
        self.assertEqual(status_of(451, "4.3.0 later", "delayed"), "4.3.0")
        self.assertEqual(status_of(0, "connection refused", "delayed"), "4.0.0")
        self.assertEqual(status_of(0, "5.1.10 null MX", "failed"), "5.1.10")
        self.assertEqual(status_of(0, "", "failed"), "5.0.0")
        self.assertEqual(status_of(250, "2.0.0 ok", "relayed"), "2.0.0")
        self.assertEqual(status_of(250, "ok 5.5.5", "relayed"), "2.0.0")

    def test_header_section(self) -> None:
        """The header section ends before the empty line; all of it when there is none."""
        self.assertEqual(header_section(b"A: 1\r\n\r\nbody"), b"A: 1\r\n")
        self.assertEqual(header_section(b"A: 1\r\n"), b"A: 1\r\n")
        self.assertEqual(header_section(b"\r\nbody"), b"")

    def test_compose_is_pure(self) -> None:
        """C{compose} builds a notice from bytes given, without any file."""
        original = Original("q1", "a@example.org", 0.0)
        data = compose(
            "failure",
            original,
            [FAILED],
            b"Subject: x\r\n",
            None,
            hostname="h.example",
            notice_id="n1",
            now=0.0,
        )
        msg = parse(data)
        self.assertEqual(msg.get_payload()[2].get_payload().strip(), "Subject: x")
