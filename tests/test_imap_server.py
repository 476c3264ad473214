"""
Tests for L{mailserver.imap.server}: the IMAP state machine over a C{StringTransport}, on a
L{Clock}, with a fake authenticator and the real mailbox store whose "thread pool" runs each
job on the calling thread (at once, or when the test releases it). These are the parts the
end-to-end tests cannot reach cheaply: timeouts, literal continuations and refusals, SASL
exchanges, IDLE pushes racing other work, the number of writes, producer backpressure.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorFromThreads, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailserver.auth import LoginFailed
from mailserver.imap import server as imap_server
from mailserver.imap.server import IMAPFactory, IMAPServer, IMAPSettings
from mailserver.limits import ConnectionLimiter
from mailserver.store.index import INBOX, MailIndex
from mailserver.store.mailbox import MailboxStore
from mailserver.store.maildir import mailbox_path

HOST = "imap.example.org"
PEER = IPv4Address("TCP", "192.0.2.10", 40000)
ALICE = "alice@example.org"
PASSWORD = "correct horse"
IDLE_TIMEOUT = 1800.0


class InlinePool:
    """
    Stands in for the I/O thread pool: runs each job on the calling thread, at once, or, while
    C{hold} is true, when the test calls L{release}.
    """

    def __init__(self) -> None:
        self.hold = False
        self.held: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, object], None], func: Callable[..., Any], *args: Any
    ) -> None:
        def job() -> None:
            try:
                result = func(*args)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)

        if self.hold:
            self.held.append(job)
        else:
            job()

    def release(self, count: int | None = None) -> None:
        """Run the held jobs (the first C{count} of them), and any they start meanwhile."""
        done = 0
        while self.held and (count is None or done < count):
            self.held.pop(0)()
            done += 1


class InlineReactor:
    """C{callFromThread} at once: the pool's jobs already run on the reactor thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class FakeAuthenticator:
    """C{alice} or C{alice@example.org} with L{PASSWORD} is the account L{ALICE}."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, peer: str, user: str, password: str) -> Deferred[str]:
        self.calls.append((user, password))
        if user in ("alice", ALICE) and password == PASSWORD:
            return succeed(ALICE)
        return fail(LoginFailed())


class RecordingTransport(StringTransport):
    """A C{StringTransport} that keeps each C{write} call apart."""

    def __init__(self) -> None:
        super().__init__(peerAddress=PEER)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class SlowReaderTransport(RecordingTransport):
    """A transport whose send buffer is full after every write while a producer is
    registered: it pauses the producer, and the test resumes it as if the buffer drained."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()


@implementer(ITLSTransport)
class TLSCapableTransport(RecordingTransport):
    """A transport that can start TLS; it records what had been written by then."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_started: list[bytes] = []

    def startTLS(self, contextFactory: object, normal: bool = True) -> None:
        self.tls_started.append(self.value())


class Client:
    """One connection to the server under test."""

    def __init__(self, protocol: IMAPServer, transport: RecordingTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self._read = 0

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def take(self) -> bytes:
        """What the server wrote since the last call."""
        value: bytes = self.transport.value()
        new, self._read = value[self._read :], len(value)
        return new

    def writes(self) -> list[bytes]:
        writes = list(self.transport.writes)
        self.transport.writes.clear()
        return writes

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def message(n: int, size: int = 0) -> bytes:
    head = b"Subject: message %d\r\n\r\n" % n
    if size <= len(head):
        return head + b"body %d\r\n" % n
    line = b"x" * 78 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


class IMAPTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = InlinePool()
        self.root = Path(self.mktemp())
        self.store = MailboxStore(
            self.root, cast(IReactorFromThreads, InlineReactor()), cast(ThreadPool, self.pool)
        )
        self.addCleanup(self.store.close)
        self.auth = FakeAuthenticator()
        self.limiter = ConnectionLimiter(100, 100)

    def add(self, *messages: bytes, folder: str = INBOX) -> None:
        for data in messages:
            self.successResultOf(
                self.store.append(ALICE, folder, lambda f, data=data: f.write(data))
            )

    def connect(self, transport: RecordingTransport | None = None, **settings: Any) -> Client:
        """A connection to a server (implicit TLS unless C{tls_mode} says otherwise); its
        greeting is read."""
        settings.setdefault("tls_mode", "implicit")
        factory = IMAPFactory(
            IMAPSettings(HOST, **settings),
            self.auth,
            self.store,
            self.clock,
            self.limiter,
            tls=object(),
        )
        transport = transport or RecordingTransport()
        protocol = factory.buildProtocol(PEER)
        protocol.makeConnection(transport)
        client = Client(protocol, transport)
        greeting = client.take()
        assert greeting.startswith(b"* OK [CAPABILITY "), greeting
        client.writes()
        self.addCleanup(client.lose)
        return client

    def login(self, client: Client, select: str | None = None) -> None:
        client.send(f'L LOGIN {ALICE} "{PASSWORD}"\r\n'.encode())
        assert client.take().startswith(b"L OK "), "login failed"
        if select is not None:
            client.send(f"S SELECT {select}\r\n".encode())
            out = client.take()
            assert out.endswith(b"S OK [READ-WRITE] SELECT completed\r\n"), out
        client.writes()


class TimeoutTests(IMAPTestCase):
    def test_idle_client_is_logged_out(self) -> None:
        """A client silent for C{idle_timeout} seconds gets BYE and is disconnected; any
        input restarts the count."""
        c = self.connect()
        self.clock.advance(IDLE_TIMEOUT - 10)
        c.send(b"a NOOP\r\n")
        self.assertEqual(c.take(), b"a OK NOOP completed\r\n")
        self.clock.advance(IDLE_TIMEOUT - 5)
        self.assertEqual(c.take(), b"")
        self.assertFalse(c.closed)
        self.clock.advance(10)
        self.assertEqual(c.take(), b"* BYE Autologout; idle for too long\r\n")
        self.assertTrue(c.closed)

    def test_idle_command_times_out_too(self) -> None:
        """IDLE does not keep a session for ever: after C{idle_timeout} it is logged out."""
        self.add(message(1))
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"i IDLE\r\n")
        self.assertEqual(c.take(), b"+ idling\r\n")
        self.clock.advance(IDLE_TIMEOUT + 1)
        self.assertTrue(c.take().startswith(b"* BYE "))
        self.assertTrue(c.closed)

    def test_no_timeout_while_the_store_works(self) -> None:
        """A command waiting on the store (a slow disk) is not cut off by the idle timer;
        the timer starts again when it is answered."""
        self.add(message(1))
        c = self.connect()
        self.login(c, INBOX)
        self.pool.hold = True
        c.send(b"a NOOP\r\n")
        self.clock.advance(IDLE_TIMEOUT * 2)
        self.assertFalse(c.closed)
        self.pool.hold = False
        self.pool.release()
        self.assertEqual(c.take(), b"a OK NOOP completed\r\n")
        self.clock.advance(IDLE_TIMEOUT - 5)
        self.assertFalse(c.closed)
        self.clock.advance(10)
        self.assertTrue(c.closed)


class LiteralTests(IMAPTestCase):
    def test_synchronizing_literal_gets_a_continuation(self) -> None:
        """C{{n}} at the end of a line gets C{+ } at once, and the command is run when the
        literal and the rest of it arrive (a LOGIN with a password sent as a literal)."""
        c = self.connect()
        c.send(b"a LOGIN alice {13}\r\n")
        self.assertEqual(c.take(), b"+ Ready for literal data\r\n")
        c.send(PASSWORD.encode() + b"\r\n")
        self.assertTrue(c.take().startswith(b"a OK [CAPABILITY "))
        self.assertEqual(self.auth.calls, [("alice", PASSWORD)])

    def test_literal_byte_at_a_time(self) -> None:
        """The same dialogue fed one octet at a time gives the same answers."""
        c = self.connect()
        for octet in b"a LOGIN alice {13}\r\n":
            c.send(bytes([octet]))
        self.assertEqual(c.take(), b"+ Ready for literal data\r\n")
        for octet in PASSWORD.encode() + b"\r\nb NOOP\r\n":
            c.send(bytes([octet]))
        out = c.take()
        self.assertTrue(out.startswith(b"a OK [CAPABILITY "), out)
        self.assertTrue(out.endswith(b"\r\nb OK NOOP completed\r\n"), out)

    def test_large_literal_for_a_command_that_takes_a_string_is_refused(self) -> None:
        """A synchronizing literal too large for anything but APPEND is refused (BAD
        [TOOBIG], no continuation); the client sends no data, and its next command runs."""
        c = self.connect()
        c.send(b"a LOGIN alice {100000}\r\nb NOOP\r\n")
        self.assertEqual(
            c.take(),
            b"a BAD [TOOBIG] Literal too big for this command\r\nb OK NOOP completed\r\n",
        )

    def test_append_literal_refused_before_login(self) -> None:
        """APPEND's literal is refused before login (no continuation, the session goes on)."""
        c = self.connect()
        c.send(b"a APPEND INBOX {10}\r\nb NOOP\r\n")
        self.assertEqual(c.take(), b"a BAD APPEND not allowed now\r\nb OK NOOP completed\r\n")

    def test_literal_over_the_limit(self) -> None:
        """
        A literal over C{max_literal}: a synchronizing one is refused at once (BAD [TOOBIG]);
        a non-synchronizing one is read and dropped, then refused, and the session goes on;
        one far over the limit ends the session rather than be read.
        """
        c = self.connect(max_literal=1000)
        self.login(c)
        c.send(b"a APPEND INBOX {2000}\r\nb NOOP\r\n")
        self.assertEqual(c.take(), b"a BAD [TOOBIG] Literal too big\r\nb OK NOOP completed\r\n")
        c.send(b"c APPEND INBOX {2000+}\r\n" + b"x" * 2000 + b"\r\nd NOOP\r\n")
        self.assertEqual(c.take(), b"c BAD [TOOBIG] Literal too big\r\nd OK NOOP completed\r\n")
        c.send(b"e APPEND INBOX {5000+}\r\n")
        self.assertEqual(
            c.take(), b"e BAD [TOOBIG] Literal too big\r\n* BYE Literal far too big\r\n"
        )
        self.assertTrue(c.closed)

    def test_append_with_a_large_literal_is_stored(self) -> None:
        """An APPEND literal larger than what is kept in memory (spilled to a file) is stored
        byte for byte and answered with APPENDUID."""
        data = message(1, 300_000)
        c = self.connect()
        self.login(c)
        c.send(b"a APPEND INBOX (\\Seen) {%d}\r\n" % len(data))
        self.assertEqual(c.take(), b"+ Ready for literal data\r\n")
        for i in range(0, len(data), 7000):
            c.send(data[i : i + 7000])
        c.send(b"\r\n")
        self.assertRegex(c.take(), rb"^a OK \[APPENDUID \d+ 1\] APPEND completed\r\n$")
        [stored] = list((self.root / "example.org" / "alice" / "cur").iterdir())
        self.assertEqual(stored.read_bytes(), data)


