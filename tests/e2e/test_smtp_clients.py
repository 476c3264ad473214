"""
End to end with real clients: swaks, smtplib and raw sockets against the real service on
loopback. Each test checks what a user would see: the reply codes, the bytes stored in the
maildir, the connection being closed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import shutil
import smtplib
import socket
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from mailserver import cli
from tests.e2e.support import (
    DOMAIN,
    RawClient,
    Running,
    client_tls_context,
    config_text,
    in_thread,
    start_server,
)

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
SENDER = "sender@sender.example"
HOSTNAME = f"mx.{DOMAIN}"


# -- helpers ---------------------------------------------------------------------------------


def simple_message(subject: str, text: str = "Hello.") -> bytes:
    return f"From: <{SENDER}>\r\nSubject: {subject}\r\n\r\n{text}\r\n".encode()


def smtp_send(
    port: int, recipients: list[str], message: bytes, mail_options: tuple[str, ...] = ()
) -> dict[str, tuple[int, bytes]]:
    """Send one message with smtplib (blocking: run it in a thread); return the refusals."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        return s.sendmail(SENDER, recipients, message, mail_options=mail_options)


def greet(c: RawClient, helo: bytes = b"client.example") -> bytes:
    """Read the greeting, send EHLO; return the EHLO reply."""
    greeting = c.read_reply()
    assert greeting.startswith(b"220 "), greeting
    return command(c, b"EHLO " + helo)


def command(c: RawClient, line: bytes) -> bytes:
    """Send one command line, return its reply."""
    c.send(line + b"\r\n")
    return c.read_reply()


def eof_within(c: RawClient, seconds: float) -> bool:
    """
    Whether the server closes the connection within C{seconds}, sending nothing more.
    (Unlike L{RawClient.closed}, a timeout counts as "still open".)
    """
    if c.buf:
        return False
    c.sock.settimeout(seconds)
    try:
        return c.sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset, or a TLS connection cut without close_notify
        return True


def tls_client(port: int) -> RawClient:
    """A L{RawClient} on an implicit-TLS listener, handshake done."""
    c = RawClient(port)
    c.sock = client_tls_context().wrap_socket(c.sock, server_hostname=HOSTNAME)
    return c


def stored_files(server: Running) -> list[Path]:
    """Every message file in every maildir of the server."""
    found: list[Path] = []
    for root, _, files in os.walk(server.data_dir / "mail"):
        if Path(root).name in ("new", "cur", "tmp"):
            found.extend(Path(root) / name for name in files)
    return found


def limits(**values: str | int) -> str:
    """A [limits] table for start_server's extra."""
    lines = ["[limits]"]
    for key, value in values.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return "\n".join(lines) + "\n"


# -- swaks -----------------------------------------------------------------------------------


