"""
Tests for L{mailserver.smtp.server}: the SMTP state machine, driven over a C{StringTransport}
with a fake directory, a L{MemoryStore} and a L{Clock}.

Replies are checked by code and enhanced status code (L{statuses}); the greeting, EHLO and the
stored messages byte for byte. Dialogues are also replayed one byte at a time and in random
pieces (fixed seed): the output and the stored messages must not change.
"""

from __future__ import annotations

import base64
import gc
import itertools
import random
import re
from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailserver.auth import LoginFailed, Throttled
from mailserver.delivery import LocalDeliveryAgent
from mailserver.interfaces import IDelivery, IDeliveryAgent, IDirectory, IMailStore
from mailserver.limits import ConnectionLimiter
from mailserver.policy.relay import RcptVerdict, check_inbound_rcpt, check_submission_rcpt
from mailserver.queue.model import MailOptions, Notify
from mailserver.sasl import ScramCredentials, scram_credentials
from mailserver.smtp import server as smtp_server
from mailserver.smtp.received import received_header
from mailserver.smtp.server import SessionTracker, SMTPFactory, SMTPServer, SMTPSettings
from mailserver.store.body import MessageBody
from mailserver.store.memory import MemoryStore
from tests.test_sasl import client_final

HOST = "mx.example.org"
PEER_IP = "192.0.2.10"
PEER = IPv4Address("TCP", PEER_IP, 40000)
GREETING = b"220 mx.example.org ESMTP mailserver ready\r\n"
SEED = 20240521
"""Seed of the random chunkings, so that a failure replays."""

EHLO = b"EHLO client.example\r\n"
SENDER = "sender@remote.example"
ALICE = "alice@example.org"
BOB = "bob@example.org"
ADMIN = "admin@example.org"
JOERG = "jörg@bücher.de"

MAIL = b"MAIL FROM:<sender@remote.example>\r\n"
RCPT_ALICE = b"RCPT TO:<alice@example.org>\r\n"
RCPT_BOB = b"RCPT TO:<bob@example.org>\r\n"
CONTENT = b"Subject: hello\r\nFrom: <sender@remote.example>\r\n\r\nHello, Alice.\r\n"
TRANSACTION = MAIL + RCPT_ALICE + b"DATA\r\n" + CONTENT + b".\r\n"
OK_TRANSACTION = ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]


# --- reply helpers ---------------------------------------------------------------------------

_STATUS = re.compile(rb"(\d{3}) (?:(\d\.\d{1,3}\.\d{1,3})(?: |$))?")


def statuses(output: bytes) -> list[str]:
    """
    The last line of each reply in C{output}, as C{"code enhanced"} (C{"250 2.1.0"}) or just
    C{"code"} when it has no enhanced code (C{"354"}). Continuation lines (C{250-...}) are
    skipped.
    """
    out = []
    for line in output.split(b"\r\n")[:-1]:
        m = _STATUS.match(line)
        if m is None:
            continue
        out.append(" ".join(g.decode() for g in m.groups() if g is not None))
    return out


