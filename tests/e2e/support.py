"""
Shared parts of the end-to-end tests: start the real service (L{mailserver.service.build}) on
loopback with a temporary data directory, run blocking stdlib clients in a thread, read what
arrived in the maildirs.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import TestCase

from mailserver import config as configuration
from mailserver.service import MailService, build

T = TypeVar("T")

DOMAIN = "example.test"
PASSWORD = "correct horse battery"


def config_text(data_dir: Path, extra: str = "", listeners: str | None = None) -> str:
    """A configuration for tests: loopback listeners on ephemeral ports."""
    if listeners is None:
        listeners = """
[[listener]]
kind = "smtp"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "starttls"

[[listener]]
kind = "smtp"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
"""
    return f"""
[server]
hostname = "mx.{DOMAIN}"
data_dir = "{data_dir}"
domain = "{DOMAIN}"
io_threads = 4
shutdown_grace = "5s"
{extra}
{listeners}
"""


class Running:
    """A started service and what tests need to reach it."""

    def __init__(self, root: MailService, data_dir: Path, cfg: configuration.Config) -> None:
        self.root = root
        self.data_dir = data_dir
        self.directory = root.directory
        self.config = cfg

    async def restart(self, test: TestCase) -> Running:
        """Stop this service and start a new one on the same data (new ports)."""
        await self.root.stopService()
        root = build(self.config, reactor)
        root.privilegedStartService()
        root.startService()
        test.addCleanup(root.stopService)
        return Running(root, self.data_dir, self.config)

    def port(self, kind: str = "smtp", index: int = 0) -> int:
        port = self.root.listener(kind, index).port
        assert port is not None
        return int(port.getHost().port)

    def maildir(self, account: str) -> Path:
        local, _, domain = account.rpartition("@")
        return self.data_dir / "mail" / domain / local

    def messages(self, account: str) -> list[bytes]:
        """The files in the account's C{new/}, oldest name first."""
        new = self.maildir(account) / "new"
        if not new.is_dir():
            return []
        return [(new / name).read_bytes() for name in sorted(os.listdir(new))]

    def bodies(self, account: str) -> list[bytes]:
        """Each stored message without the headers this server put on top."""
        return [strip_trace(m) for m in self.messages(account)]


def strip_trace(message: bytes) -> bytes:
    """Remove the Return-Path, Delivered-To and Received lines (and their folds) we prepend."""
    lines = message.split(b"\r\n")
    i = 0
    for prefix in (b"Return-Path:", b"Delivered-To:", b"Received:"):
        assert lines[i].startswith(prefix), (prefix, lines[i])
        i += 1
        while lines[i].startswith(b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


async def start_server(
    test: TestCase,
    extra: str = "",
    listeners: str | None = None,
    users: tuple[str, ...] = ("alice", "bob"),
) -> Running:
    """Build and start the real service for one test; it is stopped at cleanup."""
    data_dir = Path(test.mktemp()).absolute()
    data_dir.mkdir(parents=True)
    cfg = configuration.parse(config_text(data_dir, extra, listeners), source="test.toml")
    root = build(cfg, reactor)
    root.privilegedStartService()
    root.startService()
    test.addCleanup(root.stopService)
    running = Running(root, data_dir, cfg)
    for user in users:
        running.directory.add_user(f"{user}@{DOMAIN}", PASSWORD)
    return running


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking client off the reactor thread (calling it on the reactor deadlocks)."""
    result: T = await deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)
    return result


def client_tls_context() -> ssl.SSLContext:
    """A client context that accepts the server's self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RawClient:
    """A plain socket speaking SMTP by hand, for what smtplib cannot send (bare LF, BDAT...)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> bytes:
        """One whole (possibly multi-line) reply, without its final CRLF."""
        lines = []
        while True:
            line = self.read_line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"\r\n".join(lines)

    def read_line(self) -> bytes:
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

    def closed(self) -> bool:
        """Whether the server closes the connection (after what is buffered) within the timeout."""
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False  # still open
        except OSError:
            return True  # reset

    def close(self) -> None:
        self.sock.close()