class SwaksTests(TestCase):
    def setUp(self) -> None:
        swaks = shutil.which("swaks")
        if swaks is None:
            raise SkipTest("swaks is not installed (apt-get install swaks; .ci/run does it)")
        self.swaks_path = swaks

    async def swaks(self, port: int, subject: str, body: str, *options: str) -> str:
        """Run swaks to send one message to alice; fail the test with its transcript if it fails."""
        argv = [
            self.swaks_path,
            "--server",
            "127.0.0.1",
            "--port",
            str(port),
            "--helo",
            "swaks.example",
            "--from",
            SENDER,
            "--to",
            ALICE,
            "--h-Subject",
            subject,
            "--body",
            body,
            "--timeout",
            "20",
            *options,
        ]

        def run() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)

        done = await in_thread(run)
        transcript = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        self.assertEqual(done.returncode, 0, transcript)
        return transcript

    def assert_arrived(self, server: Running, subject: str, body: str) -> bytes:
        [stored] = server.bodies(ALICE)
        self.assertIn(f"Subject: {subject}\r\n".encode(), stored)
        self.assertIn(f"\r\n\r\n{body}\r\n".encode(), stored)
        return stored

    async def test_plain(self) -> None:
        """swaks sends a message in plain text; alice's maildir has it with its body."""
        server = await start_server(self)
        await self.swaks(server.port(), "swaks plain", "Hello from swaks.")
        self.assert_arrived(server, "swaks plain", "Hello from swaks.")

    async def test_starttls(self) -> None:
        """swaks --tls upgrades with STARTTLS and the message arrives, received over ESMTPS."""
        server = await start_server(self)
        transcript = await self.swaks(server.port(), "swaks tls", "Over TLS.", "--tls")
        self.assertIn("=== TLS started with cipher", transcript)
        self.assert_arrived(server, "swaks tls", "Over TLS.")
        [whole] = server.messages(ALICE)
        self.assertIn(b"with ESMTPS id", whole)

    async def test_pipelining(self) -> None:
        """swaks --pipeline sends MAIL, RCPT and DATA in one go; the message arrives."""
        server = await start_server(self)
        transcript = await self.swaks(server.port(), "swaks pipelined", "Pipelined.", "--pipeline")
        # swaks shows the three commands leaving before any of their replies.
        self.assertIn(f" -> MAIL FROM:<{SENDER}>\n -> RCPT TO:<{ALICE}>\n -> DATA\n", transcript)
        self.assert_arrived(server, "swaks pipelined", "Pipelined.")

    async def test_tls_on_connect(self) -> None:
        """swaks --tls-on-connect speaks to the implicit-TLS listener; the message arrives."""
        server = await start_server(self)
        transcript = await self.swaks(
            server.port("smtp", 1), "swaks tlsc", "Implicit TLS.", "--tls-on-connect"
        )
        self.assertIn("=== TLS started with cipher", transcript)
        self.assert_arrived(server, "swaks tlsc", "Implicit TLS.")
        [whole] = server.messages(ALICE)
        self.assertIn(b"with ESMTPS id", whole)


# -- message content -------------------------------------------------------------------------


