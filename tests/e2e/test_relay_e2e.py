"""
End to end: mail submitted by a user leaves through the outbound queue to "remote" MX hosts —
real SMTP servers on loopback addresses (tests.netsim sinks), found through a real
twisted.names DNS server on loopback — with fallback, retries, bounces, the queue command on
the live queue, and a SIGKILL in the middle.
"""

from __future__ import annotations

import email
import email.policy
import signal
import smtplib
import subprocess
import sys
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailserver.directory import open_directory
from tests.e2e.support import DOMAIN, PASSWORD, Running, config_text, in_thread, start_server
from tests.e2e.test_process import ChildServer, free_port
from tests.netsim import DNSFixture, Sink, SinkBehaviour, start_dns, start_sink, start_sinks

ALICE = f"alice@{DOMAIN}"

LISTENERS = """
[[listener]]
kind = "submission"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"
allow_plaintext_auth = true
"""


def message(subject: str, to: str) -> bytes:
    return (
        f"From: Alice <{ALICE}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@{DOMAIN}>\r\n\r\n"
        "Hello.\r\n.a line with a leading dot\r\n..and two\r\nBye.\r\n"
    ).encode()


def submit(port: int, items: list[tuple[str, bytes]]) -> None:
    """Log in as alice on the submission port and send each (recipient, message)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.login(ALICE, PASSWORD)
        for rcpt, data in items:
            s.sendmail(ALICE, [rcpt], data)


async def until(predicate: Callable[[], bool], seconds: float = 20.0) -> None:
    """Wait (bounded) for C{predicate} to hold."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await deferLater(reactor, 0.05)
    raise AssertionError("condition not met in time")


