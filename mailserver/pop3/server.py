# -*- test-case-name: tests.test_pop3_server -*-
"""
The POP3 server protocol: RFC 1939, with CAPA and response codes (RFC 2449), STLS (RFC 2595)
and SASL PLAIN (RFC 5034, RFC 4616).

Like the SMTP server, this is our own protocol on C{Protocol}: replies to pipelined commands
leave together, a multi-line response leaves in one write when it is small (a reply split over
two writes stalls on Nagle and delayed ACKs, which is what makes stock twistd's POP3 slow), and a
large message is streamed from its file by a producer, so memory stays flat whatever its size.
The protocol never opens a mailbox itself: it calls the C{authenticate} and C{open_mailbox}
callables it is given; it reads message files by the paths the mailbox hands out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from mailserver import log
from mailserver.auth import LoginFailed, Throttled
from mailserver.limits import ConnectionLimiter
from mailserver.sessions import SessionTracker
from mailserver.transport import pause, set_nodelay, write_now

TLSMode = Literal["starttls", "implicit", "none"]

_AUTHORIZATION, _TRANSACTION, _CLOSED = range(3)
_INLINE_LIMIT = 256 * 1024  # messages up to this size are read and sent in one write
_CHUNK = 64 * 1024
_ID_PREFIX = secrets.token_hex(3)
_ids = itertools.count(1)


class MessageRef(TypingProtocol):
    """What POP3 needs of one message in a mailbox snapshot."""

    @property
    def uid(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...


class MailboxView(TypingProtocol):
    """What POP3 needs of a mailbox: a snapshot, file paths, and expunge at QUIT."""

    @property
    def messages(self) -> Sequence[MessageRef]: ...

    def path(self, uid: int) -> str | os.PathLike[str]: ...

    def expunge(self, uids: Sequence[int]) -> Deferred[Any]: ...


Authenticate = Callable[[str, str, str], "Deferred[str]"]
"""C{authenticate(peer_host, username, password)} fires with the account address, or fails
with L{Throttled} or L{LoginFailed}."""

OpenMailbox = Callable[[str], "Deferred[MailboxView]"]


@dataclass(frozen=True, slots=True)
class POP3Settings:
    """What one POP3 listener needs to know; built from the config by the composition root."""

    hostname: str
    tls_mode: TLSMode = "starttls"
    allow_plaintext_auth: bool = False
    max_line: int = 1024
    idle_timeout: float = 600.0
    max_errors: int = 10


class MailboxLocks:
    """The accounts that have a POP3 session in the TRANSACTION state (RFC 1939 §8)."""

    def __init__(self) -> None:
        self.held: set[str] = set()


def unique_id(name: str) -> str:
    """
    The UIDL of a message: its maildir base name, which never changes (not even when the index
    is rebuilt), or a digest of it when it is too long or has characters RFC 1939 §7 forbids.
    """
    if len(name) <= 70 and all(0x21 <= ord(ch) <= 0x7E for ch in name):
        return name
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:64]


def dot_stuff(data: bytes, at_line_start: bool) -> bytes:
    """
    Dot-stuff message octets (RFC 1939 §3): a line that starts with C{.} gets another one.
    Bare LFs (a message placed in the maildir by hand) become CRLF.
    """
    if data.count(b"\n") != data.count(b"\r\n"):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if at_line_start and data[:1] == b".":
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


class POP3Factory(Factory):
    """Builds one L{POP3Server} per connection of a listener."""

    def __init__(
        self,
        settings: POP3Settings,
        authenticate: Authenticate,
        open_mailbox: OpenMailbox,
        clock: IReactorTime,
        limiter: ConnectionLimiter,
        locks: MailboxLocks,
        tls: object | None = None,
        tracker: SessionTracker | None = None,
    ) -> None:
        self.settings = settings
        self.authenticate = authenticate
        self.open_mailbox = open_mailbox
        self.clock = clock
        self.limiter = limiter
        self.locks = locks
        self.tls = tls
        self.tracker = tracker if tracker is not None else SessionTracker()

    @override
    def buildProtocol(self, addr: object) -> POP3Server:
        return POP3Server(self)


@implementer(IPushProducer)
class _FileStreamer:
    """Streams one large message file to the transport, dot-stuffed, with backpressure."""

    def __init__(
        self,
        server: POP3Server,
        path: str | os.PathLike[str],
        done: Callable[[], None],
        limit: int | None = None,
    ) -> None:
        self._server = server
        self._file = open(path, "rb")  # noqa: SIM115
        self._left = limit  # octets of the file still to send (TOP), or None: all
        self._at_line_start = True
        self._held = b""  # a CR that ended the last chunk: its LF may start the next one
        self._paused = False
        self._done = done
        self._finished = False

    def start(self) -> None:
        transport: Any = self._server.transport
        assert transport is not None
        transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        transport = self._server.transport
        self._server.made_progress()
        while not self._paused and not self._finished and transport is not None:
            if self._left is None:
                chunk = self._file.read(_CHUNK)
            else:
                chunk = self._file.read(min(_CHUNK, self._left))
                self._left -= len(chunk)
            if not chunk:
                self._finish(transport)
                return
            chunk = self._held + chunk
            # Stuff whole line ends only: "\r" + "\n." seen apart would be a bare LF and an
            # unstuffed dot.
            self._held = b"\r" if chunk.endswith(b"\r") else b""
            if self._held:
                chunk = chunk[:-1]
                if not chunk:
                    continue
            transport.write(dot_stuff(chunk, self._at_line_start))
            self._at_line_start = chunk.endswith(b"\n")

    def stopProducing(self) -> None:
        self._finished = True
        self._file.close()

    def _finish(self, transport: Any) -> None:
        self._finished = True
        self._file.close()
        end = b".\r\n" if self._at_line_start and not self._held else self._held + b"\r\n.\r\n"
        transport.unregisterProducer()
        transport.write(end)
        self._done()


class POP3Server(Protocol):
    """One POP3 session."""

    def __init__(self, factory: POP3Factory) -> None:
        self._f = factory
        self._s = factory.settings
        self._clock = factory.clock
        self.session = f"{_ID_PREFIX}p{next(_ids):06x}"
        self.peer = "unknown"
        self._counted = False
        self._state = _AUTHORIZATION
        self._buf = b""
        self._out: list[bytes] = []
        self._busy = False
        self._streaming = False
        self._closed: Deferred[None] | None = None
        self._prefetch_next = 0  # message number worth reading ahead (0: none)
        self._prefetched: tuple[int, bytes] | None = None  # (number, framed RETR answer)
        self._paused = False  # reading stopped while a reply waits (backpressure)
        self._processing = False
        self._skip_line = False
        self._errors = 0
        self._tls = factory.settings.tls_mode == "implicit"
        self._user: str | None = None
        self._account: str | None = None
        self._mailbox: MailboxView | None = None
        self._messages: Sequence[MessageRef] = ()
        self._deleted: set[int] = set()  # 1-based message numbers
        self._expunging = False
        self._sasl: bool = False  # waiting for the client's SASL PLAIN response line
        self._last_input = 0.0
        self._timer: IDelayedCall | None = None

    # -- connection ------------------------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = str(getattr(self.transport.getPeer(), "host", "unknown"))
        set_nodelay(self.transport)
        refused = self._f.limiter.acquire(self.peer)
        if refused is not None:
            log.connection_refused(self.peer, refused)
            write_now(self.transport, b"-ERR [SYS/TEMP] Too many connections, try later\r\n")
            self._state = _CLOSED
            self.transport.loseConnection()
            return
        self._counted = True
        self._f.tracker.sessions.add(self)
        self._last_input = self._clock.seconds()
        self._timer = self._clock.callLater(self._s.idle_timeout, self._check_idle)
        write_now(self.transport, b"+OK " + self._s.hostname.encode() + b" POP3 ready\r\n")

    @override
    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._state = _CLOSED
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._counted:
            self._counted = False
            self._f.limiter.release(self.peer)
            self._f.tracker.sessions.discard(self)
        if not self._expunging:
            self._release_lock()  # else when the expunge is over: nobody sees half of it
        if self._closed is not None:
            d, self._closed = self._closed, None
            d.callback(None)

    # -- graceful stop ---------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """The deletions of a QUIT are being made."""
        return self._expunging

    def shutdown(self) -> Deferred[None]:
        """
        Close for a server stop: a session in TRANSACTION state is dropped without entering
        UPDATE (nothing is deleted, RFC 1939 §6); a QUIT's deletions under way finish first.
        """
        if self._state == _CLOSED:
            return succeed(None)
        self._closed = Deferred()
        if not self._expunging:
            self._close_with(b"-ERR [SYS/TEMP] Server shutting down\r\n")
        return self._closed

    def abort_now(self) -> None:
        if self.transport is not None and self._state != _CLOSED:
            self._close_with(b"-ERR [SYS/TEMP] Server shutting down\r\n")

    def _release_lock(self) -> None:
        # A dropped connection deletes nothing (RFC 1939 §6): only QUIT enters UPDATE.
        if self._account is not None:
            self._f.locks.held.discard(self._account)
            self._account = None

    def _check_idle(self) -> None:
        self._timer = None
        if self._state == _CLOSED:
            return
        elapsed = self._clock.seconds() - self._last_input
        # Waiting on our own work (a password check, the deletions) is not idleness; a
        # download counts as activity only while the client reads it (made_progress).
        waiting = self._busy and not self._streaming
        if waiting or elapsed < self._s.idle_timeout:
            self._timer = self._clock.callLater(
                max(self._s.idle_timeout - elapsed, 1.0), self._check_idle
            )
            return
        self._close_with(b"-ERR [SYS/TEMP] Idle timeout, closing\r\n")

    def made_progress(self) -> None:
        """The client is reading what we send (a large message): that is not idleness."""
        self._last_input = self._clock.seconds()

    def _close_with(self, line: bytes) -> None:
        assert self.transport is not None
        self._out.append(line)
        self._flush()
        self._state = _CLOSED
        self.transport.loseConnection()

    # -- input -----------------------------------------------------------------------------

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._state == _CLOSED:
            return
        self._last_input = self._clock.seconds()
        self._buf = self._buf + data if self._buf else data
        if self._busy and not self._paused:
            # More input while a login, a stream or an expunge is under way: stop reading, so
            # TCP pushes back on a client that keeps sending instead of our buffer growing.
            self._paused = True
            pause(self.transport, True)
        self._process()
        self._flush()
        if self._prefetch_next:
            self._prefetch()

    def _flush(self) -> None:
        if self._out and self.transport is not None:
            out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out = []
            write_now(self.transport, out)

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._buf and not self._busy and self._state != _CLOSED:
                if not self._next_line():
                    return
        finally:
            self._processing = False

    def _next_line(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n")
        if self._skip_line:
            if end < 0:
                self._buf = b"\r" if buf.endswith(b"\r") else b""
                return False
            self._skip_line = False
            self._buf = buf[end + 2 :]
            return True
        if end < 0:
            if len(buf) > self._s.max_line:
                self._buf = b"\r" if buf.endswith(b"\r") else b""
                self._skip_line = True
                self._error("Line too long")
            return False
        line = buf[:end]
        self._buf = buf[end + 2 :]
        if end + 2 > self._s.max_line:
            self._error("Line too long")
            return True
        self._line(line)
        return True

    def _line(self, raw: bytes) -> None:
        if self._sasl:
            self._sasl = False
            self._sasl_response(raw)
            return
        if b"\x00" in raw or b"\n" in raw or b"\r" in raw:
            self._error("Bad characters in command")
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error("Command is not valid UTF-8")
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handlers = _AUTH_COMMANDS if self._state == _AUTHORIZATION else _TRANSACTION_COMMANDS
        handler = handlers.get(verb)
        if handler is None:
            if verb in _AUTH_COMMANDS or verb in _TRANSACTION_COMMANDS:
                self._error(f"{verb} not allowed now")
            else:
                self._error("Unknown command")
            return
        try:
            handler(self, arg)
        except Exception:
            log.internal_error(self.session, self.peer, verb, Failure())
            self._out.append(
                b"-ERR [SYS/TEMP] Internal error, session " + self.session.encode() + b"\r\n"
            )

    def _ok(self, text: str = "") -> None:
        self._out.append(b"+OK " + text.encode("utf-8") + b"\r\n" if text else b"+OK\r\n")

    def _err(self, text: str, code: str = "") -> None:
        prefix = f"[{code}] " if code else ""
        self._out.append(f"-ERR {prefix}{text}\r\n".encode())

    def _error(self, text: str) -> None:
        """A bad command: -ERR, counted toward the error budget."""
        self._sasl = False
        self._errors += 1
        if self._errors > self._s.max_errors:
            self._close_with(b"-ERR Too many errors, closing\r\n")
            return
        self._err(text)

    # -- AUTHORIZATION ---------------------------------------------------------------------

    def _auth_allowed(self) -> bool:
        return self._tls or self._s.allow_plaintext_auth

    def _stls_available(self) -> bool:
        return (
            self._s.tls_mode == "starttls"
            and not self._tls
            and self._f.tls is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def _capa(self, arg: str) -> None:
        caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._state == _AUTHORIZATION:
            if self._auth_allowed():
                caps += ["USER", "SASL PLAIN"]
            if self._stls_available():
                caps.append("STLS")
        caps.append("IMPLEMENTATION mailserver")
        self._out.append(
            b"+OK Capability list follows\r\n"
            + "".join(f"{c}\r\n" for c in caps).encode()
            + b".\r\n"
        )

    def _user_cmd(self, arg: str) -> None:
        if not self._auth_allowed():
            self._err("Plaintext authentication disallowed without TLS; use STLS", "AUTH")
            return
        name = arg.strip()
        if not name:
            self._error("USER needs a name")
            return
        self._user = name
        self._ok("Send PASS")

    def _pass_cmd(self, arg: str) -> None:
        if not self._auth_allowed():
            self._err("Plaintext authentication disallowed without TLS; use STLS", "AUTH")
            return
        if self._user is None:
            self._error("USER first")
            return
        user, self._user = self._user, None
        self._login(user, arg)

    def _auth_cmd(self, arg: str) -> None:
        words = arg.split()
        if not words:
            # RFC 5034 §4: AUTH with no argument lists the mechanisms (as CAPA's SASL line).
            self._out.append(b"+OK\r\nPLAIN\r\n.\r\n" if self._auth_allowed() else b"+OK\r\n.\r\n")
            return
        if not self._auth_allowed():
            self._err("Plaintext authentication disallowed without TLS; use STLS", "AUTH")
            return
        if words[0].upper() != "PLAIN" or len(words) > 2:
            self._err("Unsupported mechanism")
            return
        if len(words) == 2:
            self._sasl_response(words[1].encode("ascii", "replace"))
            return
        self._sasl = True
        self._out.append(b"+ \r\n")

    def _sasl_response(self, raw: bytes) -> None:
        if raw == b"*":
            self._err("Authentication cancelled")
            return
        try:
            decoded = base64.b64decode(raw, validate=True) if raw != b"=" else b""
            authzid, authcid, password = decoded.split(b"\x00")
            user = authcid.decode("utf-8")
            secret = password.decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            self._error("Malformed SASL PLAIN response")
            return
        if authzid and authzid != authcid:
            self._err("Authorization identity must be empty or the user", "AUTH")
            return
        self._login(user, secret)

    def _login(self, user: str, password: str) -> None:
        self._busy = True
        d = maybeDeferred(self._f.authenticate, self.peer, user, password)
        d.addCallbacks(self._authenticated, self._auth_failed)
        d.addErrback(self._internal, "login")
        d.addBoth(self._resume)

    def _auth_failed(self, f: Failure) -> None:
        if f.check(Throttled):
            self._err("Too many failed logins; try again later", "SYS/TEMP")
        elif f.check(LoginFailed):
            self._err("Authentication failed", "AUTH")
        else:
            f.raiseException()

    def _authenticated(self, account: str) -> Deferred[None] | None:
        if self._state == _CLOSED:
            return None  # the client left while we checked: take no lock nobody will release
        if account in self._f.locks.held:
            self._err("Mailbox is locked by another POP3 session", "IN-USE")
            return None
        self._f.locks.held.add(account)
        self._account = account
        d = maybeDeferred(self._f.open_mailbox, account)

        def opened(mailbox: MailboxView) -> None:
            if self._state == _CLOSED:
                return
            self._mailbox = mailbox
            self._messages = list(mailbox.messages)
            self._state = _TRANSACTION
            self._ok(f"Logged in, {len(self._messages)} messages")

        def failed(f: Failure) -> None:
            self._release_lock()
            log.internal_error(self.session, self.peer, "open mailbox", f)
            self._err("Mailbox unavailable, try later", "SYS/TEMP")

        return d.addCallbacks(opened, failed)

    def _internal(self, f: Failure, what: str) -> None:
        log.internal_error(self.session, self.peer, what, f)
        self._err(f"Internal error, session {self.session}", "SYS/TEMP")

    def _resume(self, _: object) -> None:
        self._busy = False
        if self._state == _CLOSED or self.transport is None:
            self._out = []
            return
        if self._paused:
            self._paused = False
            pause(self.transport, False)
        self._last_input = self._clock.seconds()
        if not self._processing:
            self._process()
            self._flush()

    def _stls(self, arg: str) -> None:
        if self._tls:
            self._err("TLS already active")
            return
        if not self._stls_available():
            self._err("STLS not available")
            return
        self._buf = b""  # RFC 2595 §4 / CVE-2011-0411: nothing pipelined survives into TLS
        self._ok("Begin TLS negotiation")
        self._flush()
        assert self.transport is not None
        self.transport.startTLS(self._f.tls)  # type: ignore[attr-defined]
        self._tls = True
        self._user = None

    def _quit_auth(self, arg: str) -> None:
        self._close_with(b"+OK Bye\r\n")

    def _noop(self, arg: str) -> None:
        self._ok()

    # -- TRANSACTION -----------------------------------------------------------------------

    def _message(self, arg: str) -> tuple[int, MessageRef] | None:
        """The message numbered C{arg} (1-based), or None after answering -ERR."""
        text = arg.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 9:
            self._error("Bad message number")
            return None
        n = int(text)
        if not 1 <= n <= len(self._messages):
            self._err("No such message")
            return None
        if n in self._deleted:
            self._err("Message is deleted")
            return None
        return n, self._messages[n - 1]

    def _stat(self, arg: str) -> None:
        count = 0
        size = 0
        for i, m in enumerate(self._messages, 1):
            if i not in self._deleted:
                count += 1
                size += m.size
        self._ok(f"{count} {size}")

    def _listing(self, arg: str, value: Callable[[MessageRef], str]) -> None:
        if arg.strip():
            found = self._message(arg)
            if found is not None:
                self._ok(f"{found[0]} {value(found[1])}")
            return
        lines = [b"+OK\r\n"]
        for i, m in enumerate(self._messages, 1):
            if i not in self._deleted:
                lines.append(f"{i} {value(m)}\r\n".encode())
        lines.append(b".\r\n")
        self._out.append(b"".join(lines))

    def _list(self, arg: str) -> None:
        self._listing(arg, lambda m: str(m.size))

    def _uidl(self, arg: str) -> None:
        self._listing(arg, lambda m: unique_id(m.name))

    def _retr(self, arg: str) -> None:
        found = self._message(arg)
        if found is None:
            return
        number, m = found
        ready = self._prefetched
        self._prefetched = None
        if ready is not None and ready[0] == number:
            self._out.append(ready[1])
        else:
            self._send_message(m, None)
        # Clients fetch in order: prepare the next answer while this one is on its way.
        self._prefetch_next = number + 1

    def _prefetch(self) -> None:
        """
        Read and frame the message after the one just sent, once the reply has left and while
        the client reads it, so that the next RETR is answered without touching the disk.
        Only small messages; one at a time; skipped when anything is waiting.
        """
        number = self._prefetch_next
        self._prefetch_next = 0
        if (
            self._state != _TRANSACTION
            or self._busy
            or self._buf
            or number > len(self._messages)
            or number in self._deleted
        ):
            return
        m = self._messages[number - 1]
        if m.size > _INLINE_LIMIT or self._mailbox is None:
            return
        try:
            data = _read_small(self._mailbox.path(m.uid), m.size)
        except OSError:
            return  # RETR will say what is wrong
        self._prefetched = (number, _framed(data, m.size))

    def _top(self, arg: str) -> None:
        words = arg.split()
        if len(words) != 2 or not (words[1].isascii() and words[1].isdigit()):
            self._error("Syntax: TOP msg lines")
            return
        found = self._message(words[0])
        if found is not None:
            self._send_message(found[1], int(words[1]))

    def _send_message(self, m: MessageRef, lines: int | None) -> None:
        assert self._mailbox is not None
        path = self._mailbox.path(m.uid)
        try:
            if lines is None:
                if m.size > _INLINE_LIMIT:
                    self._stream(path, f"+OK {m.size} octets\r\n", None)
                    return
                self._out.append(_framed(_read_small(path, m.size), m.size))
                return
            else:
                with open(path, "rb") as f:
                    end = _top_end(f, lines)
                    if end > _INLINE_LIMIT:
                        self._stream(path, "+OK\r\n", end)
                        return
                    f.seek(0)
                    data = f.read(end)
        except FileNotFoundError:
            self._err("Message was removed by another session")
            return
        self._out.append(_framed(data, None))

    def _stream(self, path: str | os.PathLike[str], first_line: str, limit: int | None) -> None:
        streamer = _FileStreamer(self, path, self._streamed, limit)
        self._out.append(first_line.encode())
        self._flush()
        self._busy = True
        self._streaming = True
        streamer.start()

    def _streamed(self) -> None:
        self._streaming = False
        self._resume(None)

    def _dele(self, arg: str) -> None:
        found = self._message(arg)
        if found is not None:
            self._deleted.add(found[0])
            self._ok(f"Message {found[0]} deleted")

    def _rset(self, arg: str) -> None:
        self._deleted.clear()
        self._ok(f"{len(self._messages)} messages")

    def _quit_transaction(self, arg: str) -> None:
        # RFC 1939 §6: the UPDATE state. Deletions take effect now, durably, or not at all.
        mailbox = self._mailbox
        assert mailbox is not None
        uids = [self._messages[i - 1].uid for i in sorted(self._deleted)]
        if not uids:
            self._release_lock()
            self._close_with(b"+OK Bye\r\n")
            return
        self._busy = True
        self._expunging = True
        d = maybeDeferred(mailbox.expunge, uids)

        def done(_: object) -> None:
            self._expunging = False
            self._release_lock()
            if self._state != _CLOSED:
                self._close_with(f"+OK Bye, {len(uids)} messages deleted\r\n".encode())

        def failed(f: Failure) -> None:
            self._expunging = False
            self._release_lock()
            log.internal_error(self.session, self.peer, "expunge", f)
            if self._state != _CLOSED:
                self._close_with(b"-ERR [SYS/TEMP] Could not delete the messages; try again\r\n")

        d.addCallbacks(done, failed)


def _read_small(path: str | os.PathLike[str], size: int) -> bytes:
    """The whole of a small file, in as few system calls as Python allows."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # size is the CRLF size, never smaller than the file: one read, plus one at the end
        # only when the file has grown.
        data = os.read(fd, size + 1)
        if len(data) > size:
            rest = [data]
            while chunk := os.read(fd, _CHUNK):
                rest.append(chunk)
            data = b"".join(rest)
        return data
    finally:
        os.close(fd)