class ContentTests(TestCase):
    async def test_8bit_body_arrives_byte_exact(self) -> None:
        """With BODY=8BITMIME, UTF-8 text and raw octets 0x80-0xFF arrive byte for byte."""
        server = await start_server(self)
        message = (
            b"From: <sender@sender.example>\r\n"
            b"Subject: 8bit\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n"
            b"\r\n"
            + "Grüße aus Köln, 日本語のテキスト, emoji 🎉.\r\n".encode()
            + bytes(range(0x80, 0x100))
            + b"\r\nend\r\n"
        )
        refused = await in_thread(smtp_send, server.port(), [ALICE], message, ("BODY=8BITMIME",))
        self.assertEqual(refused, {})
        self.assertEqual(server.bodies(ALICE), [message])

    async def test_smtputf8_addresses(self) -> None:
        """
        With SMTPUTF8, a non-ASCII sender can mail an account with a non-ASCII local part; the
        message arrives in that account's maildir, received "with UTF8SMTP".
        """
        server = await start_server(self)
        recipient = f"jösé@{DOMAIN}"
        server.directory.add_user(recipient, "password123")
        message = "From: <jörg@sender.example>\r\nSubject: utf8\r\n\r\nHallo José.\r\n".encode()

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", server.port(), timeout=30) as s:
                return s.sendmail(
                    "jörg@sender.example", [recipient], message, mail_options=["SMTPUTF8"]
                )

        self.assertEqual(await in_thread(send), {})
        self.assertEqual(server.bodies(recipient), [message])
        [whole] = server.messages(recipient)
        self.assertTrue(whole.startswith("Return-Path: <jörg@sender.example>\r\n".encode()))
        self.assertIn(f"Delivered-To: {recipient}\r\n".encode(), whole)
        self.assertIn(b"with UTF8SMTP id", whole)

    async def test_non_ascii_address_without_smtputf8_refused(self) -> None:
        """Without SMTPUTF8, a non-ASCII sender or recipient is refused with 553 5.6.7."""
        server = await start_server(self)
        server.directory.add_user(f"jösé@{DOMAIN}", "password123")

        def talk() -> tuple[bytes, bytes, bytes]:
            c = RawClient(server.port())
            try:
                greet(c)
                sender = command(c, "MAIL FROM:<jörg@sender.example>".encode())
                ascii_sender = command(c, f"MAIL FROM:<{SENDER}>".encode())
                rcpt = command(c, f"RCPT TO:<jösé@{DOMAIN}>".encode())
                return sender, ascii_sender, rcpt
            finally:
                c.close()

        sender, ascii_sender, rcpt = await in_thread(talk)
        self.assertTrue(sender.startswith(b"553 5.6.7 "), sender)
        self.assertTrue(ascii_sender.startswith(b"250 "), ascii_sender)
        self.assertTrue(rcpt.startswith(b"553 5.6.7 "), rcpt)
        self.assertEqual(stored_files(server), [])

    async def test_20_mib_message_arrives_byte_exact(self) -> None:
        """A 20 MiB message (base64 lines) is under the default 25 MiB limit and arrives exact."""
        server = await start_server(self)
        lines = 20 * 1024 * 1024 // 78
        raw = random.Random(20).randbytes(57 * lines)
        encoded = base64.b64encode(raw)
        body = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + b"\r\n"
        message = (
            b"From: <sender@sender.example>\r\nSubject: big\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"\r\n" + body
        )
        self.assertGreater(len(message), 20 * 1024 * 1024 - 100)
        refused = await in_thread(smtp_send, server.port(), [ALICE], message)
        self.assertEqual(refused, {})
        [stored] = server.bodies(ALICE)
        self.assertEqual(len(stored), len(message))
        self.assertEqual(hashlib.sha256(stored).hexdigest(), hashlib.sha256(message).hexdigest())

    async def test_dot_stuffing_round_trip(self) -> None:
        """Lines ".", "..", ".x", "..." sent by smtplib (which dot-stuffs) arrive unchanged."""
        server = await start_server(self)
        message = b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n...\r\n. \r\nx.\r\n.\r\n"
        refused = await in_thread(smtp_send, server.port(), [ALICE], message)
        self.assertEqual(refused, {})
        self.assertEqual(server.bodies(ALICE), [message])

    async def test_dot_stuffing_one_byte_at_a_time(self) -> None:
        """
        A dot-stuffed transaction written one octet per write (the server gets it in many
        small pieces) is un-stuffed correctly and the terminator is found.
        """
        server = await start_server(self)
        message = b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n...\r\nx.\r\n"
        stuffed = b"Subject: dots\r\n\r\n..\r\n...\r\n..x\r\n....\r\nx.\r\n.\r\n"
        script = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode()

        def talk() -> list[bytes]:
            c = RawClient(server.port())
            try:
                c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                greet(c)
                for octet in script + stuffed + b"QUIT\r\n":
                    c.send(bytes([octet]))
                    time.sleep(0.001)
                return [c.read_reply() for _ in range(5)]
            finally:
                c.close()

        replies = await in_thread(talk)
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"354", b"250", b"221"])
        self.assertEqual(server.bodies(ALICE), [message])


# -- recipients ------------------------------------------------------------------------------