def mailserver_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailserver.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class RelayTests(TestCase):
    """One server, one DNS server, several MX sinks; each test uses its own domains."""

    async def setUp(self) -> None:
        port, sinks = start_sinks(
            reactor,
            {
                "127.0.0.3": SinkBehaviour(),
                "127.0.0.4": SinkBehaviour(temp_fail=1),
                "127.0.0.5": SinkBehaviour(reject=frozenset({"nobody@reject.test"}), dsn=False),
                "127.0.0.6": SinkBehaviour(drop_in_data=1),
            },
        )
        self.sinks: dict[str, Sink] = sinks
        for sink in sinks.values():
            self.addCleanup(sink.stop)
        # 127.0.0.2 is an MX where nothing listens (a host that is down).
        self.dns: DNSFixture = start_dns(
            reactor,
            {
                "remote.test": {"MX": [(10, "down.remote.test"), (20, "up.remote.test")]},
                "down.remote.test": {"A": ["127.0.0.2"]},
                "up.remote.test": {"A": ["127.0.0.3"]},
                "pref.test": {"MX": [(10, "up.remote.test"), (20, "slow.test")]},
                "slow.test": {"MX": [(10, "slow.test")], "A": ["127.0.0.4"]},
                "reject.test": {"MX": [(10, "reject.test")], "A": ["127.0.0.5"]},
                "flaky.test": {"MX": [(10, "flaky.test")], "A": ["127.0.0.6"]},
                "nomx.test": {"A": ["127.0.0.3"]},
                "null.test": {"MX": [(0, ".")]},
                "offline.test": {"MX": [(10, "down.remote.test")]},
                "nodsn.test": {"MX": [(10, "reject.test")]},
            },
        )
        self.addCleanup(self.dns.stop)
        self.extra = f"""
[dns]
nameservers = ["{self.dns.nameserver}"]
timeout = "3s"

[queue]
retry = ["300ms"]
mx_port = {port}
connect_timeout = "5s"
command_timeout = "10s"
"""
        self.server: Running = await start_server(self, extra=self.extra, listeners=LISTENERS)
        self.port = self.server.port("submission")

    def received(self, address: str, recipient: str) -> list[bytes]:
        return [m.data for m in self.sinks[address].messages if recipient in m.recipients]

    def queue_files(self) -> list[str]:
        q = self.server.data_dir / "queue"
        return sorted(p.name for p in q.iterdir() if p.suffix == ".msg")

    def notices(self) -> list[EmailMessage]:
        out = []
        for raw in self.server.messages(ALICE):
            self.assertTrue(raw.startswith(b"Return-Path: <>\r\n"), raw[:60])
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            out.append(msg)
        return out

    async def test_fallback_to_next_mx_byte_for_byte(self) -> None:
        """The preferred MX is down: the next one gets the message, exactly as submitted."""
        data = message("fallback", "carol@remote.test")
        await in_thread(submit, self.port, [("carol@remote.test", data)])
        await until(lambda: bool(self.received("127.0.0.3", "carol@remote.test")))
        [got] = self.received("127.0.0.3", "carol@remote.test")
        self.assertTrue(got.startswith(b"Received: "), got[:40])
        self.assertTrue(got.endswith(data), got)
        [msg] = [m for m in self.sinks["127.0.0.3"].messages if "carol@remote.test" in m.recipients]
        self.assertEqual(msg.mail_from, ALICE)
        await until(lambda: self.queue_files() == [])
        # The connection is kept for a moment for more mail; stopping the server QUITs it.
        self.assertNotIn("QUIT", self.sinks["127.0.0.3"].commands)
        await self.server.root.stopService()
        self.assertIn("QUIT", self.sinks["127.0.0.3"].commands)

    async def test_preferred_mx_used_and_no_mx_means_a_record(self) -> None:
        """With both MX hosts up the preferred one gets it; a domain with no MX, its A host."""
        await in_thread(
            submit,
            self.port,
            [
                ("dave@pref.test", message("preferred", "dave@pref.test")),
                ("erin@nomx.test", message("a record", "erin@nomx.test")),
            ],
        )
        await until(
            lambda: (
                bool(self.received("127.0.0.3", "dave@pref.test"))
                and bool(self.received("127.0.0.3", "erin@nomx.test"))
            )
        )
        self.assertEqual(self.received("127.0.0.4", "dave@pref.test"), [])

    async def test_4xx_retried_then_delivered(self) -> None:
        """The first attempt gets 451: the message is tried again and delivered once."""
        await in_thread(
            submit, self.port, [("frank@slow.test", message("retry", "frank@slow.test"))]
        )
        await until(lambda: bool(self.received("127.0.0.4", "frank@slow.test")))
        self.assertEqual(len(self.received("127.0.0.4", "frank@slow.test")), 1)
        self.assertGreaterEqual(self.sinks["127.0.0.4"].connections, 2)
        self.assertEqual(self.server.messages(ALICE), [])  # no notice for a delivered message

    async def test_drop_in_data_retried(self) -> None:
        """The connection dies in the middle of DATA: retried, delivered exactly once."""
        data = message("dropped", "gina@flaky.test")
        await in_thread(submit, self.port, [("gina@flaky.test", data)])
        await until(lambda: bool(self.received("127.0.0.6", "gina@flaky.test")))
        await until(lambda: self.queue_files() == [])
        [got] = self.received("127.0.0.6", "gina@flaky.test")
        self.assertTrue(got.endswith(data), got)
        self.assertGreaterEqual(self.sinks["127.0.0.6"].connections, 2)

    async def test_5xx_bounced_to_sender_with_report(self) -> None:
        """A 550 for one recipient: alice gets one RFC 3464 report; the other one is delivered."""
        data = message("bounce me", "nobody@reject.test")
        await in_thread(submit, self.port, [("nobody@reject.test", data)])
        await until(lambda: len(self.server.messages(ALICE)) == 1)
        [notice] = self.notices()
        self.assertEqual(notice.get_content_type(), "multipart/report")
        self.assertEqual(notice.get_param("report-type"), "delivery-status")
        self.assertEqual(notice["To"], ALICE)
        self.assertIn("auto-replied", notice["Auto-Submitted"])
        parts = list(notice.iter_parts())
        self.assertEqual(parts[1].get_content_type(), "message/delivery-status")
        status = parts[1].as_string()
        self.assertIn("Final-Recipient: rfc822;nobody@reject.test", status.replace("; ", ";"))
        self.assertIn("Action: failed", status)
        self.assertIn("Status: 5.1.1", status)
        self.assertIn("Diagnostic-Code: smtp;", status.replace("; ", ";"))
        self.assertIn("550", status)
        self.assertIn("Subject: bounce me", parts[2].as_string())
        await until(lambda: self.queue_files() == [])

    async def test_null_mx_bounces_at_once(self) -> None:
        """A domain with a null MX (RFC 7505) bounces at the first attempt, with 5.1.10."""
        await in_thread(submit, self.port, [("x@null.test", message("null mx", "x@null.test"))])
        await until(lambda: len(self.server.messages(ALICE)) == 1)
        [notice] = self.notices()
        self.assertIn("5.1.10", list(notice.iter_parts())[1].as_string())

    async def test_notify_success(self) -> None:
        """
        NOTIFY=SUCCESS: a local recipient brings a "delivered" notice; a next hop without DSN a
        "relayed" one; a next hop with DSN gets the parameters passed on, and no notice.
        """
        data = message("tell me", "bob@example.test")
        params = ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;x+2Bcopy@remote.test"]

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as s:
                s.login(ALICE, PASSWORD)
                s.ehlo()
                self.assertTrue(s.has_extn("dsn"))
                s.sendmail(
                    ALICE,
                    [f"bob@{DOMAIN}", "kim@nodsn.test", "carol@remote.test"],
                    data,
                    mail_options=["RET=HDRS", "ENVID=env+2B1"],
                    rcpt_options=params,
                )

        await in_thread(send)
        await until(lambda: len(self.server.messages(ALICE)) == 2)
        await until(lambda: bool(self.received("127.0.0.3", "carol@remote.test")))
        kinds = {}
        for notice in self.notices():
            status = list(notice.iter_parts())[1].as_string().replace("; ", ";")
            action = "delivered" if "Action: delivered" in status else "relayed"
            kinds[action] = status
        self.assertEqual(sorted(kinds), ["delivered", "relayed"])
        self.assertIn(f"Final-Recipient: rfc822;bob@{DOMAIN}", kinds["delivered"])
        self.assertIn("Final-Recipient: rfc822;kim@nodsn.test", kinds["relayed"])
        self.assertIn("Original-Envelope-Id: env+1", kinds["relayed"])
        self.assertIn("Original-Recipient: rfc822;x+copy@remote.test", kinds["relayed"])
        self.assertEqual(len(self.server.bodies(f"bob@{DOMAIN}")), 1)
        [far] = [m for m in self.sinks["127.0.0.3"].messages if "carol@remote.test" in m.recipients]
        rcpt_params = dict(far.rcpts)["carol@remote.test"]
        self.assertEqual(rcpt_params.get("NOTIFY"), "SUCCESS,FAILURE")
        self.assertEqual(far.mail_params.get("RET"), "HDRS")
        self.assertEqual(far.mail_params.get("ENVID"), "env+2B1")

    async def test_queue_command_on_the_live_queue(self) -> None:
        """`queue list` shows a message waiting for a host that is down; `retry` after the
        host is back delivers it; `delete` drops another without a notice."""
        config = Path(self.mktemp()).absolute()
        config.write_text(config_text(self.server.data_dir, self.extra, LISTENERS))
        await in_thread(
            submit,
            self.port,
            [
                ("hank@offline.test", message("waiting", "hank@offline.test")),
                ("ivy@offline.test", message("to delete", "ivy@offline.test")),
            ],
        )
        await until(lambda: len(self.queue_files()) == 2)
        listing = await in_thread(mailserver_cli, config, "queue", "list")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn("hank@offline.test", listing.stdout)
        self.assertIn("ivy@offline.test", listing.stdout)
        ids = sorted(Path(n).stem for n in self.queue_files())
        ivy = next(
            i
            for i in ids
            if b"ivy@offline.test" in (self.server.data_dir / "queue" / f"{i}.msg").read_bytes()
        )
        deleted = await in_thread(mailserver_cli, config, "queue", "delete", ivy)
        self.assertEqual(deleted.returncode, 0, deleted.stderr)
        self.assertEqual(len(self.queue_files()), 1)
        self.assertNotIn(
            "ivy@offline.test", (await in_thread(mailserver_cli, config, "queue", "list")).stdout
        )
        # The host comes back: a retry now delivers without waiting for the schedule.
        self.dns.set("offline.test", "MX", [(10, "up.remote.test")])
        retried = await in_thread(mailserver_cli, config, "queue", "retry")
        self.assertEqual(retried.returncode, 0, retried.stderr)
        await until(lambda: bool(self.received("127.0.0.3", "hank@offline.test")))
        self.assertEqual(self.received("127.0.0.3", "ivy@offline.test"), [])
        await until(lambda: self.queue_files() == [])
        self.assertEqual(self.server.messages(ALICE), [])