class AuthenticateTests(IMAPTestCase):
    def test_plain_with_initial_response(self) -> None:
        """AUTHENTICATE PLAIN with SASL-IR logs in in one round trip."""
        c = self.connect()
        c.send(b"a AUTHENTICATE PLAIN " + plain(ALICE, PASSWORD) + b"\r\n")
        self.assertRegex(c.take(), rb"^a OK \[CAPABILITY [^\]]*\] Logged in\r\n$")

    def test_plain_with_continuation(self) -> None:
        """Without an initial response the server sends C{+ } and takes the next line."""
        c = self.connect()
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        self.assertEqual(c.take(), b"+ \r\n")
        c.send(plain("alice", PASSWORD) + b"\r\nb NOOP\r\n")
        out = c.take()
        self.assertRegex(out, rb"^a OK \[CAPABILITY [^\]]*\] Logged in\r\nb OK NOOP completed\r\n$")

    def test_cancel_wrong_password_and_bad_data(self) -> None:
        """C{*} cancels (BAD); a wrong password is NO [AUTHENTICATIONFAILED]; a response
        that is not base64 is BAD; another identity than one's own is refused."""
        c = self.connect()
        c.send(b"a AUTHENTICATE PLAIN\r\n*\r\n")
        self.assertEqual(c.take(), b"+ \r\na BAD Authentication cancelled\r\n")
        c.send(b"b AUTHENTICATE PLAIN " + plain(ALICE, "wrong") + b"\r\n")
        self.assertEqual(c.take(), b"b NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
        c.send(b"c AUTHENTICATE PLAIN\r\n!!notbase64\r\n")
        self.assertEqual(c.take(), b"+ \r\nc BAD Malformed SASL PLAIN response\r\n")
        c.send(b"d AUTHENTICATE PLAIN " + plain(ALICE, PASSWORD, "bob@example.org") + b"\r\n")
        self.assertEqual(c.take(), b"d NO [AUTHORIZATIONFAILED] Not authorized for that user\r\n")
        c.send(b"e AUTHENTICATE CRAM-MD5\r\n")
        self.assertEqual(c.take(), b"e NO Unsupported authentication mechanism\r\n")

    def test_no_password_before_starttls(self) -> None:
        """On a STARTTLS listener, before TLS: LOGINDISABLED, no AUTH=, LOGIN and
        AUTHENTICATE refused with [PRIVACYREQUIRED]."""
        c = self.connect(TLSCapableTransport(), tls_mode="starttls")
        c.send(b"a CAPABILITY\r\n")
        caps = c.take()
        self.assertIn(b" STARTTLS", caps)
        self.assertIn(b" LOGINDISABLED", caps)
        self.assertNotIn(b"AUTH=", caps)
        c.send(f'b LOGIN alice "{PASSWORD}"\r\n'.encode())
        c.send(b"c AUTHENTICATE PLAIN " + plain(ALICE, PASSWORD) + b"\r\n")
        self.assertEqual(
            c.take(),
            b"b NO [PRIVACYREQUIRED] Use STARTTLS first\r\n"
            b"c NO [PRIVACYREQUIRED] Use STARTTLS first\r\n",
        )
        self.assertEqual(self.auth.calls, [])

    def test_starttls_drops_pipelined_commands(self) -> None:
        """Commands sent after STARTTLS in the same packet are dropped; after TLS, AUTH=PLAIN
        is offered and STARTTLS no more."""
        transport = TLSCapableTransport()
        c = self.connect(transport, tls_mode="starttls")
        c.send(b"a STARTTLS\r\nb LOGIN alice x\r\nc CAPABILITY\r\n")
        self.assertEqual(c.take(), b"a OK Begin TLS negotiation now\r\n")
        [written] = transport.tls_started  # the OK was out before TLS started
        self.assertTrue(written.endswith(b"a OK Begin TLS negotiation now\r\n"))
        self.assertEqual(self.auth.calls, [])
        c.send(b"d CAPABILITY\r\n")
        caps = c.take()
        self.assertIn(b"AUTH=PLAIN", caps)
        self.assertNotIn(b"STARTTLS", caps)
        self.assertTrue(caps.endswith(b"d OK CAPABILITY completed\r\n"))


class StateTests(IMAPTestCase):
    def test_commands_in_the_wrong_state_are_bad(self) -> None:
        """Each command is accepted only in its states (RFC 3501 §6): the others get BAD
        naming it, and the session goes on."""
        self.add(message(1))
        c = self.connect()
        c.send(b"a SELECT INBOX\r\nb FETCH 1 FLAGS\r\nc IDLE\r\n")
        self.assertEqual(
            c.take(),
            b"a BAD SELECT not allowed now\r\nb BAD FETCH not allowed now\r\n"
            b"c BAD IDLE not allowed now\r\n",
        )
        self.login(c)
        c.send(b"d LOGIN alice x\r\ne FETCH 1 FLAGS\r\nf CLOSE\r\ng EXPUNGE\r\nh STARTTLS\r\n")
        self.assertEqual(
            c.take(),
            b"d BAD LOGIN not allowed now\r\ne BAD FETCH not allowed now\r\n"
            b"f BAD CLOSE not allowed now\r\ng BAD EXPUNGE not allowed now\r\n"
            b"h BAD STARTTLS not allowed now\r\n",
        )
        c.send(b"i SELECT INBOX\r\nj FETCH 1 (FLAGS)\r\n")
        self.assertTrue(
            c.take().endswith(b"* 1 FETCH (FLAGS (\\Recent))\r\nj OK FETCH completed\r\n")
        )

    def test_error_budget(self) -> None:
        """Bad commands are answered BAD until C{max_errors}; one more gets BYE."""
        c = self.connect(max_errors=2)
        c.send(b"a FOO\r\nb BAR\r\n")
        self.assertEqual(c.take(), b"a BAD Unknown command\r\nb BAD Unknown command\r\n")
        self.assertFalse(c.closed)
        c.send(b"c BAZ\r\nd NOOP\r\n")
        self.assertEqual(c.take(), b"c BAD Unknown command\r\n* BYE Too many errors\r\n")
        self.assertTrue(c.closed)

    def test_pipelined_answers_leave_in_one_write(self) -> None:
        """Commands that arrive together are answered in one C{write}, before login and in
        the selected state (where each command also looks at the folder)."""
        self.add(message(1), message(2))
        c = self.connect()
        c.send(b"a CAPABILITY\r\nb NOOP\r\nc ID NIL\r\n")
        self.assertEqual(len(c.writes()), 1)
        self.assertTrue(c.take().endswith(b"c OK ID completed\r\n"))
        self.login(c, INBOX)
        c.send(
            b"d NOOP\r\ne FETCH 1:2 (UID FLAGS)\r\nf STORE 1 +FLAGS (\\Seen)\r\n"
            b"g SEARCH UNSEEN\r\nh UID FETCH 2 (BODY.PEEK[HEADER])\r\n"
        )
        [write] = c.writes()
        self.assertTrue(write.startswith(b"d OK NOOP completed\r\n"), write)
        self.assertIn(b"* SEARCH 2\r\ng OK SEARCH completed\r\n", write)
        self.assertTrue(write.endswith(b"h OK UID FETCH completed\r\n"), write)


class IdleTests(IMAPTestCase):
    def test_idle_pushes_changes_and_done_ends_it(self) -> None:
        """In IDLE, a message added by someone else is told at once (EXISTS, and RECENT: the
        session claims it); DONE ends IDLE with OK; anything but DONE is BAD."""
        self.add(message(1))
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"i IDLE\r\n")
        self.assertEqual(c.take(), b"+ idling\r\n")
        self.add(message(2))
        self.assertEqual(c.take(), b"* 2 EXISTS\r\n* 2 RECENT\r\n")
        c.send(b"DONE\r\n")
        self.assertEqual(c.take(), b"i OK IDLE terminated\r\n")
        c.send(b"j IDLE\r\nk NOOP\r\n")
        self.assertEqual(c.take(), b"+ idling\r\nj BAD Expected DONE\r\n")

    def test_change_during_a_push_is_pushed_after_it(self) -> None:
        """
        A change that arrives while an IDLE push is still looking at the folder (its look
        taken before the change) is pushed as soon as that push is done, not left until the
        client's next command.
        """
        self.add(message(1))
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"i IDLE\r\n")
        self.assertEqual(c.take(), b"+ idling\r\n")
        self.pool.hold = True
        self.store.append(ALICE, INBOX, lambda f: f.write(message(2)))
        self.pool.release(1)  # the append: the session is told, its refresh is held
        self.assertEqual(len(self.pool.held), 1)
        self.store.append(ALICE, INBOX, lambda f: f.write(message(3)))  # waits its turn
        self.pool.hold = False
        self.pool.release()  # the refresh, then at once the second append
        self.assertEqual(c.take(), b"* 2 EXISTS\r\n* 2 RECENT\r\n* 3 EXISTS\r\n* 3 RECENT\r\n")

    def test_fetch_while_an_expunge_is_pending_sends_no_expunge(self) -> None:
        """
        A message expunged by another session stays numbered during FETCH, STORE and SEARCH
        (no EXPUNGE: RFC 3501 §7.4.1), and is announced by the next NOOP.
        """
        self.add(message(1), message(2), message(3))
        a, b = self.connect(), self.connect()
        self.login(a, INBOX)
        self.login(b, INBOX)
        b.send(b"x STORE 2 +FLAGS.SILENT (\\Deleted)\r\ny EXPUNGE\r\n")
        self.assertIn(b"* 2 EXPUNGE", b.take())
        a.send(b"a FETCH 1:3 (UID)\r\nb STORE 3 +FLAGS (\\Seen)\r\nc SEARCH ALL\r\n")
        out = a.take()
        self.assertNotIn(b"EXPUNGE", out)
        self.assertIn(b"* 3 FETCH (FLAGS (\\Recent \\Seen))\r\n", out)  # A selected first
        self.assertIn(b"* SEARCH 1 2 3\r\n", out)
        a.send(b"d NOOP\r\n")
        # One of A's three recent messages is gone: RECENT tells the new count.
        self.assertEqual(a.take(), b"* 2 EXPUNGE\r\n* 2 RECENT\r\nd OK NOOP completed\r\n")