def _framed(data: bytes, size: int | None) -> bytes:
    """A whole RETR (with C{size}) or TOP answer: status line, stuffed octets, final dot."""
    data = dot_stuff(data, True)
    ending = b".\r\n" if data.endswith(b"\r\n") or not data else b"\r\n.\r\n"
    head = b"+OK\r\n" if size is None else b"+OK %d octets\r\n" % size
    return head + data + ending


def _top_end(f: Any, lines: int) -> int:
    """
    Where TOP's part of the file ends: after the header, the blank line and C{lines} lines of
    the body (RFC 1939 §7). Reads in bounded pieces, so a huge line costs no memory.
    """
    at_line_start = True
    in_header = True
    left = lines
    while True:
        piece = f.readline(_CHUNK)
        if not piece:
            return int(f.tell())
        blank = at_line_start and piece in (b"\r\n", b"\n")
        at_line_start = piece.endswith(b"\n")
        if not at_line_start:
            continue
        if in_header:
            in_header = not blank
            if not in_header and left == 0:
                return int(f.tell())
        else:
            left -= 1
            if left <= 0:
                return int(f.tell())


_AUTH_COMMANDS: dict[str, Callable[[POP3Server, str], None]] = {
    "CAPA": POP3Server._capa,
    "USER": POP3Server._user_cmd,
    "PASS": POP3Server._pass_cmd,
    "AUTH": POP3Server._auth_cmd,
    "STLS": POP3Server._stls,
    "QUIT": POP3Server._quit_auth,
    "NOOP": POP3Server._noop,
}

_TRANSACTION_COMMANDS: dict[str, Callable[[POP3Server, str], None]] = {
    "CAPA": POP3Server._capa,
    "STAT": POP3Server._stat,
    "LIST": POP3Server._list,
    "UIDL": POP3Server._uidl,
    "RETR": POP3Server._retr,
    "TOP": POP3Server._top,
    "DELE": POP3Server._dele,
    "RSET": POP3Server._rset,
    "NOOP": POP3Server._noop,
    "QUIT": POP3Server._quit_transaction,
}
