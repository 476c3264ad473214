"""
Tests for L{mailserver.pop3.server}: the POP3 state machine, driven over a C{StringTransport}
with a fake authenticator, a fake mailbox whose messages are real files in a temporary
directory, a real L{ConnectionLimiter} and a L{Clock}.

Every reply is checked byte for byte, as a client would read it. Where it matters, so is the
number of C{write} calls: the replies to commands that arrive together leave together.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReactorTime, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailserver.auth import LoginFailed, Throttled
from mailserver.limits import ConnectionLimiter
from mailserver.pop3.server import (
    MailboxLocks,
    MailboxView,
    POP3Factory,
    POP3Server,
    POP3Settings,
    dot_stuff,
    unique_id,
)

HOST = "pop.example.org"
PEER_IP = "192.0.2.10"
PEER = IPv4Address("TCP", PEER_IP, 40000)
GREETING = b"+OK pop.example.org POP3 ready\r\n"

ALICE = "alice@example.org"
BOB = "bob@example.org"
PASSWORD = "correct horse"

INLINE_LIMIT = 256 * 1024
"""The server sends messages up to this size in one write and streams larger ones."""
CHUNK = 64 * 1024
"""The size of the reads of a streamed message: where a line end may be cut in two."""

M1 = (
    b"From: bob@example.net\r\nTo: alice@example.org\r\nSubject: one\r\n\r\n"
    b"First line.\r\nSecond line.\r\n.dotted third\r\nFourth.\r\n"
)
M2 = b"Subject: two\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
M3 = b"Subject: three\r\n\r\nno final newline"
N1 = "1700000001.M1P100.mx.example.org"
N2 = "1700000002.M2P100.mx.example.org"
N3 = "1700000003.M3P100." + "x" * 60 + ".example.org"  # too long for a UIDL: digested
TOTAL = len(M1) + len(M2) + len(M3)

USER_OK = b"+OK Send PASS\r\n"
LOGGED_IN = b"+OK Logged in, 3 messages\r\n"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed\r\n"
THROTTLED = b"-ERR [SYS/TEMP] Too many failed logins; try again later\r\n"
PLAINTEXT_REFUSED = b"-ERR [AUTH] Plaintext authentication disallowed without TLS; use STLS\r\n"
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n"
LOGIN = b"USER " + ALICE.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n"


def capa(*extra: str) -> bytes:
    """The CAPA response with the capabilities every state has, plus C{extra}."""
    caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", *extra]
    caps.append("IMPLEMENTATION mailserver")
    return (
        b"+OK Capability list follows\r\n" + "".join(f"{c}\r\n" for c in caps).encode() + b".\r\n"
    )


def plain(authcid: str, password: str, authzid: str = "") -> bytes:
    """A SASL PLAIN response (RFC 4616), base64-encoded."""
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())


def wire(content: bytes) -> bytes:
    """
    What RETR sends after its C{+OK} line for a file holding C{content}, written apart from the
    server's code: every line ended by CRLF (a bare LF becomes CRLF, a last line without an end
    gets one), a dot before each line that starts with one, then the terminating dot line.
    """
    lines = content.replace(b"\r\n", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    stuffed = (b"." + line if line.startswith(b".") else line for line in lines)
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


def retr(content: bytes) -> bytes:
    """The whole RETR response for a file holding C{content} (its size on disk announced)."""
    return b"+OK %d octets\r\n" % len(content) + wire(content)


# --- fakes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeMessage:
    uid: int
    name: str
    size: int


class FakeMailbox:
    """
    A mailbox snapshot whose messages are files in C{directory}. C{expunge} records its call
    and returns a Deferred the test fires; a UID in C{broken} makes C{path} raise.
    """

    def __init__(self, directory: Path, contents: Sequence[tuple[int, str, bytes]]) -> None:
        directory.mkdir(parents=True)
        self.directory = directory
        self.messages: Sequence[FakeMessage] = [
            FakeMessage(uid, name, len(content)) for uid, name, content in contents
        ]
        self._names = {uid: name for uid, name, _ in contents}
        for _, name, content in contents:
            (directory / name).write_bytes(content)
        self.expunges: list[tuple[list[int], Deferred[None]]] = []
        self.broken: set[int] = set()

    def path(self, uid: int) -> Path:
        if uid in self.broken:
            raise PermissionError(13, "Permission denied", "/srv/mail/secret/" + self._names[uid])
        return self.directory / self._names[uid]

    def expunge(self, uids: Sequence[int]) -> Deferred[Any]:
        d: Deferred[None] = Deferred()
        self.expunges.append((list(uids), d))
        return d

    def remove(self, uid: int) -> None:
        """Another session deleted the file of C{uid}."""
        (self.directory / self._names[uid]).unlink()


class FakeAuthenticator:
    """
    C{authenticate(peer, user, password)}: C{alice} and C{alice@example.org} are both the
    account C{alice@example.org}. With C{hold}, each call returns a Deferred kept in C{pending}
    for the test to fire. C{throttled} fails every call with L{Throttled}; C{error} fails it
    with that exception; C{raise_now} raises it before returning a Deferred.
    """

    def __init__(self) -> None:
        self.users = {
            "alice": (PASSWORD, ALICE),
            ALICE: (PASSWORD, ALICE),
            BOB: ("bob's password", BOB),
        }
        self.calls: list[tuple[str, str, str]] = []
        self.hold = False
        self.pending: list[Deferred[str]] = []
        self.throttled = False
        self.error: Exception | None = None
        self.raise_now: Exception | None = None

    def __call__(self, peer: str, user: str, password: str) -> Deferred[str]:
        self.calls.append((peer, user, password))
        if self.raise_now is not None:
            raise self.raise_now
        if self.hold:
            d: Deferred[str] = Deferred()
            self.pending.append(d)
            return d
        if self.error is not None:
            return fail(self.error)
        if self.throttled:
            return fail(Throttled())
        known = self.users.get(user)
        if known is None or known[0] != password:
            return fail(LoginFailed())
        return succeed(known[1])


class RecordingTransport(StringTransport):
    """A C{StringTransport} that also keeps each C{write} call apart."""

    def __init__(self, peer: Any = PEER) -> None:
        super().__init__(peerAddress=peer)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class FullTransport(RecordingTransport):
    """
    A transport whose send buffer is full after every write while a producer is registered:
    it pauses the producer, and the test calls C{resumeProducing} as the buffer drains.
    """

    def __init__(self, peer: Any = PEER) -> None:
        super().__init__(peer)
        self.registered: list[tuple[object, bool]] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.registered.append((producer, streaming))
        super().registerProducer(producer, streaming)

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()

    def drain(self, limit: int = 1000) -> int:
        """Resume the producer until it unregisters; the number of rounds it took."""
        rounds = 0
        while self.producer is not None:
            assert rounds < limit, "the producer never finished"
            self.producer.resumeProducing()
            rounds += 1
        return rounds


@implementer(ITLSTransport)
class TLSCapableTransport(RecordingTransport):
    """A transport that says it can start TLS; it records each C{startTLS} and what had been
    written by then."""

    def __init__(self, peer: Any = PEER) -> None:
        super().__init__(peer)
        self.tls_started: list[tuple[object, bytes]] = []

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_started.append((contextFactory, self.value()))

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

    def __init__(self, protocol: POP3Server, transport: RecordingTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self._read = 0
        self.lost = False

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        """What the server wrote since the last call."""
        value: bytes = self.transport.value()
        new, self._read = value[self._read :], len(value)
        return new

    def writes(self) -> list[bytes]:
        """The C{write} calls since the last call (the bytes stay for L{take})."""
        writes = list(self.transport.writes)
        self.transport.writes.clear()
        return writes

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        """The connection ends (what the reactor does after C{loseConnection})."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


class POP3TestCase(SynchronousTestCase):
    """Builds servers on a fake clock, authenticator and mailboxes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = ConnectionLimiter(100, 100)
        self.locks = MailboxLocks()
        self.auth = FakeAuthenticator()
        self.root = Path(self.mktemp())
        self.mailboxes = {
            ALICE: FakeMailbox(self.root / "alice", [(11, N1, M1), (12, N2, M2), (13, N3, M3)]),
            BOB: FakeMailbox(self.root / "bob", []),
        }
        self.opened: list[str] = []
        self.open_error: Exception | None = None
        self.open_raise: Exception | None = None

    def open_mailbox(self, account: str) -> Deferred[MailboxView]:
        self.opened.append(account)
        if self.open_raise is not None:
            raise self.open_raise
        if self.open_error is not None:
            return fail(self.open_error)
        return succeed(self.mailboxes[account])

    def factory(self, tls: object | None = None, **settings: Any) -> POP3Factory:
        """A factory; its listener has implicit TLS unless C{tls_mode} says otherwise."""
        settings.setdefault("tls_mode", "implicit")
        return POP3Factory(
            POP3Settings(HOST, **settings),
            self.auth,
            self.open_mailbox,
            self.clock,
            self.limiter,
            self.locks,
            tls,
        )

    def connect(
        self, factory: POP3Factory | None = None, transport: RecordingTransport | None = None
    ) -> Client:
        """A new connection; its greeting is left unread."""
        factory = factory or self.factory()
        transport = transport or RecordingTransport()
        protocol = factory.buildProtocol(PEER)
        protocol.makeConnection(transport)
        client = Client(protocol, transport)
        self.addCleanup(client.lose)
        return client

    def session(
        self, factory: POP3Factory | None = None, transport: RecordingTransport | None = None
    ) -> Client:
        """A connection past its greeting."""
        client = self.connect(factory, transport)
        self.assertEqual(client.take(), GREETING)
        client.writes()
        return client

    def logged_in(
        self,
        factory: POP3Factory | None = None,
        transport: RecordingTransport | None = None,
        user: str = ALICE,
    ) -> Client:
        """A session in the TRANSACTION state of C{alice}'s mailbox."""
        client = self.session(factory, transport)
        client.send(f"USER {user}\r\nPASS {PASSWORD}\r\n".encode())
        count = len(self.mailboxes[ALICE].messages)
        self.assertEqual(client.take(), USER_OK + b"+OK Logged in, %d messages\r\n" % count)
        client.writes()
        return client