class StreamingTests(IMAPTestCase):
    def test_large_fetch_waits_for_the_reader(self) -> None:
        """
        A large FETCH is streamed by a producer: with a reader that takes nothing, the server
        writes one piece and waits; as the reader drains, it goes on to the end, and the next
        command (pipelined meanwhile) is answered after the FETCH's OK.
        """
        data = message(1, 3 * 1024 * 1024)
        self.add(data)
        transport = SlowReaderTransport()
        c = self.connect(transport)
        self.login(c, INBOX)
        c.send(b"a FETCH 1 (BODY.PEEK[])\r\n")
        first = c.take()
        self.assertLess(len(first), 512 * 1024)
        self.assertNotIn(b"a OK", first)
        c.send(b"b NOOP\r\n")
        self.assertEqual(c.take(), b"")
        rounds = 0
        while transport.producer is not None:
            self.assertLess(rounds, 1000)
            transport.producer.resumeProducing()
            rounds += 1
        self.assertGreater(rounds, 5)
        out = first + c.take()
        self.assertEqual(
            out,
            b"* 1 FETCH (BODY[] {%d}\r\n" % len(data)
            + data
            + b")\r\na OK FETCH completed\r\nb OK NOOP completed\r\n",
        )

    def test_connection_lost_while_streaming(self) -> None:
        """A connection lost in the middle of a stream stops the producer; nothing more is
        written and the session is gone."""
        self.add(message(1, 2 * 1024 * 1024))
        transport = SlowReaderTransport()
        c = self.connect(transport)
        self.login(c, INBOX)
        c.send(b"a FETCH 1 (BODY.PEEK[])\r\n")
        producer = transport.producer
        assert producer is not None
        before = len(c.take())
        producer.stopProducing()
        c.lose()
        producer.resumeProducing()
        self.assertEqual(len(c.take()), 0)
        self.assertGreater(before, 0)