class QueueCrashTests(TestCase):
    """The outbound queue across a SIGKILL of a twistd child process."""

    async def test_queued_messages_survive_sigkill(self) -> None:
        """
        Twenty messages queued while their next hop is down, the server killed with SIGKILL,
        the hop started, the server started again: the hop gets each message exactly once.
        """
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        sink_port = free_port()
        submission_port = free_port()
        server = ChildServer(
            base,
            extra=(
                '[queue]\nretry = ["1s"]\n\n'
                f'[[route]]\ndomain = "far.test"\nhost = "[127.0.0.1]:{sink_port}"\n'
                'tls = "none"\n\n'
                "[[listener]]\n"
                'kind = "submission"\n'
                f'endpoint = "tcp:{submission_port}:interface=127.0.0.1"\n'
                'tls = "none"\n'
                "allow_plaintext_auth = true\n"
            ),
        )
        directory = open_directory(server.data_dir, DOMAIN)
        directory.bootstrap(DOMAIN)
        directory.add_user(ALICE, PASSWORD)
        directory.close()
        self.addCleanup(server.stop, signal.SIGKILL)
        await in_thread(server.start)
        items = [(f"u{i}@far.test", message(f"crash {i}", f"u{i}@far.test")) for i in range(20)]
        await in_thread(submit, submission_port, items)
        await in_thread(server.stop, signal.SIGKILL)

        sink = start_sink(reactor, SinkBehaviour(), interface="127.0.0.1", port=sink_port)
        self.addCleanup(sink.stop)
        await in_thread(server.start)
        await until(lambda: len(sink.messages) >= 20, seconds=60)
        await deferLater(reactor, 1.5)  # a second copy would come within a retry interval
        got = sorted(m.recipients[0] for m in sink.messages)
        self.assertEqual(got, sorted(rcpt for rcpt, _ in items))
        for m in sink.messages:
            rcpt = m.recipients[0]
            self.assertTrue(m.data.endswith(dict(items)[rcpt]), rcpt)
        await in_thread(server.stop)
        queue = server.data_dir / "queue"
        self.assertEqual(sorted(p.name for p in queue.glob("*.msg")), [])
        self.assertEqual(sorted(p.name for p in queue.glob("*.env")), [])


