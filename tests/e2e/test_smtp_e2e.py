"""End to end: the real service on loopback, driven by smtplib and raw sockets."""

from __future__ import annotations

import smtplib

from twisted.trial.unittest import TestCase

from tests.e2e.support import DOMAIN, RawClient, client_tls_context, in_thread, start_server

MESSAGE = (
    b"From: Bob <bob@sender.example>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@sender.example>\r\n"
    b"\r\n"
    b"Hello Alice.\r\n"
    b".A line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"[:0]
    + b"last line\r\n"
)


class PlainSMTPTests(TestCase):
    async def test_plain_message_arrives_byte_for_byte(self) -> None:
        """A message sent with smtplib is stored in the recipient's maildir exactly as sent."""
        server = await start_server(self)
        port = server.port()

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                return s.sendmail("bob@sender.example", [f"alice@{DOMAIN}"], MESSAGE)

        refused = await in_thread(send)
        self.assertEqual(refused, {})
        self.assertEqual(server.bodies(f"alice@{DOMAIN}"), [MESSAGE])

    async def test_starttls_message_arrives(self) -> None:
        """After STARTTLS the message is accepted and the Received line says ESMTPS."""
        server = await start_server(self)
        port = server.port()

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.starttls(context=client_tls_context())
                s.sendmail("bob@sender.example", [f"alice@{DOMAIN}"], MESSAGE)

        await in_thread(send)
        [stored] = server.messages(f"alice@{DOMAIN}")
        self.assertIn(b"with ESMTPS id", stored)
        self.assertEqual(server.bodies(f"alice@{DOMAIN}"), [MESSAGE])

    async def test_implicit_tls_listener(self) -> None:
        """A listener with tls = "implicit" speaks TLS from the first byte."""
        server = await start_server(self)
        port = server.port("smtp", 1)

        def send() -> None:
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_tls_context()) as s:
                s.sendmail("bob@sender.example", [f"bob@{DOMAIN}"], MESSAGE)

        await in_thread(send)
        self.assertEqual(server.bodies(f"bob@{DOMAIN}"), [MESSAGE])

    async def test_raw_pipelined_two_transactions(self) -> None:
        """Two transactions sent in one write get all their replies, in order."""
        server = await start_server(self)
        port = server.port()

        def talk() -> list[bytes]:
            c = RawClient(port)
            replies = [c.read_reply()]
            c.send(b"EHLO c.example\r\n")
            replies.append(c.read_reply())
            c.send(
                b"MAIL FROM:<x@y.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                b"Subject: one\r\n\r\nfirst\r\n.\r\n"
                b"MAIL FROM:<x@y.example>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n"
            )
            for _ in range(9):
                replies.append(c.read_reply())
            c.close()
            return replies

        replies = await in_thread(talk)
        codes = [r[:3] for r in replies[2:]]
        self.assertEqual(
            codes, [b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221"]
        )
        self.assertEqual(server.bodies(f"alice@{DOMAIN}"), [b"Subject: one\r\n\r\nfirst\r\n"])
        self.assertEqual(server.bodies(f"bob@{DOMAIN}"), [b"Subject: two\r\n\r\nsecond\r\n"])