class FastFetchTests(IMAPTestCase):
    """
    FETCH of only UID, FLAGS, RFC822.SIZE, INTERNALDATE, MODSEQ and whole messages takes the
    fast path (one C{os.read} per canonical file, no buffered file object); its answers are
    the same octets as the general path's.
    """

    def setUp(self) -> None:
        super().setUp()
        self.opened: list[str] = []

        def recording_open(path: str, *args: Any, **kwargs: Any) -> Any:
            self.opened.append(path)
            return open(path, *args, **kwargs)

        # The general path opens message files with the built-in open(); record those.
        setattr(imap_server, "open", recording_open)  # noqa: B010
        self.addCleanup(delattr, imap_server, "open")

    def test_several_messages_byte_exact(self) -> None:
        data = [message(1), message(2, 5000), message(3, 70000)]
        self.add(*data)
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"k STORE 2 +FLAGS ($Label \\Flagged)\r\n")
        c.take()
        c.writes()
        c.send(b"a UID FETCH 1:* (FLAGS BODY.PEEK[] RFC822.SIZE)\r\n")
        flags = [b"(\\Recent)", b"(\\Flagged \\Recent $Label)", b"(\\Recent)"]
        expected = b"".join(
            b"* %d FETCH (UID %d FLAGS %s BODY[] {%d}\r\n%s RFC822.SIZE %d)\r\n"
            % (n, n, flags[n - 1], len(d), d, len(d))
            for n, d in enumerate(data, 1)
        )
        self.assertEqual(c.take(), expected + b"a OK UID FETCH completed\r\n")
        self.assertEqual(len(c.writes()), 1)
        self.assertEqual(self.opened, [])

    def test_rfc822_sets_seen(self) -> None:
        """RFC822 in a read-write session sets \\Seen, and FLAGS comes after the message."""
        data = message(1)
        self.add(data)
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"a FETCH 1 (RFC822)\r\n")
        self.assertEqual(
            c.take(),
            b"* 1 FETCH (RFC822 {%d}\r\n%s FLAGS (\\Recent \\Seen))\r\na OK FETCH completed\r\n"
            % (len(data), data),
        )
        self.assertEqual(self.opened, [])

    def test_vanished_file(self) -> None:
        """A file gone from the disk: that message's answer is its UID and FLAGS."""
        data = [message(1), message(2), message(3)]
        self.add(*data)
        c = self.connect()
        self.login(c, INBOX)
        folder = c.protocol._folder
        assert folder is not None
        Path(folder.path(2)).unlink()
        c.send(b"a FETCH 1:* (BODY.PEEK[])\r\n")
        self.assertEqual(
            c.take(),
            b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\n" % (len(data[0]), data[0])
            + b"* 2 FETCH (UID 2 FLAGS ())\r\n"
            + b"* 3 FETCH (BODY[] {%d}\r\n%s)\r\n" % (len(data[2]), data[2])
            + b"a OK FETCH completed\r\n",
        )

    def test_non_canonical_file_falls_back(self) -> None:
        """
        A file whose size is not the message's CRLF size (here rewritten with bare LFs by
        another program) takes the general path: converted to CRLF as it is sent.
        """
        data = [message(1), message(2, 300), message(3)]
        self.add(*data)
        c = self.connect()
        self.login(c, INBOX)
        folder = c.protocol._folder
        assert folder is not None
        Path(folder.path(2)).write_bytes(data[1].replace(b"\r\n", b"\n"))
        c.send(b"a FETCH 1:* (UID BODY.PEEK[])\r\n")
        expected = b"".join(
            b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (n, n, len(d), d)
            for n, d in enumerate(data, 1)
        )
        self.assertEqual(c.take(), expected + b"a OK FETCH completed\r\n")
        self.assertEqual(self.opened, [folder.path(2)])

    def test_many_messages_stream_in_batches(self) -> None:
        """
        Many messages: the answer is streamed by the producer, in a few large writes (each
        a batch of messages), byte for byte the messages in order.
        """
        data = [message(n, 5120) for n in range(1, 201)]
        self.add(*data)
        transport = SlowReaderTransport()
        c = self.connect(transport)
        self.login(c, INBOX)
        c.send(b"a FETCH 1:* (BODY.PEEK[])\r\n")
        rounds = 0
        while transport.producer is not None:
            self.assertLess(rounds, 1000)
            transport.producer.resumeProducing()
            rounds += 1
        expected = b"".join(
            b"* %d FETCH (BODY[] {%d}\r\n%s)\r\n" % (n, len(d), d) for n, d in enumerate(data, 1)
        )
        self.assertEqual(c.take(), expected + b"a OK FETCH completed\r\n")
        writes = c.writes()
        self.assertGreater(len(writes), 2)
        self.assertLess(len(writes), 20)
        self.assertLess(max(len(w) for w in writes), 512 * 1024)
        self.assertEqual(self.opened, [])

    def test_large_message_among_small_ones_is_streamed(self) -> None:
        """A message over the inline limit takes the general path (streamed from its file)."""
        data = [message(1), message(2, 400 * 1024), message(3)]
        self.add(*data)
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"a FETCH 1:* (BODY.PEEK[] RFC822.SIZE)\r\n")
        expected = b"".join(
            b"* %d FETCH (BODY[] {%d}\r\n%s RFC822.SIZE %d)\r\n" % (n, len(d), d, len(d))
            for n, d in enumerate(data, 1)
        )
        self.assertEqual(c.take(), expected + b"a OK FETCH completed\r\n")
        folder = c.protocol._folder
        assert folder is not None
        self.assertEqual(self.opened, [folder.path(2)])