# --- tests -----------------------------------------------------------------------------------


class FakeTests(POP3TestCase):
    """The fakes provide what they stand in for."""

    def test_fake_mailbox_is_a_mailbox_view(self) -> None:
        """L{FakeMailbox} has what L{MailboxView} asks for, and its files hold the messages."""
        view: MailboxView = self.mailboxes[ALICE]
        self.assertEqual([(m.uid, m.name, m.size) for m in view.messages][0], (11, N1, len(M1)))
        self.assertEqual(view.path(12).read_bytes(), M2)

    def test_tls_transport_provides_itlstransport(self) -> None:
        """L{TLSCapableTransport} provides C{ITLSTransport}; the plain one does not."""
        self.assertTrue(verifyObject(ITLSTransport, TLSCapableTransport()))
        self.assertFalse(ITLSTransport.providedBy(RecordingTransport()))

    def test_clock_provides_ireactortime(self) -> None:
        """L{Clock} provides L{IReactorTime}, which the factory needs."""
        self.assertTrue(verifyObject(IReactorTime, Clock()))

    def test_wire_reference(self) -> None:
        """The test's own reference encoder agrees with RFC 1939 on a few lines."""
        self.assertEqual(wire(b"a\n.b\r\nc"), b"a\r\n..b\r\nc\r\n.\r\n")
        self.assertEqual(wire(b""), b".\r\n")


class HelperTests(SynchronousTestCase):
    """L{unique_id} and L{dot_stuff}."""

    def test_unique_id_is_the_name_when_it_is_allowed(self) -> None:
        """A short, printable name is its own UIDL."""
        self.assertEqual(unique_id(N1), N1)

    def test_unique_id_digests_long_names(self) -> None:
        """A name longer than 70 characters becomes a digest of 64 hex digits."""
        self.assertEqual(unique_id(N3), hashlib.sha256(N3.encode()).hexdigest())

    def test_unique_id_digests_names_with_forbidden_characters(self) -> None:
        """A space or a non-ASCII character (RFC 1939 §7: 0x21 to 0x7E) means a digest."""
        for name in ["a b", "caf\u00e9", "tab\there"]:
            uid = unique_id(name)
            self.assertEqual(len(uid), 64)
            self.assertTrue(all(0x21 <= ord(ch) <= 0x7E for ch in uid))

    def test_dot_stuff(self) -> None:
        """Lines that start with a dot get another one; bare LFs become CRLF."""
        self.assertEqual(dot_stuff(b".a\r\n.b\r\nc.\r\n", True), b"..a\r\n..b\r\nc.\r\n")
        self.assertEqual(dot_stuff(b".a\r\n", False), b".a\r\n")
        self.assertEqual(dot_stuff(b"a\n.b\n", True), b"a\r\n..b\r\n")


