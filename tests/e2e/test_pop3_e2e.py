"""
End to end POP3: mail delivered by SMTP, read and deleted with poplib, fetchmail and curl,
against the real service on loopback.
"""

from __future__ import annotations

import os
import poplib
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.e2e.support import (
    DOMAIN,
    PASSWORD,
    Running,
    client_tls_context,
    in_thread,
    start_server,
)

LISTENERS = """
[[listener]]
kind = "smtp"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"

[[listener]]
kind = "pop3"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "starttls"

[[listener]]
kind = "pop3"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
"""

ALICE = f"alice@{DOMAIN}"


def message(n: int) -> bytes:
    return (
        f"From: bob@sender.example\r\nTo: {ALICE}\r\nSubject: message {n}\r\n\r\n"
        f"Body of message {n}.\r\n.leading dot\r\n..two dots\r\nlast line\r\n"
    ).encode()


def send(server: Running, *numbers: int) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as s:
        for n in numbers:
            s.sendmail("bob@sender.example", [ALICE], message(n))


def send_raw(server: Running, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=30) as s:
        s.sendmail("bob@sender.example", [ALICE], data)


def stored_files(server: Running, account: str = ALICE) -> dict[str, bytes]:
    """Every message file of the account's INBOX (new/ and cur/), by base name."""
    files = {}
    for sub in ("new", "cur"):
        d = server.maildir(account) / sub
        if d.is_dir():
            for name in os.listdir(d):
                files[name.split(":2,")[0]] = (d / name).read_bytes()
    return files