class ListTests(IMAPTestCase):
    def test_lsub_percent_lists_an_unsubscribed_parent_as_noselect(self) -> None:
        """LSUB "" "%" with only C{Work/Sub} subscribed answers C{Work} with \\Noselect
        (RFC 3501 §6.3.9); with "*" it answers C{Work/Sub} itself."""
        c = self.connect()
        self.login(c)
        c.send(b"a CREATE Work/Sub\r\nb UNSUBSCRIBE Work\r\nc SUBSCRIBE Work/Sub\r\n")
        self.assertTrue(c.take().endswith(b"c OK SUBSCRIBE completed\r\n"))
        c.send(b'd LSUB "" "%"\r\n')
        out = c.take()
        self.assertIn(b'* LSUB (\\Noselect) "/" "Work"\r\n', out)
        self.assertNotIn(b"Work/Sub", out)
        c.send(b'e LSUB "" "Work*"\r\n')
        self.assertEqual(c.take(), b'* LSUB () "/" "Work/Sub"\r\ne OK LSUB completed\r\n')

    def test_create_makes_the_parents_and_return_subscribed(self) -> None:
        """CREATE a/b/c makes a and a/b (LIST "" "%" finds a); RETURN (SUBSCRIBED) adds
        \\Subscribed (RFC 5258 §3.2) to the subscribed ones."""
        c = self.connect()
        self.login(c)
        c.send(b"a CREATE a/b/c\r\nb UNSUBSCRIBE a/b\r\nc SUBSCRIBE a/b/c\r\n")
        c.take()
        c.send(b'd LIST "" "%"\r\n')
        self.assertIn(b'* LIST (\\HasChildren) "/" "a"\r\n', c.take())
        c.send(b'd LIST "" "a/*" RETURN (SUBSCRIBED)\r\n')
        self.assertEqual(
            c.take(),
            b'* LIST (\\HasChildren) "/" "a/b"\r\n'
            b'* LIST (\\HasNoChildren \\Subscribed) "/" "a/b/c"\r\n'
            b"d OK LIST completed\r\n",
        )

    def test_delete_of_a_folder_with_subfolders_is_refused(self) -> None:
        """DELETE of a folder that has subfolders is NO [HASCHILDREN] (the subfolders would
        otherwise be cut off from the tree); without them it goes."""
        c = self.connect()
        self.login(c)
        c.send(b"a CREATE Work/Sub\r\nb DELETE Work\r\n")
        self.assertTrue(
            c.take().endswith(b"b NO [HASCHILDREN] Folder has subfolders; delete them first\r\n")
        )
        c.send(b'c DELETE Work/Sub\r\nd DELETE Work\r\ne LIST "" "Work*"\r\n')
        self.assertEqual(
            c.take(),
            b"c OK DELETE completed\r\nd OK DELETE completed\r\ne OK LIST completed\r\n",
        )


class CondstoreTests(IMAPTestCase):
    def test_modified_names_sequence_numbers_for_store_and_uids_for_uid_store(self) -> None:
        """STORE (UNCHANGEDSINCE) refusing a message changed since answers [MODIFIED] with
        its sequence number, UID STORE with its UID (RFC 7162 §3.1.3)."""
        self.add(message(1), message(2), message(3))
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"a STORE 1 +FLAGS.SILENT (\\Deleted)\r\nb EXPUNGE\r\n")
        c.take()  # UIDs 2 and 3 are now messages 1 and 2
        c.send(b"c FETCH 2 (MODSEQ)\r\n")
        modseq = int(re.search(rb"MODSEQ \((\d+)\)", c.take()).group(1))  # type: ignore[union-attr]
        c.send(b"d STORE 2 +FLAGS.SILENT ($Changed)\r\n")
        c.take()
        c.send(b"e STORE 2 (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Seen)\r\n" % modseq)
        self.assertTrue(c.take().endswith(b"e OK [MODIFIED 2] STORE completed\r\n"))
        c.send(b"f UID STORE 3 (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Seen)\r\n" % modseq)
        self.assertTrue(c.take().endswith(b"f OK [MODIFIED 3] STORE completed\r\n"))

    def test_first_condstore_enabling_command_reports_highestmodseq(self) -> None:
        """
        FETCH MODSEQ in a session that had not enabled CONDSTORE turns it on and first sends
        C{* OK [HIGHESTMODSEQ n]} (RFC 7162 §3.1), once; after SELECT (CONDSTORE), which
        told it already, nothing more.
        """
        self.add(message(1), message(2))
        d = self.connect()
        self.login(d)
        d.send(b"s SELECT INBOX (CONDSTORE)\r\n")
        m = re.search(rb"\* OK \[HIGHESTMODSEQ (\d+)\] Highest\r\n", d.take())
        assert m is not None
        highest = m.group(1)  # that of the last change: the APPEND of message 2
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"b FETCH 2 (MODSEQ)\r\n")
        first = c.take()
        self.assertRegex(
            first,
            rb"^\* OK \[HIGHESTMODSEQ " + highest + rb"\] Highest\r\n"
            rb"\* 2 FETCH \(MODSEQ \(" + highest + rb"\)\)\r\nb OK FETCH completed\r\n$",
        )
        c.send(b"c FETCH 1 (MODSEQ)\r\n")
        self.assertRegex(c.take(), rb"^\* 1 FETCH \(MODSEQ \(\d+\)\)\r\nc OK FETCH completed\r\n$")
        d.send(b"f FETCH 1 (MODSEQ)\r\n")
        self.assertRegex(d.take(), rb"^\* 1 FETCH \(MODSEQ \(\d+\)\)\r\nf OK FETCH completed\r\n$")

    def test_search_modseq_enables_condstore_too(self) -> None:
        """SEARCH MODSEQ is CONDSTORE-enabling as well (RFC 7162 §3.1): HIGHESTMODSEQ, then
        the result with the highest MODSEQ of the messages found (§3.1.5)."""
        self.add(message(1), message(2))
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"a SEARCH MODSEQ 1\r\n")
        self.assertRegex(
            c.take(),
            rb"^\* OK \[HIGHESTMODSEQ (\d+)\] Highest\r\n\* SEARCH 1 2 \(MODSEQ \1\)\r\n"
            rb"a OK SEARCH completed\r\n$",
        )

    def test_esearch_modseq_is_of_the_messages_returned(self) -> None:
        """
        ESEARCH with a MODSEQ criterion ends with MODSEQ (RFC 4731 §3.2): for MIN alone, of
        the lowest message; MAX alone, the highest; MIN and MAX, the higher of those two;
        otherwise (ALL, COUNT) the highest of all found. Nothing found or no MODSEQ criterion:
        no MODSEQ.
        """
        self.add(message(1), message(2), message(3), message(4))
        c = self.connect()
        self.login(c)
        c.send(b"a SELECT INBOX (CONDSTORE)\r\n")
        c.take()
        modseq = {}
        for n in (1, 3, 2, 4):  # the order of the changes: 2 gets a higher MODSEQ than 3
            c.send(b"s STORE %d +FLAGS.SILENT (\\Seen)\r\n" % n)
            m = re.search(rb"MODSEQ \((\d+)\)", c.take())
            assert m is not None
            modseq[n] = int(m.group(1))
        self.assertLess(modseq[3], modseq[2])
        queries = {
            b"RETURN (MIN) 1:3 MODSEQ 1": b"MIN 1 MODSEQ %d" % modseq[1],
            b"RETURN (MAX) 1:3 MODSEQ 1": b"MAX 3 MODSEQ %d" % modseq[3],
            b"RETURN () 1:3 MODSEQ 1": b"ALL 1:3 MODSEQ %d" % modseq[2],
            b"RETURN (MIN MAX) 1,3 MODSEQ 1": b"MIN 1 MAX 3 MODSEQ %d" % modseq[3],
            b"RETURN (COUNT) 1:3 MODSEQ 1": b"COUNT 3 MODSEQ %d" % modseq[2],
            b"RETURN (MIN) 1:3 SEEN": b"MIN 1",
            b"RETURN (MIN COUNT) 1:3 MODSEQ %d" % (modseq[4] + 1): b"COUNT 0",
        }
        for query, result in queries.items():
            c.send(b"q SEARCH " + query + b"\r\n")
            self.assertEqual(
                c.take(), b'* ESEARCH (TAG "q") ' + result + b"\r\nq OK SEARCH completed\r\n"
            )
        c.send(b"u UID SEARCH RETURN (MIN) 2:4 MODSEQ 1\r\n")
        self.assertEqual(
            c.take(),
            b'* ESEARCH (TAG "u") UID MIN 2 MODSEQ %d\r\nu OK SEARCH completed\r\n' % modseq[2],
        )