class RecipientTests(TestCase):
    async def test_several_recipients(self) -> None:
        """
        A message to alice, bob and an unknown user: the unknown one is refused with
        550 5.1.1, alice and bob get one copy each, each with a Delivered-To naming them, and
        (two recipients) the Received line names nobody.
        """
        server = await start_server(self)
        message = simple_message("to several")
        refused = await in_thread(
            smtp_send, server.port(), [ALICE, BOB, f"nobody@{DOMAIN}"], message
        )
        self.assertEqual(list(refused), [f"nobody@{DOMAIN}"])
        code, text = refused[f"nobody@{DOMAIN}"]
        self.assertEqual((code, text[:5]), (550, b"5.1.1"))
        for account in (ALICE, BOB):
            [whole] = server.messages(account)
            self.assertIn(f"\r\nDelivered-To: {account}\r\n".encode(), whole)
            self.assertNotIn(b"for <", whole)
            self.assertEqual(server.bodies(account), [message])
        self.assertEqual(server.messages(f"nobody@{DOMAIN}"), [])

    async def test_single_recipient_named_in_received(self) -> None:
        """A message to one recipient has "for <that recipient>" in its Received line."""
        server = await start_server(self)
        await in_thread(smtp_send, server.port(), [ALICE], simple_message("to one"))
        [whole] = server.messages(ALICE)
        self.assertIn(f"\tfor <{ALICE}>;\r\n".encode(), whole)
        self.assertEqual(server.messages(BOB), [])

    async def test_alias_with_two_targets(self) -> None:
        """Mail to an alias with targets alice and bob reaches both, one copy each."""
        server = await start_server(self)
        server.directory.add_alias(f"team@{DOMAIN}", ALICE)
        server.directory.add_alias(f"team@{DOMAIN}", BOB)
        message = simple_message("to the team")
        self.assertEqual(await in_thread(smtp_send, server.port(), [f"team@{DOMAIN}"], message), {})
        self.assertEqual(server.bodies(ALICE), [message])
        self.assertEqual(server.bodies(BOB), [message])
        self.assertIn(f"Delivered-To: {BOB}\r\n".encode(), server.messages(BOB)[0])

    async def test_catch_all(self) -> None:
        """With a catch-all alias @example.test -> alice, mail to any address there reaches her."""
        server = await start_server(self)
        server.directory.add_alias(f"@{DOMAIN}", ALICE)
        message = simple_message("to whoever")
        self.assertEqual(
            await in_thread(smtp_send, server.port(), [f"whoever@{DOMAIN}"], message), {}
        )
        self.assertEqual(server.bodies(ALICE), [message])
        self.assertEqual(server.messages(BOB), [])

    async def test_plus_addressing(self) -> None:
        """Mail to alice+news@example.test reaches alice's account."""
        server = await start_server(self)
        message = simple_message("newsletter")
        self.assertEqual(
            await in_thread(smtp_send, server.port(), [f"alice+news@{DOMAIN}"], message), {}
        )
        self.assertEqual(server.bodies(ALICE), [message])
        self.assertIn(f"Delivered-To: {ALICE}\r\n".encode(), server.messages(ALICE)[0])

    async def test_postmaster(self) -> None:
        """
        RCPT TO:<postmaster> (no domain) and postmaster@example.test are accepted and reach the
        postmaster account the first start created.
        """
        server = await start_server(self)
        first, second = simple_message("pm bare"), simple_message("pm domain")

        def talk() -> list[bytes]:
            c = RawClient(server.port())
            try:
                replies = [greet(c)]
                for rcpt, message in (
                    (b"<postmaster>", first),
                    (b"<postmaster@example.test>", second),
                ):
                    replies.append(command(c, f"MAIL FROM:<{SENDER}>".encode()))
                    replies.append(command(c, b"RCPT TO:" + rcpt))
                    replies.append(command(c, b"DATA"))
                    replies.append(command(c, message + b"."))
                return replies
            finally:
                c.close()

        replies = await in_thread(talk)
        self.assertEqual([r[:3] for r in replies[1:]], [b"250", b"250", b"354", b"250"] * 2)
        self.assertEqual(server.bodies(f"postmaster@{DOMAIN}"), [first, second])

    async def test_relay_refused(self) -> None:
        """RCPT TO a domain that is not local gets 554 5.7.1, and nothing is stored anywhere."""
        server = await start_server(self)

        def talk() -> list[bytes]:
            c = RawClient(server.port())
            try:
                greet(c)
                return [
                    command(c, f"MAIL FROM:<{SENDER}>".encode()),
                    command(c, b"RCPT TO:<someone@elsewhere.example>"),
                    command(c, b"DATA"),
                ]
            finally:
                c.close()

        mail, rcpt, data = await in_thread(talk)
        self.assertTrue(mail.startswith(b"250 "), mail)
        self.assertTrue(rcpt.startswith(b"554 5.7.1 "), rcpt)
        self.assertTrue(data.startswith(b"554 "), data)
        self.assertEqual(stored_files(server), [])


# -- the admin CLI on a running server -------------------------------------------------------


