"""
End to end: users submitting mail on the submission listeners (587-style STARTTLS and
465-style implicit TLS) with real clients — smtplib, swaks, curl, msmtp (which picks
SCRAM-SHA-256 when its SASL library offers it) and neomutt in batch mode — and the refusals a
stranger meets: no relay on port 25 or without AUTH, no forged sender, no AUTH before TLS.

Local recipients are checked in their maildirs byte for byte; nothing here leaves 127.0.0.1
(remote delivery has its own tests in test_relay_e2e).
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import subprocess
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.support import (
    DOMAIN,
    PASSWORD,
    RawClient,
    Running,
    client_tls_context,
    in_thread,
    start_server,
)

LISTENERS = """
[[listener]]
kind = "smtp"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "starttls"

[[listener]]
kind = "submission"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "starttls"

[[listener]]
kind = "submission"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
"""

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def message(subject: str, sender: str = ALICE, to: str = BOB) -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@{DOMAIN}>\r\n\r\n"
        f"Hello Bob.\r\n.a line with a leading dot\r\nBye.\r\n"
    ).encode()


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise SkipTest(f"{program} is not installed (.ci/run installs it)")
    return path


def run(argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None) -> str:
    """Run a client to completion (bounded); its combined output for the failure message."""
    proc = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        timeout=60,
        env=env,
        check=False,
    )
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if proc.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {proc.returncode}:\n{out}")
    return out


def headers_of(stored: bytes) -> bytes:
    return stored.split(b"\r\n\r\n", 1)[0]


class SubmissionClientTests(TestCase):
    async def start(self) -> Running:
        self.server = await start_server(self, listeners=LISTENERS)
        return self.server

    def starttls_port(self) -> int:
        return self.server.port("submission", 0)

    def implicit_port(self) -> int:
        return self.server.port("submission", 1)

    def assert_arrived(self, subject: str, count: int = 1) -> bytes:
        """Bob got exactly C{count} messages with this subject; the last one is returned."""
        found = [m for m in self.server.messages(BOB) if f"Subject: {subject}".encode() in m]
        self.assertEqual(len(found), count, f"{subject!r}: {len(found)} copies")
        stored = found[-1]
        self.assertTrue(stored.startswith(f"Return-Path: <{ALICE}>\r\n".encode()), stored[:80])
        return stored

    async def test_smtplib_starttls_plain_login(self) -> None:
        """smtplib: STARTTLS, AUTH PLAIN, a message arrives byte for byte, Received says ESMTPSA."""
        await self.start()
        port = self.starttls_port()
        data = message("smtplib starttls")

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("laptop.example")
                self.assertFalse(s.has_extn("auth"), "AUTH offered before TLS")
                s.starttls(context=client_tls_context())
                s.ehlo("laptop.example")
                self.assertIn("PLAIN", s.esmtp_features["auth"])
                self.assertIn("SCRAM-SHA-256", s.esmtp_features["auth"])
                s.login(ALICE, PASSWORD)
                s.sendmail(ALICE, [BOB], data)

        await in_thread(send)
        stored = self.assert_arrived("smtplib starttls")
        self.assertTrue(stored.endswith(data), stored)
        self.assertIn(b"with ESMTPSA", headers_of(stored))
        self.assertNotIn(PASSWORD.encode(), stored)

    async def test_smtplib_implicit_tls_login_mechanism(self) -> None:
        """smtplib over implicit TLS with AUTH LOGIN."""
        await self.start()
        port = self.implicit_port()
        data = message("smtplib implicit")

        def send() -> None:
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_tls_context()) as s:
                s.ehlo("laptop.example")
                s.user, s.password = ALICE, PASSWORD
                code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
                self.assertEqual(code, 235)
                s.sendmail(ALICE, [BOB], data)

        await in_thread(send)
        self.assertTrue(self.assert_arrived("smtplib implicit").endswith(data))

    async def test_swaks_both_ports(self) -> None:
        """swaks submits over STARTTLS (587 style) and implicit TLS (465 style) with AUTH PLAIN."""
        swaks = need("swaks")
        await self.start()
        for subject, flags in (
            ("swaks starttls", ["--port", str(self.starttls_port()), "--tls"]),
            ("swaks implicit", ["--port", str(self.implicit_port()), "--tlsc"]),
        ):
            argv = [
                swaks,
                "--server",
                "127.0.0.1",
                *flags,
                "--auth",
                "PLAIN",
                "--auth-user",
                ALICE,
                "--auth-password",
                PASSWORD,
                "--from",
                ALICE,
                "--to",
                BOB,
                "--header",
                f"Subject: {subject}",
                "--body",
                "sent by swaks",
                "--timeout",
                "20",
            ]
            out = await in_thread(run, argv)
            self.assertIn("235 2.7.0", out)
            self.assertIn(b"sent by swaks", self.assert_arrived(subject))

    async def test_curl_both_ports(self) -> None:
        """curl submits with --ssl-reqd on the STARTTLS port and smtps:// on the implicit one."""
        curl = need("curl")
        await self.start()
        for subject, url in (
            ("curl starttls", f"smtp://127.0.0.1:{self.starttls_port()}"),
            ("curl implicit", f"smtps://127.0.0.1:{self.implicit_port()}"),
        ):
            data = message(subject)
            argv = [
                curl,
                "--silent",
                "--show-error",
                "--max-time",
                "30",
                url,
                "--ssl-reqd",
                "--insecure",
                "--user",
                f"{ALICE}:{PASSWORD}",
                "--mail-from",
                ALICE,
                "--mail-rcpt",
                BOB,
                "--crlf",
                "--upload-file",
                "-",
            ]
            await in_thread(run, argv, data.replace(b"\r\n", b"\n"))
            self.assertTrue(self.assert_arrived(subject).endswith(data))

    async def test_msmtp_scram_and_plain(self) -> None:
        """msmtp logs in with SCRAM-SHA-256 (and with PLAIN) and submits a message."""
        msmtp = need("msmtp")
        await self.start()
        home = Path(self.mktemp()).absolute()
        home.mkdir()
        for subject, auth, tls in (
            ("msmtp scram", "scram-sha-256", f"port {self.starttls_port()}\ntls_starttls on"),
            ("msmtp plain", "plain", f"port {self.implicit_port()}\ntls_starttls off"),
        ):
            conf = home / f"{auth}.msmtprc"
            conf.write_text(
                "account default\n"
                "host 127.0.0.1\n"
                f"{tls}\n"
                "tls on\n"
                "tls_certcheck off\n"
                f"auth {auth}\n"
                f"user {ALICE}\n"
                f"password {PASSWORD}\n"
                f"from {ALICE}\n"
                "timeout 20\n"
            )
            conf.chmod(0o600)
            argv = [msmtp, "-C", str(conf), "--read-envelope-from", "-t"]
            out = await in_thread(run, argv, message(subject).replace(b"\r\n", b"\n"))
            self.assertNotIn("error", out.lower())
            self.assert_arrived(subject)

    async def test_neomutt_batch_send(self) -> None:
        """neomutt in batch mode (-n -F muttrc) sends over STARTTLS and over implicit TLS."""
        neomutt = need("neomutt")
        server = await self.start()
        home = Path(self.mktemp()).absolute()
        home.mkdir()
        cert = server.data_dir / "tls" / "cert.pem"
        user = ALICE.replace("@", "%40")
        env = {
            "HOME": str(home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "TERM": "dumb",
            "LANG": "C.UTF-8",
        }
        for subject, url in (
            ("neomutt starttls", f"smtp://{user}@127.0.0.1:{self.starttls_port()}/"),
            ("neomutt implicit", f"smtps://{user}@127.0.0.1:{self.implicit_port()}/"),
        ):
            muttrc = home / "muttrc"
            muttrc.write_text(
                f'set smtp_url="{url}"\n'
                f'set smtp_pass="{PASSWORD}"\n'
                "set ssl_starttls=yes\n"
                "set ssl_force_tls=yes\n"
                f'set certificate_file="{cert}"\n'
                "set ssl_verify_host=no\n"
                f'set from="{ALICE}"\n'
                "set use_from=yes\n"
                'set record=""\n'
                "set charset=utf-8\n"
                "set send_charset=utf-8\n"
            )
            argv = [neomutt, "-n", "-F", str(muttrc), "-s", subject, "--", BOB]
            await in_thread(run, argv, f"Sent by neomutt: {subject}.\n".encode(), env)
            stored = self.assert_arrived(subject)
            self.assertIn(f"Sent by neomutt: {subject}.".encode(), stored)


class SubmissionRefusalTests(TestCase):
    async def test_port_25_never_relays_or_offers_auth(self) -> None:
        """Port 25: no AUTH in EHLO (even after STARTTLS), AUTH refused, remote RCPT 554 5.7.1."""
        server = await start_server(self, listeners=LISTENERS)
        port = server.port("smtp")

        def talk() -> tuple[bytes, bytes, bytes, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.starttls(context=client_tls_context())
                _, ehlo = s.ehlo("x.example")
                auth = s.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwdw==")
                s.docmd("MAIL", f"FROM:<{ALICE}>")
                code, text = s.docmd("RCPT", "TO:<victim@elsewhere.example>")
                return ehlo, str(auth[0]).encode(), str(code).encode(), text

        ehlo, auth, code, text = await in_thread(talk)
        self.assertNotIn(b"AUTH", ehlo)
        self.assertEqual(auth, b"502")
        self.assertEqual(code, b"554")
        self.assertIn(b"5.7.1", text)

    async def test_submission_without_auth_refused_for_everyone(self) -> None:
        """Submission before AUTH: MAIL gets 530 5.7.0, whether the recipient is local or not."""
        server = await start_server(self, listeners=LISTENERS)
        port = server.port("submission", 1)

        def talk() -> list[tuple[int, bytes]]:
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_tls_context()) as s:
                s.ehlo("x.example")
                out = [s.docmd("MAIL", f"FROM:<{ALICE}>")]
                out.append(s.docmd("RCPT", f"TO:<{BOB}>"))
                out.append(s.docmd("RCPT", "TO:<victim@elsewhere.example>"))
                return out

        mail, rcpt_local, rcpt_remote = await in_thread(talk)
        self.assertEqual(mail[0], 530)
        self.assertIn(b"5.7.0", mail[1])
        self.assertNotEqual(rcpt_local[0], 250)
        self.assertNotEqual(rcpt_remote[0], 250)
        self.assertEqual(server.messages(BOB), [])

    async def test_forged_sender_refused(self) -> None:
        """Alice may not send as Bob (553 5.7.1), nor with <>; as herself or alias she may."""
        server = await start_server(self, listeners=LISTENERS)
        server.directory.add_alias(f"sales@{DOMAIN}", ALICE)
        port = server.port("submission", 1)

        def talk() -> list[int]:
            codes = []
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_tls_context()) as s:
                s.login(ALICE, PASSWORD)
                for sender in (BOB, "", "ceo@elsewhere.example", f"sales@{DOMAIN}"):
                    code, _ = s.docmd("MAIL", f"FROM:<{sender}>")
                    codes.append(code)
                    s.rset()
            return codes

        self.assertEqual(await in_thread(talk), [553, 553, 553, 250])

    async def test_auth_not_before_tls(self) -> None:
        """On the STARTTLS port a password before TLS is refused (538), not checked."""
        server = await start_server(self, listeners=LISTENERS)
        port = server.port("submission", 0)

        def talk() -> bytes:
            c = RawClient(port)
            try:
                c.read_reply()
                c.send(b"EHLO x.example\r\n")
                ehlo = c.read_reply()
                self.assertNotIn(b"AUTH", ehlo)
                c.send(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0IGhvcnNlIGJhdHRlcnk=\r\n")
                return c.read_reply()
            finally:
                c.close()

        reply = await in_thread(talk)
        self.assertTrue(reply.startswith(b"538 5.7.11"), reply)

    async def test_wrong_password_then_throttled(self) -> None:
        """Wrong passwords get 535 5.7.8; past the limit the client gets 454 4.7.0 at once."""
        server = await start_server(
            self,
            listeners=LISTENERS,
            extra='[limits]\nauth_failures = 2\nauth_failure_delay = "0"\n',
        )
        port = server.port("submission", 1)

        wrong = base64.b64encode(f"\0{ALICE}\0wrong password".encode()).decode()
        right = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()

        def talk() -> list[int]:
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_tls_context()) as s:
                s.ehlo("x.example")
                codes = [s.docmd("AUTH", f"PLAIN {wrong}")[0] for _ in range(2)]
                # Throttled now: even the right password is not checked.
                codes.append(s.docmd("AUTH", f"PLAIN {right}")[0])
            return codes

        self.assertEqual(await in_thread(talk), [535, 535, 454])
