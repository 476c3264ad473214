"""
POP3's UPDATE state under SIGKILL: a server killed while it carries out the deletions of a
QUIT has, after a restart, deleted all of them or none (RFC 1939 §6 and DESIGN.md §3).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailserver.directory import open_directory
from tests.e2e.support import DOMAIN, PASSWORD
from tests.e2e.test_process import ChildServer, free_port, wait_for_port

ALICE = f"alice@{DOMAIN}"
MESSAGES = 150


class LineClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def line(self) -> bytes:
        deadline = time.monotonic() + 30
        while b"\r\n" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no complete line")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; partial {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def close(self) -> None:
        self.sock.close()


class QuitCrashTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        self.pop3_port = free_port()
        self.server = ChildServer(
            self.base,
            extra=(
                "[[listener]]\n"
                'kind = "pop3"\n'
                f'endpoint = "tcp:{self.pop3_port}:interface=127.0.0.1"\n'
                'tls = "none"\n'
                "allow_plaintext_auth = true\n"
            ),
        )
        directory = open_directory(self.server.data_dir, DOMAIN)
        directory.bootstrap(DOMAIN)
        directory.add_user(ALICE, PASSWORD)
        directory.close()
        self.maildir = self.server.data_dir / "mail" / DOMAIN / "alice"
        self.addCleanup(self.server.stop, signal.SIGKILL)

    def fill(self) -> None:
        """Put MESSAGES messages into new/ as a delivery would."""
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        for i in range(MESSAGES):
            data = f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode()
            name = f"{1_700_000_000 + i}.M{i}P1Q{i}.test,S={len(data)},W={len(data)}"
            (self.maildir / "new" / name).write_bytes(data)

    def files(self) -> int:
        return sum(len(os.listdir(self.maildir / sub)) for sub in ("cur", "new"))

    def login(self) -> LineClient:
        c = LineClient(self.pop3_port)
        self.assertTrue(c.line().startswith(b"+OK"))
        self.assertTrue(c.command(f"USER {ALICE}").startswith(b"+OK"))
        self.assertTrue(c.command(f"PASS {PASSWORD}").startswith(b"+OK"))
        return c

    def stat(self) -> int:
        c = self.login()
        reply = c.command("STAT")
        c.command("QUIT")
        c.close()
        self.assertTrue(reply.startswith(b"+OK "), reply)
        return int(reply.split()[1])

    def test_kill_during_quit_deletes_all_or_none(self) -> None:
        """
        Rounds of: log in, DELE every message, QUIT, SIGKILL the server a little later (a
        different delay each round, across the time the deletions take). After each restart
        the mailbox has every message or none, and the files agree with what POP3 shows.
        """
        outcomes = []
        for delay in (0.0, 0.001, 0.003, 0.006, 0.01, 0.02, 0.05):
            if not self.maildir.exists() or self.files() == 0:
                self.fill()
            self.server.start()
            wait_for_port(self.pop3_port, self.server.proc)  # type: ignore[arg-type]
            before = self.stat()
            self.assertEqual(before, MESSAGES)
            c = self.login()
            c.sock.sendall(b"".join(f"DELE {i}\r\n".encode() for i in range(1, before + 1)))
            for _ in range(before):
                self.assertTrue(c.line().startswith(b"+OK"))
            c.sock.sendall(b"QUIT\r\n")
            time.sleep(delay)
            self.server.stop(signal.SIGKILL)
            c.close()

            self.server.start()
            wait_for_port(self.pop3_port, self.server.proc)  # type: ignore[arg-type]
            after = self.stat()
            self.assertIn(after, (0, MESSAGES), f"partial deletion after a {delay}s kill")
            self.assertEqual(self.files(), after, "files and index disagree")
            outcomes.append(after)
            self.assertEqual(self.server.stop(), 0)
        # The rounds spanned the deletion: at least one kill came after it was done.
        self.assertIn(0, outcomes)