class AdminWhileRunningTests(TestCase):
    def cli_config(self, server: Running) -> Path:
        path = Path(self.mktemp()).absolute()
        path.mkdir(parents=True)
        config = path / "mailserver.toml"
        config.write_text(config_text(server.data_dir))
        return config

    async def run_cli(self, *argv: str, stdin: str = "") -> None:
        out, err = io.StringIO(), io.StringIO()
        code = await in_thread(
            lambda: cli.main(list(argv), stdin=io.StringIO(stdin), stdout=out, stderr=err)
        )
        self.assertEqual(code, 0, out.getvalue() + err.getvalue())

    async def test_user_and_domain_added_while_running(self) -> None:
        """
        With the server running, `mailserver user add` makes the address deliverable at once,
        on a connection already open (550 5.1.1 before, 250 after, no restart); likewise
        `mailserver domain add` plus `user add` for a new domain (554 5.7.1 before).
        """
        server = await start_server(self)
        config = str(self.cli_config(server))
        c = RawClient(server.port())
        self.addCleanup(c.close)
        await in_thread(greet, c)
        mail = await in_thread(command, c, f"MAIL FROM:<{SENDER}>".encode())
        self.assertEqual(mail[:4], b"250 ")

        before = await in_thread(command, c, f"RCPT TO:<carol@{DOMAIN}>".encode())
        self.assertTrue(before.startswith(b"550 5.1.1 "), before)
        before_other = await in_thread(command, c, b"RCPT TO:<dave@other.test>")
        self.assertTrue(before_other.startswith(b"554 5.7.1 "), before_other)

        await self.run_cli(
            "--config", config, "user", "add", f"carol@{DOMAIN}", "--password-stdin",
            stdin="password123\n",
        )  # fmt: skip
        await self.run_cli("--config", config, "domain", "add", "other.test")
        await self.run_cli(
            "user", "add", "dave@other.test", "--password-stdin", "--config", config,
            stdin="password456\n",
        )  # fmt: skip

        after = await in_thread(command, c, f"RCPT TO:<carol@{DOMAIN}>".encode())
        self.assertTrue(after.startswith(b"250 "), after)
        after_other = await in_thread(command, c, b"RCPT TO:<dave@other.test>")
        self.assertTrue(after_other.startswith(b"250 "), after_other)
        message = simple_message("welcome")
        self.assertTrue((await in_thread(command, c, b"DATA")).startswith(b"354"))
        done = await in_thread(command, c, message + b".")
        self.assertTrue(done.startswith(b"250 "), done)
        self.assertEqual(server.bodies(f"carol@{DOMAIN}"), [message])
        self.assertEqual(server.bodies("dave@other.test"), [message])


# -- limits ----------------------------------------------------------------------------------


