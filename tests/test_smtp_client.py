"""
Tests for L{mailserver.smtp.client}: the client's state machine over a C{StringTransport}
with a L{Clock}: what it writes (and in how many writes), how replies map to per-recipient
results, the extension rules, dot-stuffing and line-ending canonicalisation.

Real connections (TLS, AUTH, loopback sinks) are in L{tests.test_queue_delivery}.
"""

from __future__ import annotations

import base64
import dataclasses
import random
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailserver.queue.model import Outgoing, QueuedRecipient, RcptResult
from mailserver.smtp.client import (
    SMALL_BODY,
    BodyFramer,
    ClientSettings,
    SessionError,
    SMTPClient,
    xtext,
)

SEED = 20240607
GREETING = b"220 mx.example.test ESMTP\r\n"
ALL_EXT = ["PIPELINING", "SIZE 1000000", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"]
BODY = b"Subject: hi\r\n\r\nHello.\r\n"


class RecordingTransport(StringTransport):
    """A StringTransport that also keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def take(self) -> bytes:
        out: bytes = self.value()
        self.clear()
        self.writes = []
        return out


def ehlo_reply(extensions: list[str]) -> bytes:
    lines = ["mx.example.test greets client.test", *extensions]
    return b"".join(
        f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode()
        for i, line in enumerate(lines)
    )


def results_of(d: Any) -> list[RcptResult]:
    out: list[RcptResult] = []
    d.addCallback(out.extend)
    return out


class ClientTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.count = 0

    def message(
        self,
        body: bytes = BODY,
        rcpts: tuple[str, ...] = ("alice@example.test",),
        **kw: Any,
    ) -> Outgoing:
        self.count += 1
        path = self.dir / f"m{self.count}"
        path.write_bytes(body)
        recipients = kw.pop("recipients", None) or tuple(QueuedRecipient(r) for r in rcpts)
        return Outgoing(
            queue_id=f"q{self.count}",
            sender=kw.pop("sender", "sender@here.test"),
            recipients=recipients,
            path=path,
            size=len(body),
            **kw,
        )

    def connect(
        self, extensions: list[str] | None = ALL_EXT, **settings: Any
    ) -> tuple[SMTPClient, RecordingTransport]:
        """A client past the greeting and EHLO (C{extensions} None: EHLO refused, HELO)."""
        client = SMTPClient(
            self.clock, ClientSettings("client.test", **settings), "mx.example.test", "192.0.2.1"
        )
        transport = RecordingTransport()
        client.makeConnection(transport)
        client.dataReceived(GREETING)
        self.assertEqual(transport.take(), b"EHLO client.test\r\n")
        if extensions is None:
            client.dataReceived(b"502 5.5.1 no EHLO here\r\n")
            self.assertEqual(transport.take(), b"HELO client.test\r\n")
            client.dataReceived(b"250 mx.example.test\r\n")
        else:
            client.dataReceived(ehlo_reply(extensions))
        return client, transport

    def ready(self, client: SMTPClient) -> None:
        self.successResultOf(client.ready)


class SessionSetupTests(ClientTestCase):
    def test_ready(self) -> None:
        client, _ = self.connect()
        self.ready(client)
        self.assertTrue(client.usable)
        self.assertEqual(client.extensions["SIZE"], "1000000")
        self.assertIn("PIPELINING", client.extensions)
        self.assertEqual(client.label, "mx.example.test[192.0.2.1]")

    def test_helo_fallback(self) -> None:
        """EHLO answered 5xx: HELO, and no extension is used."""
        client, transport = self.connect(None)
        self.ready(client)
        self.assertEqual(client.extensions, {})
        results = results_of(client.deliver(self.message(eight_bit=False)))
        self.assertEqual(transport.take(), b"MAIL FROM:<sender@here.test>\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual(transport.take(), b"RCPT TO:<alice@example.test>\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual(transport.take(), b"DATA\r\n")
        client.dataReceived(b"354 go\r\n")
        self.assertEqual(transport.take(), BODY + b".\r\n")
        client.dataReceived(b"250 queued\r\n")
        self.assertEqual([r.outcome for r in results], ["sent"])

    def _refused_greeting(self, line: bytes) -> SessionError:
        client = SMTPClient(self.clock, ClientSettings("client.test"), "mx", "192.0.2.1")
        transport = RecordingTransport()
        client.makeConnection(transport)
        client.dataReceived(line)
        error = self.failureResultOf(client.ready, SessionError).value
        assert isinstance(error, SessionError)
        self.assertEqual(transport.value(), b"QUIT\r\n")
        self.assertTrue(transport.disconnecting)
        return error

    def test_greeting_421(self) -> None:
        error = self._refused_greeting(b"421 4.3.2 busy\r\n")
        self.assertEqual(error.code, 421)
        self.assertIn("mx[192.0.2.1]", error.text)
        self.assertIn("421 4.3.2 busy", error.text)

    def test_greeting_554(self) -> None:
        self.assertEqual(self._refused_greeting(b"554 no mail here\r\n").code, 554)

    def test_greeting_timeout(self) -> None:
        """No greeting within connect_timeout: the connection is dropped, the host unusable."""
        client = SMTPClient(
            self.clock, ClientSettings("client.test", connect_timeout=30), "mx", "192.0.2.1"
        )
        transport = RecordingTransport()
        client.makeConnection(transport)
        self.clock.advance(29)
        self.assertNoResult(client.ready)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)
        client.connectionLost(Failure(ConnectionLost()))
        error = self.failureResultOf(client.ready, SessionError).value
        self.assertIn("timeout waiting for the greeting", str(error))

    def test_ehlo_4xx(self) -> None:
        client = SMTPClient(self.clock, ClientSettings("client.test"), "mx", "192.0.2.1")
        client.makeConnection(RecordingTransport())
        client.dataReceived(GREETING)
        client.dataReceived(b"421 4.7.0 go away\r\n")
        self.assertEqual(self.failureResultOf(client.ready, SessionError).value.code, 421)

    def test_tls_required_not_offered(self) -> None:
        client, _ = self.connect(tls="starttls", tls_name="mx.example.test")
        error = self.failureResultOf(client.ready, SessionError).value
        self.assertIn("TLS required but not offered", str(error))

    def test_opportunistic_without_starttls(self) -> None:
        """STARTTLS not offered and not required: go on in plain text."""
        client, _ = self.connect(tls="opportunistic")
        self.ready(client)
        self.assertFalse(client.tls_active)

    def test_auth_plain(self) -> None:
        client, transport = self.connect(
            [*ALL_EXT, "AUTH LOGIN PLAIN"], tls="none", auth=("u", "p w")
        )
        token = base64.b64encode(b"\0u\0p w")
        self.assertEqual(transport.take(), b"AUTH PLAIN " + token + b"\r\n")
        self.assertNoResult(client.ready)
        client.dataReceived(b"235 2.7.0 ok\r\n")
        self.ready(client)
        self.assertTrue(client.authenticated)

    def test_auth_refused(self) -> None:
        client, _ = self.connect(["AUTH PLAIN"], tls="none", auth=("u", "p"))
        client.dataReceived(b"535 5.7.8 bad credentials\r\n")
        error = self.failureResultOf(client.ready, SessionError).value
        assert isinstance(error, SessionError)
        self.assertEqual(error.code, 535)

    def test_no_password_in_clear(self) -> None:
        """With opportunistic TLS that did not happen, the password is not sent."""
        client, transport = self.connect(["AUTH PLAIN"], tls="opportunistic", auth=("u", "p"))
        error = self.failureResultOf(client.ready, SessionError).value
        self.assertIn("without TLS", str(error))
        self.assertNotIn(b"AUTH", transport.value())

    def test_auth_not_offered(self) -> None:
        client, _ = self.connect(ALL_EXT, tls="none", auth=("u", "p"))
        self.assertIn("AUTH PLAIN", str(self.failureResultOf(client.ready, SessionError).value))

    def test_multiline_and_malformed(self) -> None:
        """A reply line that is not a reply ends the session."""
        client, transport = self.connect()
        self.ready(client)
        results = results_of(client.deliver(self.message()))
        client.dataReceived(b"250-first\r\n250 second\r\nhello there\r\n")
        self.assertTrue(transport.disconnected)
        client.connectionLost(Failure(ConnectionLost()))
        self.assertEqual([r.outcome for r in results], ["deferred"])
        self.assertIn("malformed reply", results[0].text)

    def test_quit(self) -> None:
        client, transport = self.connect()
        self.ready(client)
        closed = client.quit()
        self.assertEqual(transport.take(), b"QUIT\r\n")
        self.assertFalse(transport.disconnecting)
        client.dataReceived(b"221 2.0.0 bye\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(closed)
        client.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(closed)


class TransactionTests(ClientTestCase):
    def test_pipelined_in_one_write(self) -> None:
        """With PIPELINING, MAIL, every RCPT and DATA leave in one write."""
        client, transport = self.connect()
        self.ready(client)
        msg = self.message(rcpts=("a@example.test", "b@example.test", "c@example.test"))
        results = results_of(client.deliver(msg))
        self.assertEqual(
            transport.writes,
            [
                b"MAIL FROM:<sender@here.test> SIZE=%d\r\n" % len(BODY)
                + b"RCPT TO:<a@example.test>\r\n"
                + b"RCPT TO:<b@example.test>\r\n"
                + b"RCPT TO:<c@example.test>\r\n"
                + b"DATA\r\n"
            ],
        )
        transport.take()
        client.dataReceived(
            b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n451 4.2.0 later\r\n"
            b"354 go ahead\r\n"
        )
        self.assertEqual(transport.writes, [BODY + b".\r\n"])
        self.assertEqual(results, [])
        client.dataReceived(b"250 2.0.0 queued as X\r\n")
        self.assertEqual(
            [(r.address, r.outcome, r.code, r.text) for r in results],
            [
                ("a@example.test", "sent", 250, "2.0.0 queued as X"),
                ("b@example.test", "failed", 550, "5.1.1 no such user"),
                ("c@example.test", "deferred", 451, "4.2.0 later"),
            ],
        )
        self.assertEqual({r.host for r in results}, {"mx.example.test[192.0.2.1]"})
        self.assertEqual([r.dsn_relayed for r in results], [True, False, False])
        self.assertTrue(client.usable)

    def test_lock_step(self) -> None:
        """Without PIPELINING each command waits for the previous reply."""
        client, transport = self.connect(["8BITMIME"])
        self.ready(client)
        results = results_of(client.deliver(self.message(rcpts=("a@example.test", "b@x.test"))))
        self.assertEqual(transport.take(), b"MAIL FROM:<sender@here.test>\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual(transport.take(), b"RCPT TO:<a@example.test>\r\n")
        client.dataReceived(b"550 5.1.1 unknown\r\n")
        self.assertEqual(transport.take(), b"RCPT TO:<b@x.test>\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual(transport.take(), b"DATA\r\n")
        client.dataReceived(b"354 go\r\n")
        self.assertEqual(transport.take(), BODY + b".\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual([r.outcome for r in results], ["failed", "sent"])
        self.assertEqual([r.dsn_relayed for r in results], [False, False])

    def test_mail_refused_applies_to_all(self) -> None:
        client, transport = self.connect()
        self.ready(client)
        results = results_of(client.deliver(self.message(rcpts=("a@x.test", "b@x.test"))))
        transport.take()
        client.dataReceived(
            b"550 5.7.1 sender refused\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n"
            b"503 5.5.1 no MAIL\r\n"
        )
        self.assertEqual(transport.take(), b"RSET\r\n")
        client.dataReceived(b"250 2.0.0 reset\r\n")
        self.assertEqual(
            [(r.outcome, r.code, r.text) for r in results],
            [("failed", 550, "5.7.1 sender refused")] * 2,
        )
        self.assertTrue(client.usable)

    def test_mail_4xx_defers_all(self) -> None:
        client, transport = self.connect(["SIZE"])
        self.ready(client)
        results = results_of(client.deliver(self.message(rcpts=("a@x.test", "b@x.test"))))
        transport.take()
        client.dataReceived(b"452 4.3.1 insufficient storage\r\n")
        self.assertEqual(transport.take(), b"RSET\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual([r.outcome for r in results], ["deferred", "deferred"])

    def test_no_recipient_accepted(self) -> None:
        """Every RCPT refused: no content is sent, the transaction is reset."""
        client, transport = self.connect()
        self.ready(client)
        results = results_of(client.deliver(self.message()))
        transport.take()
        client.dataReceived(b"250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n")
        self.assertEqual(transport.take(), b"RSET\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual([(r.outcome, r.code) for r in results], [("failed", 550)])

    def test_data_end_refused(self) -> None:
        """A refusal after the content applies to every accepted recipient; RSET follows."""
        client, transport = self.connect()
        self.ready(client)
        results = results_of(client.deliver(self.message(rcpts=("a@x.test", "b@x.test"))))
        transport.take()
        client.dataReceived(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        transport.take()
        client.dataReceived(b"554 5.7.1 spam\r\n")
        self.assertEqual(transport.take(), b"RSET\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual([(r.outcome, r.code) for r in results], [("failed", 554), ("failed", 550)])

    def test_data_end_temporary(self) -> None:
        client, transport = self.connect()
        self.ready(client)
        results = results_of(client.deliver(self.message()))
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n451 4.3.0 later\r\n")
        client.dataReceived(b"250 ok\r\n")  # RSET
        self.assertEqual([(r.outcome, r.code) for r in results], [("deferred", 451)])

    def test_data_refused(self) -> None:
        client, transport = self.connect()
        self.ready(client)
        results = results_of(client.deliver(self.message()))
        client.dataReceived(b"250 ok\r\n250 ok\r\n451 4.3.0 not now\r\n")
        self.assertEqual(transport.value().count(BODY), 0)
        client.dataReceived(b"250 ok\r\n")  # RSET
        self.assertEqual([(r.outcome, r.code) for r in results], [("deferred", 451)])

    def test_connection_lost_mid_transaction(self) -> None:
        """Lost after the content: accepted recipients are deferred, refused ones stay."""
        client, transport = self.connect()
        self.ready(client)
        results = results_of(client.deliver(self.message(rcpts=("a@x.test", "b@x.test"))))
        client.dataReceived(b"250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(results, [])
        client.connectionLost(Failure(ConnectionLost()))
        self.assertEqual([r.outcome for r in results], ["failed", "deferred"])
        self.assertIn("mx.example.test[192.0.2.1]", results[1].text)
        self.assertEqual(results[1].code, 0)
        self.assertFalse(client.usable)
        later = results_of(client.deliver(self.message()))
        self.assertEqual([r.outcome for r in later], ["deferred"])

    def test_reply_timeout(self) -> None:
        client, transport = self.connect(command_timeout=300)
        self.ready(client)
        results = results_of(client.deliver(self.message()))
        client.dataReceived(b"250 ok\r\n")
        self.clock.advance(299)
        self.assertFalse(transport.disconnected)
        client.dataReceived(b"250 ok\r\n")  # each reply restarts the time
        self.clock.advance(299)
        self.assertFalse(transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)
        client.connectionLost(Failure(ConnectionLost()))
        self.assertEqual([r.outcome for r in results], ["deferred"])
        self.assertIn("timeout waiting for the reply to DATA", results[0].text)

    def test_reuse(self) -> None:
        """Several messages, one after the other, on one session."""
        client, transport = self.connect()
        self.ready(client)
        for n in range(3):
            results = results_of(client.deliver(self.message()))
            client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok %d\r\n" % n)
            self.assertEqual([(r.outcome, r.text) for r in results], [("sent", f"ok {n}")])
        self.assertEqual(transport.value().count(b"MAIL FROM"), 3)
        self.assertEqual(client.messages, 3)

    def test_idle_between_transactions(self) -> None:
        """Idle (cacheable) only between transactions, with nothing awaited."""
        client, transport = self.connect()
        self.ready(client)
        self.assertTrue(client.idle)
        results = results_of(client.deliver(self.message()))
        self.assertFalse(client.idle)
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertFalse(client.idle)
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual([r.outcome for r in results], ["sent"])
        self.assertTrue(client.idle)
        self.assertEqual(client.mail_reply.code if client.mail_reply else None, 250)
        client.connectionLost(Failure(ConnectionLost()))
        self.assertFalse(client.idle)

    def test_mail_reply_when_lost(self) -> None:
        """The connection lost before MAIL's reply: mail_reply says no reply came (code 0)."""
        client, transport = self.connect()
        self.ready(client)
        results = results_of(client.deliver(self.message()))
        client.connectionLost(Failure(ConnectionLost()))
        self.assertEqual([r.outcome for r in results], ["deferred"])
        assert client.mail_reply is not None
        self.assertEqual(client.mail_reply.code, 0)
        later = results_of(client.deliver(self.message()))
        self.assertEqual([r.outcome for r in later], ["deferred"])
        self.assertIsNone(client.mail_reply)  # that one sent no MAIL

    def test_unsolicited_reply_ends_session(self) -> None:
        """A reply while nothing is awaited (a 421 idle timeout): the session is over."""
        client, transport = self.connect()
        self.ready(client)
        client.dataReceived(b"421 4.4.2 mx.example.test idle too long\r\n")
        self.assertFalse(client.usable)
        self.assertFalse(client.idle)
        self.assertTrue(transport.disconnecting)
        client.connectionLost(Failure(ConnectionLost()))
        results = results_of(client.deliver(self.message()))
        self.assertEqual([r.outcome for r in results], ["deferred"])
        self.assertIn("idle too long", results[0].text)

    def test_unreadable_file(self) -> None:
        client, transport = self.connect()
        self.ready(client)
        msg = self.message()
        msg.path.unlink()
        results = results_of(client.deliver(msg))
        self.assertEqual([r.outcome for r in results], ["deferred"])
        self.assertEqual(transport.value(), b"")


class ParameterTests(ClientTestCase):
    def test_dsn_and_all_parameters(self) -> None:
        client, transport = self.connect()
        self.ready(client)
        rcpts = (
            QueuedRecipient(
                "bob@example.test",
                notify=frozenset({"FAILURE", "SUCCESS"}),
                orcpt="rfc822;bob+x=y@example.test",
            ),
            QueuedRecipient("carol@example.test", notify=frozenset({"NEVER"})),
            QueuedRecipient("dan@example.test"),
        )
        msg = self.message(
            recipients=rcpts, envid="id+1 x", ret="HDRS", eight_bit=True, smtputf8=True
        )
        client.deliver(msg)
        self.assertEqual(
            transport.take().split(b"\r\n")[:-2],
            [
                b"MAIL FROM:<sender@here.test> SIZE=%d BODY=8BITMIME SMTPUTF8 RET=HDRS"
                b" ENVID=id+2B1+20x" % len(BODY),
                b"RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE"
                b" ORCPT=rfc822;bob+2Bx+3Dy@example.test",
                b"RCPT TO:<carol@example.test> NOTIFY=NEVER",
                b"RCPT TO:<dan@example.test>",
            ],
        )

    def test_no_dsn_parameters_without_dsn(self) -> None:
        client, transport = self.connect(["PIPELINING", "8BITMIME"])
        self.ready(client)
        rcpt = QueuedRecipient(
            "bob@example.test", notify=frozenset({"SUCCESS"}), orcpt="rfc822;b@x"
        )
        results = results_of(
            client.deliver(self.message(recipients=(rcpt,), envid="e", ret="FULL"))
        )
        self.assertEqual(
            transport.take(),
            b"MAIL FROM:<sender@here.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
        )
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        self.assertEqual([(r.outcome, r.dsn_relayed) for r in results], [("sent", False)])

    def test_utf8_addresses(self) -> None:
        client, transport = self.connect()
        self.ready(client)
        client.deliver(
            self.message(sender="jörg@bücher.test", rcpts=("ñ@example.test",), smtputf8=True)
        )
        self.assertIn("MAIL FROM:<jörg@bücher.test>".encode(), transport.value())
        self.assertIn("RCPT TO:<ñ@example.test>".encode(), transport.value())

    def test_smtputf8_needs_smtputf8(self) -> None:
        """RFC 6531 §3.4: no SMTPUTF8 at the hop, the message fails (5.6.7), nothing sent."""
        client, transport = self.connect(["PIPELINING", "8BITMIME"])
        self.ready(client)
        results = results_of(client.deliver(self.message(smtputf8=True, rcpts=("a@x", "b@x"))))
        self.assertEqual([r.outcome for r in results], ["failed", "failed"])
        self.assertTrue(results[0].text.startswith("5.6.7 "))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(client.usable)

    def test_eight_bit_needs_8bitmime(self) -> None:
        """8-bit content and no 8BITMIME: failed 5.6.3, no downgrade."""
        client, transport = self.connect(["PIPELINING"])
        self.ready(client)
        msg = self.message(body="Subject: é\r\n\r\nçà\r\n".encode(), eight_bit=True)
        results = results_of(client.deliver(msg))
        self.assertEqual([r.outcome for r in results], ["failed"])
        self.assertTrue(results[0].text.startswith("5.6.3 "))
        self.assertEqual(transport.value(), b"")

    def test_declared_eight_bit_but_seven_bit(self) -> None:
        """Declared 8BITMIME but only ASCII: sent anyway, without BODY=."""
        client, transport = self.connect(["PIPELINING"])
        self.ready(client)
        results = results_of(client.deliver(self.message(eight_bit=True)))
        self.assertEqual(
            transport.take(),
            b"MAIL FROM:<sender@here.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
        )
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        self.assertEqual([r.outcome for r in results], ["sent"])

    def test_large_eight_bit_scan(self) -> None:
        """The 8-bit check of a large file reads it in chunks, letting the reactor run."""
        client, transport = self.connect(["PIPELINING"])
        self.ready(client)
        body = b"x" * 100 + b"\r\n" + (b"a" * 998 + b"\r\n") * 400 + b"\xff\r\n"
        results = results_of(client.deliver(self.message(body=body, eight_bit=True)))
        for _ in range(20):
            self.clock.advance(0)
        self.assertEqual([r.outcome for r in results], ["failed"])
        self.assertIn("5.6.3", results[0].text)

    def test_size_limit(self) -> None:
        client, transport = self.connect(["PIPELINING", "SIZE 10"])
        self.ready(client)
        results = results_of(client.deliver(self.message()))
        self.assertEqual([r.outcome for r in results], ["failed"])
        self.assertTrue(results[0].text.startswith("5.3.4 "))
        self.assertEqual(transport.value(), b"")

    def test_size_zero_is_no_limit(self) -> None:
        client, transport = self.connect(["PIPELINING", "SIZE 0"])
        self.ready(client)
        client.deliver(self.message())
        self.assertIn(b"SIZE=%d" % len(BODY), transport.value())

    def test_xtext(self) -> None:
        self.assertEqual(xtext("abc"), "abc")
        self.assertEqual(xtext("a+b=c d"), "a+2Bb+3Dc+20d")
        self.assertEqual(xtext("é"), "+C3+A9")


class BodyTests(ClientTestCase):
    def sent_body(self, body: bytes) -> bytes:
        """What goes on the wire after 354 for C{body}."""
        client, transport = self.connect()
        self.ready(client)
        results = results_of(client.deliver(self.message(body=body)))
        client.dataReceived(b"250 ok\r\n250 ok\r\n")
        transport.take()
        client.dataReceived(b"354 go\r\n")
        wire = transport.take()
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual([r.outcome for r in results], ["sent"])
        return wire

    def test_dot_stuffing(self) -> None:
        body = b".hidden\r\n..two\r\n.\r\nend\r\n"
        self.assertEqual(self.sent_body(body), b"..hidden\r\n...two\r\n..\r\nend\r\n.\r\n")

    def test_body_from_memory_when_given(self) -> None:
        """An Outgoing that carries its content is sent from it (the file is not opened),
        stuffed and framed the same way."""
        client, transport = self.connect()
        self.ready(client)
        message = self.message(b"on disk\r\n")
        message.path.unlink()
        message = dataclasses.replace(message, data=b".in memory\r\n", size=12)
        results = results_of(client.deliver(message))
        transport.take()
        client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(transport.take(), b"..in memory\r\n.\r\n")
        client.dataReceived(b"250 ok\r\n")
        self.assertEqual([r.outcome for r in results], ["sent"])

    def test_missing_final_line_end(self) -> None:
        self.assertEqual(self.sent_body(b"no line end"), b"no line end\r\n.\r\n")

    def test_bare_line_ends_canonical(self) -> None:
        """Bare LF and bare CR become CRLF; the content cannot end the DATA early."""
        body = b"a\nb\rc\r\nd\n.\nMAIL FROM:<evil@x>\n.\r"
        wire = self.sent_body(body)
        self.assertEqual(wire, b"a\r\nb\r\nc\r\nd\r\n..\r\nMAIL FROM:<evil@x>\r\n..\r\n.\r\n")
        self.assertEqual(wire.count(b"\r\n.\r\n"), 1)
        self.assertTrue(wire.endswith(b"\r\n.\r\n"))

    def test_smuggling_sequences(self) -> None:
        """The usual smuggling ends (<LF>.<LF>, <CR>.<CR>, <LF>.<CR><LF>) are stuffed."""
        for end in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"):
            body = b"x" + end + b"MAIL FROM:<e@x>\r\n"
            wire = self.sent_body(body)
            self.assertEqual(wire.count(b"\r\n.\r\n"), 1, body)
            self.assertTrue(wire.endswith(b"MAIL FROM:<e@x>\r\n.\r\n"), wire)

    def test_large_body_streamed(self) -> None:
        """A file over SMALL_BODY leaves in several writes; the content is the same."""
        line = b"." + b"y" * 80 + b"\n"
        body = line * (SMALL_BODY // len(line) * 3)
        wire = self.sent_body(body)
        expected = (b".." + b"y" * 80 + b"\r\n") * (SMALL_BODY // len(line) * 3) + b".\r\n"
        self.assertEqual(wire, expected)

    def test_large_body_streamed_in_chunks(self) -> None:
        client, transport = self.connect()
        self.ready(client)
        body = b"z" * 999 + b"\r\n"
        body = body * (3 * SMALL_BODY // len(body))
        client.deliver(self.message(body=body))
        client.dataReceived(b"250 ok\r\n250 ok\r\n")
        transport.take()
        client.dataReceived(b"354 go\r\n")
        self.assertGreater(len(transport.writes), 3)
        self.assertIsNone(transport.producer)

    def test_framer_chunking(self) -> None:
        """Any split of the input gives the same output."""
        rnd = random.Random(SEED)
        body = b"a\r\n.b\n\r.c\r\r\n..\n.\r\n\r.\r" * 20
        whole = BodyFramer()
        expected = whole.feed(body) + whole.end()
        for _ in range(200):
            framer = BodyFramer()
            out = []
            i = 0
            while i < len(body):
                n = rnd.randint(1, 7)
                out.append(framer.feed(body[i : i + n]))
                i += n
            out.append(framer.end())
            self.assertEqual(b"".join(out), expected)
        self.assertNotIn(b"\n", expected.replace(b"\r\n", b""))
        self.assertNotIn(b"\r", expected.replace(b"\r\n", b""))