def uidvalidity(out: bytes) -> bytes:
    m = re.search(rb"\[UIDVALIDITY (\d+)\]", out)
    assert m is not None, out
    return m.group(1)


class RecentTests(IMAPTestCase):
    """\\Recent (RFC 3501 §2.3.2): each message is recent in one read-write session only."""

    def test_second_session_sees_no_recent_and_new_mail_goes_to_the_first_to_look(self) -> None:
        self.add(message(1), message(2))
        a, b = self.connect(), self.connect()
        self.login(a)
        self.login(b)
        a.send(b"s SELECT INBOX\r\n")
        self.assertTrue(a.take().startswith(b"* 2 EXISTS\r\n* 2 RECENT\r\n* FLAGS "))
        b.send(b"s SELECT INBOX\r\n")
        self.assertTrue(b.take().startswith(b"* 2 EXISTS\r\n* 0 RECENT\r\n* FLAGS "))
        a.send(b"f FETCH 1:2 (FLAGS)\r\n")
        self.assertEqual(
            a.take(),
            b"* 1 FETCH (FLAGS (\\Recent))\r\n* 2 FETCH (FLAGS (\\Recent))\r\n"
            b"f OK FETCH completed\r\n",
        )
        b.send(b"f FETCH 1:2 (FLAGS)\r\n")
        self.assertEqual(
            b.take(), b"* 1 FETCH (FLAGS ())\r\n* 2 FETCH (FLAGS ())\r\nf OK FETCH completed\r\n"
        )
        # A new message is recent in the session that looks first (here B), not in A.
        self.add(message(3))
        b.send(b"n NOOP\r\n")
        self.assertEqual(b.take(), b"* 3 EXISTS\r\n* 1 RECENT\r\nn OK NOOP completed\r\n")
        a.send(b"n NOOP\r\nf FETCH 3 (FLAGS)\r\n")
        self.assertEqual(
            a.take(),
            b"* 3 EXISTS\r\n* 2 RECENT\r\nn OK NOOP completed\r\n"
            b"* 3 FETCH (FLAGS ())\r\nf OK FETCH completed\r\n",
        )
        # Selecting again: all three were claimed, none is recent any more.
        a.send(b"s SELECT INBOX\r\n")
        self.assertTrue(a.take().startswith(b"* 3 EXISTS\r\n* 0 RECENT\r\n"))

    def test_examine_sees_unclaimed_messages_recent_and_claims_nothing(self) -> None:
        """EXAMINE shows the messages no session has claimed as \\Recent, new ones too, but
        leaves them recent (RFC 3501 §6.3.2): a later SELECT still claims them all."""
        self.add(message(1), message(2))
        e = self.connect()
        self.login(e)
        e.send(b"e EXAMINE INBOX\r\n")
        self.assertTrue(e.take().startswith(b"* 2 EXISTS\r\n* 2 RECENT\r\n* FLAGS "))
        self.add(message(3))
        e.send(b"n NOOP\r\nf FETCH 3 (FLAGS)\r\n")
        self.assertEqual(
            e.take(),
            b"* 3 EXISTS\r\n* 3 RECENT\r\nn OK NOOP completed\r\n"
            b"* 3 FETCH (FLAGS (\\Recent))\r\nf OK FETCH completed\r\n",
        )
        s = self.connect()
        self.login(s)
        s.send(b"s SELECT INBOX\r\n")
        self.assertTrue(s.take().startswith(b"* 3 EXISTS\r\n* 3 RECENT\r\n"))
        # Claimed now: a new EXAMINE sees none recent.
        e2 = self.connect()
        self.login(e2)
        e2.send(b"e EXAMINE INBOX\r\n")
        self.assertTrue(e2.take().startswith(b"* 3 EXISTS\r\n* 0 RECENT\r\n"))
        # A message that arrives now goes to whichever looks first; EXAMINE sees it while
        # it is unclaimed (no RECENT line without an EXISTS when nothing changed).
        self.add(message(4))
        e2.send(b"n NOOP\r\n")
        self.assertEqual(e2.take(), b"* 4 EXISTS\r\n* 1 RECENT\r\nn OK NOOP completed\r\n")
        s.send(b"n NOOP\r\n")
        self.assertEqual(s.take(), b"* 4 EXISTS\r\n* 4 RECENT\r\nn OK NOOP completed\r\n")

    def test_status_recent_counts_unclaimed_messages(self) -> None:
        """STATUS RECENT: the messages no session has claimed; of the selected folder, the
        session's own recent messages."""
        self.add(message(1), message(2))
        a, b = self.connect(), self.connect()
        self.login(a)
        self.login(b)
        a.send(b"a STATUS INBOX (MESSAGES RECENT)\r\n")
        self.assertEqual(
            a.take(), b'* STATUS "INBOX" (MESSAGES 2 RECENT 2)\r\na OK STATUS completed\r\n'
        )
        a.send(b"b EXAMINE INBOX\r\nc STATUS INBOX (RECENT)\r\n")
        self.assertTrue(
            a.take().endswith(b'* STATUS "INBOX" (RECENT 2)\r\nc OK STATUS completed\r\n')
        )
        b.send(b"d STATUS INBOX (RECENT)\r\n")  # EXAMINE claimed nothing
        self.assertEqual(b.take(), b'* STATUS "INBOX" (RECENT 2)\r\nd OK STATUS completed\r\n')
        a.send(b"e SELECT INBOX\r\nf STATUS INBOX (RECENT)\r\n")
        self.assertTrue(
            a.take().endswith(b'* STATUS "INBOX" (RECENT 2)\r\nf OK STATUS completed\r\n')
        )
        b.send(b"g STATUS INBOX (MESSAGES RECENT)\r\n")
        self.assertEqual(
            b.take(), b'* STATUS "INBOX" (MESSAGES 2 RECENT 0)\r\ng OK STATUS completed\r\n'
        )
        self.add(message(3))
        b.send(b"h STATUS INBOX (MESSAGES RECENT)\r\n")
        self.assertEqual(
            b.take(), b'* STATUS "INBOX" (MESSAGES 3 RECENT 1)\r\nh OK STATUS completed\r\n'
        )

    def test_search_recent_new_and_old(self) -> None:
        """RECENT: recent in this session; OLD: not; NEW: recent and unseen (§6.4.4)."""
        self.add(message(1), message(2))
        c = self.connect()
        self.login(c, INBOX)  # claims 1 and 2
        c.send(b"u UNSELECT\r\n")
        c.take()
        self.add(message(3), message(4), message(5))
        c.send(b"s SELECT INBOX\r\nt STORE 4 +FLAGS.SILENT (\\Seen)\r\n")  # claims 3 to 5
        c.take()
        for query, found in (
            (b"SEARCH RECENT", b"3 4 5"),
            (b"SEARCH NEW", b"3 5"),
            (b"SEARCH OLD", b"1 2"),
            (b"SEARCH NOT RECENT", b"1 2"),
            (b"SEARCH OR OLD SEEN", b"1 2 4"),
            (b"UID SEARCH RECENT 4:*", b"4 5"),
        ):
            c.send(b"q " + query + b"\r\n")
            self.assertEqual(c.take(), b"* SEARCH " + found + b"\r\nq OK SEARCH completed\r\n")