class LimitTests(TestCase):
    async def test_message_size(self) -> None:
        """
        With message_size = 1MiB: EHLO advertises SIZE 1048576; MAIL with SIZE=2000000 gets
        552 5.3.4; a 2 MiB message without SIZE gets 552 5.3.4 after its data; and the same
        connection then sends a small message successfully.
        """
        server = await start_server(self, extra=limits(message_size="1MiB"))
        big = b"Subject: big\r\n\r\n" + (b"x" * 1022 + b"\r\n") * 2048
        small = simple_message("small")

        def talk() -> list[bytes]:
            c = RawClient(server.port())
            try:
                replies = [greet(c)]
                replies.append(command(c, f"MAIL FROM:<{SENDER}> SIZE=2000000".encode()))
                replies.append(command(c, f"MAIL FROM:<{SENDER}>".encode()))
                replies.append(command(c, f"RCPT TO:<{ALICE}>".encode()))
                replies.append(command(c, b"DATA"))
                replies.append(command(c, big + b"."))
                replies.append(command(c, f"MAIL FROM:<{SENDER}> SIZE={len(small)}".encode()))
                replies.append(command(c, f"RCPT TO:<{ALICE}>".encode()))
                replies.append(command(c, b"DATA"))
                replies.append(command(c, small + b"."))
                return replies
            finally:
                c.close()

        ehlo, size_param, mail, rcpt, data, too_big, *small_replies = await in_thread(talk)
        self.assertIn(b"\r\n250-SIZE 1048576\r\n", ehlo)
        self.assertTrue(size_param.startswith(b"552 5.3.4 "), size_param)
        self.assertEqual([mail[:3], rcpt[:3], data[:3]], [b"250", b"250", b"354"])
        self.assertTrue(too_big.startswith(b"552 5.3.4 "), too_big)
        self.assertEqual([r[:3] for r in small_replies], [b"250", b"250", b"354", b"250"])
        self.assertEqual(server.bodies(ALICE), [small])

    async def test_recipients(self) -> None:
        """With recipients = 3, the 4th RCPT gets 452 4.5.3 and the first 3 get the message."""
        users = ("alice", "bob", "carol", "dave")
        server = await start_server(self, extra=limits(recipients=3), users=users)
        message = simple_message("four")
        to = [f"{u}@{DOMAIN}" for u in users]
        refused = await in_thread(smtp_send, server.port(), to, message)
        self.assertEqual(list(refused), [f"dave@{DOMAIN}"])
        code, text = refused[f"dave@{DOMAIN}"]
        self.assertEqual((code, text[:5]), (452, b"4.5.3"))
        for account in to[:3]:
            self.assertEqual(server.bodies(account), [message])
        self.assertEqual(server.messages(f"dave@{DOMAIN}"), [])

    async def test_line_length(self) -> None:
        """
        With smtp_line_length = 600, a 700-octet command line gets 500 5.5.2 (sent whole or in
        two pieces) and the session goes on.
        """
        server = await start_server(self, extra=limits(smtp_line_length=600))
        long_line = b"NOOP " + b"x" * 693 + b"\r\n"
        self.assertEqual(len(long_line), 700)

        def talk() -> list[bytes]:
            c = RawClient(server.port())
            try:
                greet(c)
                c.send(long_line)
                replies = [c.read_reply(), command(c, b"NOOP")]
                c.send(long_line[:650])
                replies.append(c.read_reply())  # refused before the line has ended
                c.send(long_line[650:])
                replies.append(command(c, b"NOOP"))
                return replies
            finally:
                c.close()

        whole, noop, split, noop_again = await in_thread(talk)
        self.assertTrue(whole.startswith(b"500 5.5.2 "), whole)
        self.assertEqual(noop[:4], b"250 ")
        self.assertTrue(split.startswith(b"500 5.5.2 "), split)
        self.assertEqual(noop_again[:4], b"250 ")

    async def test_connections_per_ip(self) -> None:
        """
        With connections_per_ip = 2, a third simultaneous connection from 127.0.0.1 gets
        421 4.7.0 and is closed; once one of the two has quit, a new connection gets 220.
        """
        server = await start_server(self, extra=limits(connections_per_ip=2, connections=1000))
        port = server.port()

        def talk() -> tuple[bytes, bool, bytes, bytes]:
            a, b = RawClient(port), RawClient(port)
            try:
                a.read_reply(), b.read_reply()
                third = RawClient(port)
                try:
                    refused, closed = third.read_reply(), eof_within(third, 5)
                finally:
                    third.close()
                bye = command(a, b"QUIT")
                assert eof_within(a, 5), "no close after QUIT"
                fourth = RawClient(port)
                try:
                    return refused, closed, bye, fourth.read_reply()
                finally:
                    fourth.close()
            finally:
                a.close()
                b.close()

        refused, closed, bye, greeting = await in_thread(talk)
        self.assertTrue(refused.startswith(b"421 4.7.0 "), refused)
        self.assertTrue(closed)
        self.assertEqual(bye[:4], b"221 ")
        self.assertTrue(greeting.startswith(b"220 "), greeting)

    async def test_connections_total(self) -> None:
        """
        With connections = 2 over all listeners (one implicit-TLS, one plain connection), a
        third gets 421 4.7.0 and is closed; after one client drops its connection, a new one
        gets 220 within a few seconds.
        """
        server = await start_server(self, extra=limits(connections=2))

        def talk() -> tuple[bytes, bool, bytes]:
            a, b = tls_client(server.port("smtp", 1)), RawClient(server.port())
            try:
                a.read_reply(), b.read_reply()
                third = RawClient(server.port())
                try:
                    refused, closed = third.read_reply(), eof_within(third, 5)
                finally:
                    third.close()
                a.close()  # no QUIT: the server notices the close
                deadline = time.monotonic() + 5
                while True:  # bounded: until 220, or the deadline
                    fourth = RawClient(server.port())
                    try:
                        greeting = fourth.read_reply()
                    finally:
                        fourth.close()
                    if greeting.startswith(b"220") or time.monotonic() > deadline:
                        return refused, closed, greeting
                    time.sleep(0.05)
            finally:
                a.close()
                b.close()

        refused, closed, greeting = await in_thread(talk)
        self.assertTrue(refused.startswith(b"421 4.7.0 "), refused)
        self.assertTrue(closed)
        self.assertTrue(greeting.startswith(b"220 "), greeting)

    async def test_idle_timeout(self) -> None:
        """
        With smtp_idle_timeout = 1s, a silent client gets 421 4.4.2 and is disconnected within
        a few seconds, while a client sending NOOP every 0.3 s for 2 s stays connected.
        """
        server = await start_server(self, extra=limits(smtp_idle_timeout="1s"))

        def silent() -> tuple[bytes, bool, float]:
            start = time.monotonic()  # before the server's clock starts: a lower bound
            c = RawClient(server.port(), timeout=10)
            try:
                c.read_reply()
                reply = c.read_reply()
                closed = eof_within(c, 5)
                return reply, closed, time.monotonic() - start
            finally:
                c.close()

        def chatty() -> list[bytes]:
            c = RawClient(server.port(), timeout=10)
            try:
                c.read_reply()
                replies = []
                for _ in range(7):  # 7 x 0.3 s > 2 s: twice the timeout
                    time.sleep(0.3)
                    replies.append(command(c, b"NOOP"))
                replies.append(command(c, b"QUIT"))
                return replies
            finally:
                c.close()

        reply, closed, waited = await in_thread(silent)
        self.assertTrue(reply.startswith(b"421 4.4.2 "), reply)
        self.assertTrue(closed)
        self.assertGreaterEqual(waited, 0.9)
        self.assertLessEqual(waited, 10)
        replies = await in_thread(chatty)
        self.assertEqual([r[:4] for r in replies], [b"250 "] * 7 + [b"221 "])

    async def test_error_limit(self) -> None:
        """With smtp_errors = 3, the 4th bad command gets 421 4.7.0 and the connection closes."""
        server = await start_server(self, extra=limits(smtp_errors=3))

        def talk() -> tuple[list[bytes], bool]:
            c = RawClient(server.port())
            try:
                greet(c)
                replies = [command(c, b"XYZZY") for _ in range(4)]
                return replies, eof_within(c, 5)
            finally:
                c.close()

        replies, closed = await in_thread(talk)
        self.assertEqual([r[:10] for r in replies[:3]], [b"500 5.5.2 "] * 3)
        self.assertTrue(replies[3].startswith(b"421 4.7.0 "), replies[3])
        self.assertTrue(closed)

    async def test_nul_and_invalid_utf8_in_commands(self) -> None:
        """A NUL or invalid UTF-8 in a command gets 500 5.5.2 and the session goes on."""
        server = await start_server(self)

        def talk() -> list[bytes]:
            c = RawClient(server.port())
            try:
                greet(c)
                return [
                    command(c, b"NOOP a\x00b"),
                    command(c, b"MAIL FROM:<a\x00@sender.example>"),
                    command(c, b"NOOP \xff\xfe"),
                    command(c, b"MAIL FROM:<\xc3@sender.example>"),
                    command(c, f"MAIL FROM:<{SENDER}>".encode()),
                    command(c, b"NOOP"),
                ]
            finally:
                c.close()

        *bad, mail, noop = await in_thread(talk)
        self.assertEqual([r[:10] for r in bad], [b"500 5.5.2 "] * 4)
        self.assertEqual(mail[:4], b"250 ")
        self.assertEqual(noop[:4], b"250 ")


