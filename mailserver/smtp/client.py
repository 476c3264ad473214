# -*- test-case-name: tests.test_smtp_client -*-
"""
The outbound ESMTP client (RFC 5321) with PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME
(RFC 6152), SMTPUTF8 (RFC 6531), DSN (RFC 3461), STARTTLS (RFC 3207) and AUTH PLAIN (RFC 4954,
RFC 4616).

Our own protocol on C{Protocol} (DESIGN.md §1). One L{SMTPClient} is one connection to one
address of a next hop: it reads the greeting, says EHLO (HELO when EHLO is refused), starts TLS
when offered (or required), authenticates when told to, and then sends any number of messages
one after the other (L{SMTPClient.deliver}), each ending in one L{RcptResult} per recipient:
2xx sent, 4xx deferred, 5xx failed. A refusal of MAIL, of DATA or of the message after DATA
applies to every recipient still in the transaction; a connection lost, or a reply that does
not come within the timeout, leaves every recipient not yet answered deferred.

Message content is sent with canonical CRLF line endings (a bare CR or LF in the file is sent
as CRLF), dot-stuffed, and always ends with CRLF before the final C{.}: nothing in a message
can end the DATA early and smuggle a second message to the next hop. Files up to
L{SMALL_BODY} octets are read at once and leave in one write; larger ones are streamed in
chunks by a push producer, so memory stays flat and TCP pushes back.

What we do not do: downgrade. A message that needs SMTPUTF8 goes only to a hop that offers it
(else it fails with 5.6.7, RFC 6531 §3.4); a message declared 8BITMIME whose content really has
8-bit octets goes only to a hop that offers 8BITMIME (else it fails with 5.6.3: we do not
convert to quoted-printable or base64). A declared 8BITMIME message that turns out to be 7-bit
is sent without C{BODY=}.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITLSTransport
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from mailserver import log
from mailserver.queue.model import Outcome, Outgoing, QueuedRecipient, RcptResult
from mailserver.transport import set_nodelay, write_now

__all__ = [
    "SMALL_BODY",
    "ClientSettings",
    "ServerReply",
    "SessionError",
    "SMTPClient",
    "TLSPolicy",
    "BodyFramer",
    "client_tls",
    "xtext",
]

TLSPolicy = Literal["opportunistic", "starttls", "implicit", "none"]

SMALL_BODY = 256 * 1024
"""Message files up to this size are read in one go; larger ones are streamed."""
CHUNK = 64 * 1024
"""Octets read from a large message file at a time."""
MAX_REPLY_LINE = 4096
"""A longer reply line ends the session (RFC 5321 §4.5.3.1.5 allows 512)."""
MAX_REPLY_LINES = 128


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How to talk to one next hop."""

    helo: str
    """Our name in EHLO/HELO."""
    tls: TLSPolicy = "opportunistic"
    """opportunistic: STARTTLS when offered, certificate not checked; starttls: STARTTLS
    required and the certificate verified for C{tls_name}; implicit: TLS from the first byte
    (the caller wraps the connection; see L{client_tls}), verified; none: never TLS."""
    tls_name: str = ""
    """The name the certificate must carry when verified (a host name or an IP address)."""
    trust_root: Any = None
    """C{IOpenSSLTrustRoot} for verification; None: the platform's CAs."""
    auth: tuple[str, str] | None = None
    """C{(user, password)} for AUTH PLAIN (a smarthost); never sent without TLS unless
    C{tls} is none."""
    connect_timeout: float = 30.0
    """Seconds from the connection attempt to the greeting."""
    command_timeout: float = 300.0
    """Seconds to wait for any other reply, or for the peer to take more message data."""


@dataclass(frozen=True, slots=True)
class ServerReply:
    """
    A reply of the server, or (C{code} 0) the reason none came: the connection was lost or
    the reply took too long.
    """

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply's text, lines joined by spaces (the enhanced status code first)."""
        return " ".join(line for line in self.lines if line)

    @property
    def outcome(self) -> Outcome:
        """What this reply means for a recipient: 2xx sent, 5xx failed, anything else later."""
        kind = self.code // 100
        if kind == 2:
            return "sent"
        if kind == 5:
            return "failed"
        return "deferred"

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code else self.text