class KeywordFlagsTests(IMAPTestCase):
    """FLAGS and PERMANENTFLAGS list the keywords in use, and are sent again before any
    response that shows a keyword the client was not told of (RFC 3501 §7.2.6)."""

    FLAGS = b"\\Answered \\Flagged \\Deleted \\Seen \\Draft"

    def flags(self, *words: bytes) -> bytes:
        every = b" ".join((self.FLAGS, *words))
        return (
            b"* FLAGS (" + every + b")\r\n"
            b"* OK [PERMANENTFLAGS (" + every + b" \\*)] Flags permitted\r\n"
        )

    def test_new_keyword_sends_flags_before_the_fetch(self) -> None:
        self.add(message(1), message(2))
        a, b = self.connect(), self.connect()
        self.login(a, INBOX)
        self.login(b, INBOX)
        a.send(b"s STORE 1 +FLAGS ($Work)\r\n")
        self.assertEqual(
            a.take(),
            self.flags(b"$Work")
            + b"* 1 FETCH (FLAGS (\\Recent $Work))\r\ns OK STORE completed\r\n",
        )
        a.send(b"t STORE 2 +FLAGS ($Work)\r\n")  # known now: no FLAGS
        self.assertEqual(
            a.take(), b"* 2 FETCH (FLAGS (\\Recent $Work))\r\nt OK STORE completed\r\n"
        )
        # The other session learns of it before the FETCH that shows it.
        b.send(b"n NOOP\r\n")
        self.assertEqual(
            b.take(),
            self.flags(b"$Work") + b"* 1 FETCH (FLAGS ($Work))\r\n* 2 FETCH (FLAGS ($Work))\r\n"
            b"n OK NOOP completed\r\n",
        )
        # APPEND with a new keyword into the selected folder: FLAGS before EXISTS.
        a.send(b"x APPEND INBOX (Later) {%d}\r\n" % len(message(3)))
        self.assertEqual(a.take(), b"+ Ready for literal data\r\n")
        a.send(message(3) + b"\r\n")
        self.assertRegex(
            a.take(),
            re.escape(self.flags(b"$Work", b"Later") + b"* 3 EXISTS\r\n* 3 RECENT\r\n")
            + rb"x OK \[APPENDUID \d+ 3\] APPEND completed\r\n$",
        )
        # A new session's SELECT lists both.
        c = self.connect()
        self.login(c)
        c.send(b"s SELECT INBOX\r\n")
        out = c.take()
        self.assertIn(b"* 0 RECENT\r\n" + self.flags(b"$Work", b"Later"), out)

    def test_another_sessions_keyword_shown_by_own_store_or_fetch_comes_after_flags(self) -> None:
        """
        B sets keywords A was not told of; A's own STORE (and FETCH that sets \\Seen) on
        those messages, before any NOOP, shows the message's flags as they are now, B's
        keywords with them: FLAGS and PERMANENTFLAGS come first (imaptest's stress test
        checks this: "Keyword used without being in FLAGS").
        """
        self.add(message(1), message(2))
        a, b = self.connect(), self.connect()
        self.login(a, INBOX)
        self.login(b, INBOX)
        b.send(b"s STORE 1 +FLAGS.SILENT ($Other)\r\nt STORE 2 +FLAGS.SILENT ($Third)\r\n")
        b.take()
        a.send(b"x STORE 1 +FLAGS (\\Seen)\r\n")
        self.assertEqual(
            a.take(),
            self.flags(b"$Other")
            + b"* 1 FETCH (FLAGS (\\Recent \\Seen $Other))\r\nx OK STORE completed\r\n",
        )
        a.send(b"y FETCH 2 (BODY[TEXT])\r\nz NOOP\r\n")
        self.assertEqual(
            a.take(),
            self.flags(b"$Other", b"$Third")
            + b"* 2 FETCH (BODY[TEXT] {8}\r\nbody 2\r\n FLAGS (\\Recent \\Seen $Third))\r\n"
            b"y OK FETCH completed\r\nz OK NOOP completed\r\n",
        )

    def test_keyword_named_by_a_store_that_changes_nothing_is_in_flags(self) -> None:
        """A STORE naming a keyword adds it to FLAGS even when no message changed (-FLAGS of
        a keyword nobody has), as Dovecot does; imaptest checks for it after every STORE."""
        self.add(message(1))
        c = self.connect()
        self.login(c, INBOX)
        c.send(b"s STORE 1 -FLAGS ($Never)\r\nt STORE 1 -FLAGS ($Never)\r\n")
        self.assertEqual(
            c.take(),
            self.flags(b"$Never") + b"* 1 FETCH (FLAGS (\\Recent))\r\ns OK STORE completed\r\n"
            b"* 1 FETCH (FLAGS (\\Recent))\r\nt OK STORE completed\r\n",
        )


class MailboxNameTests(IMAPTestCase):
    def test_invalid_modified_utf7_name_is_no(self) -> None:
        """
        A mailbox name that is no valid modified UTF-7 (RFC 3501 §5.1.3) is a well-formed
        command naming no mailbox: NO (not BAD, not counted as an error); LIST and LSUB
        match nothing; a SELECT that fails so leaves no mailbox selected (§6.3.1).
        """
        self.add(message(1))
        c = self.connect(max_errors=1)
        self.login(c, INBOX)
        c.send(
            b'a CREATE "&Jjo"\r\nb STATUS "Bad&Name" (MESSAGES)\r\nc LIST "" "&Jjo"\r\n'
            b'd LSUB "" "*&AGE-*"\r\ne SELECT "&AGE-"\r\nf FETCH 1 (FLAGS)\r\n'
        )
        no = b" NO [CANNOT] mailbox name is not valid modified UTF-7\r\n"
        self.assertEqual(
            c.take(),
            b"a" + no + b"b" + no + b"c OK LIST completed\r\nd OK LSUB completed\r\n"
            b"e" + no + b"f BAD FETCH not allowed now\r\n",
        )
        self.assertFalse(c.closed)
        c.send(b'g CREATE "&AOk-t&AOk-"\r\nh LIST "" "&AOk-t&AOk-"\r\n')  # "été": valid
        self.assertEqual(
            c.take(),
            b'g OK CREATE completed\r\n* LIST (\\HasNoChildren) "/" "&AOk-t&AOk-"\r\n'
            b"h OK LIST completed\r\n",
        )