class GreetingTests(POP3TestCase):
    """The greeting and the connection limit."""

    def test_greeting(self) -> None:
        """A new connection gets C{+OK <hostname> POP3 ready}, in one write."""
        client = self.connect()
        self.assertEqual(client.take(), GREETING)
        self.assertEqual(client.writes(), [GREETING])
        self.assertFalse(client.closed)
        self.assertEqual(self.limiter.total, 1)

    def test_connection_limit_refuses_with_sys_temp(self) -> None:
        """
        Past the per-client limit, a connection gets C{-ERR [SYS/TEMP]} and no greeting, and
        is closed; it never counts, so its end releases nothing.
        """
        self.limiter = ConnectionLimiter(100, 1)
        first = self.connect()
        second = self.connect()
        self.assertEqual(first.take(), GREETING)
        self.assertEqual(second.take(), b"-ERR [SYS/TEMP] Too many connections, try later\r\n")
        self.assertTrue(second.closed)
        second.send(LOGIN + b"STAT\r\n")
        self.assertEqual(second.take(), b"")
        self.assertEqual(self.auth.calls, [])
        second.lose()
        self.assertEqual(self.limiter.total, 1)
        first.lose()
        self.assertEqual(self.limiter.total, 0)

    def test_total_limit_refuses(self) -> None:
        """The total limit refuses a client that has no other connection."""
        self.limiter = ConnectionLimiter(0, 10)
        client = self.connect()
        self.assertEqual(client.take(), b"-ERR [SYS/TEMP] Too many connections, try later\r\n")
        self.assertTrue(client.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_end_releases_the_count_and_the_timer(self) -> None:
        """When the connection ends, the limiter count goes back and no timer is left."""
        client = self.session()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        client.lose()
        self.assertEqual(self.limiter.total, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CapaTests(POP3TestCase):
    """CAPA (RFC 2449) by state, listener and TLS."""

    def test_capa_exact_bytes_on_implicit_tls(self) -> None:
        """On implicit TLS, before login: USER and SASL PLAIN, no STLS."""
        client = self.session()
        client.send(b"CAPA\r\n")
        self.assertEqual(
            client.take(),
            b"+OK Capability list follows\r\n"
            b"CAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
            b"USER\r\nSASL PLAIN\r\nIMPLEMENTATION mailserver\r\n.\r\n",
        )

    def test_capa_on_starttls_listener_before_tls(self) -> None:
        """Before STLS, with plaintext auth not allowed: STLS but neither USER nor SASL."""
        client = self.session(self.factory(object(), tls_mode="starttls"), TLSCapableTransport())
        client.send(b"CAPA\r\n")
        self.assertEqual(client.take(), capa("STLS"))

    def test_capa_on_starttls_listener_allowing_plaintext(self) -> None:
        """With C{allow_plaintext_auth}, USER and SASL PLAIN are offered beside STLS."""
        factory = self.factory(object(), tls_mode="starttls", allow_plaintext_auth=True)
        client = self.session(factory, TLSCapableTransport())
        client.send(b"CAPA\r\n")
        self.assertEqual(client.take(), capa("USER", "SASL PLAIN", "STLS"))

    def test_capa_no_stls_without_tls_context(self) -> None:
        """A starttls listener with no TLS context does not offer STLS."""
        client = self.session(self.factory(None, tls_mode="starttls"), TLSCapableTransport())
        client.send(b"CAPA\r\n")
        self.assertEqual(client.take(), capa())

    def test_capa_no_stls_on_transport_without_tls(self) -> None:
        """A transport that cannot start TLS does not offer STLS."""
        client = self.session(self.factory(object(), tls_mode="starttls"))
        client.send(b"CAPA\r\n")
        self.assertEqual(client.take(), capa())

    def test_capa_plain_listener(self) -> None:
        """A listener without TLS offers USER and SASL only with C{allow_plaintext_auth}."""
        client = self.session(self.factory(object(), tls_mode="none"), TLSCapableTransport())
        client.send(b"CAPA\r\n")
        self.assertEqual(client.take(), capa())
        factory = self.factory(object(), tls_mode="none", allow_plaintext_auth=True)
        client = self.session(factory, TLSCapableTransport())
        client.send(b"CAPA\r\n")
        self.assertEqual(client.take(), capa("USER", "SASL PLAIN"))

    def test_capa_after_login(self) -> None:
        """In the TRANSACTION state, CAPA lists no login capability and no STLS."""
        client = self.logged_in()
        client.send(b"capa\r\n")
        self.assertEqual(client.take(), capa())

    def test_capa_after_stls(self) -> None:
        """After STLS, USER and SASL PLAIN are offered and STLS is not."""
        client = self.session(self.factory(object(), tls_mode="starttls"), TLSCapableTransport())
        client.send(b"STLS\r\n")
        self.assertEqual(client.take(), b"+OK Begin TLS negotiation\r\n")
        client.send(b"CAPA\r\n")
        self.assertEqual(client.take(), capa("USER", "SASL PLAIN"))


class STLSTests(POP3TestCase):
    """STLS (RFC 2595)."""

    def starttls_session(self) -> tuple[Client, TLSCapableTransport, object]:
        context = object()
        transport = TLSCapableTransport()
        client = self.session(self.factory(context, tls_mode="starttls"), transport)
        return client, transport, context

    def test_stls_starts_tls_after_its_reply(self) -> None:
        """STLS answers C{+OK}, written before TLS starts, with the listener's context."""
        client, transport, context = self.starttls_session()
        client.send(b"STLS\r\n")
        reply = b"+OK Begin TLS negotiation\r\n"
        self.assertEqual(client.take(), reply)
        self.assertEqual(transport.tls_started, [(context, GREETING + reply)])

    def test_stls_discards_pipelined_commands(self) -> None:
        """
        CVE-2011-0411: commands sent in the same chunk as STLS are plaintext injected into the
        TLS session; they are thrown away, not run.
        """
        client, transport, _ = self.starttls_session()
        client.send(b"STLS\r\n" + LOGIN + b"STAT\r\n")
        self.assertEqual(client.take(), b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(self.auth.calls, [])
        client.send(b"NOOP\r\n")
        self.assertEqual(client.take(), b"+OK\r\n")

    def test_stls_discards_a_partial_pipelined_line(self) -> None:
        """Half a line after STLS does not join the first line sent under TLS."""
        client, transport, _ = self.starttls_session()
        client.send(b"STLS\r\nQU")
        client.take()
        client.send(b"NOOP\r\n")
        self.assertEqual(client.take(), b"+OK\r\n")
        self.assertFalse(client.closed)

    def test_stls_forgets_user(self) -> None:
        """A USER given before STLS does not carry into the TLS session (PASS needs USER)."""
        factory = self.factory(object(), tls_mode="starttls", allow_plaintext_auth=True)
        client = self.session(factory, TLSCapableTransport())
        client.send(b"USER alice\r\n")
        self.assertEqual(client.take(), USER_OK)
        client.send(b"STLS\r\n")
        client.take()
        client.send(f"PASS {PASSWORD}\r\n".encode())
        self.assertEqual(client.take(), b"-ERR USER first\r\n")
        self.assertEqual(self.auth.calls, [])

    def test_login_after_stls(self) -> None:
        """After STLS, USER/PASS log in."""
        client, transport, _ = self.starttls_session()
        client.send(b"STLS\r\n")
        client.take()
        client.send(LOGIN)
        self.assertEqual(client.take(), USER_OK + LOGGED_IN)

    def test_second_stls_refused(self) -> None:
        """STLS inside TLS gets -ERR and starts nothing."""
        client, transport, _ = self.starttls_session()
        client.send(b"STLS\r\n")
        client.take()
        client.send(b"STLS\r\n")
        self.assertEqual(client.take(), b"-ERR TLS already active\r\n")
        self.assertEqual(len(transport.tls_started), 1)

    def test_stls_on_implicit_tls(self) -> None:
        """On an implicit TLS listener, STLS says TLS is already active."""
        client = self.session(self.factory(object()), TLSCapableTransport())
        client.send(b"STLS\r\n")
        self.assertEqual(client.take(), b"-ERR TLS already active\r\n")

    def test_stls_unavailable(self) -> None:
        """Without a TLS-capable transport or context, STLS gets -ERR and the session goes on."""
        client = self.session(self.factory(object(), tls_mode="starttls"))
        client.send(b"STLS\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"-ERR STLS not available\r\n+OK\r\n")
        client = self.session(self.factory(None, tls_mode="starttls"), TLSCapableTransport())
        client.send(b"STLS\r\n")
        self.assertEqual(client.take(), b"-ERR STLS not available\r\n")
        self.assertEqual(client.transport.tls_started, [])  # type: ignore[attr-defined]

    def test_stls_after_login_not_allowed(self) -> None:
        """STLS in the TRANSACTION state is a command in the wrong state."""
        client = self.logged_in(self.factory(object(), tls_mode="implicit"))
        client.send(b"STLS\r\n")
        self.assertEqual(client.take(), b"-ERR STLS not allowed now\r\n")


class UserPassTests(POP3TestCase):
    """USER and PASS (RFC 1939 §7)."""

    def test_login(self) -> None:
        """USER then PASS log in; the authenticator sees the peer, user and password."""
        client = self.session()
        client.send(b"USER alice\r\n")
        self.assertEqual(client.take(), USER_OK)
        client.send(f"PASS {PASSWORD}\r\n".encode())
        self.assertEqual(client.take(), LOGGED_IN)
        self.assertEqual(self.auth.calls, [(PEER_IP, "alice", PASSWORD)])
        self.assertEqual(self.opened, [ALICE])
        self.assertEqual(self.locks.held, {ALICE})

    def test_wrong_password(self) -> None:
        """A wrong password gets C{-ERR [AUTH]}; the session stays in AUTHORIZATION."""
        client = self.session()
        client.send(b"USER alice\r\nPASS wrong\r\nSTAT\r\n")
        self.assertEqual(client.take(), USER_OK + AUTH_FAILED + b"-ERR STAT not allowed now\r\n")
        self.assertEqual(self.opened, [])
        self.assertEqual(self.locks.held, set())
        client.send(LOGIN)
        self.assertEqual(client.take(), USER_OK + LOGGED_IN)

    def test_unknown_user(self) -> None:
        """An unknown user gets the same reply as a wrong password."""
        client = self.session()
        client.send(b"USER nobody\r\nPASS x\r\n")
        self.assertEqual(client.take(), USER_OK + AUTH_FAILED)

    def test_failed_login_forgets_user(self) -> None:
        """After a failed PASS, another PASS needs a new USER."""
        client = self.session()
        client.send(b"USER alice\r\nPASS wrong\r\n")
        client.take()
        client.send(f"PASS {PASSWORD}\r\n".encode())
        self.assertEqual(client.take(), b"-ERR USER first\r\n")
        self.assertEqual(len(self.auth.calls), 1)

    def test_password_keeps_its_spaces(self) -> None:
        """Everything after C{PASS } is the password, spaces included; the user is trimmed."""
        client = self.session()
        client.send(b"USER  alice \r\nPASS  two  spaces \r\n")
        client.take()
        self.assertEqual(self.auth.calls, [(PEER_IP, "alice", " two  spaces ")])

    def test_throttled(self) -> None:
        """A throttled client gets C{-ERR [SYS/TEMP]}."""
        self.auth.throttled = True
        client = self.session()
        client.send(LOGIN)
        self.assertEqual(client.take(), USER_OK + THROTTLED)
        self.assertEqual(self.locks.held, set())

    def test_pass_without_user(self) -> None:
        """PASS before USER gets -ERR and calls nothing."""
        client = self.session()
        client.send(b"PASS secret\r\n")
        self.assertEqual(client.take(), b"-ERR USER first\r\n")
        self.assertEqual(self.auth.calls, [])

    def test_user_without_name(self) -> None:
        """USER with no name gets -ERR."""
        client = self.session()
        client.send(b"USER\r\nUSER \r\n")
        self.assertEqual(client.take(), b"-ERR USER needs a name\r\n" * 2)

    def test_plaintext_refused_before_stls(self) -> None:
        """
        On a starttls listener without TLS, USER and PASS get C{-ERR [AUTH]} and the password
        never reaches the authenticator.
        """
        client = self.session(self.factory(object(), tls_mode="starttls"), TLSCapableTransport())
        client.send(LOGIN)
        self.assertEqual(client.take(), PLAINTEXT_REFUSED * 2)
        self.assertEqual(self.auth.calls, [])

    def test_plaintext_allowed_by_setting(self) -> None:
        """With C{allow_plaintext_auth}, a listener without TLS takes USER/PASS."""
        client = self.session(self.factory(tls_mode="none", allow_plaintext_auth=True))
        client.send(LOGIN)
        self.assertEqual(client.take(), USER_OK + LOGGED_IN)

    def test_pending_login_holds_pipelined_commands(self) -> None:
        """
        While the authenticator works, later commands wait; when it answers, the login reply
        and theirs leave in one write.
        """
        self.auth.hold = True
        client = self.session()
        client.send(LOGIN + b"STAT\r\nNOOP\r\n")
        self.assertEqual(client.take(), USER_OK)
        self.assertEqual(client.writes(), [USER_OK])
        self.auth.pending[0].callback(ALICE)
        expected = LOGGED_IN + b"+OK 3 %d\r\n+OK\r\n" % TOTAL
        self.assertEqual(client.take(), expected)
        self.assertEqual(client.writes(), [expected])

    def test_input_during_login_pauses_reading(self) -> None:
        """
        Input that arrives while the authenticator works stops reading from the connection
        (the client's own TCP window holds the rest); the answer starts it again.
        """
        self.auth.hold = True
        client = self.session()
        client.send(LOGIN)
        self.assertEqual(client.transport.producerState, "producing")
        client.send(b"STAT\r\n")
        self.assertEqual(client.transport.producerState, "paused")
        self.auth.pending[0].callback(ALICE)
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(client.take(), USER_OK + LOGGED_IN + b"+OK 3 %d\r\n" % TOTAL)

    def test_connection_lost_during_login_takes_no_lock(self) -> None:
        """
        A client that leaves while its password is checked gets no lock when the check
        succeeds: the account can log in again at once.
        """
        self.auth.hold = True
        client = self.session()
        client.send(LOGIN)
        client.lose()
        self.auth.pending[0].callback(ALICE)
        self.assertEqual(self.locks.held, set())
        self.assertEqual(self.opened, [])
        self.auth.hold = False
        self.logged_in()

    def test_in_use(self) -> None:
        """
        A second session of an account that has one in TRANSACTION gets C{-ERR [IN-USE]}
        (the lock is by account, whatever name logged in) and opens no mailbox.
        """
        self.logged_in(user="alice")
        other = self.session()
        other.send(LOGIN)
        self.assertEqual(other.take(), USER_OK + IN_USE)
        self.assertEqual(self.opened, [ALICE])
        other.send(b"STAT\r\n")
        self.assertEqual(other.take(), b"-ERR STAT not allowed now\r\n")

    def test_other_account_not_in_use(self) -> None:
        """A lock on one account does not stop another."""
        self.logged_in()
        other = self.session()
        other.send(b"USER bob@example.org\r\nPASS bob's password\r\n")
        self.assertEqual(other.take(), USER_OK + b"+OK Logged in, 0 messages\r\n")
        self.assertEqual(self.locks.held, {ALICE, BOB})

    def test_lock_released_on_quit(self) -> None:
        """QUIT without deletions ends the session and releases the lock."""
        client = self.logged_in()
        client.send(b"QUIT\r\n")
        self.assertEqual(client.take(), b"+OK Bye\r\n")
        self.assertTrue(client.closed)
        self.assertEqual(self.locks.held, set())
        self.logged_in()

    def test_lock_released_on_connection_lost(self) -> None:
        """A dropped connection releases the lock."""
        client = self.logged_in()
        client.lose()
        self.assertEqual(self.locks.held, set())
        self.logged_in()

    def test_mailbox_open_failure(self) -> None:
        """
        If the mailbox cannot be opened, the client gets C{-ERR [SYS/TEMP]} (no detail), the
        lock is released, and the error is logged.
        """
        self.open_error = OSError("/srv/mail/alice: disk on fire")
        client = self.session()
        client.send(LOGIN + b"STAT\r\n")
        self.assertEqual(
            client.take(),
            USER_OK
            + b"-ERR [SYS/TEMP] Mailbox unavailable, try later\r\n"
            + b"-ERR STAT not allowed now\r\n",
        )
        self.assertEqual(self.locks.held, set())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.open_error = None
        client.send(LOGIN)
        self.assertEqual(client.take(), USER_OK + LOGGED_IN)

    def test_mailbox_open_raising(self) -> None:
        """C{open_mailbox} raising at once is handled like a failed Deferred."""
        self.open_raise = OSError("/srv/mail/alice: no such directory")
        client = self.session()
        client.send(LOGIN)
        self.assertEqual(
            client.take(), USER_OK + b"-ERR [SYS/TEMP] Mailbox unavailable, try later\r\n"
        )
        self.assertEqual(self.locks.held, set())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_quit_in_authorization(self) -> None:
        """QUIT before login says goodbye and closes."""
        client = self.session()
        client.send(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"+OK Bye\r\n")
        self.assertTrue(client.closed)


class SASLTests(POP3TestCase):
    """AUTH PLAIN (RFC 5034, RFC 4616)."""

    def test_auth_plain_initial_response(self) -> None:
        """AUTH PLAIN with an initial response logs in."""
        client = self.session()
        client.send(b"AUTH PLAIN " + plain(ALICE, PASSWORD) + b"\r\n")
        self.assertEqual(client.take(), LOGGED_IN)
        self.assertEqual(self.auth.calls, [(PEER_IP, ALICE, PASSWORD)])

    def test_auth_plain_with_authzid_equal_to_user(self) -> None:
        """An authorization identity equal to the user is accepted."""
        client = self.session()
        client.send(b"AUTH plain " + plain(ALICE, PASSWORD, ALICE) + b"\r\n")
        self.assertEqual(client.take(), LOGGED_IN)

    def test_auth_plain_with_other_authzid(self) -> None:
        """Logging in as someone else (a different authzid) is refused with C{[AUTH]}."""
        client = self.session()
        client.send(b"AUTH PLAIN " + plain(ALICE, PASSWORD, BOB) + b"\r\n")
        self.assertEqual(
            client.take(), b"-ERR [AUTH] Authorization identity must be empty or the user\r\n"
        )
        self.assertEqual(self.auth.calls, [])

    def test_auth_plain_continuation(self) -> None:
        """AUTH PLAIN alone gets C{+ }; the next line is the response."""
        client = self.session()
        client.send(b"AUTH PLAIN\r\n")
        self.assertEqual(client.take(), b"+ \r\n")
        client.send(plain(ALICE, PASSWORD) + b"\r\n")
        self.assertEqual(client.take(), LOGGED_IN)

    def test_auth_plain_continuation_pipelined(self) -> None:
        """AUTH PLAIN, its response and a command in one chunk are answered in one write."""
        client = self.session()
        client.send(b"AUTH PLAIN\r\n" + plain(ALICE, PASSWORD) + b"\r\nSTAT\r\n")
        expected = b"+ \r\n" + LOGGED_IN + b"+OK 3 %d\r\n" % TOTAL
        self.assertEqual(client.take(), expected)
        self.assertEqual(client.writes(), [expected])

    def test_auth_plain_wrong_password(self) -> None:
        """A wrong password through SASL gets C{-ERR [AUTH]}."""
        client = self.session()
        client.send(b"AUTH PLAIN " + plain(ALICE, "wrong") + b"\r\n")
        self.assertEqual(client.take(), AUTH_FAILED)

    def test_auth_plain_throttled(self) -> None:
        """A throttled client gets C{-ERR [SYS/TEMP]} through SASL too."""
        self.auth.throttled = True
        client = self.session()
        client.send(b"AUTH PLAIN " + plain(ALICE, PASSWORD) + b"\r\n")
        self.assertEqual(client.take(), THROTTLED)

    def test_auth_cancelled(self) -> None:
        """C{*} as the response cancels; the next line is a command again."""
        client = self.session()
        client.send(b"AUTH PLAIN\r\n*\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"+ \r\n-ERR Authentication cancelled\r\n+OK\r\n")
        self.assertEqual(self.auth.calls, [])

    def test_auth_malformed_base64(self) -> None:
        """A response that is not base64 gets -ERR, and the session goes on."""
        client = self.session()
        client.send(b"AUTH PLAIN\r\n!!!notbase64\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"+ \r\n-ERR Malformed SASL PLAIN response\r\n+OK\r\n")
        client.send(b"AUTH PLAIN ab=c\r\n")
        self.assertEqual(client.take(), b"-ERR Malformed SASL PLAIN response\r\n")
        self.assertEqual(self.auth.calls, [])

    def test_auth_plain_without_two_nuls(self) -> None:
        """Valid base64 that is not C{authzid NUL authcid NUL password} gets -ERR."""
        client = self.session()
        for decoded in [b"alice", b"\0alice", b"a\0b\0c\0d", b"\0\xff\xfe\0pw"]:
            client.send(b"AUTH PLAIN " + base64.b64encode(decoded) + b"\r\n")
            self.assertEqual(client.take(), b"-ERR Malformed SASL PLAIN response\r\n")
        client.send(b"AUTH PLAIN =\r\n")
        self.assertEqual(client.take(), b"-ERR Malformed SASL PLAIN response\r\n")
        self.assertEqual(self.auth.calls, [])

    def test_auth_over_long_response_ends_the_exchange(self) -> None:
        """
        A response line too long gets -ERR, which ends the AUTH command: the next line is a
        command, not a SASL response.
        """
        client = self.session()
        client.send(b"AUTH PLAIN\r\n" + b"A" * 2000 + b"\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"+ \r\n-ERR Line too long\r\n+OK\r\n")

    def test_auth_unsupported_mechanism(self) -> None:
        """AUTH with another mechanism gets -ERR."""
        client = self.session()
        client.send(b"AUTH LOGIN\r\nAUTH PLAIN a b\r\n")
        self.assertEqual(client.take(), b"-ERR Unsupported mechanism\r\n" * 2)

    def test_auth_lists_mechanisms(self) -> None:
        """AUTH without an argument lists PLAIN, or nothing where login is not allowed."""
        client = self.session()
        client.send(b"AUTH\r\n")
        self.assertEqual(client.take(), b"+OK\r\nPLAIN\r\n.\r\n")
        client = self.session(self.factory(tls_mode="none"))
        client.send(b"AUTH\r\n")
        self.assertEqual(client.take(), b"+OK\r\n.\r\n")

    def test_auth_refused_without_tls(self) -> None:
        """AUTH PLAIN on a listener without TLS gets C{[AUTH]}; no continuation is offered."""
        client = self.session(self.factory(tls_mode="none"))
        client.send(b"AUTH PLAIN\r\nAUTH PLAIN " + plain(ALICE, PASSWORD) + b"\r\n")
        self.assertEqual(client.take(), PLAINTEXT_REFUSED * 2)
        self.assertEqual(self.auth.calls, [])


class TransactionTests(POP3TestCase):
    """STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP."""

    def test_stat(self) -> None:
        """STAT gives the count and total size."""
        client = self.logged_in()
        client.send(b"STAT\r\n")
        self.assertEqual(client.take(), b"+OK 3 %d\r\n" % TOTAL)

    def test_stat_empty_mailbox(self) -> None:
        """An empty mailbox has STAT C{0 0} and an empty LIST."""
        client = self.session()
        client.send(b"USER bob@example.org\r\nPASS bob's password\r\nSTAT\r\nLIST\r\nUIDL\r\n")
        self.assertEqual(
            client.take(),
            USER_OK + b"+OK Logged in, 0 messages\r\n+OK 0 0\r\n+OK\r\n.\r\n+OK\r\n.\r\n",
        )

    def test_list_all(self) -> None:
        """LIST gives number and size of each message."""
        client = self.logged_in()
        client.send(b"LIST\r\n")
        self.assertEqual(
            client.take(),
            b"+OK\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n" % (len(M1), len(M2), len(M3)),
        )

    def test_list_one(self) -> None:
        """LIST n gives one scan listing on the +OK line."""
        client = self.logged_in()
        client.send(b"LIST 2\r\nLIST  3 \r\n")
        self.assertEqual(client.take(), b"+OK 2 %d\r\n+OK 3 %d\r\n" % (len(M2), len(M3)))

    def test_uidl_all(self) -> None:
        """UIDL lists the unique ids: the names, or a digest of a name that cannot be one."""
        client = self.logged_in()
        client.send(b"UIDL\r\n")
        digest = hashlib.sha256(N3.encode()).hexdigest()
        self.assertEqual(client.take(), f"+OK\r\n1 {N1}\r\n2 {N2}\r\n3 {digest}\r\n.\r\n".encode())

    def test_uidl_one(self) -> None:
        """UIDL n gives one unique id."""
        client = self.logged_in()
        client.send(b"UIDL 1\r\n")
        self.assertEqual(client.take(), f"+OK 1 {N1}\r\n".encode())

    def test_bad_message_numbers(self) -> None:
        """
        Numbers out of range get C{No such message}; anything that is not a plain ASCII
        decimal number (signs, words, superscripts, other scripts' digits, too many digits)
        gets C{Bad message number}. None of it is an internal error.
        """
        client = self.logged_in(self.factory(max_errors=100))
        no_such = b"-ERR No such message\r\n"
        bad = b"-ERR Bad message number\r\n"
        cases = [
            ("0", no_such),
            ("4", no_such),
            ("000", no_such),
            ("999999999", no_such),
            ("9999999999", bad),
            ("99999999999999999999999999", bad),
            ("-1", bad),
            ("+1", bad),
            ("one", bad),
            ("1 2", bad),
            ("1.0", bad),
            ("\u00b2", bad),
            ("\u0661", bad),
        ]
        for command in ["LIST", "UIDL", "RETR", "DELE"]:
            for number, reply in cases:
                client.send(f"{command} {number}\r\n".encode())
                self.assertEqual(client.take(), reply, (command, number))
        client.send(b"STAT\r\n")
        self.assertEqual(client.take(), b"+OK 3 %d\r\n" % TOTAL)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_retr_missing_number(self) -> None:
        """RETR and DELE need a number."""
        client = self.logged_in()
        client.send(b"RETR\r\nDELE\r\n")
        self.assertEqual(client.take(), b"-ERR Bad message number\r\n" * 2)

    def test_retr_exact_bytes(self) -> None:
        """RETR sends the size, the file with its dot lines stuffed, and the end line."""
        client = self.logged_in()
        client.send(b"RETR 1\r\n")
        self.assertEqual(
            client.take(),
            b"+OK %d octets\r\n" % len(M1)
            + b"From: bob@example.net\r\nTo: alice@example.org\r\nSubject: one\r\n\r\n"
            + b"First line.\r\nSecond line.\r\n..dotted third\r\nFourth.\r\n.\r\n",
        )

    def test_retr_dot_stuffing(self) -> None:
        """Every line that starts with a dot, a lone dot included, gets one more."""
        client = self.logged_in()
        client.send(b"RETR 2\r\n")
        self.assertEqual(
            client.take(),
            b"+OK %d octets\r\n" % len(M2)
            + b"Subject: two\r\n\r\n..leading dot\r\n...two dots\r\n..\r\nend\r\n.\r\n",
        )

    def test_retr_without_final_line_end(self) -> None:
        """A message without a final CRLF gets one before the end line."""
        client = self.logged_in()
        client.send(b"RETR 3\r\n")
        self.assertEqual(
            client.take(),
            b"+OK %d octets\r\nSubject: three\r\n\r\nno final newline\r\n.\r\n" % len(M3),
        )

    def retr_one(self, content: bytes) -> bytes:
        """The RETR response for a mailbox holding only C{content}."""
        self.mailboxes[ALICE] = FakeMailbox(self.root / "one", [(21, "m1", content)])
        client = self.session()
        client.send(LOGIN)
        client.take()
        client.send(b"RETR 1\r\n")
        return client.take()

    def test_retr_bare_lf(self) -> None:
        """
        A file with bare LF line ends (put in the maildir by hand) is sent with CRLF, dot
        lines stuffed, and the end line right after the last line (no empty line added).
        """
        content = b"Subject: lf\n\nline one\n.dot\n.\nlast\n"
        self.assertEqual(
            self.retr_one(content),
            b"+OK %d octets\r\n" % len(content)
            + b"Subject: lf\r\n\r\nline one\r\n..dot\r\n..\r\nlast\r\n.\r\n",
        )

    def test_retr_bare_lf_without_final_line_end(self) -> None:
        """A bare-LF file without a final line end gets CRLF and the end line."""
        content = b"Subject: lf\n\n.last"
        self.assertEqual(
            self.retr_one(content),
            b"+OK %d octets\r\nSubject: lf\r\n\r\n..last\r\n.\r\n" % len(content),
        )

    def test_retr_mixed_line_ends(self) -> None:
        """A file that mixes CRLF and bare LF is sent with CRLF only."""
        content = b"A: b\r\n\r\none\ntwo\r\n.three\n"
        self.assertEqual(
            self.retr_one(content),
            b"+OK %d octets\r\nA: b\r\n\r\none\r\ntwo\r\n..three\r\n.\r\n" % len(content),
        )

    def test_retr_starting_with_dot(self) -> None:
        """A dot on the very first line is stuffed too."""
        content = b".first\r\nsecond\r\n"
        self.assertEqual(self.retr_one(content), retr(content))
        self.assertEqual(retr(content), b"+OK 16 octets\r\n..first\r\nsecond\r\n.\r\n")

    def test_retr_empty_file(self) -> None:
        """An empty file is just the end line."""
        self.assertEqual(self.retr_one(b""), b"+OK 0 octets\r\n.\r\n")

    def test_retr_file_vanished(self) -> None:
        """
        RETR of a message whose file another session removed gets -ERR, and the session
        goes on.
        """
        self.mailboxes[ALICE].remove(12)
        client = self.logged_in()
        client.send(b"RETR 2\r\nTOP 2 1\r\nNOOP\r\n")
        gone = b"-ERR Message was removed by another session\r\n"
        self.assertEqual(client.take(), gone * 2 + b"+OK\r\n")

    def test_top(self) -> None:
        """TOP n 0 is the header and the blank line; TOP n k adds k body lines, stuffed."""
        client = self.logged_in()
        header = b"From: bob@example.net\r\nTo: alice@example.org\r\nSubject: one\r\n\r\n"
        client.send(b"TOP 1 0\r\n")
        self.assertEqual(client.take(), b"+OK\r\n" + header + b".\r\n")
        client.send(b"TOP 1 3\r\n")
        self.assertEqual(
            client.take(),
            b"+OK\r\n" + header + b"First line.\r\nSecond line.\r\n..dotted third\r\n.\r\n",
        )

    def test_top_more_lines_than_the_body(self) -> None:
        """TOP with more lines than the body has (however many) sends the whole message."""
        client = self.logged_in()
        client.send(b"TOP 3 99999999999999999999\r\nTOP 2 50\r\n")
        self.assertEqual(
            client.take(),
            b"+OK\r\nSubject: three\r\n\r\nno final newline\r\n.\r\n" + b"+OK\r\n" + wire(M2),
        )

    def test_top_bare_lf(self) -> None:
        """TOP finds the end of a bare-LF header and sends CRLF lines."""
        self.mailboxes[ALICE] = FakeMailbox(
            self.root / "lf", [(21, "m1", b"A: b\nC: d\n\n.one\ntwo\nthree\n")]
        )
        client = self.logged_in()
        client.send(b"TOP 1 1\r\n")
        self.assertEqual(client.take(), b"+OK\r\nA: b\r\nC: d\r\n\r\n..one\r\n.\r\n")

    def test_top_syntax_errors(self) -> None:
        """TOP needs a message number and an ASCII line count."""
        client = self.logged_in()
        syntax = b"-ERR Syntax: TOP msg lines\r\n"
        client.send(b"TOP\r\nTOP 1\r\nTOP 1 -1\r\nTOP 1 x\r\n")
        self.assertEqual(client.take(), syntax * 4)
        client.send("TOP 1 \u00b2\r\nTOP 1 2 3\r\nTOP x 1\r\nTOP 9 1\r\n".encode())
        self.assertEqual(
            client.take(),
            syntax * 2 + b"-ERR Bad message number\r\n-ERR No such message\r\n",
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_dele_hides_the_message(self) -> None:
        """
        A deleted message is gone from STAT, LIST and UIDL, and RETR, TOP, LIST n, UIDL n
        and DELE of it get -ERR.
        """
        client = self.logged_in()
        client.send(b"DELE 2\r\n")
        self.assertEqual(client.take(), b"+OK Message 2 deleted\r\n")
        client.send(b"STAT\r\nLIST\r\nUIDL\r\n")
        self.assertEqual(
            client.take(),
            b"+OK 2 %d\r\n" % (len(M1) + len(M3))
            + b"+OK\r\n1 %d\r\n3 %d\r\n.\r\n" % (len(M1), len(M3))
            + f"+OK\r\n1 {N1}\r\n3 {unique_id(N3)}\r\n.\r\n".encode(),
        )
        client.send(b"RETR 2\r\nTOP 2 0\r\nLIST 2\r\nUIDL 2\r\nDELE 2\r\n")
        self.assertEqual(client.take(), b"-ERR Message is deleted\r\n" * 5)

    def test_rset_undeletes(self) -> None:
        """RSET brings deleted messages back, and QUIT then deletes nothing."""
        client = self.logged_in()
        client.send(b"DELE 1\r\nDELE 3\r\nRSET\r\nSTAT\r\nRETR 1\r\n")
        self.assertEqual(
            client.take(),
            b"+OK Message 1 deleted\r\n+OK Message 3 deleted\r\n+OK 3 messages\r\n"
            + b"+OK 3 %d\r\n" % TOTAL
            + retr(M1),
        )
        client.send(b"QUIT\r\n")
        self.assertEqual(client.take(), b"+OK Bye\r\n")
        self.assertEqual(self.mailboxes[ALICE].expunges, [])

    def test_noop(self) -> None:
        """NOOP answers +OK in both states."""
        client = self.session()
        client.send(b"NOOP\r\n")
        self.assertEqual(client.take(), b"+OK\r\n")
        client.send(LOGIN + b"noop\r\n")
        self.assertEqual(client.take(), USER_OK + LOGGED_IN + b"+OK\r\n")

    def test_pipelined_commands_answered_in_order_in_one_write(self) -> None:
        """
        Commands that arrive in one chunk are answered in order, and their replies leave in
        a single write (a reply split over writes stalls on Nagle and delayed ACKs).
        """
        client = self.session()
        client.send(LOGIN + b"STAT\r\nLIST\r\nUIDL 1\r\nRETR 2\r\nTOP 1 0\r\nDELE 3\r\nNOOP\r\n")
        expected = (
            USER_OK
            + LOGGED_IN
            + b"+OK 3 %d\r\n" % TOTAL
            + b"+OK\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n" % (len(M1), len(M2), len(M3))
            + f"+OK 1 {N1}\r\n".encode()
            + retr(M2)
            + b"+OK\r\nFrom: bob@example.net\r\nTo: alice@example.org\r\nSubject: one\r\n\r\n"
            + b".\r\n"
            + b"+OK Message 3 deleted\r\n"
            + b"+OK\r\n"
        )
        self.assertEqual(client.take(), expected)
        self.assertEqual(client.writes(), [expected])

    def test_dialogue_one_byte_at_a_time(self) -> None:
        """The same dialogue sent one byte at a time gets the same bytes back."""
        dialogue = (
            b"CAPA\r\nAUTH PLAIN\r\n" + plain(ALICE, PASSWORD) + b"\r\n"
            b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nRETR 2\r\nRETR 3\r\nTOP 1 2\r\n"
            b"DELE 2\r\nFOO\r\nLIST 2\r\nRSET\r\nNOOP\r\nQUIT\r\n"
        )
        whole = self.session()
        whole.send(dialogue)
        expected = whole.take()
        self.assertTrue(expected.endswith(b"+OK\r\n+OK Bye\r\n"))
        whole.lose()
        bytewise = self.session()
        for i in range(len(dialogue)):
            bytewise.send(dialogue[i : i + 1])
        self.assertEqual(bytewise.take(), expected)
        self.assertTrue(bytewise.closed)


class ReadAheadTests(POP3TestCase):
    """After a RETR, the next message is read while the client takes in the answer."""

    def test_next_message_is_read_ahead(self) -> None:
        """
        Once RETR 1 is answered, message 2 is already read and framed: RETR 2 is answered
        exactly even though its file is gone by then (the session's snapshot is what counts),
        while RETR 3 without a read-ahead (its file removed before RETR 2) gets -ERR.
        """
        client = self.logged_in()
        client.send(b"RETR 1\r\n")
        self.assertEqual(client.take(), retr(M1))
        self.mailboxes[ALICE].remove(12)
        client.send(b"RETR 2\r\n")
        self.assertEqual(client.take(), retr(M2))

    def test_no_read_ahead_of_deleted_or_missing_messages(self) -> None:
        """A message deleted after it was read ahead is refused; the end of the list is fine."""
        client = self.logged_in()
        client.send(b"RETR 2\r\n")
        self.assertEqual(client.take(), retr(M2))
        client.send(b"DELE 3\r\nRETR 3\r\nRETR 3\r\n")
        self.assertEqual(
            client.take(),
            b"+OK Message 3 deleted\r\n-ERR Message is deleted\r\n-ERR Message is deleted\r\n",
        )
        client.send(b"RSET\r\nRETR 3\r\nRETR 1\r\n")
        self.assertEqual(client.take(), b"+OK 3 messages\r\n" + retr(M3) + retr(M1))


class LargeMessageTests(POP3TestCase):
    """Messages past 256 KiB: streamed from the file by a producer, with backpressure."""

    def big_session(self, content: bytes) -> tuple[Client, FullTransport]:
        self.mailboxes[ALICE] = FakeMailbox(
            self.root / "big", [(21, "big", content), (22, "small", M1)]
        )
        transport = FullTransport()
        return self.logged_in(transport=transport), transport

    def big_message(self, eol: bytes = b"\r\n", size: int = 300 * 1024) -> bytes:
        """
        A message past the inline limit, whose 64 KiB read boundaries fall in the awkward
        places: between the CR and LF of a line end followed by a dot line, right after a line
        end before a dot line, and inside a line.
        """
        out = bytearray(b"Subject: big" + eol + eol)
        n = 0

        def line_ending_at(boundary: int, cut: int) -> None:
            # A filler line whose end's first byte is at boundary - cut.
            pad = boundary - cut - len(out)
            assert pad >= 0
            out.extend(b"y" * pad + eol)

        def fill(until: int) -> None:
            nonlocal n
            while len(out) + 200 < until:
                n += 1
                out.extend(b"line %d " % n + b"x" * 60 + eol)
                if n % 7 == 0:
                    out.extend(b"." + eol if n % 2 else b".dot line %d" % n + eol)

        fill(CHUNK)
        line_ending_at(CHUNK, 1)  # CHUNK - 1 is the CR (or the LF); CHUNK is the dot
        out.extend(b".after the cut" + eol)
        fill(2 * CHUNK)
        line_ending_at(2 * CHUNK, len(eol))  # the line end finishes the chunk
        out.extend(b"..two dots after the boundary" + eol)
        fill(3 * CHUNK + 40)
        out.extend(b".in the middle of a chunk" + eol)
        fill(size)
        return bytes(out)

    def test_big_message_shape(self) -> None:
        """The big test message has its cut line ends where the test means them to be."""
        crlf = self.big_message()
        self.assertEqual(crlf[CHUNK - 1 : CHUNK + 2], b"\r\n.")
        self.assertEqual(crlf[2 * CHUNK - 2 : 2 * CHUNK + 1], b"\r\n.")
        self.assertGreater(len(crlf), INLINE_LIMIT)
        self.assertNotIn(b"\n", crlf.replace(b"\r\n", b""))
        lf = self.big_message(b"\n")
        self.assertEqual(lf[CHUNK - 1 : CHUNK + 1], b"\n.")
        self.assertNotIn(b"\r", lf)

    def test_retr_streams_with_backpressure(self) -> None:
        """
        RETR of a big message registers a streaming producer that stops whenever the
        transport pauses it; resumed until done, it has sent the exact stuffed bytes, and the
        commands that came during the stream are answered after it, in order.
        """
        content = self.big_message()
        client, transport = self.big_session(content)
        client.send(b"RETR 1\r\nLIST 2\r\n")
        first = client.take()
        header = b"+OK %d octets\r\n" % len(content)
        self.assertTrue(first.startswith(header))
        self.assertLess(len(first), len(content) // 2)
        [(producer, streaming)] = transport.registered
        self.assertTrue(streaming)
        self.assertTrue(verifyObject(IPushProducer, producer))
        client.send(b"NOOP\r\n")
        self.assertEqual(client.take(), b"")
        rounds = transport.drain()
        self.assertGreaterEqual(rounds, 4)
        self.assertEqual(
            first + client.take(), retr(content) + b"+OK 2 %d\r\n" % len(M1) + b"+OK\r\n"
        )
        client.send(b"STAT\r\n")
        self.assertEqual(client.take(), b"+OK 2 %d\r\n" % (len(content) + len(M1)))

    def test_input_during_stream_pauses_reading(self) -> None:
        """A client that sends while its message streams stops being read until it is done."""
        client, transport = self.big_session(self.big_message())
        client.send(b"RETR 1\r\n")
        self.assertEqual(transport.producerState, "producing")
        client.send(b"NOOP\r\n")
        self.assertEqual(transport.producerState, "paused")
        transport.drain()
        self.assertEqual(transport.producerState, "producing")

    def test_retr_streams_without_backpressure(self) -> None:
        """
        On a transport that never pushes back, the stream finishes at once and the next
        pipelined command is answered after it.
        """
        content = self.big_message()
        self.mailboxes[ALICE] = FakeMailbox(self.root / "big", [(21, "big", content)])
        client = self.logged_in()
        client.send(b"RETR 1\r\nNOOP\r\n")
        self.assertEqual(client.take(), retr(content) + b"+OK\r\n")
        self.assertIsNone(client.transport.producer)

    def test_retr_streams_bare_lf(self) -> None:
        """A big bare-LF message streams as CRLF, stuffed, also where a chunk ends."""
        content = self.big_message(b"\n")
        client, transport = self.big_session(content)
        client.send(b"RETR 1\r\n")
        transport.drain()
        self.assertEqual(client.take(), retr(content))

    def test_retr_streams_without_final_line_end(self) -> None:
        """A big message without a final CRLF gets one before the end line."""
        content = self.big_message() + b"no end"
        client, transport = self.big_session(content)
        client.send(b"RETR 1\r\n")
        transport.drain()
        self.assertEqual(client.take(), retr(content))
        self.assertTrue(retr(content).endswith(b"no end\r\n.\r\n"))

    def test_message_at_the_limit_leaves_in_one_write(self) -> None:
        """A message of exactly 256 KiB is sent inline, with the next reply, in one write."""
        line = b"z" * 1022 + b"\r\n"
        content = line * (INLINE_LIMIT // len(line))
        self.assertEqual(len(content), INLINE_LIMIT)
        client, transport = self.big_session(content)
        client.send(b"RETR 1\r\nNOOP\r\n")
        expected = retr(content) + b"+OK\r\n"
        self.assertEqual(client.take(), expected)
        self.assertEqual(client.writes(), [expected])
        self.assertEqual(transport.registered, [])

    def test_top_of_big_message_is_not_streamed(self) -> None:
        """TOP of a big message sends only the header and the lines asked for."""
        client, transport = self.big_session(self.big_message())
        client.send(b"TOP 1 1\r\n")
        self.assertEqual(
            client.take(), b"+OK\r\nSubject: big\r\n\r\nline 1 " + b"x" * 60 + b"\r\n.\r\n"
        )
        self.assertEqual(transport.registered, [])

    def test_top_with_many_lines_of_big_message_streams_only_its_part(self) -> None:
        """
        TOP of a big message asking for more body lines than fit in one write streams exactly
        the header and those lines (never the whole file into memory), then goes on.
        """
        content = self.big_message(size=600 * 1024)
        lines = 6000
        head, _, body = content.partition(b"\r\n\r\n")
        part = head + b"\r\n\r\n" + b"".join(body.split(b"\r\n")[i] + b"\r\n" for i in range(lines))
        self.assertGreater(len(part), INLINE_LIMIT)
        self.assertLess(len(part), len(content))
        client, transport = self.big_session(content)
        client.send(b"TOP 1 %d\r\nNOOP\r\n" % lines)
        self.assertEqual(len(transport.registered), 1)
        transport.drain()
        self.assertEqual(
            client.take(),
            b"+OK\r\n" + retr(part)[len(b"+OK %d octets\r\n" % len(part)) :] + b"+OK\r\n",
        )

    def test_client_that_stops_reading_a_download_times_out(self) -> None:
        """
        A client that stops reading in the middle of a big RETR (the producer stays paused)
        is closed after the idle timeout; one that keeps reading is not.
        """
        client, transport = self.big_session(self.big_message())
        client.send(b"RETR 1\r\n")
        self.assertIsNotNone(transport.producer)
        self.clock.advance(599)
        transport.producer.resumeProducing()  # the client read some: progress
        self.clock.advance(599)
        self.assertFalse(client.closed)
        self.clock.advance(2)
        self.assertTrue(client.closed)

    def test_big_file_vanished(self) -> None:
        """RETR of a big message whose file is gone gets -ERR and starts no stream."""
        client, transport = self.big_session(self.big_message())
        self.mailboxes[ALICE].remove(21)
        client.send(b"RETR 1\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"-ERR Message was removed by another session\r\n+OK\r\n")
        self.assertEqual(transport.registered, [])

    def test_connection_lost_during_stream(self) -> None:
        """
        When the connection drops mid-stream (the transport stops its producer), nothing
        more is written and the lock is released.
        """
        client, transport = self.big_session(self.big_message())
        client.send(b"RETR 1\r\nNOOP\r\n")
        producer: Any = transport.producer
        self.assertIsNotNone(producer)
        client.lose()
        producer.stopProducing()
        sent = transport.value()
        producer.resumeProducing()
        self.assertEqual(transport.value(), sent)
        self.assertEqual(self.locks.held, set())


class QuitTests(POP3TestCase):
    """QUIT and the UPDATE state (RFC 1939 §6)."""

    def test_quit_expunges_deleted_messages(self) -> None:
        """
        QUIT after DELE expunges the deleted UIDs, and replies and closes only when the
        expunge is done; the lock is held until then.
        """
        client = self.logged_in()
        client.send(b"DELE 3\r\nDELE 1\r\n")
        client.take()
        client.send(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"")
        self.assertFalse(client.closed)
        [(uids, d)] = self.mailboxes[ALICE].expunges
        self.assertEqual(uids, [11, 13])
        self.assertEqual(self.locks.held, {ALICE})
        d.callback(None)
        self.assertEqual(client.take(), b"+OK Bye, 2 messages deleted\r\n")
        self.assertTrue(client.closed)
        self.assertEqual(self.locks.held, set())

    def test_quit_expunge_failure(self) -> None:
        """A failed expunge gets C{-ERR [SYS/TEMP]}, is logged, and the lock is released."""
        client = self.logged_in()
        client.send(b"DELE 2\r\nQUIT\r\n")
        self.assertEqual(client.take(), b"+OK Message 2 deleted\r\n")
        [(uids, d)] = self.mailboxes[ALICE].expunges
        self.assertEqual(uids, [12])
        d.errback(OSError("/srv/mail/alice/cur: read-only file system"))
        self.assertEqual(
            client.take(), b"-ERR [SYS/TEMP] Could not delete the messages; try again\r\n"
        )
        self.assertTrue(client.closed)
        self.assertEqual(self.locks.held, set())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_dropped_connection_never_expunges(self) -> None:
        """A connection that ends without QUIT deletes nothing, and releases the lock."""
        client = self.logged_in()
        client.send(b"DELE 1\r\nDELE 2\r\n")
        client.lose()
        self.assertEqual(self.mailboxes[ALICE].expunges, [])
        self.assertEqual(self.locks.held, set())

    def test_idle_timeout_never_expunges(self) -> None:
        """A session closed for idleness deletes nothing either."""
        client = self.logged_in()
        client.send(b"DELE 1\r\n")
        self.clock.advance(600)
        self.assertTrue(client.closed)
        client.lose()
        self.assertEqual(self.mailboxes[ALICE].expunges, [])

    def test_lock_held_until_expunge_done_after_drop(self) -> None:
        """
        A client that drops during the expunge keeps the account locked until the expunge is
        done, so no new session sees a mailbox half expunged.
        """
        client = self.logged_in()
        client.send(b"DELE 1\r\nQUIT\r\n")
        [(uids, d)] = self.mailboxes[ALICE].expunges
        client.lose()
        self.assertEqual(self.locks.held, {ALICE})
        other = self.session()
        other.send(LOGIN)
        self.assertEqual(other.take(), USER_OK + IN_USE)
        d.callback(None)
        self.assertEqual(self.locks.held, set())
        other.send(LOGIN)
        self.assertEqual(other.take(), USER_OK + LOGGED_IN)


class ErrorTests(POP3TestCase):
    """Bad input: unknown commands, wrong state, long lines, bad bytes, the error budget."""

    def test_unknown_command(self) -> None:
        """An unknown command gets -ERR; the session goes on."""
        client = self.session()
        client.send(b"XYZZY\r\n\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"-ERR Unknown command\r\n" * 2 + b"+OK\r\n")

    def test_transaction_commands_before_login(self) -> None:
        """Each TRANSACTION command before login says it is not allowed now."""
        client = self.session(self.factory(max_errors=100))
        for verb in [b"STAT", b"LIST", b"UIDL", b"RETR 1", b"TOP 1 1", b"DELE 1", b"RSET"]:
            client.send(verb + b"\r\n")
            name = verb.split()[0]
            self.assertEqual(client.take(), b"-ERR " + name + b" not allowed now\r\n")

    def test_authorization_commands_after_login(self) -> None:
        """USER, PASS, AUTH and STLS after login are not allowed."""
        client = self.logged_in()
        client.send(b"USER bob\r\nPASS x\r\nAUTH PLAIN\r\nSTLS\r\n")
        self.assertEqual(
            client.take(),
            b"-ERR USER not allowed now\r\n-ERR PASS not allowed now\r\n"
            b"-ERR AUTH not allowed now\r\n-ERR STLS not allowed now\r\n",
        )
        self.assertEqual(len(self.auth.calls), 1)

    def test_error_budget_closes_the_session(self) -> None:
        """Past C{max_errors} bad commands, the session is closed; later input is ignored."""
        client = self.session(self.factory(max_errors=3))
        client.send(b"BAD\r\n" * 3)
        self.assertEqual(client.take(), b"-ERR Unknown command\r\n" * 3)
        self.assertFalse(client.closed)
        client.send(b"BAD\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"-ERR Too many errors, closing\r\n")
        self.assertTrue(client.closed)
        client.send(b"NOOP\r\n")
        self.assertEqual(client.take(), b"")

    def test_failed_logins_do_not_spend_the_error_budget(self) -> None:
        """Wrong passwords are the authenticator's to throttle, not bad commands."""
        client = self.session(self.factory(max_errors=1))
        client.send(b"USER alice\r\nPASS wrong\r\n" * 3)
        self.assertEqual(client.take(), (USER_OK + AUTH_FAILED) * 3)
        self.assertFalse(client.closed)

    def test_over_long_line_in_one_chunk(self) -> None:
        """A line longer than C{max_line}, CRLF included, gets -ERR; the next line runs."""
        client = self.session()
        client.send(b"NOOP " + b"x" * 2000 + b"\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"-ERR Line too long\r\n+OK\r\n")

    def test_line_at_the_limit(self) -> None:
        """A line of exactly C{max_line} octets with its CRLF is accepted; one more is not."""
        client = self.session()
        client.send(b"NOOP " + b"x" * (1024 - 7) + b"\r\n")
        self.assertEqual(client.take(), b"+OK\r\n")
        client.send(b"NOOP " + b"x" * (1024 - 6) + b"\r\n")
        self.assertEqual(client.take(), b"-ERR Line too long\r\n")

    def test_over_long_line_across_chunks(self) -> None:
        """
        A line that grows past C{max_line} without a CRLF gets -ERR at once; the rest of it is
        thrown away as it comes (a CR and LF split over chunks included), and then commands
        run again.
        """
        client = self.session()
        client.send(b"x" * 2000)
        self.assertEqual(client.take(), b"-ERR Line too long\r\n")
        client.send(b"STAT\r" * 1000)
        client.send(b"y" * 5000 + b"\r")
        self.assertEqual(client.take(), b"")
        client.send(b"\nNOOP\r\n")
        self.assertEqual(client.take(), b"+OK\r\n")
        self.assertFalse(client.closed)

    def test_nul_and_bare_line_ends(self) -> None:
        """A command with a NUL, a bare CR or a bare LF gets -ERR and is not run."""
        client = self.session()
        client.send(b"NO\x00OP\r\nQUIT\nNOOP\r\nQUIT\rNOOP\r\n")
        self.assertEqual(client.take(), b"-ERR Bad characters in command\r\n" * 3)
        self.assertFalse(client.closed)

    def test_invalid_utf8(self) -> None:
        """A command that is not UTF-8 gets -ERR and the session goes on."""
        client = self.session()
        client.send(b"USER \xff\xfe\r\nNOOP\r\n")
        self.assertEqual(client.take(), b"-ERR Command is not valid UTF-8\r\n+OK\r\n")

    def test_bad_bytes_spend_the_error_budget(self) -> None:
        """NULs and invalid UTF-8 count as bad commands toward C{max_errors}."""
        client = self.session(self.factory(max_errors=2))
        client.send(b"\xff\r\nNO\x00OP\r\n")
        self.assertFalse(client.closed)
        client.send(b"\xc3\r\n")
        self.assertEqual(
            client.take(),
            b"-ERR Command is not valid UTF-8\r\n-ERR Bad characters in command\r\n"
            b"-ERR Too many errors, closing\r\n",
        )
        self.assertTrue(client.closed)

    def test_utf8_user_name(self) -> None:
        """A UTF-8 user name reaches the authenticator decoded."""
        client = self.session()
        client.send("USER j\u00f6rg@b\u00fccher.de\r\nPASS pw\r\n".encode())
        self.assertEqual(client.take(), USER_OK + AUTH_FAILED)
        self.assertEqual(self.auth.calls, [(PEER_IP, "j\u00f6rg@b\u00fccher.de", "pw")])

    def test_internal_error_in_a_handler(self) -> None:
        """
        An unexpected exception in a command gets a generic C{-ERR [SYS/TEMP]} naming the
        session, no traceback or detail; it is logged, and the session goes on.
        """
        self.mailboxes[ALICE].broken.add(12)
        client = self.logged_in()
        client.send(b"RETR 2\r\nNOOP\r\n")
        session = client.protocol.session.encode()
        self.assertEqual(
            client.take(),
            b"-ERR [SYS/TEMP] Internal error, session " + session + b"\r\n+OK\r\n",
        )
        self.assertEqual(len(self.flushLoggedErrors(PermissionError)), 1)

    def test_authenticator_raising(self) -> None:
        """
        An authenticator that raises instead of returning a Deferred gets a generic -ERR, and
        the session is not left waiting for it.
        """
        self.auth.raise_now = RuntimeError("database is locked: /var/lib/mailserver/db")
        client = self.session()
        client.send(LOGIN + b"NOOP\r\n")
        session = client.protocol.session.encode()
        self.assertEqual(
            client.take(),
            USER_OK + b"-ERR [SYS/TEMP] Internal error, session " + session + b"\r\n+OK\r\n",
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.auth.raise_now = None
        client.send(LOGIN)
        self.assertEqual(client.take(), USER_OK + LOGGED_IN)

    def test_authenticator_failing_unexpectedly(self) -> None:
        """An unexpected failure of the authenticator is an internal error, not a refusal."""
        self.auth.error = RuntimeError("database is locked: /var/lib/mailserver/db")
        client = self.session()
        client.send(LOGIN + b"NOOP\r\n")
        session = client.protocol.session.encode()
        self.assertEqual(
            client.take(),
            USER_OK + b"-ERR [SYS/TEMP] Internal error, session " + session + b"\r\n+OK\r\n",
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.locks.held, set())


class IdleTimeoutTests(POP3TestCase):
    """The idle timeout."""

    def test_idle_session_closed(self) -> None:
        """A session with no input for C{idle_timeout} gets C{-ERR [SYS/TEMP]} and is closed."""
        client = self.session()
        self.clock.advance(599)
        self.assertFalse(client.closed)
        self.clock.advance(1)
        self.assertEqual(client.take(), b"-ERR [SYS/TEMP] Idle timeout, closing\r\n")
        self.assertTrue(client.closed)

    def test_input_restarts_the_timeout(self) -> None:
        """Input restarts the count: the session closes C{idle_timeout} after the last input."""
        client = self.logged_in(self.factory(idle_timeout=60))
        self.clock.advance(50)
        client.send(b"NOOP\r\n")
        self.assertEqual(client.take(), b"+OK\r\n")
        self.clock.advance(59)
        self.assertFalse(client.closed)
        self.clock.advance(1)
        self.assertEqual(client.take(), b"-ERR [SYS/TEMP] Idle timeout, closing\r\n")
        self.assertTrue(client.closed)
        client.lose()
        self.assertEqual(self.locks.held, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timeout_while_waiting_for_the_server(self) -> None:
        """A session waiting on its login is not closed for idleness."""
        self.auth.hold = True
        client = self.session(self.factory(idle_timeout=60))
        client.send(LOGIN)
        client.take()
        self.clock.advance(500)
        self.assertFalse(client.closed)
        self.auth.pending[0].callback(ALICE)
        self.assertEqual(client.take(), LOGGED_IN)
        self.clock.advance(60)
        self.assertTrue(client.closed)