class SessionError(Exception):
    """
    The session could not be set up (greeting, EHLO, TLS, AUTH) or is gone: this address of
    the next hop cannot take mail now.

    @ivar code: the server's reply code, 0 when it gave none.
    @ivar text: what happened, naming the host.
    @ivar host: C{"name[ip]"} of the host when the connection was made, else C{""}.
    """

    def __init__(self, text: str, code: int = 0, host: str = "") -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.host = host


def client_tls(name: str | None, trust_root: Any = None) -> Any:
    """
    A client TLS connection creator: verifying that the server's certificate is valid for
    C{name} (a host name or IP address, with service_identity) against C{trust_root} (None:
    the platform's trust store), or, when C{name} is None, checking nothing (opportunistic
    TLS: any encryption beats none, RFC 7435).
    """
    if name is None:
        return CertificateOptions(verify=False)
    return optionsForClientTLS(name, trustRoot=trust_root)


def xtext(value: str) -> str:
    """Encode C{value} (as UTF-8) in RFC 3461 §4 xtext: C{+XX} for C{+}, C{=} and non-graphic
    or non-ASCII octets."""
    out = []
    for octet in value.encode("utf-8"):
        if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


class BodyFramer:
    """
    Turns message octets, fed in any chunks, into DATA content: every CR, LF or CRLF becomes
    CRLF, a line starting with C{.} gets another one, and L{end} closes with
    C{CRLF.CRLF} (or C{.CRLF} right after a line end).
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        """The framed form of C{chunk} (a CR at its end is held until the next octet)."""
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            self._held_cr = True
            chunk = chunk[:-1]
        if not chunk:
            return b""
        if chunk.count(b"\r") != chunk.count(b"\n") or chunk.count(b"\r\n") != chunk.count(b"\n"):
            # Some bare CR or LF: make every line end CRLF (CRLF first, so it stays one).
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        out = chunk.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\r\n")
        return out

    def end(self) -> bytes:
        """The end of the content: a line end if one is missing, then the final dot."""
        if self._held_cr:
            self._held_cr = False
            self._at_line_start = True
            return b"\r\n.\r\n"
        if self._at_line_start:
            return b".\r\n"
        self._at_line_start = True
        return b"\r\n.\r\n"


def _ssl_reason(error: SSL.Error) -> str:
    """The reasons in an OpenSSL error (C{"certificate verify failed"}), or its text."""
    try:
        reasons = [str(item[2]) for item in error.args[0] if item[2]]
    except (IndexError, TypeError):
        reasons = []
    return "; ".join(reasons) or str(error) or "handshake failed"


def _has_8bit(data: bytes) -> bool:
    return not data.isascii()


@implementer(IPushProducer)
class _BodyStreamer:
    """Streams a large message file as DATA content, chunk by chunk, with backpressure."""

    def __init__(self, client: SMTPClient, file: IO[bytes], size: int) -> None:
        self._client = client
        self._file = file
        self._left = size  # the file may hold more after the message (the queue's envelope)
        self._framer = BodyFramer()
        self._paused = False
        self._finished = False
        self.done: Deferred[bool] = Deferred()
        """Fires True when everything was written, False when the connection went first."""

    def start(self) -> None:
        transport: Any = self._client.transport
        assert transport is not None
        transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        transport: Any = self._client.transport
        while not self._paused and not self._finished and transport is not None:
            try:
                chunk = self._file.read(min(CHUNK, self._left))
            except OSError as e:
                self._client.abort(f"cannot read the message file ({e.strerror or e})")
                return
            self._left -= len(chunk)
            if not chunk and self._left > 0:
                self._client.abort("the message file is shorter than the message")
                return
            if not chunk:
                self._finished = True
                self._file.close()
                transport.unregisterProducer()
                transport.write(self._framer.end())
                self.done.callback(True)
                return
            out = self._framer.feed(chunk)
            if out:
                transport.write(out)
            self._client.made_progress()

    def stopProducing(self) -> None:
        if not self._finished:
            self._finished = True
            self._file.close()
            self.done.callback(False)


class _Body:
    """A queued message's file, opened: small ones read in full (or taken from memory when the
    queue still has them), large ones kept open."""

    def __init__(self, message: Outgoing) -> None:
        self.file: IO[bytes] | None = None
        self.data: bytes | None = message.data
        self.size = message.size
        if self.data is not None:
            return
        self.file = open(message.path, "rb")  # noqa: SIM115
        if message.size <= SMALL_BODY:
            try:
                self.data = self.file.read(message.size)
                if len(self.data) != message.size:
                    raise OSError("the message file is shorter than the message")
            finally:
                self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class SMTPClient(Protocol):
    """
    One outbound SMTP session to one address.

    Use: connect it (the caller's endpoint), wait for L{ready}, call L{deliver} for each
    message (one at a time), then L{quit}.

    @ivar label: C{"name[ip]"}, the host as results and errors name it.
    @ivar ready: fires once the session can take mail (greeting, EHLO, TLS and AUTH done);
        fails with L{SessionError} otherwise (the connection is then closed).
    @ivar extensions: the EHLO keywords (upper case) and their parameters.
    @ivar tls_active: whether the session runs over TLS.
    """

    def __init__(self, clock: IReactorTime, settings: ClientSettings, name: str, ip: str) -> None:
        self._clock = clock
        self._s = settings
        self.label = f"{name}[{ip}]"
        self.ready: Deferred[None] = Deferred()
        self.extensions: dict[str, str] = {}
        self.tls_active = settings.tls == "implicit"
        self.authenticated = False
        self.messages = 0
        """Message transactions started on this session."""
        self.mail_reply: ServerReply | None = None
        """The reply to the MAIL of the last L{deliver} (code 0: none came, the connection
        went); None when that message sent no MAIL."""
        self._deadline = clock.seconds() + settings.connect_timeout
        self._buf = b""
        self._lines: list[str] = []
        self._pending: deque[tuple[Deferred[ServerReply], str]] = deque()
        self._timer: IDelayedCall | None = None
        self._waiting_for = ""
        self._connected = False
        self._lost: str | None = None
        self._usable = False
        self._tls_pending = False
        self._streamer: _BodyStreamer | None = None
        self._close_waiters: list[Deferred[None]] = []

    # -- connection ------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Whether another message can be sent on this session."""
        return self._usable and self._connected

    @property
    def idle(self) -> bool:
        """Usable and between transactions: no reply awaited, nothing being sent (a session
        that can wait for its next message, as it is)."""
        return self.usable and not self._pending and self._streamer is None and not self._lines

    @override
    def connectionMade(self) -> None:
        self._connected = True
        set_nodelay(self.transport)
        timeout = max(self._deadline - self._clock.seconds(), 0.001)
        greeting = self._expect("the greeting", timeout)
        d = Deferred.fromCoroutine(self._setup(greeting))
        d.addCallbacks(self._setup_done, self._setup_failed)

    @override
    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._connected = False
        self._usable = False
        if self._lost is None:
            self._lost = self._describe(reason)
        self._cancel_timer()
        if self._streamer is not None:
            self._streamer.stopProducing()
            self._streamer = None
        self._answer_all(self._lost)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    def _describe(self, reason: Failure) -> str:
        value = reason.value
        if isinstance(value, SSL.Error):
            return f"TLS failure with {self.label}: {_ssl_reason(value)}"
        if type(value).__name__ == "VerificationError":  # service_identity's
            return f"TLS failure with {self.label}: certificate not valid for {self._s.tls_name}"
        if self._tls_pending:
            return f"TLS failure with {self.label}: {value}"
        if reason.check(ConnectionDone):
            return f"connection closed by {self.label}"
        return f"connection to {self.label} lost: {value}"

    def when_closed(self) -> Deferred[None]:
        """Fires once the connection is closed."""
        if not self._connected:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        return d

    def abort(self, why: str) -> None:
        """Drop the connection now; whatever waits gets C{why}."""
        if self._lost is None:
            self._lost = why
        self._usable = False
        if self._connected and self.transport is not None:
            abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
            abort()

    def quit(self) -> Deferred[None]:
        """Say QUIT, wait for its reply (within the command timeout) and close."""
        self._usable = False
        if not self._connected:
            return succeed(None)
        closed = self.when_closed()
        self._command("QUIT").addBoth(lambda _: self._lose())
        return closed

    def _lose(self) -> None:
        if self._connected and self.transport is not None:
            self.transport.loseConnection()

    # -- replies ---------------------------------------------------------------------------

    @override
    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while self._connected:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_REPLY_LINE:
                    self.abort(f"{self.label} sent a reply line too long")
                return
            line = self._buf[:end].rstrip(b"\r")
            self._buf = self._buf[end + 1 :]
            if not self._reply_line(line):
                return

    def _reply_line(self, line: bytes) -> bool:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self.abort(f"{self.label} sent a malformed reply: {line[:80]!r}")
            return False
        if len(self._lines) >= MAX_REPLY_LINES:
            self.abort(f"{self.label} sent a reply of too many lines")
            return False
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if line[3:4] == b"-":
            return True
        reply = ServerReply(int(line[:3]), tuple(self._lines))
        self._lines = []
        if self._pending:
            d, _ = self._pending.popleft()
            self._rearm()
            d.callback(reply)
            return True
        # A reply to nothing: the server ends the session on its own (a 421 after it waited
        # too long for our next command). Nothing more goes over this one.
        if self._lost is None:
            self._lost = f"{self.label} ended the session: {reply}"
        self._usable = False
        self._lose()
        return False

    def _expect(self, what: str, timeout: float | None = None) -> Deferred[ServerReply]:
        """The next reply (C{what} names it in a timeout's text)."""
        if not self._connected:
            why = self._lost or f"not connected to {self.label}"
            return succeed(ServerReply(0, (f"4.4.2 {why}",)))
        d: Deferred[ServerReply] = Deferred()
        self._pending.append((d, what))
        if len(self._pending) == 1:
            self._arm(timeout if timeout is not None else self._s.command_timeout, what)
        return d

    def _command(self, line: str, what: str | None = None) -> Deferred[ServerReply]:
        """Send one command and return its reply."""
        return self._pipeline([line], [what or f"the reply to {line.split(' ')[0]}"])[0]

    def _pipeline(self, lines: Sequence[str], whats: Sequence[str]) -> list[Deferred[ServerReply]]:
        """Send several commands in one write; their replies, in order."""
        replies = [self._expect(what) for what in whats]
        if self._connected and self.transport is not None:
            write_now(self.transport, b"".join(line.encode("utf-8") + b"\r\n" for line in lines))
        return replies

    def _answer_all(self, why: str) -> None:
        pending, self._pending = self._pending, deque()
        for d, _ in pending:
            d.callback(ServerReply(0, (f"4.4.2 {why}",)))

    # -- timeouts --------------------------------------------------------------------------

    def _arm(self, timeout: float, what: str) -> None:
        self._waiting_for = what
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self._clock.callLater(timeout, self._timed_out)

    def _rearm(self) -> None:
        if self._pending:
            self._arm(self._s.command_timeout, self._pending[0][1])
        elif self._streamer is None:
            self._cancel_timer()

    def made_progress(self) -> None:
        """The peer took more message data: its time starts again."""
        self._arm(self._s.command_timeout, "the peer to take message data")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.abort(f"timeout waiting for {self._waiting_for} from {self.label}")

    # -- session set-up --------------------------------------------------------------------

    async def _setup(self, greeting_reply: Deferred[ServerReply]) -> None:
        greeting = await greeting_reply
        if greeting.code != 220:
            if greeting.code == 0:
                raise SessionError(greeting.text, 0, self.label)
            raise SessionError(f"{self.label} greeting: {greeting}", greeting.code, self.label)
        await self._hello()
        if not self.tls_active and self._s.tls in ("opportunistic", "starttls"):
            await self._starttls()
        if self._s.auth is not None:
            await self._authenticate(*self._s.auth)

    def _setup_done(self, _: None) -> None:
        self._usable = self._connected
        if self._usable:
            self.ready.callback(None)
        else:
            why = self._lost or f"{self.label} went away"
            self.ready.errback(SessionError(f"4.4.2 {why}", 0, self.label))

    def _setup_failed(self, f: Failure) -> None:
        if isinstance(f.value, SessionError):
            error = f.value
        else:
            error = SessionError(f"internal error talking to {self.label}: {f.value!r}")
        if self._connected and self.transport is not None:
            self.transport.write(b"QUIT\r\n")
            self.transport.loseConnection()
        self.ready.errback(error)

    async def _hello(self) -> None:
        reply = await self._command(f"EHLO {self._s.helo}")
        self.extensions = {}
        if reply.code == 250:
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params.strip()
            return
        if reply.code // 100 != 5:
            raise self._refused("EHLO", reply)
        reply = await self._command(f"HELO {self._s.helo}")
        if reply.code != 250:
            raise self._refused("HELO", reply)

    async def _starttls(self) -> None:
        required = self._s.tls == "starttls"
        can = ITLSTransport.providedBy(self.transport)
        if "STARTTLS" not in self.extensions or not can:
            if required:
                raise SessionError(f"TLS required but not offered by {self.label}", 0, self.label)
            return
        reply = await self._command("STARTTLS")
        if reply.code == 0:
            raise self._refused("STARTTLS", reply)
        if reply.code != 220:
            if required:
                raise SessionError(
                    f"TLS required but {self.label} refused STARTTLS: {reply}", 0, self.label
                )
            return
        # RFC 3207 §4.2: nothing the server sent before the handshake counts.
        self._buf = b""
        self._lines = []
        creator = client_tls(self._s.tls_name if required else None, self._s.trust_root)
        self._tls_pending = True
        self.transport.startTLS(creator)  # type: ignore[union-attr]
        self.tls_active = True
        await self._hello()
        self._tls_pending = False

    async def _authenticate(self, user: str, password: str) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" not in mechanisms:
            raise SessionError(f"{self.label} does not offer AUTH PLAIN", 0, self.label)
        if not self.tls_active and self._s.tls != "none":
            raise SessionError(f"not sending a password to {self.label} without TLS", 0, self.label)
        token = base64.b64encode(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
        reply = await self._command("AUTH PLAIN " + token.decode("ascii"), "the reply to AUTH")
        if reply.code != 235:
            raise self._refused(f"AUTH as {user}", reply)
        self.authenticated = True

    def _refused(self, what: str, reply: ServerReply) -> SessionError:
        if reply.code == 0:
            return SessionError(reply.text, 0, self.label)
        return SessionError(f"{self.label} refused {what}: {reply}", reply.code, self.label)

    # -- messages --------------------------------------------------------------------------

    def deliver(self, message: Outgoing) -> Deferred[list[RcptResult]]:
        """
        Send one message. Never fails: every recipient gets a result (deferred when the
        session broke before the recipient's fate was known).
        """
        return Deferred.fromCoroutine(self._deliver(message))

    async def _deliver(self, message: Outgoing) -> list[RcptResult]:
        self.mail_reply = None
        if not self.usable:
            why = self._lost or f"no session with {self.label}"
            return self._all(message, "deferred", 0, f"4.4.2 {why}")
        try:
            body = _Body(message)
        except OSError as e:
            return self._all(message, "deferred", 0, f"4.3.0 cannot read the queued message: {e}")
        try:
            refusal = await self._refusal(message, body)
            if refusal is not None:
                return self._all(message, "failed", 0, refusal)
            self.messages += 1
            return await self._transaction(message, body)
        except Exception:
            # A bug of ours: the session's state is unknown, so it ends here.
            log.internal_error(message.queue_id, self.label, "outbound transaction", Failure())
            why = f"internal error sending to {self.label}"
            self.abort(why)
            return self._all(message, "deferred", 0, f"4.3.0 {why}")
        finally:
            body.close()

    async def _refusal(self, message: Outgoing, body: _Body) -> str | None:
        """Why this hop cannot take the message (a permanent failure), or None."""
        ext = self.extensions
        if message.smtputf8 and "SMTPUTF8" not in ext:
            return f"5.6.7 {self.label} does not offer SMTPUTF8, which the message needs"
        limit = ext.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < message.size:
            return (
                f"5.3.4 message of {message.size} octets is larger than {self.label} takes"
                f" ({limit})"
            )
        if message.eight_bit and "8BITMIME" not in ext and await self._body_has_8bit(body):
            return (
                f"5.6.3 {self.label} does not offer 8BITMIME and the message has 8-bit"
                " content (we do not downgrade)"
            )
        return None

    async def _body_has_8bit(self, body: _Body) -> bool:
        if body.data is not None:
            return _has_8bit(body.data)
        assert body.file is not None
        found = False
        while not found:
            chunk = body.file.read(CHUNK)
            if not chunk:
                break
            found = _has_8bit(chunk)
            await deferLater(self._clock, 0, lambda: None)  # let others run between chunks
        body.file.seek(0)
        return found

    def _mail_line(self, message: Outgoing) -> str:
        ext = self.extensions
        params = []
        if "SIZE" in ext:
            params.append(f"SIZE={message.size}")
        if message.eight_bit and "8BITMIME" in ext:
            params.append("BODY=8BITMIME")
        if message.smtputf8:
            params.append("SMTPUTF8")
        if "DSN" in ext:
            if message.ret is not None:
                params.append(f"RET={message.ret}")
            if message.envid is not None:
                params.append(f"ENVID={xtext(message.envid)}")
        return " ".join([f"MAIL FROM:<{message.sender}>", *params])

    def _rcpt_line(self, rcpt: QueuedRecipient) -> str:
        params = []
        if "DSN" in self.extensions:
            if rcpt.notify is not None:
                if "NEVER" in rcpt.notify:
                    params.append("NOTIFY=NEVER")
                else:
                    kinds = [k for k in ("SUCCESS", "FAILURE", "DELAY") if k in rcpt.notify]
                    params.append("NOTIFY=" + ",".join(kinds))
            if rcpt.orcpt is not None:
                kind, sep, address = rcpt.orcpt.partition(";")
                if sep and kind:
                    params.append(f"ORCPT={kind};{xtext(address)}")
        return " ".join([f"RCPT TO:<{rcpt.address}>", *params])

    async def _transaction(self, message: Outgoing, body: _Body) -> list[RcptResult]:
        rcpts = message.recipients
        lines = [self._mail_line(message), *(self._rcpt_line(r) for r in rcpts), "DATA"]
        whats = ["the reply to MAIL", *["the reply to RCPT"] * len(rcpts), "the reply to DATA"]
        if "PIPELINING" in self.extensions:
            replies = self._pipeline(lines, whats)
            mail = self.mail_reply = await replies[0]
            answers = [await d for d in replies[1:-1]]
            data = await replies[-1]
        else:
            mail = self.mail_reply = await self._command(lines[0], whats[0])
            answers = []
            if mail.code // 100 == 2:
                for line in lines[1:-1]:
                    answers.append(await self._command(line, "the reply to RCPT"))
            accepted_any = any(a.code // 100 == 2 for a in answers)
            data = await self._command("DATA") if accepted_any else ServerReply(503, ("not sent",))

        if mail.code // 100 != 2:
            await self._end_refused(data)
            return [self._result(r.address, mail) for r in rcpts]
        results: list[RcptResult | None] = [
            None if a.code // 100 == 2 else self._result(r.address, a)
            for r, a in zip(rcpts, answers, strict=True)
        ]
        if all(r is not None for r in results) or data.code != 354:
            await self._end_refused(data)
            return [
                r if r is not None else self._result(rcpt.address, data)
                for r, rcpt in zip(results, rcpts, strict=True)
            ]
        final = await self._send_body(body)
        if final.code // 100 != 2 and final.code != 0:
            await self._command("RSET")
        return [
            r if r is not None else self._result(rcpt.address, final)
            for r, rcpt in zip(results, rcpts, strict=True)
        ]

    async def _end_refused(self, data: ServerReply) -> None:
        """End a transaction that will not carry the message."""
        if data.code == 354:
            # DATA was accepted though nobody is to get the message (only a broken server
            # does that): end the content at once; its reply is ignored.
            if self._connected and self.transport is not None:
                reply = self._expect("the reply to an empty message")
                self.transport.write(b".\r\n")
                await reply
        if self._connected:
            await self._command("RSET")

    async def _send_body(self, body: _Body) -> ServerReply:
        final = self._expect("the reply to the end of DATA")
        transport = self.transport
        if not self._connected or transport is None:
            return await final
        if body.data is not None:
            framer = BodyFramer()
            write_now(transport, framer.feed(body.data) + framer.end())
        else:
            assert body.file is not None
            self._streamer = _BodyStreamer(self, body.file, body.size)
            body.file = None  # the streamer closes it
            streamer = self._streamer
            streamer.start()
            await streamer.done
            self._streamer = None
            self._rearm()
        return await final

    def _result(self, address: str, reply: ServerReply) -> RcptResult:
        return RcptResult(
            address=address,
            outcome=reply.outcome,
            code=reply.code,
            text=reply.text,
            host=self.label,
            dsn_relayed=reply.code // 100 == 2 and "DSN" in self.extensions,
        )

    def _all(self, message: Outgoing, outcome: Outcome, code: int, text: str) -> list[RcptResult]:
        return [
            RcptResult(r.address, outcome, code, text, host=self.label) for r in message.recipients
        ]