def accepted_ids(output: bytes) -> list[str]:
    """The message ids of the C{250 ... Message accepted as <id>} replies in C{output}."""
    return [m.decode() for m in re.findall(rb"Message accepted as (\S+)\r\n", output)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_pieces(data: bytes, rng: random.Random, max_piece: int = 9) -> list[bytes]:
    out = []
    i = 0
    while i < len(data):
        n = rng.randint(1, max_piece)
        out.append(data[i : i + n])
        i += n
    return out


# --- fakes -----------------------------------------------------------------------------------


@implementer(IDirectory)
class FakeDirectory:
    """
    A directory with two local domains and a few accounts; C{postmaster} (bare) resolves to
    C{admin@example.org}. An address in C{fail_on} makes C{resolve} raise.
    """

    def __init__(self) -> None:
        self.domains = {"example.org", "bücher.de"}
        self.accounts = {
            ALICE: [ALICE],
            BOB: [BOB],
            "postmaster": [ADMIN],
            "postmaster@example.org": [ADMIN],
            JOERG: [JOERG],
        }
        self.fail_on: set[str] = set()

    def is_local_domain(self, domain: str) -> bool:
        return domain in self.domains

    def resolve(self, address: str) -> list[str]:
        if address in self.fail_on:
            raise OSError("database locked: /var/lib/mailserver/secret.sqlite")
        return list(self.accounts.get(address, []))


@implementer(IMailStore)
class PendingStore:
    """A store whose deliveries wait until the test fires them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[list[str]], list[tuple[str, bytes]], bytes]] = []

    def deliver(
        self, targets: Sequence[tuple[str, bytes]], body: MessageBody
    ) -> Deferred[list[str]]:
        d: Deferred[list[str]] = Deferred()
        self.calls.append((d, list(targets), body.read()))
        return d

    def fire(self, index: int = 0) -> None:
        d, targets, _ = self.calls[index]
        d.callback([f"p{i}" for i in range(len(targets))])


class RecordingTransport(StringTransport):
    """A C{StringTransport} that also keeps each C{write} call apart."""

    def __init__(self, peer: Any = PEER) -> None:
        super().__init__(peerAddress=peer)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


@implementer(ITLSTransport)
class TLSCapableTransport(RecordingTransport):
    """A transport that says it can start TLS, and records that it was asked to."""

    def __init__(self, peer: Any = PEER) -> None:
        super().__init__(peer)
        self.tls_started: list[object] = []

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_started.append(contextFactory)

    def getTcpNoDelay(self) -> bool:
        return False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def loseWriteConnection(self) -> None:
        pass


class Client:
    """One connection to the server under test."""

    def __init__(self, protocol: SMTPServer, transport: RecordingTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self._read = 0
        self.lost = False

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def send_pieces(self, pieces: Sequence[bytes]) -> None:
        for piece in pieces:
            self.protocol.dataReceived(piece)

    def take(self) -> bytes:
        """What the server wrote since the last call."""
        value: bytes = self.transport.value()
        new, self._read = value[self._read :], len(value)
        return new

    def statuses(self) -> list[str]:
        return statuses(self.take())

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """The connection ends (what the reactor does after C{loseConnection})."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


class ServerTestCase(SynchronousTestCase):
    """Builds servers on a fake clock, directory and store."""

    def setUp(self) -> None:
        self.ids = itertools.count(1)
        self.patch(smtp_server, "new_id", self._new_id)
        self.clock = Clock()
        self.directory = FakeDirectory()
        self.store = MemoryStore()
        self.limiter = ConnectionLimiter(100, 100)
        self.tracker = SessionTracker()

    def _new_id(self) -> str:
        return f"id{next(self.ids)}"

    def factory(
        self, store: IMailStore | None = None, tls: object | None = None, **settings: Any
    ) -> SMTPFactory:
        agent = LocalDeliveryAgent(self.directory, store or self.store, None)
        return SMTPFactory(
            SMTPSettings(HOST, **settings), agent, self.clock, self.limiter, self.tracker, tls
        )

    def connect(
        self,
        factory: SMTPFactory | None = None,
        transport: RecordingTransport | None = None,
        peer: Any = PEER,
    ) -> Client:
        """A new connection; its greeting is left unread."""
        factory = factory or self.factory()
        transport = transport or RecordingTransport(peer)
        protocol = factory.buildProtocol(peer)
        protocol.makeConnection(transport)
        client = Client(protocol, transport)
        self.addCleanup(client.lose)
        return client

    def session(self, factory: SMTPFactory | None = None, **settings: Any) -> Client:
        """A connection past the greeting and EHLO."""
        client = self.connect(factory or self.factory(**settings))
        self.assertEqual(client.take(), GREETING)
        client.send(EHLO)
        self.assertEqual(statuses(client.take()), ["250"])
        return client

    def expected_copy(
        self,
        account: str,
        content: bytes,
        msgid: str,
        *,
        sender: str = SENDER,
        recipient: str | None = ALICE,
        helo: str = "client.example",
        protocol: str = "ESMTP",
        now: float = 0.0,
    ) -> bytes:
        """The exact bytes stored for C{account}: trace prefix, then C{content} untouched."""
        trace = received_header(
            helo=helo,
            peer_ip=PEER_IP,
            hostname=HOST,
            protocol=protocol,
            message_id=msgid,
            recipient=recipient,
            now=now,
        )
        return (
            b"Return-Path: <"
            + sender.encode()
            + b">\r\nDelivered-To: "
            + account.encode()
            + b"\r\n"
            + trace
            + content
        )


# --- tests -----------------------------------------------------------------------------------


class FakeTests(SynchronousTestCase):
    """The fakes provide the interfaces they stand in for."""

    def test_fake_directory_provides_idirectory(self) -> None:
        """L{FakeDirectory} provides L{IDirectory}."""
        self.assertTrue(verifyObject(IDirectory, FakeDirectory()))

    def test_pending_store_provides_imailstore(self) -> None:
        """L{PendingStore} and L{MemoryStore} provide L{IMailStore}."""
        self.assertTrue(verifyObject(IMailStore, PendingStore()))
        self.assertTrue(verifyObject(IMailStore, MemoryStore()))

    def test_clock_provides_ireactortime(self) -> None:
        """L{Clock} provides L{IReactorTime}, which the factory needs."""
        self.assertTrue(verifyObject(IReactorTime, Clock()))


class GreetingTests(ServerTestCase):
    """Greeting, EHLO, HELO and STARTTLS advertisement."""

    def test_greeting_is_220_with_hostname(self) -> None:
        """A new connection gets C{220 <hostname> ESMTP ...} in one line."""
        client = self.connect()
        self.assertEqual(client.take(), GREETING)
        self.assertEqual(client.transport.writes, [GREETING])

    def test_ehlo_lists_extensions(self) -> None:
        """
        EHLO answers a multi-line 250 whose first line greets the client and which lists
        PIPELINING, SIZE with the limit, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES and CHUNKING.
        """
        client = self.connect(self.factory(max_size=12345))
        client.take()
        client.send(EHLO)
        lines = client.take().split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        lines = lines[:-1]
        self.assertEqual(lines[0], b"250-mx.example.org greets client.example")
        self.assertTrue(all(line.startswith(b"250-") for line in lines[:-1]), lines)
        self.assertTrue(lines[-1].startswith(b"250 "), lines)
        keywords = [line[4:] for line in lines[1:]]
        for keyword in (
            b"PIPELINING",
            b"SIZE 12345",
            b"8BITMIME",
            b"SMTPUTF8",
            b"ENHANCEDSTATUSCODES",
            b"CHUNKING",
        ):
            self.assertIn(keyword, keywords)
        self.assertNotIn(b"STARTTLS", keywords)

    def test_ehlo_without_domain_gets_501_5_5_4(self) -> None:
        """EHLO with no argument is refused."""
        client = self.connect()
        client.take()
        client.send(b"EHLO\r\nEHLO  \r\n")
        self.assertEqual(client.statuses(), ["501 5.5.4", "501 5.5.4"])

    def test_helo_gets_250_with_hostname(self) -> None:
        """HELO is answered C{250 <hostname>}, with no extension list."""
        client = self.connect()
        client.take()
        client.send(b"HELO client.example\r\n")
        self.assertEqual(client.take(), b"250 mx.example.org\r\n")

    def test_helo_without_domain_gets_501(self) -> None:
        """HELO with no argument is refused."""
        client = self.connect()
        client.take()
        client.send(b"HELO\r\n")
        self.assertEqual(client.statuses(), ["501 5.5.4"])

    def test_helo_session_refuses_mail_parameters_with_555(self) -> None:
        """After HELO (not EHLO), MAIL parameters are not recognised: 555."""
        client = self.connect()
        client.take()
        client.send(b"HELO client.example\r\nMAIL FROM:<a@remote.example> SIZE=10\r\n")
        self.assertEqual(client.statuses(), ["250", "555 5.5.4"])

    def test_helo_message_is_traced_as_smtp(self) -> None:
        """A message received after HELO is stored with C{with SMTP} in its trace."""
        client = self.connect()
        client.take()
        client.send(b"HELO client.example\r\n" + TRANSACTION)
        output = client.take()
        self.assertEqual(statuses(output), ["250"] + OK_TRANSACTION)
        [msgid] = accepted_ids(output)
        self.assertEqual(
            self.store.messages[ALICE], [self.expected_copy(ALICE, CONTENT, msgid, protocol="SMTP")]
        )

    def test_commands_are_case_insensitive(self) -> None:
        """Verbs are recognised in any case."""
        client = self.connect()
        client.take()
        client.send(b"ehlo client.example\r\nmail FROM:<a@remote.example>\r\nNoOp\r\n")
        self.assertEqual(client.statuses(), ["250", "250 2.1.0", "250 2.0.0"])

    def test_starttls_not_offered_on_transport_without_tls(self) -> None:
        """
        With a TLS context but a transport that does not provide L{ITLSTransport}, EHLO does
        not offer STARTTLS, and STARTTLS gets 502 5.5.1.
        """
        client = self.connect(self.factory(tls=object()))
        client.take()
        client.send(EHLO)
        self.assertNotIn(b"STARTTLS", client.take())
        client.send(b"STARTTLS\r\n")
        self.assertEqual(client.statuses(), ["502 5.5.1"])

    def test_starttls_not_offered_without_tls_context(self) -> None:
        """A TLS-capable transport without a TLS context: no STARTTLS, and 502."""
        client = self.connect(self.factory(tls=None), transport=TLSCapableTransport())
        client.take()
        client.send(EHLO)
        self.assertNotIn(b"STARTTLS", client.take())
        client.send(b"STARTTLS\r\n")
        self.assertEqual(client.statuses(), ["502 5.5.1"])

    def test_starttls_offered_and_started_with_tls_transport(self) -> None:
        """
        With a context and an L{ITLSTransport}, STARTTLS is offered; STARTTLS gets 220 2.0.0
        and starts TLS with that context; commands pipelined after it are discarded
        (CVE-2011-0411), and the client must EHLO again.
        """
        context = object()
        transport = TLSCapableTransport()
        client = self.connect(self.factory(tls=context), transport=transport)
        client.take()
        client.send(EHLO)
        self.assertIn(b"250-STARTTLS\r\n", client.take())
        client.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        self.assertEqual(client.statuses(), ["220 2.0.0"])
        self.assertEqual(transport.tls_started, [context])
        client.send(MAIL)
        self.assertEqual(client.statuses(), ["503 5.5.1"])
        client.send(EHLO)
        self.assertNotIn(b"STARTTLS", client.take())
        client.send(MAIL)
        self.assertEqual(client.statuses(), ["250 2.1.0"])


class SequenceTests(ServerTestCase):
    """Commands out of order are refused with 503 (or 554 for DATA without recipients)."""

    def test_mail_before_ehlo_gets_503_5_5_1(self) -> None:
        """MAIL before EHLO/HELO is refused."""
        client = self.connect()
        client.take()
        client.send(MAIL)
        self.assertEqual(client.statuses(), ["503 5.5.1"])

    def test_nested_mail_gets_503_5_5_1(self) -> None:
        """A second MAIL inside a transaction is refused; the first one stands."""
        client = self.session()
        client.send(MAIL + b"MAIL FROM:<other@remote.example>\r\n" + RCPT_ALICE)
        self.assertEqual(client.statuses(), ["250 2.1.0", "503 5.5.1", "250 2.1.5"])

    def test_rcpt_before_mail_gets_503_5_5_1(self) -> None:
        """RCPT without MAIL is refused."""
        client = self.session()
        client.send(RCPT_ALICE)
        self.assertEqual(client.statuses(), ["503 5.5.1"])

    def test_data_before_mail_gets_503_5_5_1(self) -> None:
        """DATA without MAIL is refused, and what follows is read as commands."""
        client = self.session()
        client.send(b"DATA\r\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["503 5.5.1", "250 2.0.0"])

    def test_data_without_accepted_recipient_gets_554_5_5_1(self) -> None:
        """DATA when every RCPT was refused gets 554 5.5.1 (RFC 2920 §3.1)."""
        client = self.session()
        client.send(MAIL + b"RCPT TO:<nobody@example.org>\r\nDATA\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "550 5.1.1", "554 5.5.1"])

    def test_ehlo_resets_transaction(self) -> None:
        """EHLO in a transaction ends it (RFC 5321 §4.1.4): RCPT then needs a new MAIL."""
        client = self.session()
        client.send(MAIL + EHLO + RCPT_ALICE + MAIL)
        self.assertEqual(client.statuses(), ["250 2.1.0", "250", "503 5.5.1", "250 2.1.0"])

    def test_data_with_argument_gets_501(self) -> None:
        """DATA takes no argument."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"DATA now\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.1.5", "501 5.5.4"])


class RcptTests(ServerTestCase):
    """Recipient checks."""

    def test_rcpt_unknown_local_user_gets_550_5_1_1(self) -> None:
        """A local domain but no such account: 550 5.1.1."""
        client = self.session()
        client.send(MAIL + b"RCPT TO:<nobody@example.org>\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "550 5.1.1"])

    def test_rcpt_foreign_domain_gets_554_5_7_1(self) -> None:
        """A domain that is not local is not relayed: 554 5.7.1."""
        client = self.session()
        client.send(MAIL + b"RCPT TO:<someone@elsewhere.example>\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "554 5.7.1"])

    def test_relay_refused_recipient_gets_no_copy(self) -> None:
        """With one local and one foreign recipient, only the local one gets the message."""
        client = self.session()
        client.send(MAIL + b"RCPT TO:<x@elsewhere.example>\r\n" + RCPT_ALICE)
        client.send(b"DATA\r\n" + CONTENT + b".\r\n")
        self.assertEqual(
            client.statuses(), ["250 2.1.0", "554 5.7.1", "250 2.1.5", "354", "250 2.0.0"]
        )
        self.assertEqual(list(self.store.messages), [ALICE])

    def test_rcpt_postmaster_accepted_when_directory_resolves_it(self) -> None:
        """C{RCPT TO:<postmaster>} (any case) is accepted and delivered to its account."""
        client = self.session()
        client.send(MAIL + b"RCPT TO:<PostMaster>\r\nDATA\r\n" + CONTENT + b".\r\n")
        output = client.take()
        self.assertEqual(statuses(output), OK_TRANSACTION)
        [msgid] = accepted_ids(output)
        self.assertEqual(
            self.store.messages,
            {ADMIN: [self.expected_copy(ADMIN, CONTENT, msgid, recipient="postmaster")]},
        )

    def test_rcpt_postmaster_refused_when_directory_does_not_resolve_it(self) -> None:
        """Without a postmaster entry in the directory, C{<postmaster>} gets 550 5.1.1."""
        del self.directory.accounts["postmaster"]
        client = self.session()
        client.send(MAIL + b"RCPT TO:<postmaster>\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "550 5.1.1"])

    def test_rcpt_null_gets_501_5_1_3(self) -> None:
        """C{RCPT TO:<>} is refused."""
        client = self.session()
        client.send(MAIL + b"RCPT TO:<>\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "501 5.1.3"])

    def test_rcpt_parameter_gets_555_5_5_4(self) -> None:
        """RCPT parameters are not implemented: 555."""
        client = self.session()
        client.send(MAIL + b"RCPT TO:<alice@example.org> NOTIFY=NEVER\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "555 5.5.4"])

    def test_too_many_recipients_gets_452_4_5_3(self) -> None:
        """
        Past C{max_recipients}, RCPT gets 452 4.5.3; the message goes to the accepted ones.
        """
        client = self.session(max_recipients=2)
        client.send(MAIL + RCPT_ALICE + RCPT_BOB + b"RCPT TO:<postmaster>\r\n")
        client.send(b"DATA\r\n" + CONTENT + b".\r\n")
        self.assertEqual(
            client.statuses(),
            ["250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3", "354", "250 2.0.0"],
        )
        self.assertEqual(sorted(self.store.messages), [ALICE, BOB])

    def test_same_account_twice_gets_one_copy(self) -> None:
        """Two recipients resolving to one account store one copy."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + RCPT_ALICE + b"DATA\r\n" + CONTENT + b".\r\n")
        self.assertEqual(
            client.statuses(), ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354", "250 2.0.0"]
        )
        self.assertEqual(len(self.store.messages[ALICE]), 1)


class MailParameterTests(ServerTestCase):
    """MAIL FROM parameters: SIZE, BODY, SMTPUTF8, unknown ones."""

    def test_mail_space_after_colon_accepted(self) -> None:
        """C{MAIL FROM: <a@b>} is accepted."""
        client = self.session()
        client.send(b"MAIL FROM: <sender@remote.example>\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0"])

    def test_mail_bad_address_gets_501_5_1_7(self) -> None:
        """A malformed sender address gets 501 5.1.7."""
        client = self.session()
        client.send(b"MAIL FROM:sender@remote.example\r\nMAIL FROM:<a b@c>\r\n")
        self.assertEqual(client.statuses(), ["501 5.1.7", "501 5.1.7"])

    def test_null_sender_accepted_and_stored_with_empty_return_path(self) -> None:
        """C{MAIL FROM:<>} is accepted; the copy has C{Return-Path: <>}."""
        client = self.session()
        client.send(b"MAIL FROM:<>\r\n" + RCPT_ALICE + b"DATA\r\n" + CONTENT + b".\r\n")
        output = client.take()
        self.assertEqual(statuses(output), OK_TRANSACTION)
        [msgid] = accepted_ids(output)
        self.assertEqual(
            self.store.messages[ALICE], [self.expected_copy(ALICE, CONTENT, msgid, sender="")]
        )

    def test_size_over_limit_gets_552_5_3_4(self) -> None:
        """C{SIZE=} above C{max_size} gets 552 5.3.4; no transaction is opened."""
        client = self.session(max_size=1000)
        client.send(b"MAIL FROM:<a@remote.example> SIZE=1001\r\n" + MAIL)
        self.assertEqual(client.statuses(), ["552 5.3.4", "250 2.1.0"])

    def test_size_at_limit_accepted(self) -> None:
        """C{SIZE=} equal to C{max_size} is accepted."""
        client = self.session(max_size=1000)
        client.send(b"MAIL FROM:<a@remote.example> SIZE=1000\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0"])

    def test_size_not_a_number_gets_501(self) -> None:
        """C{SIZE=} must be a number."""
        client = self.session()
        client.send(
            b"MAIL FROM:<a@remote.example> SIZE=ten\r\n"
            b"MAIL FROM:<a@remote.example> SIZE\r\n"
            b"MAIL FROM:<a@remote.example> SIZE=" + b"9" * 30 + b"\r\n"
        )
        self.assertEqual(client.statuses(), ["501 5.5.4"] * 3)

    def test_body_8bitmime_and_7bit_accepted(self) -> None:
        """C{BODY=8BITMIME} and C{BODY=7BIT} (any case) are accepted."""
        client = self.session()
        client.send(
            b"MAIL FROM:<a@remote.example> BODY=8BITMIME\r\nRSET\r\n"
            b"MAIL FROM:<a@remote.example> body=7bit\r\n"
        )
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.0.0", "250 2.1.0"])

    def test_body_unknown_gets_501(self) -> None:
        """C{BODY=FOO} is refused with 501 5.5.4."""
        client = self.session()
        client.send(b"MAIL FROM:<a@remote.example> BODY=FOO\r\n")
        self.assertEqual(client.statuses(), ["501 5.5.4"])

    def test_unknown_mail_parameter_gets_555(self) -> None:
        """An unknown MAIL parameter gets 555 5.5.4."""
        client = self.session()
        client.send(b"MAIL FROM:<a@remote.example> XFOO=1\r\n")
        self.assertEqual(client.statuses(), ["555 5.5.4"])

    def test_smtputf8_with_value_gets_501(self) -> None:
        """C{SMTPUTF8} takes no value."""
        client = self.session()
        client.send(b"MAIL FROM:<a@remote.example> SMTPUTF8=yes\r\n")
        self.assertEqual(client.statuses(), ["501 5.5.4"])

    def test_non_ascii_sender_without_smtputf8_gets_553_5_6_7(self) -> None:
        """A UTF-8 sender without the SMTPUTF8 parameter gets 553 5.6.7."""
        client = self.session()
        client.send("MAIL FROM:<jörg@bücher.de>\r\n".encode())
        self.assertEqual(client.statuses(), ["553 5.6.7"])

    def test_non_ascii_recipient_without_smtputf8_gets_553_5_6_7(self) -> None:
        """A UTF-8 recipient in a transaction without SMTPUTF8 gets 553 5.6.7."""
        client = self.session()
        client.send(MAIL + "RCPT TO:<jörg@bücher.de>\r\n".encode())
        self.assertEqual(client.statuses(), ["250 2.1.0", "553 5.6.7"])

    def test_non_ascii_addresses_with_smtputf8_accepted_and_delivered(self) -> None:
        """With C{SMTPUTF8}, UTF-8 addresses are accepted; the trace says C{UTF8SMTP}."""
        client = self.session()
        client.send(
            "MAIL FROM:<jörg@bücher.de> SMTPUTF8\r\nRCPT TO:<jörg@bücher.de>\r\n".encode()
            + b"DATA\r\n"
            + CONTENT
            + b".\r\n"
        )
        output = client.take()
        self.assertEqual(statuses(output), OK_TRANSACTION)
        [msgid] = accepted_ids(output)
        self.assertEqual(
            self.store.messages[JOERG],
            [
                self.expected_copy(
                    JOERG, CONTENT, msgid, sender=JOERG, recipient=JOERG, protocol="UTF8SMTP"
                )
            ],
        )


class DataTests(ServerTestCase):
    """Receiving and storing a message with DATA."""

    def test_message_stored_byte_exact_after_trace_prefix(self) -> None:
        """
        The stored copy is C{Return-Path:}, C{Delivered-To:}, C{Received:} and then the
        content exactly as sent (8-bit octets, spaces, tabs and empty lines untouched).
        """
        content = (
            b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
            b"X-Spaces:   three  \t\r\n"
            b"\r\n"
            + "Grüße, café\r\n".encode()
            + b"\r\n\r\n"
            + b"\x80\xfe\xff binary-ish\r\n"
            + b"trailing line\r\n"
        )
        client = self.session()
        client.send(
            b"MAIL FROM:<sender@remote.example> BODY=8BITMIME\r\n"
            + RCPT_ALICE
            + b"DATA\r\n"
            + content
            + b".\r\n"
        )
        output = client.take()
        self.assertEqual(statuses(output), OK_TRANSACTION)
        [msgid] = accepted_ids(output)
        self.assertEqual(self.store.messages, {ALICE: [self.expected_copy(ALICE, content, msgid)]})

    def test_received_names_no_recipient_when_several(self) -> None:
        """With two recipients, each copy has its own Delivered-To and no C{for} clause."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + RCPT_BOB + b"DATA\r\n" + CONTENT + b".\r\n")
        [msgid] = accepted_ids(client.take())
        self.assertEqual(
            self.store.messages,
            {
                ALICE: [self.expected_copy(ALICE, CONTENT, msgid, recipient=None)],
                BOB: [self.expected_copy(BOB, CONTENT, msgid, recipient=None)],
            },
        )

    def test_dot_unstuffing(self) -> None:
        """Lines C{..x}, C{...} and C{..} lose one dot; C{.} alone ends the message."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"DATA\r\n..x\r\n...\r\n..\r\na.b\r\n.\r\n")
        output = client.take()
        self.assertEqual(statuses(output), OK_TRANSACTION)
        [msgid] = accepted_ids(output)
        self.assertEqual(
            self.store.messages[ALICE],
            [self.expected_copy(ALICE, b".x\r\n..\r\n.\r\na.b\r\n", msgid)],
        )

    def test_empty_message_stored_as_prefix_only(self) -> None:
        """DATA followed at once by C{.} stores an empty message (just the trace)."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"DATA\r\n.\r\n")
        output = client.take()
        self.assertEqual(statuses(output), OK_TRANSACTION)
        [msgid] = accepted_ids(output)
        self.assertEqual(self.store.messages[ALICE], [self.expected_copy(ALICE, b"", msgid)])

    def test_message_accepted_at_clock_time(self) -> None:
        """The trace's date is the clock's time at the end of DATA."""
        client = self.session(idle_timeout=86400 * 366)
        self.clock.advance(86400 * 365)
        client.send(TRANSACTION)
        [msgid] = accepted_ids(client.take())
        self.assertEqual(
            self.store.messages[ALICE],
            [self.expected_copy(ALICE, CONTENT, msgid, now=86400 * 365)],
        )

    def test_pipelined_transaction_in_one_read_gives_all_replies_in_one_write(self) -> None:
        """
        A whole pipelined dialogue in one read is answered in order, in a single write.
        """
        client = self.connect()
        client.take()
        client.send(EHLO + TRANSACTION + b"NOOP\r\nQUIT\r\n")
        self.assertEqual(len(client.transport.writes), 2)
        output = client.take()
        self.assertEqual(client.transport.writes[1], output)
        self.assertEqual(statuses(output), ["250"] + OK_TRANSACTION + ["250 2.0.0", "221 2.0.0"])
        self.assertTrue(client.closed)
        self.assertEqual(len(self.store.messages[ALICE]), 1)

    def test_two_pipelined_messages_in_one_read(self) -> None:
        """Two transactions back to back in one read both get stored, in order."""
        client = self.session()
        client.send(
            MAIL
            + RCPT_ALICE
            + b"DATA\r\nfirst\r\n.\r\n"
            + MAIL
            + RCPT_ALICE
            + b"DATA\r\nsecond\r\n.\r\n"
        )
        output = client.take()
        self.assertEqual(statuses(output), OK_TRANSACTION * 2)
        first, second = accepted_ids(output)
        self.assertEqual(
            self.store.messages[ALICE],
            [
                self.expected_copy(ALICE, b"first\r\n", first),
                self.expected_copy(ALICE, b"second\r\n", second),
            ],
        )

    def test_many_pipelined_messages_in_one_read(self) -> None:
        """
        500 small pipelined messages in one read (about 45 KB, less than one 64 KiB socket
        read) are all answered and stored.
        """
        n = 500
        client = self.session()
        try:
            client.send(TRANSACTION * n + b"QUIT\r\n")
        finally:
            # Anything this leaves unhandled in a Deferred is reported here, not later.
            gc.collect()
        output = client.take()
        self.assertEqual(statuses(output), OK_TRANSACTION * n + ["221 2.0.0"])
        self.assertEqual(len(self.store.messages[ALICE]), n)

    def test_data_over_limit_gets_552_5_3_4_and_session_continues(self) -> None:
        """
        Content over C{max_size} gets 552 5.3.4 after the terminator; nothing is stored and
        the next transaction works.
        """
        client = self.session(max_size=100)
        client.send(MAIL + RCPT_ALICE + b"DATA\r\n")
        client.send(b"0123456789012345678\r\n" * 10)
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.1.5", "354"])
        client.send(b".\r\n" + TRANSACTION)
        output = client.take()
        self.assertEqual(statuses(output), ["552 5.3.4"] + OK_TRANSACTION)
        [msgid] = accepted_ids(output)
        self.assertEqual(self.store.messages, {ALICE: [self.expected_copy(ALICE, CONTENT, msgid)]})

    def test_data_giant_line_over_limit_gets_552_and_next_command_is_read(self) -> None:
        """
        One giant line without CRLF, far over the limit and sent in pieces, still ends at
        the terminator: 552 5.3.4, then the pipelined NOOP is answered.
        """
        client = self.session(max_size=1000)
        client.send(MAIL + RCPT_ALICE + b"DATA\r\n")
        for _ in range(100):
            client.send(b"A" * 1000)
        client.send(b"\r\n.\r\nNOOP\r\n")
        self.assertEqual(
            client.statuses(), ["250 2.1.0", "250 2.1.5", "354", "552 5.3.4", "250 2.0.0"]
        )
        self.assertEqual(self.store.messages, {})

    def test_data_exactly_at_limit_accepted_byte_at_a_time(self) -> None:
        """Content of exactly C{max_size} octets, sent one byte at a time, is accepted."""
        content = b"0123456789abcdef\r\n"
        client = self.session(max_size=len(content))
        client.send_pieces(bytewise(MAIL + RCPT_ALICE + b"DATA\r\n" + content + b".\r\nNOOP\r\n"))
        output = client.take()
        self.assertEqual(statuses(output), OK_TRANSACTION + ["250 2.0.0"])
        [msgid] = accepted_ids(output)
        self.assertEqual(self.store.messages[ALICE], [self.expected_copy(ALICE, content, msgid)])

    def test_bare_lf_in_data_gets_554_5_6_0_nothing_stored_commands_after_read(self) -> None:
        """
        A bare LF in the content gets 554 5.6.0 after the real terminator; nothing is
        stored, and what follows the terminator is read as commands.
        """
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"DATA\r\nline one\nline two\r\n.\r\nNOOP\r\n")
        self.assertEqual(
            client.statuses(), ["250 2.1.0", "250 2.1.5", "354", "554 5.6.0", "250 2.0.0"]
        )
        self.assertEqual(self.store.messages, {})
        client.send(TRANSACTION)
        self.assertEqual(client.statuses(), OK_TRANSACTION)

    def test_bare_cr_in_data_gets_554_5_6_0(self) -> None:
        """A bare CR in the content gets 554 5.6.0 and nothing is stored."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"DATA\r\nline one\rstill one\r\n.\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.1.5", "354", "554 5.6.0"])
        self.assertEqual(self.store.messages, {})

    def test_smuggling_attempts_never_store_a_second_message(self) -> None:
        """
        SMTP smuggling: a fake end of data (C{LF.LF}, C{CRLF.LF}, C{LF.CRLF}, C{CR.CRLF})
        followed by a second transaction inside the content never ends the data, so the
        smuggled MAIL/RCPT/DATA are never run: the whole thing is one message, refused
        (554 5.6.0), in one piece or byte by byte.
        """
        for fake_end in (b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r\r\n"):
            for pieces in ("whole", "bytewise"):
                self.store.messages.clear()
                client = self.session()
                dialogue = (
                    MAIL
                    + RCPT_ALICE
                    + b"DATA\r\nSubject: legit\r\n\r\nhello"
                    + fake_end
                    + b"MAIL FROM:<evil@attacker.example>\r\n"
                    + RCPT_BOB
                    + b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\nQUIT\r\n"
                )
                if pieces == "whole":
                    client.send(dialogue)
                else:
                    client.send_pieces(bytewise(dialogue))
                self.assertEqual(
                    client.statuses(),
                    ["250 2.1.0", "250 2.1.5", "354", "554 5.6.0", "221 2.0.0"],
                    (fake_end, pieces),
                )
                self.assertEqual(self.store.messages, {}, (fake_end, pieces))

    def test_data_input_after_quit_is_ignored(self) -> None:
        """After QUIT, bytes in the same read are not answered."""
        client = self.session()
        client.send(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["221 2.0.0"])
        client.send(b"NOOP\r\n")
        self.assertEqual(client.take(), b"")


class ChunkingTests(ServerTestCase):
    """The same dialogue, cut differently, gives the same replies and the same messages."""

    DIALOGUE = (
        EHLO
        + MAIL
        + RCPT_ALICE
        + b"RCPT TO:<nobody@example.org>\r\n"
        + b"DATA\r\n"
        + b"Subject: x\r\n\r\n..stuffed\r\n...\r\n.\r\n"
        + b"NOOP\r\nFOO\r\n"
        + b"MAIL FROM:<> BODY=8BITMIME\r\n"
        + RCPT_BOB
        + b"BDAT 7\r\n.\r\nab\r\nBDAT 4 LAST\r\n..\r\n"
        + b"MAIL FROM:<x@remote.example>\r\n"
        + RCPT_ALICE
        + b"DATA\r\nbad\nline\r\n.\r\n"
        + b"RSET\r\nVRFY alice\r\nQUIT\r\n"
    )

    def run_dialogue(self, pieces: Sequence[bytes]) -> tuple[bytes, dict[str, list[bytes]]]:
        """Run L{DIALOGUE} cut into C{pieces} on a new server; return output and store."""
        self.ids = itertools.count(1)
        self.store = MemoryStore()
        client = self.connect()
        client.send_pieces(pieces)
        client.lose()
        return client.transport.value(), self.store.messages

    def test_reference_dialogue(self) -> None:
        """The dialogue, sent in one piece, gets the expected replies and stores two copies."""
        output, messages = self.run_dialogue([self.DIALOGUE])
        self.assertEqual(
            statuses(output),
            ["220", "250"]
            + ["250 2.1.0", "250 2.1.5", "550 5.1.1", "354", "250 2.0.0"]
            + ["250 2.0.0", "500 5.5.2"]
            + ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"]
            + ["250 2.1.0", "250 2.1.5", "354", "554 5.6.0"]
            + ["250 2.0.0", "252 2.5.0", "221 2.0.0"],
        )
        first, second = accepted_ids(output)
        self.assertEqual(
            messages,
            {
                ALICE: [self.expected_copy(ALICE, b"Subject: x\r\n\r\n.stuffed\r\n..\r\n", first)],
                BOB: [
                    self.expected_copy(BOB, b".\r\nab\r\n..\r\n", second, sender="", recipient=BOB)
                ],
            },
        )

    def test_one_byte_at_a_time_gives_same_output_and_messages(self) -> None:
        """Fed one byte at a time, the dialogue gives the same bytes out and in the store."""
        self.assertEqual(
            self.run_dialogue(bytewise(self.DIALOGUE)), self.run_dialogue([self.DIALOGUE])
        )

    def test_random_chunkings_give_same_output_and_messages(self) -> None:
        """Fed in 30 random chunkings (seeded), the dialogue gives the same results."""
        expected = self.run_dialogue([self.DIALOGUE])
        rng = random.Random(SEED)
        for _ in range(30):
            pieces = random_pieces(self.DIALOGUE, rng, max_piece=rng.choice([2, 5, 17, 64]))
            self.assertEqual(self.run_dialogue(pieces), expected, pieces)

    def test_every_two_piece_split_gives_same_output(self) -> None:
        """Cut in two at every offset, the dialogue gives the same results."""
        expected = self.run_dialogue([self.DIALOGUE])
        for i in range(1, len(self.DIALOGUE)):
            pieces = [self.DIALOGUE[:i], self.DIALOGUE[i:]]
            self.assertEqual(self.run_dialogue(pieces), expected, i)


class CommandLineTests(ServerTestCase):
    """Malformed command lines and the error budget."""

    def test_unknown_command_gets_500_5_5_2(self) -> None:
        """An unknown verb gets 500 5.5.2."""
        client = self.session()
        client.send(b"XYZZY\r\n")
        self.assertEqual(client.statuses(), ["500 5.5.2"])

    def test_line_too_long_gets_500_5_5_2_and_session_continues(self) -> None:
        """A command line over C{max_line} gets 500 5.5.2; the next line is read normally."""
        client = self.session(max_line=100)
        client.send(b"NOOP " + b"x" * 200 + b"\r\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["500 5.5.2", "250 2.0.0"])

    def test_line_too_long_in_pieces_session_continues_after_next_crlf(self) -> None:
        """
        An over-long line sent in pieces gets one 500 5.5.2 as soon as it is too long; the
        rest of it, up to its CRLF, is skipped, and the next command is answered.
        """
        client = self.session(max_line=100)
        for _ in range(10):
            client.send(b"x" * 50)
        self.assertEqual(client.statuses(), ["500 5.5.2"])
        client.send(b"xxxx\r\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["250 2.0.0"])

    def test_line_too_long_with_crlf_split_across_reads(self) -> None:
        """
        When the CR ending an over-long line arrives in one read and its LF in the next, the
        line still ends there: the following NOOP is answered.
        """
        client = self.session(max_line=100)
        client.send(b"x" * 300 + b"\r")
        client.send(b"\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["500 5.5.2", "250 2.0.0"])

    def test_line_too_long_byte_at_a_time_session_continues(self) -> None:
        """Fed one byte at a time, an over-long line gets one 500 and NOOP after it is read."""
        client = self.session(max_line=100)
        client.send_pieces(bytewise(b"NOOP " + b"x" * 200 + b"\r\nNOOP\r\n"))
        self.assertEqual(client.statuses(), ["500 5.5.2", "250 2.0.0"])

    def test_line_of_max_line_octets_with_crlf_is_accepted(self) -> None:
        """A line whose length with CRLF is exactly C{max_line} is accepted."""
        client = self.session(max_line=30)
        line = b"NOOP " + b"x" * 23 + b"\r\n"
        self.assertEqual(len(line), 30)
        client.send(line)
        self.assertEqual(client.statuses(), ["250 2.0.0"])

    def test_nul_in_command_gets_500(self) -> None:
        """A NUL octet in a command line gets 500 5.5.2."""
        client = self.session()
        client.send(b"NOOP\x00\r\nMAIL FROM:<a\x00@remote.example>\r\n")
        self.assertEqual(client.statuses(), ["500 5.5.2", "500 5.5.2"])

    def test_invalid_utf8_gets_500(self) -> None:
        """A command line that is not valid UTF-8 gets 500 5.5.2."""
        client = self.session()
        client.send(b"MAIL FROM:<\xff\xfe@remote.example>\r\n")
        self.assertEqual(client.statuses(), ["500 5.5.2"])

    def test_bare_lf_inside_command_line_gets_500(self) -> None:
        """
        A bare LF or CR inside a command line makes the whole line (up to CRLF) one bad
        command: one 500 5.5.2, and neither half is run.
        """
        client = self.session()
        client.send(b"NOOP\nRSET\r\nMAIL FROM:<a@remote.example>\rRSET\r\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["500 5.5.2", "500 5.5.2", "250 2.0.0"])

    def test_error_budget_exhausted_gets_421_and_closes(self) -> None:
        """
        After C{max_errors} bad commands, the next one gets 421 4.7.0 and the connection is
        closed; later input is ignored.
        """
        client = self.session(max_errors=3)
        client.send(b"FOO\r\n" * 3)
        self.assertEqual(client.statuses(), ["500 5.5.2"] * 3)
        self.assertFalse(client.closed)
        client.send(b"FOO\r\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["421 4.7.0"])
        self.assertTrue(client.closed)
        client.send(b"NOOP\r\n")
        self.assertEqual(client.take(), b"")

    def test_error_budget_counts_501_and_503(self) -> None:
        """Syntax (501) and sequence (503) errors count toward the budget."""
        client = self.session(max_errors=2)
        client.send(RCPT_ALICE + b"MAIL FROM:bad\r\n" + b"RSET x\r\n")
        self.assertEqual(client.statuses(), ["503 5.5.1", "501 5.1.7", "421 4.7.0"])
        self.assertTrue(client.closed)

    def test_policy_refusals_do_not_count_as_errors(self) -> None:
        """550/554 refusals of recipients are not client errors: no 421 for them."""
        client = self.session(max_errors=2)
        client.send(
            MAIL + b"RCPT TO:<nobody@example.org>\r\n" * 5 + b"RCPT TO:<x@other.example>\r\n"
        )
        self.assertEqual(client.statuses(), ["250 2.1.0"] + ["550 5.1.1"] * 5 + ["554 5.7.1"])
        self.assertFalse(client.closed)

    def test_http_request_as_first_command_gets_421_and_closes(self) -> None:
        """An HTTP request instead of SMTP gets one 421 and the connection closes."""
        client = self.connect()
        client.take()
        client.send(b"GET / HTTP/1.1\r\nHost: mx.example.org\r\n\r\n")
        replies = client.statuses()
        self.assertEqual(len(replies), 1)
        self.assertTrue(replies[0].startswith("421"), replies)
        self.assertTrue(client.closed)

    def test_auth_gets_502(self) -> None:
        """AUTH is not offered on this port: 502 5.5.1."""
        client = self.session()
        client.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
        self.assertEqual(client.statuses(), ["502 5.5.1"])


class SimpleCommandTests(ServerTestCase):
    """RSET, NOOP, VRFY, EXPN, HELP, QUIT."""

    def test_rset_clears_transaction(self) -> None:
        """After RSET, RCPT needs a new MAIL and MAIL is not nested; nothing is stored."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"RSET\r\n" + RCPT_ALICE + b"DATA\r\n" + MAIL)
        self.assertEqual(
            client.statuses(),
            ["250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "503 5.5.1", "250 2.1.0"],
        )
        self.assertEqual(self.store.messages, {})

    def test_rset_with_argument_gets_501(self) -> None:
        """RSET takes no argument."""
        client = self.session()
        client.send(b"RSET now\r\n")
        self.assertEqual(client.statuses(), ["501 5.5.4"])

    def test_noop_gets_250(self) -> None:
        """NOOP, with or without an argument, gets 250 2.0.0."""
        client = self.session()
        client.send(b"NOOP\r\nNOOP hello\r\n")
        self.assertEqual(client.statuses(), ["250 2.0.0", "250 2.0.0"])

    def test_vrfy_gets_252(self) -> None:
        """VRFY never reveals accounts: 252 2.5.0 for known and unknown names alike."""
        client = self.session()
        client.send(b"VRFY alice@example.org\r\nVRFY nobody@example.org\r\n")
        self.assertEqual(client.statuses(), ["252 2.5.0", "252 2.5.0"])

    def test_vrfy_without_argument_gets_501(self) -> None:
        """VRFY needs an argument."""
        client = self.session()
        client.send(b"VRFY\r\n")
        self.assertEqual(client.statuses(), ["501 5.5.4"])

    def test_expn_gets_502(self) -> None:
        """EXPN is not available."""
        client = self.session()
        client.send(b"EXPN staff\r\n")
        self.assertEqual(client.statuses(), ["502 5.5.1"])

    def test_help_gets_214(self) -> None:
        """HELP gets 214 2.0.0."""
        client = self.session()
        client.send(b"HELP\r\n")
        self.assertEqual(client.statuses(), ["214 2.0.0"])

    def test_quit_gets_221_and_closes(self) -> None:
        """QUIT gets 221 2.0.0 and the server closes the connection."""
        client = self.session()
        client.send(b"QUIT\r\n")
        self.assertEqual(client.statuses(), ["221 2.0.0"])
        self.assertTrue(client.closed)

    def test_quit_mid_transaction_stores_nothing(self) -> None:
        """QUIT in the middle of a transaction ends it; nothing is stored."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"QUIT\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.1.5", "221 2.0.0"])
        client.lose()
        self.assertEqual(self.store.messages, {})

    def test_disconnect_mid_data_stores_nothing(self) -> None:
        """A connection lost in the middle of DATA stores nothing."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"DATA\r\nSubject: x\r\n\r\npartial\r\n")
        client.lose()
        self.assertEqual(self.store.messages, {})


class BdatTests(ServerTestCase):
    """CHUNKING (RFC 3030)."""

    def test_bdat_chunks_then_bdat_0_last_store_exact_bytes(self) -> None:
        """
        BDAT chunks are stored exactly, with no dot-unstuffing and no search for a
        terminator; C{BDAT 0 LAST} ends the message.
        """
        part1 = b"Subject: x\r\n\r\n..two\r\n"
        part2 = b".\r\n...\r\n"
        client = self.session()
        client.send(
            MAIL
            + RCPT_ALICE
            + b"BDAT %d\r\n" % len(part1)
            + part1
            + b"BDAT %d\r\n" % len(part2)
            + part2
            + b"BDAT 0 LAST\r\n"
        )
        output = client.take()
        self.assertEqual(
            statuses(output), ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "250 2.0.0"]
        )
        [msgid] = accepted_ids(output)
        self.assertEqual(
            self.store.messages[ALICE], [self.expected_copy(ALICE, part1 + part2, msgid)]
        )

    def test_bdat_n_last_stores_exact_bytes(self) -> None:
        """A single C{BDAT n LAST} stores its n octets."""
        content = b"Subject: y\r\n\r\n.\r\n"
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"BDAT %d LAST\r\n" % len(content) + content + b"NOOP\r\n")
        output = client.take()
        self.assertEqual(statuses(output), ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"])
        [msgid] = accepted_ids(output)
        self.assertEqual(self.store.messages[ALICE], [self.expected_copy(ALICE, content, msgid)])

    def test_bdat_chunk_may_split_crlf(self) -> None:
        """A CRLF split between two chunks is a proper line ending."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"BDAT 3\r\nab\rBDAT 1 LAST\r\n\n")
        output = client.take()
        self.assertEqual(statuses(output), ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"])
        [msgid] = accepted_ids(output)
        self.assertEqual(self.store.messages[ALICE], [self.expected_copy(ALICE, b"ab\r\n", msgid)])

    def test_bdat_byte_at_a_time(self) -> None:
        """A BDAT transaction fed one byte at a time stores the same bytes."""
        content = b"line\r\n.\r\n"
        client = self.session()
        client.send_pieces(bytewise(MAIL + RCPT_ALICE + b"BDAT 4\r\nlineBDAT 5 LAST\r\n\r\n.\r\n"))
        output = client.take()
        self.assertEqual(statuses(output), ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"])
        [msgid] = accepted_ids(output)
        self.assertEqual(self.store.messages[ALICE], [self.expected_copy(ALICE, content, msgid)])

    def test_bdat_without_mail_consumes_bytes_and_gets_503(self) -> None:
        """
        BDAT without MAIL gets 503 5.5.1 after its octets are read; those octets are not
        taken as commands.
        """
        client = self.session()
        client.send(b"BDAT 6\r\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["503 5.5.1"])
        client.send(b"NOOP\r\n")
        self.assertEqual(client.statuses(), ["250 2.0.0"])

    def test_transaction_after_refused_bdat_may_use_data(self) -> None:
        """A BDAT refused for lack of MAIL does not stop the next transaction from using DATA."""
        client = self.session()
        client.send(b"BDAT 3 LAST\r\nabc" + TRANSACTION)
        self.assertEqual(client.statuses(), ["503 5.5.1"] + OK_TRANSACTION)

    def test_bdat_without_mail_in_pieces(self) -> None:
        """The chunk of a refused BDAT is skipped even when it arrives in pieces."""
        client = self.session()
        client.send(b"BDAT 12 LAST\r\nQUIT\r\n")
        self.assertEqual(client.statuses(), [])
        client.send(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["503 5.5.1", "250 2.0.0"])
        self.assertFalse(client.closed)

    def test_bdat_without_recipient_gets_554(self) -> None:
        """BDAT LAST with no accepted recipient gets 554 5.5.1, and nothing is stored."""
        client = self.session()
        client.send(MAIL + b"RCPT TO:<nobody@example.org>\r\nBDAT 3 LAST\r\nabc")
        self.assertEqual(client.statuses(), ["250 2.1.0", "550 5.1.1", "554 5.5.1"])
        self.assertEqual(self.store.messages, {})

    def test_bdat_over_size_gets_552_5_3_4(self) -> None:
        """A chunk taking the message over C{max_size} gets 552 5.3.4; the session goes on."""
        client = self.session(max_size=100)
        client.send(MAIL + RCPT_ALICE + b"BDAT 101 LAST\r\n" + b"x" * 101 + MAIL)
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.1.5", "552 5.3.4", "250 2.1.0"])
        self.assertEqual(self.store.messages, {})

    def test_bdat_over_size_in_later_chunk(self) -> None:
        """
        When a later chunk goes over the limit, it and the rest get 552 and the message is
        not stored.
        """
        client = self.session(max_size=100)
        client.send(
            MAIL
            + RCPT_ALICE
            + b"BDAT 60\r\n"
            + b"a" * 60
            + b"BDAT 60\r\n"
            + b"b" * 60
            + b"BDAT 0 LAST\r\n"
            + MAIL
        )
        self.assertEqual(
            client.statuses(),
            ["250 2.1.0", "250 2.1.5", "250 2.0.0", "552 5.3.4", "552 5.3.4", "250 2.1.0"],
        )
        self.assertEqual(self.store.messages, {})

    def test_data_after_bdat_gets_503(self) -> None:
        """DATA after a BDAT chunk in the same transaction gets 503 5.5.1."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"BDAT 3\r\nabcDATA\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1"])

    def test_bdat_bad_syntax_gets_421_and_closes(self) -> None:
        """
        A BDAT whose size cannot be read gets 421 and the connection closes (what follows
        cannot be framed).
        """
        for arg in (b"", b"x", b"-1", b"5 NOTLAST", b"1 2 3", b"9" * 19):
            client = self.session()
            client.send(b"BDAT " + arg + b"\r\nNOOP\r\n")
            replies = client.statuses()
            self.assertEqual(len(replies), 1, arg)
            self.assertEqual(replies[0][:3], "421", arg)
            self.assertTrue(client.closed, arg)

    def test_bdat_bad_syntax_421_has_class_4_enhanced_code(self) -> None:
        """
        The 421 for bad BDAT syntax carries an enhanced code of class 4 (RFC 3463 §2: the
        class must match the reply code).
        """
        client = self.session()
        client.send(b"BDAT x\r\n")
        self.assertEqual(client.statuses(), ["421 4.5.4"])

    def test_bdat_bare_lf_gets_554_5_6_0(self) -> None:
        """A bare LF in BDAT content gets 554 5.6.0 at LAST and nothing is stored."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"BDAT 4\r\na\nb\rBDAT 1 LAST\r\nx" + b"NOOP\r\n")
        self.assertEqual(
            client.statuses(), ["250 2.1.0", "250 2.1.5", "250 2.0.0", "554 5.6.0", "250 2.0.0"]
        )
        self.assertEqual(self.store.messages, {})

    def test_bdat_ending_with_cr_gets_554(self) -> None:
        """Content that ends with a lone CR is refused at LAST."""
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"BDAT 3 LAST\r\nab\r")
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.1.5", "554 5.6.0"])


class InternalErrorTests(ServerTestCase):
    """Failures inside the server give 451 4.3.0, reveal nothing, and the session goes on."""

    def test_store_failure_gets_451_4_3_0_without_details_and_session_continues(self) -> None:
        """
        When the store fails, the end of DATA gets 451 4.3.0 naming only the session, not
        the exception; the next transaction works.
        """
        self.store.fail_with = RuntimeError("disk on fire at /srv/mail/secret")
        client = self.session()
        client.send(TRANSACTION)
        output = client.take()
        self.assertEqual(statuses(output), ["250 2.1.0", "250 2.1.5", "354", "451 4.3.0"])
        self.assertNotIn(b"fire", output)
        self.assertNotIn(b"secret", output)
        self.assertNotIn(b"Traceback", output)
        self.assertNotIn(b"RuntimeError", output)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.store.fail_with = None
        client.send(TRANSACTION)
        self.assertEqual(client.statuses(), OK_TRANSACTION)
        self.assertEqual(len(self.store.messages[ALICE]), 1)

    def test_directory_exception_during_rcpt_gets_451_4_3_0(self) -> None:
        """An exception from the directory during RCPT gets 451 4.3.0, without details."""
        self.directory.fail_on.add(ALICE)
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"NOOP\r\n")
        output = client.take()
        self.assertEqual(statuses(output), ["250 2.1.0", "451 4.3.0", "250 2.0.0"])
        self.assertNotIn(b"secret", output)
        self.assertNotIn(b"OSError", output)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertFalse(client.closed)

    def test_directory_exception_on_one_rcpt_keeps_the_transaction(self) -> None:
        """
        A temporary failure (451) on one RCPT does not end the transaction (RFC 5321 §3.3):
        the next recipient is accepted and the message delivered to it.
        """
        self.directory.fail_on.add(ALICE)
        client = self.session()
        client.send(MAIL + RCPT_ALICE + RCPT_BOB + b"DATA\r\n" + CONTENT + b".\r\n")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(
            client.statuses(), ["250 2.1.0", "451 4.3.0", "250 2.1.5", "354", "250 2.0.0"]
        )
        self.assertEqual(list(self.store.messages), [BOB])


class PendingCommitTests(ServerTestCase):
    """A commit whose Deferred fires later."""

    def setUp(self) -> None:
        super().setUp()
        self.pending = PendingStore()

    def test_pending_commit_holds_replies_to_pipelined_commands_in_order(self) -> None:
        """
        Commands pipelined after the end of DATA are answered only once the commit fires,
        after its 250, in order.
        """
        client = self.session(self.factory(store=self.pending))
        client.send(TRANSACTION + b"NOOP\r\nRSET\r\nQUIT\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.1.5", "354"])
        self.assertFalse(client.closed)
        writes = len(client.transport.writes)
        self.pending.fire()
        self.assertEqual(len(client.transport.writes), writes + 1)
        self.assertEqual(client.statuses(), ["250 2.0.0", "250 2.0.0", "250 2.0.0", "221 2.0.0"])
        self.assertTrue(client.closed)

    def test_pending_commit_pauses_transport_when_more_input_arrives(self) -> None:
        """
        While the commit is pending, more input pauses the transport (TCP backpressure); it is
        resumed once the commit fires. A client that waits for its reply causes no pause.
        """
        client = self.session(self.factory(store=self.pending))
        client.send(TRANSACTION)
        self.assertEqual(client.transport.producerState, "producing")
        client.send(b"NOOP\r\n")
        self.assertEqual(client.transport.producerState, "paused")
        self.pending.fire()
        self.assertEqual(client.transport.producerState, "producing")

    def test_input_during_pending_commit_is_handled_after_it(self) -> None:
        """Input that arrives while the commit is pending is answered after its 250."""
        client = self.session(self.factory(store=self.pending))
        client.send(TRANSACTION)
        client.take()
        client.send(b"NOOP\r\n")
        client.send(MAIL)
        self.assertEqual(client.take(), b"")
        self.pending.fire()
        self.assertEqual(client.statuses(), ["250 2.0.0", "250 2.0.0", "250 2.1.0"])

    def test_pending_commit_stores_exact_content(self) -> None:
        """The store receives the exact content and trace."""
        client = self.session(self.factory(store=self.pending))
        client.send(TRANSACTION)
        [(_, targets, body)] = self.pending.calls
        self.assertEqual(
            [(account, prefix + body) for account, prefix in targets],
            [(ALICE, self.expected_copy(ALICE, CONTENT, "id2"))],
        )

    def test_pending_commit_failure_gets_451_then_pipelined_replies(self) -> None:
        """A commit that fails later gets 451 4.3.0, then the pipelined commands' replies."""
        client = self.session(self.factory(store=self.pending))
        client.send(TRANSACTION + b"NOOP\r\n")
        client.take()
        self.pending.calls[0][0].errback(RuntimeError("late failure"))
        self.assertEqual(client.statuses(), ["451 4.3.0", "250 2.0.0"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_connection_lost_during_pending_commit(self) -> None:
        """The connection may be lost while the commit is pending; its firing then is quiet."""
        client = self.session(self.factory(store=self.pending))
        client.send(TRANSACTION + b"NOOP\r\n")
        client.take()
        client.lose()
        self.pending.fire()
        self.assertEqual(client.take(), b"")

    def test_idle_timeout_does_not_close_while_commit_pending(self) -> None:
        """The idle timeout does not fire while the server itself is busy committing."""
        client = self.session(self.factory(store=self.pending, idle_timeout=60))
        client.send(TRANSACTION)
        client.take()
        self.clock.advance(600)
        self.assertFalse(client.closed)
        self.assertEqual(client.take(), b"")

    def test_idle_timeout_restarts_after_slow_commit_reply(self) -> None:
        """
        After a slow commit, the client gets the whole idle timeout to send its next
        command, counted from the 250 (it could not send before).
        """
        client = self.session(self.factory(store=self.pending, idle_timeout=60))
        client.send(TRANSACTION)
        client.take()
        self.clock.advance(120)
        self.pending.fire()
        self.assertEqual(client.statuses(), ["250 2.0.0"])
        self.clock.advance(30)
        self.assertFalse(client.closed)
        self.assertEqual(client.take(), b"")


class IdleTimeoutTests(ServerTestCase):
    """The idle timeout."""

    def test_idle_timeout_gets_421_4_4_2_and_closes(self) -> None:
        """After C{idle_timeout} seconds without input: 421 4.4.2 and the connection closes."""
        client = self.session(idle_timeout=60)
        self.clock.advance(59.9)
        self.assertEqual(client.take(), b"")
        self.assertFalse(client.closed)
        self.clock.advance(0.1)
        self.assertEqual(client.statuses(), ["421 4.4.2"])
        self.assertTrue(client.closed)

    def test_idle_timeout_before_ehlo(self) -> None:
        """A client that never speaks after the greeting is timed out too."""
        client = self.connect(self.factory(idle_timeout=30))
        client.take()
        self.clock.advance(30)
        self.assertEqual(client.statuses(), ["421 4.4.2"])
        self.assertTrue(client.closed)

    def test_activity_postpones_idle_timeout(self) -> None:
        """Input restarts the idle time: the timeout comes C{idle_timeout} after it."""
        client = self.session(idle_timeout=60)
        self.clock.advance(50)
        client.send(b"NOOP\r\n")
        client.take()
        self.clock.advance(59)
        self.assertFalse(client.closed)
        self.assertEqual(client.take(), b"")
        self.clock.advance(1)
        self.assertEqual(client.statuses(), ["421 4.4.2"])
        self.assertTrue(client.closed)

    def test_partial_input_counts_as_activity(self) -> None:
        """A slow client sending a command in pieces is not idle."""
        client = self.session(idle_timeout=60)
        for piece in bytewise(b"NOOP\r\n"):
            self.clock.advance(50)
            client.send(piece)
        self.assertEqual(client.statuses(), ["250 2.0.0"])
        self.assertFalse(client.closed)

    def test_timeout_in_data_stores_nothing(self) -> None:
        """A client that stops in the middle of DATA is timed out; nothing is stored."""
        client = self.session(idle_timeout=60)
        client.send(MAIL + RCPT_ALICE + b"DATA\r\npartial\r\n")
        client.take()
        self.clock.advance(60)
        self.assertEqual(client.statuses(), ["421 4.4.2"])
        client.lose()
        self.assertEqual(self.store.messages, {})

    def test_no_timer_left_after_disconnect(self) -> None:
        """Once the connection is lost, no timer of the session is left on the clock."""
        client = self.session(idle_timeout=60)
        client.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConnectionLimitTests(ServerTestCase):
    """Connection limits through L{ConnectionLimiter}."""

    def test_over_total_limit_greeting_is_421_4_7_0_and_closed(self) -> None:
        """Past the total limit, the greeting is 421 4.7.0 and the connection closes."""
        self.limiter = ConnectionLimiter(max_total=2, max_per_client=10)
        factory = self.factory()
        self.connect(factory, peer=IPv4Address("TCP", "192.0.2.1", 1))
        self.connect(factory, peer=IPv4Address("TCP", "192.0.2.2", 1))
        third = self.connect(factory, peer=IPv4Address("TCP", "192.0.2.3", 1))
        self.assertEqual(third.statuses(), ["421 4.7.0"])
        self.assertTrue(third.closed)

    def test_refused_connection_ignores_input(self) -> None:
        """A refused connection answers nothing more."""
        self.limiter = ConnectionLimiter(max_total=0, max_per_client=10)
        client = self.connect()
        client.take()
        client.send(EHLO + MAIL)
        self.assertEqual(client.take(), b"")

    def test_over_per_client_limit_421_other_client_accepted(self) -> None:
        """Past the per-client limit that client gets 421 4.7.0; another client gets 220."""
        self.limiter = ConnectionLimiter(max_total=10, max_per_client=1)
        factory = self.factory()
        first = self.connect(factory)
        self.assertEqual(first.take(), GREETING)
        second = self.connect(factory)
        self.assertEqual(second.statuses(), ["421 4.7.0"])
        self.assertTrue(second.closed)
        other = self.connect(factory, peer=IPv4Address("TCP", "192.0.2.99", 1))
        self.assertEqual(other.take(), GREETING)

    def test_per_client_limit_groups_ipv6_64(self) -> None:
        """Two peers of one IPv6 /64 share the per-client limit."""
        self.limiter = ConnectionLimiter(max_total=10, max_per_client=1)
        factory = self.factory()
        first = self.connect(factory, peer=IPv6Address("TCP", "2001:db8::1", 1))
        self.assertEqual(first.statuses(), ["220"])
        second = self.connect(factory, peer=IPv6Address("TCP", "2001:db8::2", 1))
        self.assertEqual(second.statuses(), ["421 4.7.0"])

    def test_disconnect_frees_the_slot(self) -> None:
        """When a counted connection ends, a new one from the same client gets in."""
        self.limiter = ConnectionLimiter(max_total=1, max_per_client=1)
        factory = self.factory()
        first = self.connect(factory)
        first.take()
        first.lose()
        self.assertEqual(self.limiter.total, 0)
        again = self.connect(factory)
        self.assertEqual(again.take(), GREETING)

    def test_refused_connection_frees_nothing_on_disconnect(self) -> None:
        """A refused connection was not counted, so its end does not free a slot."""
        self.limiter = ConnectionLimiter(max_total=1, max_per_client=1)
        factory = self.factory()
        self.connect(factory)
        refused = self.connect(factory)
        refused.lose()
        self.assertEqual(self.limiter.total, 1)
        self.assertEqual(self.connect(factory).statuses(), ["421 4.7.0"])


class DrainTests(ServerTestCase):
    """
    A graceful stop through L{SessionTracker.drain}. C{drain} fires once every session's
    connection is closed; L{Client.lose} plays the reactor's part after C{loseConnection}.
    """

    def lose_closed(self, *clients: Client) -> None:
        """Deliver C{connectionLost} to each client whose server closed the connection."""
        for client in clients:
            if client.closed:
                client.lose()

    def test_drain_without_sessions_fires_at_once(self) -> None:
        """With no session open, C{drain} has already fired."""
        self.assertIsNone(self.successResultOf(self.tracker.drain(self.clock, 30)))

    def test_drain_closes_idle_sessions_with_421_4_3_2_at_once(self) -> None:
        """Idle sessions get 421 4.3.2 and are closed at once; C{drain} fires once closed."""
        one = self.session()
        two = self.connect()
        two.take()
        d = self.tracker.drain(self.clock, 30)
        for client in (one, two):
            self.assertEqual(client.statuses(), ["421 4.3.2"])
            self.assertTrue(client.closed)
        self.lose_closed(one, two)
        self.assertIsNone(self.successResultOf(d))

    def test_drain_lets_session_mid_data_finish_then_421(self) -> None:
        """
        A session in the middle of DATA gets to finish its message (250) and then gets
        421 4.3.2; C{drain} fires then.
        """
        busy = self.session()
        idle = self.session()
        busy.send(MAIL + RCPT_ALICE + b"DATA\r\nSubject: x\r\n\r\n")
        busy.take()
        d = self.tracker.drain(self.clock, 30)
        self.assertEqual(idle.statuses(), ["421 4.3.2"])
        self.lose_closed(idle)
        self.assertNoResult(d)
        self.assertEqual(busy.take(), b"")
        self.assertFalse(busy.closed)
        busy.send(b"body\r\n.\r\nNOOP\r\n")
        self.assertEqual(busy.statuses(), ["250 2.0.0", "421 4.3.2"])
        self.assertTrue(busy.closed)
        self.lose_closed(busy)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.store.messages[ALICE]), 1)

    def test_drain_lets_session_between_mail_and_data_finish(self) -> None:
        """A session with a transaction open (MAIL given) may still send its message."""
        busy = self.session()
        busy.send(MAIL + RCPT_ALICE)
        busy.take()
        d = self.tracker.drain(self.clock, 30)
        self.assertNoResult(d)
        busy.send(b"DATA\r\n" + CONTENT + b".\r\n")
        self.assertEqual(busy.statuses(), ["354", "250 2.0.0", "421 4.3.2"])
        self.lose_closed(busy)
        self.assertIsNone(self.successResultOf(d))

    def test_drain_session_that_resets_its_transaction_is_closed(self) -> None:
        """A session that abandons its transaction with RSET is closed right after."""
        busy = self.session()
        busy.send(MAIL + RCPT_ALICE)
        busy.take()
        d = self.tracker.drain(self.clock, 30)
        busy.send(b"RSET\r\n")
        self.assertEqual(busy.statuses(), ["250 2.0.0", "421 4.3.2"])
        self.lose_closed(busy)
        self.assertIsNone(self.successResultOf(d))

    def test_drain_lets_pending_commit_finish_then_421(self) -> None:
        """A session waiting for its commit gets the 250, then 421 4.3.2."""
        pending = PendingStore()
        client = self.session(self.factory(store=pending))
        client.send(TRANSACTION + b"NOOP\r\n")
        client.take()
        d = self.tracker.drain(self.clock, 30)
        self.assertNoResult(d)
        pending.fire()
        self.assertEqual(client.statuses(), ["250 2.0.0", "421 4.3.2"])
        self.assertTrue(client.closed)
        self.lose_closed(client)
        self.assertIsNone(self.successResultOf(d))

    def test_drain_grace_timeout_closes_unfinished_session(self) -> None:
        """
        A session that never finishes its message is closed with 421 4.3.2 when the grace
        time is over; nothing is stored and C{drain} fires.
        """
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"DATA\r\nSubject: x\r\n\r\n")
        client.take()
        d = self.tracker.drain(self.clock, 30)
        self.clock.advance(29)
        self.assertNoResult(d)
        self.assertFalse(client.closed)
        self.clock.advance(1)
        self.assertEqual(client.statuses(), ["421 4.3.2"])
        self.assertTrue(client.closed)
        self.lose_closed(client)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.store.messages, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_grace_timeout_fires_even_if_connection_never_closes(self) -> None:
        """
        After the grace time, C{drain} fires even when the transport never reports the
        connection lost (so a stop cannot hang on one stuck peer).
        """
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"DATA\r\n")
        d = self.tracker.drain(self.clock, 30)
        self.clock.advance(30)
        self.assertTrue(client.closed)
        self.assertIsNone(self.successResultOf(d))

    def test_drain_grace_timeout_leaves_no_unhandled_error(self) -> None:
        """
        When the grace time cuts a session off, no Deferred is left holding an unhandled
        failure (which would be logged as "Unhandled error in Deferred"), and the late
        C{connectionLost} raises nothing.
        """
        client = self.session()
        client.send(MAIL + RCPT_ALICE + b"DATA\r\n")
        d = self.tracker.drain(self.clock, 30)
        self.clock.advance(30)
        self.successResultOf(d)
        client.lose()
        del client, d
        self.tracker.sessions.clear()
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(CancelledError), [])

    def test_closed_session_answers_nothing_after_drain(self) -> None:
        """Once closed by the drain, a session answers nothing."""
        client = self.session()
        self.tracker.drain(self.clock, 30)
        client.take()
        client.send(b"NOOP\r\n")
        self.assertEqual(client.take(), b"")


# --- submission (RFC 6409, RFC 4954 AUTH, RFC 3461 DSN) -------------------------------------

ALICE_PASSWORD = "alice-password"
REMOTE = "friend@remote.example"


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{user}\0{password}")


class FakeAuthenticator:
    """
    Logs alice in with her password, by PLAIN/LOGIN or SCRAM; records every call. Peers in
    C{throttled} get L{Throttled}; with C{pending}, verdicts wait for the test to fire them.
    """

    def __init__(self) -> None:
        self.scram = {ALICE: scram_credentials(ALICE_PASSWORD)}
        self.calls: list[tuple[Any, ...]] = []
        self.throttled: set[str] = set()
        self.pending = False
        self.waiting: list[tuple[Deferred[str], str | None]] = []
        self.error: Exception | None = None

    def _verdict(self, peer: str, account: str | None) -> Deferred[str]:
        if self.error is not None:
            return fail(self.error)
        if self.pending:
            d: Deferred[str] = Deferred()
            self.waiting.append((d, account))
            return d
        if peer in self.throttled:
            return fail(Throttled())
        return succeed(account) if account is not None else fail(LoginFailed())

    def fire(self) -> None:
        d, account = self.waiting.pop(0)
        if account is None:
            d.errback(LoginFailed())
        else:
            d.callback(account)

    def authenticate(self, peer_host: str, username: str, password: str) -> Deferred[str]:
        self.calls.append(("password", peer_host, username, password))
        account = username.lower()
        ok = self.scram.get(account) is not None and password == ALICE_PASSWORD
        return self._verdict(peer_host, account if ok else None)

    def scram_credentials(self, username: str) -> ScramCredentials:
        self.calls.append(("credentials", username))
        found = self.scram.get(username.lower())
        return found if found is not None else scram_credentials("fake", b"0" * 16)

    def scram_login(self, peer_host: str, username: str, proof_ok: bool) -> Deferred[str]:
        self.calls.append(("scram", peer_host, username, proof_ok))
        return self._verdict(peer_host, username.lower() if proof_ok else None)


@implementer(IDelivery)
class RecordingDelivery:
    """A transaction that records what the protocol hands over."""

    def __init__(self, agent: RecordingAgent, mail_from: str, options: MailOptions | None) -> None:
        self.agent = agent
        self.mail_from = mail_from
        self.options = options
        self.rcpts: list[tuple[str, frozenset[Notify] | None, str | None]] = []
        self.body = b""
        self.trace = b""

    @property
    def size(self) -> int:
        return len(self.body)

    def add_rcpt(
        self, address: str, notify: frozenset[Notify] | None = None, orcpt: str | None = None
    ) -> RcptVerdict:
        submitted = self.options is not None and self.options.account is not None
        check = check_submission_rcpt if submitted else check_inbound_rcpt
        verdict, _ = check(self.agent.directory, address)
        if verdict is RcptVerdict.ACCEPT:
            self.rcpts.append((address, notify, orcpt))
        return verdict

    def write(self, data: bytes) -> None:
        self.body += data

    def commit(self, trace: bytes) -> Deferred[None]:
        self.trace = trace
        self.agent.committed.append(self)
        return succeed(None)

    def abort(self) -> None:
        pass


@implementer(IDeliveryAgent)
class RecordingAgent:
    def __init__(self, directory: IDirectory) -> None:
        self.directory = directory
        self.begun: list[RecordingDelivery] = []
        self.committed: list[RecordingDelivery] = []

    def begin(
        self, mail_from: str, message_id: str, options: MailOptions | None = None
    ) -> RecordingDelivery:
        delivery = RecordingDelivery(self, mail_from, options)
        self.begun.append(delivery)
        return delivery


class SubmissionTestCase(ServerTestCase):
    """A submission listener with a fake authenticator and a recording agent."""

    def setUp(self) -> None:
        super().setUp()
        self.auth = FakeAuthenticator()
        self.agent = RecordingAgent(self.directory)
        self.owned = {(ALICE, ALICE), (ALICE, "sales@example.org")}
        self.sender_checks: list[tuple[str, str]] = []

    def may_send_as(self, account: str, address: str) -> bool:
        self.sender_checks.append((account, address))
        return (account, address) in self.owned

    def submission(self, tls: object | None = None, **settings: Any) -> SMTPFactory:
        settings.setdefault("tls_mode", "implicit")
        return SMTPFactory(
            SMTPSettings(HOST, submission=True, **settings),
            self.agent,
            self.clock,
            self.limiter,
            self.tracker,
            tls,
            auth=self.auth,
            may_send_as=self.may_send_as,
        )

    def logged_in(self, **settings: Any) -> Client:
        client = self.session(self.submission(**settings))
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.statuses(), ["235 2.7.0"])
        return client

    @staticmethod
    def challenge(output: bytes) -> bytes:
        """The decoded data of the one C{334} challenge in C{output}."""
        line = output.decode()
        assert line.startswith("334 ") and line.endswith("\r\n"), line
        return base64.b64decode(line[4:-2])


class SubmissionEhloTests(SubmissionTestCase):
    """What a submission listener advertises, and when AUTH is allowed."""

    def ehlo(self, client: Client) -> list[bytes]:
        client.send(EHLO)
        return [line[4:] for line in client.take().split(b"\r\n")[1:-1]]

    def test_auth_only_after_starttls(self) -> None:
        """
        Before STARTTLS: no AUTH offered, AUTH gets 538 5.7.11 and MAIL 530 5.7.0; DSN is
        offered. After STARTTLS and a new EHLO, AUTH is offered and works.
        """
        context = object()
        client = self.connect(
            self.submission(context, tls_mode="starttls"), transport=TLSCapableTransport()
        )
        client.take()
        keywords = self.ehlo(client)
        self.assertIn(b"STARTTLS", keywords)
        self.assertIn(b"DSN", keywords)
        self.assertFalse([k for k in keywords if k.startswith(b"AUTH")], keywords)
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        client.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(client.statuses(), ["538 5.7.11", "530 5.7.0"])
        self.assertEqual(self.auth.calls, [])
        client.send(b"STARTTLS\r\n")
        self.assertEqual(client.statuses(), ["220 2.0.0"])
        keywords = self.ehlo(client)
        self.assertIn(b"AUTH PLAIN LOGIN SCRAM-SHA-256", keywords)
        self.assertNotIn(b"STARTTLS", keywords)
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.statuses(), ["235 2.7.0"])

    def test_implicit_tls_offers_auth_at_once(self) -> None:
        client = self.connect(self.submission())
        client.take()
        keywords = self.ehlo(client)
        self.assertIn(b"AUTH PLAIN LOGIN SCRAM-SHA-256", keywords)
        self.assertIn(b"DSN", keywords)

    def test_allow_plaintext_auth(self) -> None:
        client = self.connect(self.submission(tls_mode="none", allow_plaintext_auth=True))
        client.take()
        self.assertIn(b"AUTH PLAIN LOGIN SCRAM-SHA-256", self.ehlo(client))
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.statuses(), ["235 2.7.0"])

    def test_starttls_forgets_the_login(self) -> None:
        """RFC 3207 §4.2: a login made before TLS does not survive STARTTLS."""
        client = self.connect(
            self.submission(object(), tls_mode="starttls", allow_plaintext_auth=True),
            transport=TLSCapableTransport(),
        )
        client.take()
        client.send(EHLO + b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.statuses(), ["250", "235 2.7.0"])
        client.send(b"STARTTLS\r\n")
        client.send(EHLO + b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(client.statuses(), ["220 2.0.0", "250", "530 5.7.0"])

    def test_port_25_unchanged(self) -> None:
        """Port 25 offers neither AUTH nor DSN, even over TLS, and AUTH gets 502."""
        client = self.connect(self.factory(tls_mode="implicit"))
        client.take()
        keywords = self.ehlo(client)
        self.assertFalse([k for k in keywords if k.startswith((b"AUTH", b"DSN"))], keywords)
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.statuses(), ["502 5.5.1"])

    def test_submission_needs_auth_and_sender_check(self) -> None:
        settings = SMTPSettings(HOST, submission=True)
        agent = RecordingAgent(self.directory)
        args = (settings, agent, self.clock, self.limiter, self.tracker)
        self.assertRaises(ValueError, SMTPFactory, *args)
        self.assertRaises(ValueError, SMTPFactory, *args, auth=self.auth)
        self.assertRaises(ValueError, SMTPFactory, *args, may_send_as=self.may_send_as)


class AuthExchangeTests(SubmissionTestCase):
    """AUTH PLAIN, LOGIN and SCRAM-SHA-256 on the wire (RFC 4954)."""

    def test_plain_initial_response(self) -> None:
        client = self.session(self.submission())
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.take(), b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(self.auth.calls, [("password", PEER_IP, ALICE, ALICE_PASSWORD)])

    def test_plain_with_continuation(self) -> None:
        """Without an initial response the server sends an empty challenge, C{334 }."""
        client = self.session(self.submission())
        client.send(b"auth plain\r\n")
        self.assertEqual(client.take(), b"334 \r\n")
        client.send(plain(ALICE, ALICE_PASSWORD, authzid=ALICE) + b"\r\n")
        self.assertEqual(client.statuses(), ["235 2.7.0"])

    def test_plain_other_authzid_refused(self) -> None:
        client = self.session(self.submission())
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD, authzid=BOB) + b"\r\n")
        self.assertEqual(client.statuses(), ["535 5.7.8"])
        self.assertEqual(self.auth.calls, [])

    def test_empty_initial_response(self) -> None:
        """C{=} is an empty initial response: for PLAIN a malformed one."""
        client = self.session(self.submission())
        client.send(b"AUTH PLAIN =\r\n")
        self.assertEqual(client.statuses(), ["501 5.5.2"])

    def test_login(self) -> None:
        client = self.session(self.submission())
        client.send(b"AUTH LOGIN\r\n")
        self.assertEqual(client.take(), b"334 VXNlcm5hbWU6\r\n")
        client.send(b64(ALICE) + b"\r\n")
        self.assertEqual(client.take(), b"334 UGFzc3dvcmQ6\r\n")
        client.send(b64(ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.statuses(), ["235 2.7.0"])
        self.assertEqual(self.auth.calls, [("password", PEER_IP, ALICE, ALICE_PASSWORD)])

    def test_login_initial_response_is_the_user(self) -> None:
        client = self.session(self.submission())
        client.send(b"AUTH LOGIN " + b64(ALICE) + b"\r\n")
        self.assertEqual(client.take(), b"334 UGFzc3dvcmQ6\r\n")
        client.send(b64("wrong") + b"\r\n")
        self.assertEqual(client.statuses(), ["535 5.7.8"])

    def scram_first(self, client: Client, user: str = ALICE) -> tuple[str, str]:
        bare = f"n={user},r=clientnonce123"
        client.send(b"AUTH SCRAM-SHA-256 " + b64(f"n,,{bare}") + b"\r\n")
        return bare, self.challenge(client.take()).decode()

    def test_scram(self) -> None:
        """
        The whole exchange: server-first, then the server signature as a last challenge,
        which an empty response acknowledges; then 235. The credentials were looked up by
        the name the client sent; the verdict went through the authenticator.
        """
        client = self.session(self.submission())
        bare, server_first = self.scram_first(client)
        self.assertTrue(server_first.startswith("r=clientnonce123"), server_first)
        final, verifier = client_final(ALICE_PASSWORD, bare, server_first)
        client.send(b64(final) + b"\r\n")
        self.assertEqual(self.challenge(client.take()), verifier)
        self.assertEqual(self.auth.calls, [("credentials", ALICE), ("scram", PEER_IP, ALICE, True)])
        client.send(b"\r\n")
        self.assertEqual(client.statuses(), ["235 2.7.0"])
        client.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0"])

    def test_scram_without_initial_response(self) -> None:
        client = self.session(self.submission())
        client.send(b"AUTH SCRAM-SHA-256\r\n")
        self.assertEqual(client.take(), b"334 \r\n")
        bare = "n=alice@example.org,r=abc"
        client.send(b64("n,,n=alice@example.org,r=abc") + b"\r\n")
        server_first = self.challenge(client.take()).decode()
        final, _ = client_final(ALICE_PASSWORD, bare, server_first)
        client.send(b64(final) + b"\r\n")
        client.take()
        client.send(b"=\r\n")
        self.assertEqual(client.statuses(), ["235 2.7.0"])

    def test_scram_wrong_password(self) -> None:
        """A wrong proof is a failed login through the authenticator: 535 5.7.8."""
        client = self.session(self.submission())
        bare, server_first = self.scram_first(client)
        final, _ = client_final("wrong", bare, server_first)
        client.send(b64(final) + b"\r\n")
        self.assertEqual(client.statuses(), ["535 5.7.8"])
        self.assertEqual(self.auth.calls[-1], ("scram", PEER_IP, ALICE, False))
        client.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(client.statuses(), ["530 5.7.0"])

    def test_scram_throttled_reveals_nothing(self) -> None:
        """A throttled client gets 454 4.7.0, not the server signature, even when right."""
        self.auth.throttled.add(PEER_IP)
        client = self.session(self.submission())
        bare, server_first = self.scram_first(client)
        final, _ = client_final(ALICE_PASSWORD, bare, server_first)
        client.send(b64(final) + b"\r\n")
        self.assertEqual(client.statuses(), ["454 4.7.0"])

    def test_scram_ack_must_be_empty(self) -> None:
        client = self.session(self.submission())
        bare, server_first = self.scram_first(client)
        final, _ = client_final(ALICE_PASSWORD, bare, server_first)
        client.send(b64(final) + b"\r\n")
        client.take()
        client.send(b64("more") + b"\r\n")
        client.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(client.statuses(), ["501 5.5.2", "530 5.7.0"])

    def test_scram_channel_binding_refused(self) -> None:
        client = self.session(self.submission())
        client.send(b"AUTH SCRAM-SHA-256 " + b64("p=tls-exporter,,n=alice,r=abc") + b"\r\n")
        self.assertEqual(client.statuses(), ["535 5.7.8"])

    def test_cancel(self) -> None:
        """C{*} cancels an exchange (501); AUTH may be tried again."""
        client = self.session(self.submission())
        client.send(b"AUTH LOGIN\r\n*\r\n")
        self.assertEqual(client.statuses(), ["334", "501 5.7.0"])
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.statuses(), ["235 2.7.0"])

    def test_bad_base64(self) -> None:
        client = self.session(self.submission())
        client.send(b"AUTH PLAIN AGFsaWNl!!!\r\nAUTH LOGIN\r\nnot base64\r\n")
        self.assertEqual(client.statuses(), ["501 5.5.2", "334", "501 5.5.2"])
        self.assertEqual(self.auth.calls, [])

    def test_wrong_password_and_throttled(self) -> None:
        client = self.session(self.submission())
        client.send(b"AUTH PLAIN " + plain(ALICE, "wrong") + b"\r\n")
        self.assertEqual(client.take(), b"535 5.7.8 Authentication credentials invalid\r\n")
        self.auth.throttled.add(PEER_IP)
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.statuses(), ["454 4.7.0"])

    def test_internal_error_is_454(self) -> None:
        self.auth.error = RuntimeError("directory locked")
        client = self.session(self.submission())
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        self.assertEqual(client.take(), b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_sequence_errors(self) -> None:
        """AUTH before EHLO or after HELO: 503; a second AUTH: 503; unknown mechanism: 504;
        no mechanism: 501."""
        client = self.connect(self.submission())
        client.take()
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        client.send(b"HELO client.example\r\nAUTH PLAIN\r\n")
        client.send(EHLO + b"AUTH CRAM-MD5\r\nAUTH\r\n")
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\nAUTH LOGIN\r\n")
        self.assertEqual(
            client.statuses(),
            ["503 5.5.1", "250", "503 5.5.1", "250", "504 5.5.4", "501 5.5.4", "235 2.7.0"]
            + ["503 5.5.1"],
        )

    def test_auth_not_in_a_transaction(self) -> None:
        client = self.logged_in(allow_plaintext_auth=True)
        client.send(b"MAIL FROM:<alice@example.org>\r\nAUTH PLAIN\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "503 5.5.1"])

    def test_input_paused_while_the_check_runs(self) -> None:
        """
        Commands pipelined after AUTH wait for its verdict (the transport is paused when
        more input comes) and are then answered in order, in one write.
        """
        self.auth.pending = True
        client = self.session(self.submission())
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        client.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(client.take(), b"")
        self.assertEqual(client.transport.producerState, "paused")
        writes = len(client.transport.writes)
        self.auth.fire()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(len(client.transport.writes), writes + 1)
        self.assertEqual(client.statuses(), ["235 2.7.0", "250 2.1.0"])

    def test_verdict_after_disconnect(self) -> None:
        self.auth.pending = True
        client = self.session(self.submission())
        client.send(b"AUTH PLAIN " + plain(ALICE, ALICE_PASSWORD) + b"\r\n")
        client.lose()
        self.auth.fire()
        self.assertEqual(client.take(), b"")

    def test_long_auth_lines(self) -> None:
        """
        AUTH lines may be longer than other commands (RFC 4954 §4: 12288 octets), up to
        C{max_auth_line}; a longer SASL response gets 500 5.5.6 and ends the exchange.
        Port 25 keeps its command line limit.
        """
        long_plain = plain(ALICE, "x" * 9000)
        client = self.session(self.submission(max_line=512))
        client.send(b"AUTH PLAIN " + long_plain + b"\r\n")
        self.assertEqual(client.statuses(), ["535 5.7.8"])
        client.send(b"AUTH LOGIN\r\n" + b"A" * 20000 + b"\r\nNOOP\r\n")
        self.assertEqual(client.statuses(), ["334", "500 5.5.6", "250 2.0.0"])
        port25 = self.session(max_line=512)
        port25.send(b"AUTH PLAIN " + long_plain + b"\r\n")
        self.assertEqual(port25.statuses(), ["500 5.5.2"])

    def test_shutdown_during_exchange(self) -> None:
        """A session waiting for a SASL response is idle: a graceful stop closes it."""
        client = self.session(self.submission())
        client.send(b"AUTH LOGIN\r\n")
        client.take()
        self.tracker.drain(self.clock, 30)
        self.assertEqual(client.statuses(), ["421 4.3.2"])
        self.assertTrue(client.closed)


class SubmissionMailTests(SubmissionTestCase):
    """MAIL and RCPT on submission: authentication, sender ownership, recipients."""

    def test_530_before_auth(self) -> None:
        """Before AUTH, MAIL and RCPT get 530 5.7.0, for local and remote recipients."""
        client = self.session(self.submission())
        client.send(b"MAIL FROM:<alice@example.org>\r\n" + RCPT_ALICE)
        client.send(b"RCPT TO:<friend@remote.example>\r\nDATA\r\n")
        self.assertEqual(client.statuses(), ["530 5.7.0", "530 5.7.0", "530 5.7.0", "503 5.5.1"])
        self.assertEqual(self.agent.begun, [])

    def test_forged_sender_553(self) -> None:
        client = self.logged_in()
        client.send(b"MAIL FROM:<bob@example.org>\r\n")
        self.assertEqual(
            client.take(), b"553 5.7.1 Sender address not owned by alice@example.org\r\n"
        )
        self.assertEqual(self.sender_checks, [(ALICE, BOB)])
        self.assertEqual(self.agent.begun, [])

    def test_null_sender_553(self) -> None:
        client = self.logged_in()
        client.send(b"MAIL FROM:<>\r\n")
        self.assertEqual(client.statuses(), ["553 5.7.1"])
        self.assertEqual(self.sender_checks, [])

    def test_owned_addresses(self) -> None:
        client = self.logged_in()
        client.send(b"MAIL FROM:<sales@example.org>\r\nRSET\r\nMAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.0.0", "250 2.1.0"])

    def test_recipients(self) -> None:
        """Local recipients are checked as on port 25; remote ones are accepted (queued)."""
        client = self.logged_in()
        client.send(b"MAIL FROM:<alice@example.org>\r\n" + RCPT_BOB)
        client.send(b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<friend@remote.example>\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5"])
        [delivery] = self.agent.begun
        self.assertEqual([r[0] for r in delivery.rcpts], [BOB, REMOTE])

    def test_message_traced_as_esmtpsa_without_secrets(self) -> None:
        """
        A submitted message's Received: says ESMTPSA (RFC 3848) and holds neither the
        account nor anything of the login.
        """
        client = self.logged_in()
        client.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<friend@remote.example>\r\n")
        client.send(b"DATA\r\n" + CONTENT + b".\r\n")
        output = client.take()
        self.assertEqual(statuses(output), ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"])
        [delivery] = self.agent.committed
        [msgid] = accepted_ids(output)
        expected = received_header(
            helo="client.example",
            peer_ip=PEER_IP,
            hostname=HOST,
            protocol="ESMTPSA",
            message_id=msgid,
            recipient=REMOTE,
            now=0.0,
        )
        self.assertEqual(delivery.trace, expected)
        for secret in (b"alice", ALICE_PASSWORD.encode(), b"PLAIN", b"AUTH"):
            self.assertNotIn(secret, delivery.trace)
        self.assertEqual(delivery.body, CONTENT)

    def test_utf8_submission_traced_as_utf8smtpsa(self) -> None:
        client = self.logged_in()
        client.send(b"MAIL FROM:<alice@example.org> SMTPUTF8\r\n" + RCPT_BOB)
        client.send(b"DATA\r\n" + CONTENT + b".\r\n")
        client.take()
        [delivery] = self.agent.committed
        self.assertIn(b" with UTF8SMTPSA id ", delivery.trace)


class DSNParameterTests(SubmissionTestCase):
    """RFC 3461 parameters on submission: parsed, decoded, handed to the agent."""

    def test_parameters_reach_the_agent(self) -> None:
        client = self.logged_in()
        client.send(
            b"MAIL FROM:<alice@example.org> RET=hdrs ENVID=QQ+2Bx+3Dy BODY=8BITMIME SMTPUTF8\r\n"
            b"RCPT TO:<friend@remote.example> NOTIFY=success,FAILURE "
            b"ORCPT=rfc822;friend+2Bx@remote.example\r\n"
            b"RCPT TO:<bob@example.org> NOTIFY=NEVER\r\n"
            b"RCPT TO:<alice@example.org>\r\n"
        )
        self.assertEqual(client.statuses(), ["250 2.1.0"] + ["250 2.1.5"] * 3)
        [delivery] = self.agent.begun
        self.assertEqual(delivery.mail_from, ALICE)
        self.assertEqual(
            delivery.options,
            MailOptions(account=ALICE, envid="QQ+x=y", ret="HDRS", smtputf8=True, eight_bit=True),
        )
        self.assertEqual(
            delivery.rcpts,
            [
                (REMOTE, frozenset({"SUCCESS", "FAILURE"}), "rfc822;friend+x@remote.example"),
                (BOB, frozenset({"NEVER"}), None),
                (ALICE, None, None),
            ],
        )

    def test_defaults(self) -> None:
        client = self.logged_in()
        client.send(b"MAIL FROM:<alice@example.org> BODY=7BIT\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0"])
        self.assertEqual(self.agent.begun[0].options, MailOptions(account=ALICE))

    def test_bad_values_get_501_5_5_4(self) -> None:
        """Bad RET, ENVID, NOTIFY and ORCPT values (bad xtext, a control character once
        decoded, NEVER with others, no addr-type) get 501 5.5.4."""
        client = self.logged_in(max_errors=100)
        for params in (
            b"RET=ALL",
            b"RET",
            b"ENVID=a+ZZ",
            b"ENVID",
            b"ENVID=" + b"x" * 101,
            b"ENVID=a+0Ab",
        ):
            client.send(b"MAIL FROM:<alice@example.org> " + params + b"\r\n")
            self.assertEqual(client.statuses(), ["501 5.5.4"], params)
        client.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(client.statuses(), ["250 2.1.0"])
        for params in (
            b"NOTIFY=NEVER,SUCCESS",
            b"NOTIFY",
            b"NOTIFY=SOMETIMES",
            b"ORCPT=friend@remote.example",
            b"ORCPT=rfc822;",
            b"ORCPT=rfc822;a+0Db@remote.example",
            b"ORCPT=rfc822;a+b@remote.example",
            b"ORCPT=;a@remote.example",
        ):
            client.send(b"RCPT TO:<friend@remote.example> " + params + b"\r\n")
            self.assertEqual(client.statuses(), ["501 5.5.4"], params)

    def test_port_25_has_no_dsn_but_passes_mail_options(self) -> None:
        """Port 25: DSN parameters are unknown (555); the agent still gets SMTPUTF8 and
        BODY, with no account."""
        agent = RecordingAgent(self.directory)
        factory = SMTPFactory(SMTPSettings(HOST), agent, self.clock, self.limiter, self.tracker)
        client = self.session(factory)
        client.send(b"MAIL FROM:<a@remote.example> RET=FULL\r\n")
        client.send(b"MAIL FROM:<a@remote.example> ENVID=x\r\n")
        client.send(b"MAIL FROM:<a@remote.example> BODY=8BITMIME SMTPUTF8\r\n")
        client.send(RCPT_ALICE[:-2] + b" NOTIFY=NEVER\r\n")
        client.send(RCPT_ALICE[:-2] + b" ORCPT=rfc822;alice@example.org\r\n")
        client.send(b"RCPT TO:<friend@remote.example>\r\n")
        self.assertEqual(
            client.statuses(),
            ["555 5.5.4", "555 5.5.4", "250 2.1.0", "555 5.5.4", "555 5.5.4", "554 5.7.1"],
        )
        self.assertEqual(
            agent.begun[0].options, MailOptions(account=None, smtputf8=True, eight_bit=True)
        )