class SmarthostTests(TestCase):
    async def test_all_remote_mail_through_smarthost_with_auth(self) -> None:
        """
        With [relay] set, remote mail goes to the smarthost (AUTH PLAIN with the password from
        password_file), whatever the recipient domain's MX says; a [[route]] still wins.
        """
        port, sinks = start_sinks(
            reactor,
            {
                "127.0.0.7": SinkBehaviour(auth=("relayuser", "s3cret pw"), auth_required=True),
                "127.0.0.8": SinkBehaviour(),
            },
        )
        for sink in sinks.values():
            self.addCleanup(sink.stop)
        secret = Path(self.mktemp()).absolute()
        secret.write_text("s3cret pw\n")
        extra = f"""
[relay]
host = "[127.0.0.7]:{port}"
tls = "none"
user = "relayuser"
password_file = "{secret}"

[[route]]
domain = "partner.test"
host = "[127.0.0.8]:{port}"
tls = "none"
"""
        server = await start_server(self, extra=extra, listeners=LISTENERS)
        await in_thread(
            submit,
            server.port("submission"),
            [
                ("someone@anywhere.example", message("via smarthost", "someone@anywhere.example")),
                ("pat@partner.test", message("via route", "pat@partner.test")),
            ],
        )
        smarthost, partner = sinks["127.0.0.7"], sinks["127.0.0.8"]
        await until(lambda: len(smarthost.messages) == 1 and len(partner.messages) == 1)
        [relayed] = smarthost.messages
        self.assertEqual(relayed.recipients, ["someone@anywhere.example"])
        self.assertEqual(relayed.auth, "relayuser")
        self.assertEqual(partner.messages[0].recipients, ["pat@partner.test"])
        self.assertIsNone(partner.messages[0].auth)
