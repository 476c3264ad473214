"""
End to end with the server as a real child process (C{twistd mailserver}): crash safety under
SIGKILL, graceful stop on SIGTERM, start-up with no configuration file.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailserver.directory import open_directory
from mailserver.tls import ensure_self_signed
from tests.e2e.support import DOMAIN, PASSWORD, RawClient, client_tls_context

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


class ChildServer:
    """A C{twistd -n mailserver --config ...} child with its own data directory."""

    def __init__(self, base: Path, extra: str = "", tls: str = "none") -> None:
        self.base = base
        self.data_dir = base / "data"
        self.port = free_port()
        self.config = base / "mailserver.toml"
        self.config.write_text(
            f"""
[server]
hostname = "mx.{DOMAIN}"
data_dir = "data"
domain = "{DOMAIN}"
shutdown_grace = "10s"
{extra}
[[listener]]
kind = "smtp"
endpoint = "tcp:{self.port}:interface=127.0.0.1"
tls = "{tls}"
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.base / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "mailserver", "--config", str(self.config)],
            cwd=self.base,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.port, self.proc)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def new_files(self, account: str) -> list[Path]:
        local, _, domain = account.rpartition("@")
        new = self.data_dir / "mail" / domain / local / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


def message(marker: str) -> bytes:
    # Big enough that a torn write would show, small enough to send many.
    filler = (f"{marker} " * 40 + "\r\n").encode() * 30
    return f"Subject: {marker}\r\nX-Marker: {marker}\r\n\r\n".encode() + filler + b"end\r\n"


class CrashSafetyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        self.server = ChildServer(self.base)
        directory = open_directory(self.server.data_dir, DOMAIN)
        directory.bootstrap(DOMAIN)
        directory.add_user(f"alice@{DOMAIN}", PASSWORD)
        directory.close()
        self.addCleanup(self.server.stop, signal.SIGKILL)

    def test_sigkill_mid_traffic_loses_no_acknowledged_message(self) -> None:
        """
        Several clients send concurrently; the server is SIGKILLed mid-traffic. After a
        restart every message that got a 250 is in the maildir exactly once, and every file in
        new/ is one whole message (no torn file).
        """
        self.server.start()
        acked: list[str] = []
        sent: dict[str, bytes] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def client(n: int) -> None:
            for i in range(400):  # bounded; the kill ends it much sooner
                if stop.is_set():
                    return
                marker = f"c{n}m{i}"
                body = message(marker)
                with lock:
                    sent[marker] = body
                try:
                    with smtplib.SMTP("127.0.0.1", self.server.port, timeout=10) as s:
                        s.sendmail("bob@sender.example", [f"alice@{DOMAIN}"], body)
                except (OSError, smtplib.SMTPException):
                    return
                with lock:
                    acked.append(marker)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, n) for n in range(6)]
            deadline = time.monotonic() + 30
            while len(acked) < 60 and time.monotonic() < deadline:
                time.sleep(0.01)
            self.server.stop(signal.SIGKILL)
            stop.set()
            for f in futures:
                f.result(timeout=60)
        self.assertGreaterEqual(len(acked), 60)

        self.server.start()
        seen: dict[str, int] = {}
        for path in self.server.new_files(f"alice@{DOMAIN}"):
            data = path.read_bytes()
            head, _, body = data.partition(b"\r\nSubject: ")
            marker = body.split(b"\r\n", 1)[0].decode()
            self.assertIn(marker, sent, f"unknown or torn file {path.name}")
            self.assertTrue(data.endswith(sent[marker]), f"torn file {path.name}")
            seen[marker] = seen.get(marker, 0) + 1
        for marker in acked:
            self.assertEqual(
                seen.get(marker), 1, f"acknowledged {marker} stored {seen.get(marker)}x"
            )
        self.assertEqual([m for m, n in seen.items() if n != 1], [])

        # And the restarted server takes mail again.
        with smtplib.SMTP("127.0.0.1", self.server.port, timeout=10) as s:
            s.sendmail("bob@sender.example", [f"alice@{DOMAIN}"], message("after"))
        self.assertEqual(self.server.stop(), 0)


class GracefulStopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        self.server = ChildServer(self.base)
        directory = open_directory(self.server.data_dir, DOMAIN)
        directory.bootstrap(DOMAIN)
        directory.add_user(f"alice@{DOMAIN}", PASSWORD)
        directory.close()
        self.addCleanup(self.server.stop, signal.SIGKILL)

    def test_sigterm_lets_message_in_data_finish_and_exits_0(self) -> None:
        """
        SIGTERM while a client is in the middle of DATA: the listener closes at once, the
        client still finishes its message and gets 250 (then 421), an idle session gets 421,
        and the process exits with status 0.
        """
        self.server.start()
        assert self.server.proc is not None
        busy = RawClient(self.server.port)
        idle = RawClient(self.server.port)
        try:
            self.assertTrue(busy.read_reply().startswith(b"220"))
            self.assertTrue(idle.read_reply().startswith(b"220"))
            busy.send(
                b"EHLO c.example\r\nMAIL FROM:<b@s.example>\r\nRCPT TO:<alice@example.test>\r\n"
            )
            for _ in range(3):
                busy.read_reply()
            busy.send(b"DATA\r\n")
            self.assertTrue(busy.read_reply().startswith(b"354"))
            busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
            self.server.proc.send_signal(signal.SIGTERM)
            self.assertTrue(idle.read_reply().startswith(b"421"))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the listener closes at once
                try:
                    socket.create_connection(("127.0.0.1", self.server.port), timeout=1).close()
                except OSError:
                    break
                time.sleep(0.05)
            else:
                self.fail("listener still open after SIGTERM")
            busy.send(b"second half\r\n.\r\n")
            self.assertTrue(busy.read_reply().startswith(b"250"))
            self.assertTrue(busy.read_reply().startswith(b"421"))
        finally:
            busy.close()
            idle.close()
        self.assertEqual(self.server.proc.wait(30), 0)
        [stored] = self.server.new_files(f"alice@{DOMAIN}")
        self.assertTrue(stored.read_bytes().endswith(b"first half\r\nsecond half\r\n"))


class ReloadTests(SynchronousTestCase):
    def test_sighup_loads_new_certificate(self) -> None:
        """
        After the certificate files are replaced, SIGHUP makes new STARTTLS connections get
        the new certificate, without a restart; the server keeps running.
        """
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        first = ensure_self_signed(base / "one", "one.example")
        second = ensure_self_signed(base / "two", "two.example")
        shutil.copy(first[0], base / "cert.pem")
        shutil.copy(first[1], base / "key.pem")
        server = ChildServer(
            base, extra='[tls]\ncert = "cert.pem"\nkey = "key.pem"\n', tls="starttls"
        )
        self.addCleanup(server.stop, signal.SIGKILL)
        server.start()
        assert server.proc is not None

        def peer_certificate() -> bytes:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as s:
                s.starttls(context=client_tls_context())
                der = s.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
                assert der is not None
                return der

        before = peer_certificate()
        self.assertEqual(before, ssl.PEM_cert_to_DER_cert(first[0].read_text()))
        shutil.copy(second[0], base / "cert.pem")
        shutil.copy(second[1], base / "key.pem")
        server.proc.send_signal(signal.SIGHUP)
        expected = ssl.PEM_cert_to_DER_cert(second[0].read_text())
        deadline = time.monotonic() + 10
        while peer_certificate() != expected:
            self.assertLess(time.monotonic(), deadline, "certificate not reloaded")
            time.sleep(0.1)
        self.assertIsNone(server.proc.poll())
        self.assertEqual(server.stop(), 0)


class FirstStartTests(SynchronousTestCase):
    def test_no_config_file_starts_with_embedded_default(self) -> None:
        """
        C{twistd -n mailserver} with no --config starts on the embedded default: SMTP on
        127.0.0.1:2525, data under ./var, a self-signed certificate, a postmaster account whose
        password is printed once and stored 0600 in var/initial-password.
        """
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        try:
            socket.create_connection(("127.0.0.1", 2525), timeout=1).close()
            raise self.skipTest("port 2525 is in use on this machine")
        except OSError:
            pass
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "mailserver"],
            cwd=base,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(2525, proc)
            with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as s:
                s.starttls()
                s.sendmail(
                    "x@elsewhere.example", ["postmaster@localhost"], b"Subject: hi\r\n\r\nhi\r\n"
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 0, output)
        password_file = base / "var" / "initial-password"
        self.assertEqual(os.stat(password_file).st_mode & 0o777, 0o600)
        address, password = password_file.read_text().split()
        self.assertEqual(address, "postmaster@localhost")
        self.assertEqual(output.count(password.encode()), 1)
        self.assertTrue((base / "var" / "tls" / "cert.pem").exists())
        new = base / "var" / "mail" / "localhost" / "postmaster" / "new"
        self.assertEqual(len(os.listdir(new)), 1)