class SourcePOP3(poplib.POP3):
    """poplib from a chosen loopback source address (another client, as far as limits go)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self._source, 0))


def login_stls(port: int, user: str = ALICE, password: str = PASSWORD) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    p.stls(client_tls_context())
    p.user(user)
    p.pass_(password)
    return p


class POP3Tests(TestCase):
    async def start(self, extra: str = "") -> Running:
        return await start_server(self, extra=extra, listeners=LISTENERS)

    async def test_retr_is_byte_exact_and_sizes_match(self) -> None:
        """
        Mail delivered by SMTP is listed with sizes equal to the octets RETR sends, and RETR
        returns the stored message exactly (over STLS).
        """
        server = await self.start()
        await in_thread(send, server, 1, 2, 3)
        port = server.port("pop3")

        def read() -> tuple[tuple[int, int], list[bytes], list[bytes], list[bytes]]:
            p = login_stls(port)
            stat = p.stat()
            listing = p.list()[1]
            bodies = []
            for i in range(1, stat[0] + 1):
                resp, lines, octets = p.retr(i)
                bodies.append(b"\r\n".join(lines) + b"\r\n")
            uidl = p.uidl()[1]
            p.quit()
            return stat, listing, bodies, uidl

        stat, listing, bodies, uidl = await in_thread(read)
        files = stored_files(server)
        self.assertEqual(stat[0], 3)
        self.assertEqual(sorted(bodies), sorted(files.values()))
        self.assertEqual(stat[1], sum(len(b) for b in files.values()))
        sizes = [int(line.split()[1]) for line in listing]
        self.assertEqual(sizes, [len(b) for b in bodies])
        for n, body in enumerate(bodies, 1):
            self.assertIn(f"Subject: message {n}".encode(), body)
            self.assertTrue(body.endswith(message(n).split(b"\r\n\r\n", 1)[1]))
        self.assertEqual(len({line.split()[1] for line in uidl}), 3)

    async def test_mail_arriving_during_a_session_shows_in_the_next(self) -> None:
        """
        A session sees the mailbox as it was when it logged in; a message delivered by SMTP
        meanwhile is listed by the next session.
        """
        server = await self.start()
        await in_thread(send, server, 1)
        port = server.port("pop3")

        def run() -> tuple[int, int, int]:
            p = login_stls(port)
            before = p.stat()[0]
            send(server, 2)
            during = p.stat()[0]
            p.quit()
            p = login_stls(port)
            after = p.stat()[0]
            p.quit()
            return before, during, after

        self.assertEqual(await in_thread(run), (1, 1, 2))

    async def test_large_message_streamed_over_tls_byte_exact(self) -> None:
        """
        A 6 MiB message (streamed from its file, not read whole) arrives byte for byte over
        STLS, with its dot-stuffed lines, and the session goes on afterwards.
        """
        server = await self.start()
        line = b".dot-led line " + b"x" * 60 + b"\r\n"
        big = b"Subject: big\r\n\r\n" + line * (6 * 1024 * 1024 // len(line))
        await in_thread(send_raw, server, big)
        port = server.port("pop3")

        def read() -> tuple[bytes, int, tuple[int, int]]:
            p = login_stls(port)
            _, lines, _ = p.retr(1)
            size = int(p.list(1).split()[2])
            stat = p.stat()
            p.quit()
            return b"\r\n".join(lines) + b"\r\n", size, stat

        body, size, stat = await in_thread(read)
        [stored] = stored_files(server).values()
        self.assertEqual(body, stored)
        self.assertEqual(size, len(stored))
        self.assertTrue(stored.endswith(big))
        self.assertEqual(stat, (1, len(stored)))

    async def test_pop3s_implicit_tls(self) -> None:
        """The implicit-TLS listener serves POP3 over TLS from the first byte."""
        server = await self.start()
        await in_thread(send, server, 1)
        port = server.port("pop3", 1)

        def read() -> int:
            p = poplib.POP3_SSL("127.0.0.1", port, timeout=10, context=client_tls_context())
            p.user(ALICE)
            p.pass_(PASSWORD)
            count = p.stat()[0]
            p.quit()
            return count

        self.assertEqual(await in_thread(read), 1)

    async def test_plaintext_password_refused_before_stls(self) -> None:
        """Without TLS, USER/PASS get -ERR [AUTH] and CAPA offers STLS, not USER."""
        server = await self.start()
        port = server.port("pop3")

        def attempt() -> tuple[list[bytes], str]:
            p = poplib.POP3("127.0.0.1", port, timeout=10)
            caps = p._longcmd("CAPA")[1]
            try:
                p.user(ALICE)
                result = "accepted"
            except poplib.error_proto as e:
                result = str(e)
            p.quit()
            return caps, result

        caps, result = await in_thread(attempt)
        self.assertIn(b"STLS", caps)
        self.assertNotIn(b"USER", caps)
        self.assertIn("[AUTH]", result)

    async def test_dele_takes_effect_at_quit_only(self) -> None:
        """DELE then QUIT deletes durably; DELE then a dropped connection deletes nothing."""
        server = await self.start()
        await in_thread(send, server, 1, 2, 3)
        port = server.port("pop3")

        def drop_after_dele() -> None:
            p = login_stls(port)
            p.dele(1)
            p.sock.close()  # no QUIT

        await in_thread(drop_after_dele)
        self.assertEqual(len(stored_files(server)), 3)

        def dele_and_quit() -> list[bytes]:
            p = login_stls(port)
            uidl_before = p.uidl()[1]
            p.dele(1)
            p.dele(3)
            p.quit()
            return uidl_before

        uidl_before = await in_thread(dele_and_quit)
        files = stored_files(server)
        self.assertEqual(len(files), 1)
        [remaining] = files.values()
        self.assertIn(b"Subject: message 2", remaining)

        def uidl_now() -> list[bytes]:
            p = login_stls(port)
            out = p.uidl()[1]
            p.quit()
            return out

        [line] = await in_thread(uidl_now)
        self.assertEqual(line.split()[1], uidl_before[1].split()[1])

    async def test_uidl_stable_across_restart(self) -> None:
        """UIDL values are the same after the server restarts."""
        server = await self.start()
        await in_thread(send, server, 1, 2)

        def uidl(port: int) -> list[bytes]:
            p = login_stls(port)
            out = p.uidl()[1]
            p.quit()
            return out

        before = await in_thread(uidl, server.port("pop3"))
        server = await server.restart(self)
        after = await in_thread(uidl, server.port("pop3"))
        self.assertEqual(before, after)
        self.assertEqual(len(after), 2)

    async def test_second_session_gets_in_use(self) -> None:
        """While one session holds the mailbox, a second login gets -ERR [IN-USE]."""
        server = await self.start()
        port = server.port("pop3")

        def two() -> str:
            first = login_stls(port)
            try:
                login_stls(port)
                return "second got in"
            except poplib.error_proto as e:
                return str(e)
            finally:
                first.quit()

        self.assertIn("[IN-USE]", await in_thread(two))

    async def test_wrong_passwords_throttled_while_others_are_served(self) -> None:
        """
        After repeated wrong passwords from one address, that address gets a temporary error
        even with the right password, while a client at another address logs in at once.
        """
        server = await self.start('[limits]\nauth_failures = 3\nauth_failure_delay = "0.1s"\n')
        port = server.port("pop3")

        def attempt(source: str, password: str) -> str:
            p = SourcePOP3("127.0.0.1", port, source)
            p.stls(client_tls_context())
            try:
                p.user(ALICE)
                p.pass_(password)
                p.quit()
                return "ok"
            except poplib.error_proto as e:
                return str(e)

        def run() -> list[str]:
            results = [attempt("127.0.0.1", "wrong") for _ in range(3)]
            results.append(attempt("127.0.0.1", PASSWORD))
            results.append(attempt("127.0.0.2", PASSWORD))
            return results

        results = await in_thread(run)
        self.assertTrue(all("[AUTH]" in r for r in results[:3]), results)
        self.assertIn("[SYS/TEMP]", results[3])
        self.assertEqual(results[4], "ok")

    async def test_curl_pop3s_retr_and_list(self) -> None:
        """curl lists and retrieves a message over pop3s."""
        if shutil.which("curl") is None:
            self.skipTest("curl not installed")
        server = await self.start()
        await in_thread(send, server, 1)
        port = server.port("pop3", 1)

        def curl(path: str) -> bytes:
            out = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--insecure",
                    "--user",
                    f"{ALICE}:{PASSWORD}",
                    f"pop3s://127.0.0.1:{port}/{path}",
                ],
                capture_output=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            return out.stdout

        listing = await in_thread(curl, "")
        body = await in_thread(curl, "1")
        [stored] = stored_files(server).values()
        self.assertEqual(listing, f"1 {len(stored)}\r\n".encode())
        self.assertEqual(body, stored)

    async def test_fetchmail_downloads_over_stls(self) -> None:
        """fetchmail fetches every message over STLS and hands each to its MDA."""
        if shutil.which("fetchmail") is None:
            self.skipTest("fetchmail not installed")
        server = await self.start()
        await in_thread(send, server, 1, 2)
        port = server.port("pop3")
        out_dir = Path(self.mktemp()).absolute()
        out_dir.mkdir(parents=True)
        rc = out_dir / "fetchmailrc"
        rc.write_text(
            f"poll 127.0.0.1 service {port} protocol POP3 auth password\n"
            f'  user "{ALICE}" password "{PASSWORD}"\n'
            f"  sslproto 'TLS1.2+' no sslcertck\n"
            f"  keep\n"
            f"  mda \"/bin/sh -c 'cat > {out_dir}/msg.$$'\"\n"
        )
        os.chmod(rc, 0o600)

        def run() -> subprocess.CompletedProcess[bytes]:
            env = dict(os.environ, HOME=str(out_dir), FETCHMAILHOME=str(out_dir))
            return subprocess.run(
                ["fetchmail", "-f", str(rc), "--nosyslog", "--nodetach", "-v"],
                capture_output=True,
                timeout=120,
                env=env,
            )

        result = await in_thread(run)
        self.assertIn(result.returncode, (0,), result.stdout + result.stderr)
        fetched = sorted(p.read_bytes() for p in out_dir.glob("msg.*"))
        self.assertEqual(len(fetched), 2)
        for n, data in enumerate(fetched, 1):
            self.assertIn(f"Subject: message {n}".encode(), data)
        self.assertEqual(len(stored_files(server)), 2)  # "keep"


class PlaintextListenerTests(TestCase):
    async def test_plaintext_listener_allowed_by_config(self) -> None:
        """
        A listener with tls = "none" and allow_plaintext_auth = true (a trusted network)
        takes USER/PASS without TLS; one without the setting refuses them.
        """
        listeners = """
[[listener]]
kind = "smtp"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"

[[listener]]
kind = "pop3"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
allow_plaintext_auth = true

[[listener]]
kind = "pop3"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
"""
        server = await start_server(self, listeners=listeners)
        await in_thread(send, server, 1)

        def read(port: int) -> str:
            p = poplib.POP3("127.0.0.1", port, timeout=10)
            try:
                p.user(ALICE)
                p.pass_(PASSWORD)
                _, lines, _ = p.retr(1)
                p.quit()
                return (b"\r\n".join(lines) + b"\r\n").decode()
            except poplib.error_proto as e:
                return str(e)

        allowed = await in_thread(read, server.port("pop3", 0))
        [stored] = stored_files(server).values()
        self.assertEqual(allowed.encode(), stored)
        refused = await in_thread(read, server.port("pop3", 1))
        self.assertIn("[AUTH]", refused)