# -- protocol attacks ------------------------------------------------------------------------


SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nevil\r\n.\r\n"


class AttackTests(TestCase):
    async def smuggle(self, fake_end: bytes) -> None:
        server = await start_server(self)

        def talk() -> list[bytes]:
            c = RawClient(server.port())
            try:
                greet(c)
                for line in (f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{ALICE}>".encode()):
                    assert command(c, line).startswith(b"250"), line
                assert command(c, b"DATA").startswith(b"354")
                c.send(b"Subject: hi\r\n\r\nhello" + fake_end + SMUGGLED)
                c.send(b"QUIT\r\n")
                replies = []
                for _ in range(10):  # bounded: until the server closes
                    try:
                        replies.append(c.read_reply())
                    except ConnectionError:
                        break
                return replies
            finally:
                c.close()

        replies = await in_thread(talk)
        self.assertEqual(len(replies), 2, replies)
        self.assertTrue(replies[0].startswith(b"554 5.6.0 "), replies)
        self.assertTrue(replies[1].startswith(b"221 "), replies)
        self.assertEqual(server.messages(BOB), [])
        self.assertEqual(server.messages(ALICE), [])
        self.assertEqual(stored_files(server), [])

    async def test_smuggling_bare_lf_dot(self) -> None:
        """
        A body with <CR><LF>.<LF> followed by MAIL/RCPT/DATA for bob: the server only ends the
        data at <CR><LF>.<CR><LF>, refuses the whole message with one 554 5.6.0, never runs
        the smuggled commands, and nothing reaches alice or bob.
        """
        await self.smuggle(b"\r\n.\n")

    async def test_smuggling_lf_dot_crlf(self) -> None:
        """Likewise with <LF>.<CR><LF> as the fake end of data: one 554 5.6.0, nothing stored."""
        await self.smuggle(b"\n.\r\n")

    async def test_smuggling_cr_dot_crlf(self) -> None:
        """Likewise with <CR>.<CR><LF> as the fake end of data: one 554 5.6.0, nothing stored."""
        await self.smuggle(b"\r.\r\n")

    async def test_starttls_discards_pipelined_plaintext(self) -> None:
        """
        "STARTTLS\\r\\nRSET\\r\\n" in one write: the RSET sent before the handshake is thrown
        away, so the first reply inside TLS answers the client's own next command (EHLO).
        """
        server = await start_server(self)

        def talk() -> tuple[bytes, bytes, list[bytes]]:
            c = RawClient(server.port())
            try:
                greet(c)
                c.send(b"STARTTLS\r\nRSET\r\n")
                ready = c.read_reply()
                leftover = c.buf
                c.sock = client_tls_context().wrap_socket(c.sock, server_hostname=HOSTNAME)
                inside = [command(c, b"EHLO client.example"), command(c, b"NOOP")]
                inside.append(command(c, b"QUIT"))
                return ready, leftover, inside
            finally:
                c.close()

        ready, leftover, (ehlo, noop, bye) = await in_thread(talk)
        self.assertTrue(ready.startswith(b"220 "), ready)
        self.assertEqual(leftover, b"")
        self.assertTrue(ehlo.startswith(f"250-{HOSTNAME} greets client.example".encode()), ehlo)
        self.assertNotIn(b"STARTTLS", ehlo)
        self.assertEqual(noop, b"250 2.0.0 OK")
        self.assertTrue(bye.startswith(b"221 "), bye)

    async def test_bdat(self) -> None:
        """
        BDAT 10 then BDAT 5 LAST each get 250 and the 15 octets are stored exactly; BDAT
        content is not dot-unstuffed and a CRLF split between chunks is fine.
        """
        server = await start_server(self)
        first = (b"Subj: hi\r\n", b"\r\nA\r\n")
        second = (b"Subject: b\r", b"\n\r\n.\r\n..\r\nend\r\n")

        def talk() -> list[bytes]:
            c = RawClient(server.port())
            try:
                greet(c)
                replies = []
                for chunks, rcpt in ((first, ALICE), (second, BOB)):
                    replies.append(command(c, f"MAIL FROM:<{SENDER}>".encode()))
                    replies.append(command(c, f"RCPT TO:<{rcpt}>".encode()))
                    head, last = chunks
                    c.send(b"BDAT %d\r\n" % len(head) + head)
                    replies.append(c.read_reply())
                    c.send(b"BDAT %d LAST\r\n" % len(last) + last)
                    replies.append(c.read_reply())
                return replies
            finally:
                c.close()

        replies = await in_thread(talk)
        self.assertEqual([r[:4] for r in replies], [b"250 "] * 8)
        self.assertEqual(replies[2], b"250 2.0.0 10 octets received")
        self.assertEqual(server.bodies(ALICE), [b"".join(first)])
        self.assertEqual(server.bodies(BOB), [b"".join(second)])
