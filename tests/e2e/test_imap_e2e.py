"""
End to end IMAP: mail delivered by SMTP, read, flagged, copied, moved, appended and expunged
with imaplib (and curl) against the real service on loopback.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import smtplib
import subprocess
import time

from twisted.trial.unittest import TestCase

from tests.e2e.support import DOMAIN, PASSWORD, Running, client_tls_context, in_thread, start_server

LISTENERS = """
[[listener]]
kind = "smtp"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"

[[listener]]
kind = "imap"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "starttls"

[[listener]]
kind = "imap"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
"""

ALICE = f"alice@{DOMAIN}"


def message(n: int) -> bytes:
    return (
        f"From: Bob <bob@sender.example>\r\nTo: {ALICE}\r\nSubject: message {n}\r\n"
        f"Message-ID: <m{n}@sender.example>\r\n\r\n"
        f"Body of message {n}.\r\n.leading dot\r\nlast line\r\n"
    ).encode()


def send(server: Running, *numbers: int) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as s:
        for n in numbers:
            s.sendmail("bob@sender.example", [ALICE], message(n))


def login(port: int) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    m.starttls(client_tls_context())
    m.login(ALICE, PASSWORD)
    return m


def stored(server: Running) -> list[bytes]:
    out = []
    for sub in ("new", "cur"):
        d = server.maildir(ALICE) / sub
        for name in sorted(os.listdir(d)) if d.is_dir() else []:
            out.append((d / name).read_bytes())
    return out


class IMAPTests(TestCase):
    async def start(self) -> Running:
        return await start_server(self, listeners=LISTENERS)

    async def test_login_disabled_before_starttls(self) -> None:
        """On 143 without TLS: LOGINDISABLED and LOGIN refused; after STARTTLS it works."""
        server = await self.start()
        port = server.port("imap")

        def run() -> tuple[tuple[str, ...], str, tuple[str, ...]]:
            m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
            before = m.capabilities
            try:
                m.login(ALICE, PASSWORD)
                refused = "accepted"
            except imaplib.IMAP4.error as e:
                refused = str(e)
            m.starttls(client_tls_context())
            m.login(ALICE, PASSWORD)
            after = m.capabilities
            m.logout()
            return before, refused, after

        before, refused, after = await in_thread(run)
        self.assertIn("LOGINDISABLED", before)
        self.assertIn("STARTTLS", before)
        self.assertIn("PRIVACYREQUIRED", refused)
        self.assertIn("IDLE", after)

    async def test_fetch_is_byte_exact_and_flags_persist(self) -> None:
        """
        BODY[] of mail delivered by SMTP is the stored file byte for byte; \\Seen set by the
        fetch and a flag set by STORE are there in a new session; UIDs stay the same.
        """
        server = await self.start()
        await in_thread(send, server, 1, 2)
        port = server.port("imap")

        def first() -> tuple[list[bytes], bytes, bytes]:
            m = login(port)
            typ, data = m.select("INBOX")
            assert typ == "OK" and data == [b"2"], data
            bodies = []
            for n in (1, 2):
                typ, fetched = m.fetch(str(n), "(BODY[])")
                bodies.append(fetched[0][1])
            m.store("2", "+FLAGS", "(\\Flagged $Work)")
            typ, uids = m.uid("SEARCH", "ALL")
            typ, flags = m.fetch("1:2", "(UID FLAGS)")
            m.logout()
            return bodies, uids[0], b" ".join(flags)

        bodies, uids, flags = await in_thread(first)
        self.assertEqual(sorted(bodies), sorted(stored(server)))
        self.assertIn(b"\\Seen", flags)
        self.assertIn(b"$Work", flags)

        def second() -> tuple[bytes, bytes, bytes]:
            m = login(port)
            m.select("INBOX", readonly=True)
            typ, now = m.uid("SEARCH", "ALL")
            typ, flags = m.fetch("2", "(FLAGS)")
            typ, unseen = m.search(None, "UNSEEN")
            m.logout()
            return now[0], flags[0], unseen[0]

        now, flags2, unseen = await in_thread(second)
        self.assertEqual(now, uids)
        self.assertIn(b"\\Flagged", flags2)
        self.assertIn(b"\\Seen", flags2)
        self.assertEqual(unseen, b"")

    async def test_special_folders_list_copy_move_expunge(self) -> None:
        """
        A new account lists INBOX and the special-use folders; COPY answers COPYUID, MOVE
        empties the source; EXPUNGE removes \\Deleted messages.
        """
        server = await self.start()
        await in_thread(send, server, 1, 2, 3)
        port = server.port("imap")

        def run() -> dict[str, object]:
            m = login(port)
            out: dict[str, object] = {}
            out["list"] = m.list()[1]
            m.select("INBOX")
            out["copy"] = m.copy("1", "Archive")
            out["move"] = m._simple_command("MOVE", "2", "Trash")
            out["after_move"] = m.select("INBOX")[1]
            m.store("1", "+FLAGS", "(\\Deleted)")
            out["expunge"] = m.expunge()
            out["archive"] = m.status("Archive", "(MESSAGES UIDNEXT)")[1]
            out["trash"] = m.status("Trash", "(MESSAGES)")[1]
            m.logout()
            return out

        out = await in_thread(run)
        listing = b"\n".join(out["list"])  # type: ignore[arg-type]
        for name, use in (("Sent", "\\Sent"), ("Trash", "\\Trash"), ("Archive", "\\Archive")):
            self.assertRegex(
                listing, re.compile(rf'\(.*{re.escape(use)}.*\) "/" "?{name}"?'.encode())
            )
        self.assertIn(b"COPYUID", out["copy"][1][0])  # type: ignore[index]
        self.assertEqual(out["after_move"], [b"2"])
        self.assertEqual(out["expunge"][1], [b"1"])  # type: ignore[index]
        self.assertIn(b"MESSAGES 1", out["archive"][0])  # type: ignore[index]
        self.assertIn(b"MESSAGES 1", out["trash"][0])  # type: ignore[index]
        self.assertEqual(len(stored(server)), 1)

    async def test_append_and_imaps(self) -> None:
        """APPEND over implicit TLS stores the message byte for byte with APPENDUID."""
        server = await self.start()
        port = server.port("imap", 1)
        data = b"Subject: appended\r\n\r\n" + b"x" * 70000 + b"\r\n"

        def run() -> tuple[object, bytes]:
            m = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_tls_context(), timeout=10)
            m.login(ALICE, PASSWORD)
            result = m.append("INBOX", "(\\Seen)", None, data)
            m.select("INBOX")
            typ, fetched = m.fetch("1", "(BODY.PEEK[])")
            m.logout()
            return result, fetched[0][1]

        result, body = await in_thread(run)
        self.assertIn(b"APPENDUID", result[1][0])  # type: ignore[index]
        self.assertEqual(body, data)

    async def test_idle_woken_by_delivery(self) -> None:
        """An IDLE session sees * n EXISTS within a second of an SMTP delivery."""
        server = await self.start()
        await in_thread(send, server, 1)
        port = server.port("imap")

        def run() -> tuple[bytes, float]:
            m = login(port)
            m.select("INBOX")
            tag = m._new_tag()
            m.send(tag + b" IDLE\r\n")
            assert m.readline().startswith(b"+")
            start = time.monotonic()
            send(server, 2)
            m.sock.settimeout(5)
            line = m.readline()
            took = time.monotonic() - start
            m.send(b"DONE\r\n")
            done = m.readline()
            assert done.startswith(tag + b" OK"), done
            m.logout()
            return line, took

        line, took = await in_thread(run)
        self.assertEqual(line, b"* 2 EXISTS\r\n")
        self.assertLess(took, 1.0)

    async def test_curl_imaps_list_and_fetch(self) -> None:
        if shutil.which("curl") is None:
            self.skipTest("curl not installed")
        server = await self.start()
        await in_thread(send, server, 1)
        port = server.port("imap", 1)

        def curl(path: str) -> bytes:
            out = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--insecure",
                    "--user",
                    f"{ALICE}:{PASSWORD}",
                    f"imaps://127.0.0.1:{port}/{path}",
                ],
                capture_output=True,
                timeout=60,
            )
            assert out.returncode == 0, out.stderr
            return out.stdout

        listing = await in_thread(curl, "")
        body = await in_thread(curl, "INBOX;UID=1")
        self.assertIn(b"INBOX", listing)
        self.assertIn(b"Archive", listing)
        [data] = stored(server)
        self.assertEqual(body, data)