class SearchAddressTests(IMAPTestCase):
    def test_from_to_match_the_address_without_comments(self) -> None:
        """FROM/TO/CC/BCC match the addresses as the envelope gives them (comments out,
        C{mailbox@host} rebuilt) and the display names, in part and in any case."""
        self.add(
            b"From: <user-from (comment)@ (comment) domain.org>\r\n"
            b"To: Real To <user-to (x)@domain.org>\r\nCc: (c) carol@cc.example\r\n"
            b"Subject: one\r\n\r\nbody\r\n",
            b"From: RealFrom <other@example.com>\r\nTo: user-to@domain.org\r\n"
            b"Subject: two\r\n\r\nbody\r\n",
        )
        c = self.connect()
        self.login(c, INBOX)
        for query, found in (
            (b"FROM user-from@domain.org", b" 1"),
            (b"FROM SER-FROM@DOMAIN", b" 1"),
            (b"FROM realfrom", b" 2"),
            (b"FROM other@example.com", b" 2"),
            (b"TO user-to@domain.org", b" 1 2"),
            (b'TO "real to"', b" 1"),
            (b"CC carol@cc.example", b" 1"),
            (b"FROM nobody@domain.org", b""),
            (b"BCC user-to", b""),
        ):
            c.send(b"q SEARCH " + query + b"\r\n")
            self.assertEqual(
                c.take(), b"* SEARCH" + found + b"\r\nq OK SEARCH completed\r\n", query
            )


class MoveTests(IMAPTestCase):
    def test_move_into_the_selected_folder_gives_new_uids(self) -> None:
        """MOVE (and UID MOVE) to the folder itself: the messages get new UIDs, told by
        COPYUID before the EXPUNGE; they come back at the end, recent in this session. A
        UID MOVE that names no message moves nothing and says so with no untagged OK."""
        self.add(message(1), message(2), message(3))
        c = self.connect()
        self.login(c)
        c.send(b"s SELECT INBOX\r\n")
        v = uidvalidity(c.take())
        c.send(b"m MOVE 1 INBOX\r\n")
        self.assertEqual(
            c.take(),
            b"* OK [COPYUID " + v + b" 1 4] Moved\r\n* 1 EXPUNGE\r\n* 3 EXISTS\r\n"
            b"* 3 RECENT\r\nm OK MOVE completed\r\n",
        )
        c.send(b"u UID MOVE 2:3 INBOX\r\n")
        self.assertEqual(
            c.take(),
            b"* OK [COPYUID " + v + b" 2:3 5:6] Moved\r\n* 2 EXPUNGE\r\n* 1 EXPUNGE\r\n"
            b"* 3 EXISTS\r\n* 3 RECENT\r\nu OK MOVE completed\r\n",
        )
        c.send(b"n UID MOVE 99 Trash\r\n")  # no such UID: nothing moved, no COPYUID
        self.assertEqual(c.take(), b"n OK MOVE completed\r\n")
        c.send(b"f FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
        subjects = re.findall(
            rb"UID (\d+) BODY\[HEADER.FIELDS \(SUBJECT\)\] \{\d+\}\r\n([^\r]*)", c.take()
        )
        self.assertEqual(
            subjects,
            [
                (b"4", b"Subject: message 1"),
                (b"5", b"Subject: message 2"),
                (b"6", b"Subject: message 3"),
            ],
        )


class IncrementalRefreshTests(IMAPTestCase):
    """A selected session's refresh applies what changed (never reads the whole folder), and
    sessions on one folder share the store's state."""

    def refuse_full_reads(self) -> None:
        def refuse(*args: object) -> None:
            raise AssertionError("the whole folder was read")

        self.patch(MailIndex, "state", refuse)

    def test_sessions_see_each_others_changes(self) -> None:
        """
        Flag changes, an expunge and a new message, all in one refresh, reach the other
        session as before (EXPUNGE first, then FETCH FLAGS renumbered, then EXISTS, RECENT),
        and both sessions hold the same state afterwards.
        """
        self.add(message(1), message(2), message(3))
        a, b = self.connect(), self.connect()
        self.login(a, INBOX)
        self.login(b, INBOX)
        box_a, box_b = a.protocol._box, b.protocol._box
        assert box_a is not None and box_b is not None
        self.assertIs(box_a.state, box_b.state)
        self.refuse_full_reads()
        b.send(b"x STORE 1 +FLAGS.SILENT (\\Flagged)\r\n")
        b.take()
        a.send(b"n NOOP\r\n")
        self.assertEqual(
            a.take(), b"* 1 FETCH (FLAGS (\\Flagged \\Recent))\r\nn OK NOOP completed\r\n"
        )
        b.send(b"x STORE 2 +FLAGS.SILENT (\\Deleted)\r\ny STORE 3 +FLAGS.SILENT (\\Seen)\r\n")
        b.send(b"z EXPUNGE\r\n")
        self.assertIn(b"* 2 EXPUNGE\r\n", b.take())
        self.add(message(4))
        a.send(b"n NOOP\r\n")
        self.assertEqual(
            a.take(),
            b"* 2 EXPUNGE\r\n* 2 FETCH (FLAGS (\\Recent \\Seen))\r\n"
            b"* 3 EXISTS\r\n* 3 RECENT\r\nn OK NOOP completed\r\n",
        )
        b.send(b"n NOOP\r\n")
        self.assertEqual(b.take(), b"* 3 EXISTS\r\n* 0 RECENT\r\nn OK NOOP completed\r\n")
        self.assertIs(box_a.state, box_b.state)
        self.assertEqual(list(box_a.uids), [1, 3, 4])

    def test_expunge_held_back_with_a_new_message(self) -> None:
        """An expunge held back by SEARCH while a message arrives: EXISTS counts the held
        message (the new one is number 4), and the next NOOP announces the expunge."""
        self.add(message(1), message(2), message(3))
        a, b = self.connect(), self.connect()
        self.login(a, INBOX)
        self.login(b, INBOX)
        self.refuse_full_reads()
        b.send(b"x STORE 2 +FLAGS.SILENT (\\Deleted)\r\ny EXPUNGE\r\n")
        b.take()
        self.add(message(4))
        a.send(b"s SEARCH ALL\r\n")
        self.assertEqual(
            a.take(), b"* SEARCH 1 2 3\r\n* 4 EXISTS\r\n* 4 RECENT\r\ns OK SEARCH completed\r\n"
        )
        a.send(b"f FETCH 4 (UID FLAGS)\r\n")
        self.assertEqual(
            a.take(), b"* 4 FETCH (UID 4 FLAGS (\\Recent))\r\nf OK FETCH completed\r\n"
        )
        a.send(b"n NOOP\r\n")
        self.assertEqual(a.take(), b"* 2 EXPUNGE\r\n* 3 RECENT\r\nn OK NOOP completed\r\n")
        box_a, box_b = a.protocol._box, b.protocol._box
        assert box_a is not None and box_b is not None
        b.send(b"n NOOP\r\n")
        b.take()
        self.assertIs(box_a.state, box_b.state)

    def test_index_rebuilt_under_a_selected_session(self) -> None:
        """The index lost and rebuilt (a new UIDVALIDITY): the selected session is told BYE
        and disconnected, since its UIDs mean nothing now."""
        self.add(message(1), message(2))
        a = self.connect()
        self.login(a, INBOX)
        self.store.close()
        index = mailbox_path(self.root, ALICE) / "index.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(str(index) + suffix).unlink(missing_ok=True)
        a.send(b"n NOOP\r\n")
        self.assertIn(b"* BYE Selected mailbox UIDVALIDITY changed", a.take())
        self.assertTrue(a.closed)
