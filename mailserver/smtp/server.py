# -*- test-case-name: tests.test_smtp_server -*-
"""
The ESMTP server protocol (RFC 5321) with PIPELINING (RFC 2920), 8BITMIME (RFC 6152), SMTPUTF8
(RFC 6531), SIZE (RFC 1870), ENHANCEDSTATUSCODES (RFC 2034), STARTTLS (RFC 3207) and CHUNKING
(RFC 3030); on a submission listener (RFC 6409) also AUTH (RFC 4954: PLAIN, LOGIN,
SCRAM-SHA-256) and DSN (RFC 3461).

Our own protocol on C{Protocol}, not twisted.mail's (DESIGN.md §1): input is framed here in
chunks, replies to pipelined commands leave in one write, and a command whose reply must wait
(the end of DATA, whose C{250} waits for durable storage) pauses the transport, so replies stay
in order and TCP pushes back. The protocol never touches the disk: it talks to an
L{IDeliveryAgent}.

A submission listener wants AUTH (offered only once TLS is on, unless the listener allows
plaintext authentication) before MAIL, and takes a MAIL FROM only when the account owns it
(the C{may_send_as} check it is given). Port 25 never offers AUTH and never relays.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from typing_extensions import override

from mailserver import log, sasl
from mailserver.auth import LoginFailed, Throttled
from mailserver.interfaces import IDelivery, IDeliveryAgent
from mailserver.limits import ConnectionLimiter
from mailserver.policy.relay import RcptVerdict
from mailserver.queue.model import MailOptions, Notify, Ret
from mailserver.sessions import SessionTracker
from mailserver.smtp import codes as c
from mailserver.smtp.address import (
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_path_argument,
    parse_ret,
    require_ascii,
    unknown_parameter,
)
from mailserver.smtp.codes import Reply, format_multiline, format_reply
from mailserver.smtp.data import DataDecoder, LineEndingCheck
from mailserver.smtp.received import protocol_name, received_header
from mailserver.transport import pause, set_nodelay, write_now

__all__ = [
    "SMTPAuthenticator",
    "SMTPFactory",
    "SMTPServer",
    "SMTPSettings",
    "SenderCheck",
    "SessionTracker",
    "new_id",
]

TLSMode = Literal["starttls", "implicit", "none"]

# RFC 4954's replies (codes.py has RFC 5321's).
C235AuthSucceeded = 235
C454TempAuthFailure = 454
C530AuthRequired = 530
C535AuthFailed = 535
C538EncryptionRequired = 538

_HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"})
_COMMAND, _DATA, _BDAT, _CLOSED = range(4)
_ID_PREFIX = secrets.token_hex(3)
_ids = itertools.count(1)


def new_id() -> str:
    """A short id, unique in this process and unlikely to repeat across restarts."""
    return f"{_ID_PREFIX}{next(_ids):06x}"


@dataclass(frozen=True, slots=True)
class SMTPSettings:
    """
    What one SMTP listener needs to know; built from the config by the composition root.

    @ivar submission: a submission listener (ports 587, 465): AUTH, sender ownership, DSN.
    @ivar allow_plaintext_auth: on a submission listener, offer AUTH before TLS too.
    @ivar max_auth_line: the longest AUTH command or SASL response line, CRLF included
        (RFC 4954 §4 asks for at least 12288 octets).
    """

    hostname: str
    tls_mode: TLSMode = "starttls"
    max_line: int = 4096
    max_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    idle_timeout: float = 300.0
    max_errors: int = 10
    submission: bool = False
    allow_plaintext_auth: bool = False
    max_auth_line: int = 16384


class SMTPAuthenticator(TypingProtocol):
    """What AUTH needs (L{mailserver.auth.Authenticator} is one)."""

    def authenticate(self, peer_host: str, username: str, password: str) -> Deferred[str]:
        """Check a password; fires with the account, fails with L{Throttled} or
        L{LoginFailed}."""
        ...

    def scram_credentials(self, username: str) -> sasl.ScramCredentials:
        """The SCRAM-SHA-256 credentials of a login name (a fixed fake for no account)."""
        ...

    def scram_login(self, peer_host: str, username: str, proof_ok: bool) -> Deferred[str]:
        """Count a finished SCRAM exchange; fires with the account, fails like
        C{authenticate}."""
        ...


SenderCheck = Callable[[str, str], bool]
"""C{may_send_as(account, address)}: whether the account may use that envelope sender."""


class SMTPFactory(Factory):
    """Builds one L{SMTPServer} per connection of a listener."""

    def __init__(
        self,
        settings: SMTPSettings,
        agent: IDeliveryAgent,
        clock: IReactorTime,
        limiter: ConnectionLimiter,
        tracker: SessionTracker,
        tls: object | None = None,
        *,
        auth: SMTPAuthenticator | None = None,
        may_send_as: SenderCheck | None = None,
    ) -> None:
        """
        @param tls: the server TLS context factory (an C{IOpenSSLServerConnectionCreator}) for
            STARTTLS; for implicit TLS the listener wraps this factory and C{tls} is unused.
        @param auth: checks logins; required on a submission listener, unused otherwise.
        @param may_send_as: the sender ownership check; required on a submission listener.
        @raise ValueError: a submission listener without C{auth} or C{may_send_as}.
        """
        if settings.submission and (auth is None or may_send_as is None):
            raise ValueError("a submission listener needs auth and may_send_as")
        self.settings = settings
        self.agent = agent
        self.clock = clock
        self.limiter = limiter
        self.tracker = tracker
        self.tls = tls
        self.auth = auth
        self.may_send_as = may_send_as

    @override
    def buildProtocol(self, addr: object) -> SMTPServer:
        return SMTPServer(self)


class SMTPServer(Protocol):
    """One SMTP session."""

    def __init__(self, factory: SMTPFactory) -> None:
        self._f = factory
        self._s = factory.settings
        self._clock = factory.clock
        self.session = new_id()
        self.peer = "unknown"
        self._counted = False
        self._mode = _COMMAND
        self._buf = b""
        self._out: list[bytes] = []
        self._busy = False  # a reply is pending on a Deferred: process no more input
        self._processing = False
        self._paused = False  # reading stopped while a reply waits (backpressure)
        self._skip_line = False  # discarding the rest of an over-long command line
        self._errors = 0
        self._messages = 0
        self._tls = factory.settings.tls_mode == "implicit"
        self._helo: str | None = None
        self._esmtp = False
        self._last_input = 0.0
        self._timer: IDelayedCall | None = None
        self._stopping = False
        self._idle_waiter: Deferred[None] | None = None
        self._delivery: IDelivery | None = None
        self._account: str | None = None  # after a successful AUTH
        self._sasl: sasl.Mechanism | None = None  # an AUTH exchange waiting for a response
        self._sasl_ack: str | None = None  # SCRAM's account, once the client takes our v=
        self._reset_transaction()

    # -- connection ------------------------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = str(getattr(self.transport.getPeer(), "host", "unknown"))
        set_nodelay(self.transport)
        refused = self._f.limiter.acquire(self.peer)
        if refused is not None:
            log.connection_refused(self.peer, refused)
            write_now(self.transport, format_reply(421, "4.7.0", "Too many connections, try later"))
            self._mode = _CLOSED
            self.transport.loseConnection()
            return
        self._counted = True
        self._f.tracker.sessions.add(self)
        log.smtp_connect(self.session, self.peer)
        self._last_input = self._clock.seconds()
        self._timer = self._clock.callLater(self._s.idle_timeout, self._check_idle)
        write_now(
            self.transport,
            format_reply(c.C220Ready, "", f"{self._s.hostname} ESMTP mailserver ready"),
        )

    @override
    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._mode = _CLOSED
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._counted:
            self._counted = False
            self._f.limiter.release(self.peer)
            self._f.tracker.sessions.discard(self)
            log.smtp_disconnect(self.session, self.peer, self._messages, "closed")
        if self._delivery is not None and not self._busy:
            self._delivery.abort()
            self._delivery = None
        self._wake_idle_waiter()

    def _check_idle(self) -> None:
        self._timer = None
        if self._mode == _CLOSED:
            return
        elapsed = self._clock.seconds() - self._last_input
        if self._busy or elapsed < self._s.idle_timeout:
            self._timer = self._clock.callLater(
                max(self._s.idle_timeout - elapsed, 1.0), self._check_idle
            )
            return
        self._close_with(format_reply(421, "4.4.2", f"{self._s.hostname} Idle timeout, closing"))

    def _close_with(self, reply: bytes) -> None:
        assert self.transport is not None
        self._out.append(reply)
        self._flush()
        self._mode = _CLOSED
        self.transport.loseConnection()

    # -- graceful stop ---------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """Whether a message is being received or committed."""
        return self._busy or self._delivery is not None

    def shutdown(self) -> Deferred[None]:
        """
        Close this session for a server stop: at once if no message is being received or
        committed, else once that message is done. Fires when the connection has closed.
        """
        self._stopping = True
        if self._mode == _CLOSED:
            return succeed(None)
        self._idle_waiter = Deferred()
        if self._mode == _COMMAND and not self.in_transaction:
            self._close_with(format_reply(421, "4.3.2", "Server shutting down"))
        return self._idle_waiter

    def abort_now(self) -> None:
        """End the session at once (the graceful stop's grace time is over)."""
        if self._mode != _CLOSED:
            self._close_with(format_reply(421, "4.3.2", "Server shutting down"))

    def _wake_idle_waiter(self) -> None:
        if self._idle_waiter is not None:
            d, self._idle_waiter = self._idle_waiter, None
            d.callback(None)

    def _after_transaction_if_stopping(self) -> None:
        if self._stopping and self._mode == _COMMAND and not self.in_transaction:
            self._close_with(format_reply(421, "4.3.2", "Server shutting down"))

    # -- input -----------------------------------------------------------------------------

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._mode == _CLOSED:
            return
        self._last_input = self._clock.seconds()
        self._buf = self._buf + data if self._buf else data
        if self._busy and not self._paused:
            # More input while a reply waits on the disk: stop reading, so TCP pushes back on
            # a client that keeps sending. (Pausing only now, not at every commit, saves two
            # epoll_ctl calls per message for the usual client that waits for its reply.)
            self._paused = True
            pause(self.transport, True)
        self._process()
        self._flush()

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
            self._process_loop()
        finally:
            self._processing = False

    def _process_loop(self) -> None:
        while self._buf and not self._busy:
            mode = self._mode
            if mode == _COMMAND:
                if not self._next_command():
                    return
            elif mode == _DATA:
                self._data_input()
            elif mode == _BDAT:
                self._bdat_input()
            else:
                self._buf = b""
                return

    def _next_command(self) -> bool:
        """Handle one command line from the buffer; False when no complete line is there."""
        buf = self._buf
        end = buf.find(b"\r\n")
        if self._skip_line:
            if end < 0:
                self._buf = b"\r" if buf.endswith(b"\r") else b""
                return False
            self._skip_line = False
            self._buf = buf[end + 2 :]
            return True
        limit = self._line_limit(buf)
        if end < 0:
            if len(buf) > limit:
                self._buf = b"\r" if buf.endswith(b"\r") else b""
                self._skip_line = True
                self._line_too_long()
            return False
        line = buf[:end]
        self._buf = buf[end + 2 :]
        if end + 2 > limit:
            self._line_too_long()
            return True
        if self._in_sasl:
            self._run("AUTH", lambda: self._sasl_response(line))
        else:
            self._command(line)
        return True

    @property
    def _in_sasl(self) -> bool:
        """Whether the next line is a response of an AUTH exchange, not a command."""
        return self._sasl is not None or self._sasl_ack is not None

    def _line_limit(self, buf: bytes) -> int:
        """The longest line allowed at the start of C{buf}: AUTH lines may be longer."""
        if self._in_sasl or (self._s.submission and buf[:5].upper() == b"AUTH "):
            return max(self._s.max_line, self._s.max_auth_line)
        return self._s.max_line

    def _line_too_long(self) -> None:
        if self._in_sasl:
            self._end_sasl()
            self._error(c.C500SyntaxError, "5.5.6", "Authentication exchange line is too long")
        else:
            self._error(c.C500SyntaxError, "5.5.2", "Line too long")

    def _command(self, raw: bytes) -> None:
        if b"\x00" in raw:
            self._error(c.C500SyntaxError, "5.5.2", "NUL character in command")
            return
        if b"\n" in raw or b"\r" in raw:
            self._error(c.C500SyntaxError, "5.5.2", "Bare CR or LF in command; use CRLF")
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(c.C500SyntaxError, "5.5.2", "Command is not valid UTF-8")
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb)
        if handler is None:
            if verb in _HTTP_VERBS and self._helo is None:
                # Another protocol speaking to us (RFC 5321 is not HTTP): end it at once.
                self._close_with(format_reply(421, "4.5.0", "This is an SMTP server"))
                return
            self._error(c.C500SyntaxError, "5.5.2", "Command not recognized")
            return
        self._run(verb, lambda: handler(self, arg))

    def _run(self, verb: str, call: Callable[[], None]) -> None:
        """Run a command's handler: a L{Reply} it raises is the answer, any other error a 451."""
        try:
            call()
        except Reply as r:
            self._refuse(verb, r)
        except Exception:
            log.internal_error(self.session, self.peer, verb, Failure())
            self._end_sasl()
            if verb != "RCPT":
                self._abort_transaction()
            self._reply(c.C451LocalError, "4.3.0", f"Internal error, session {self.session}")

    def _refuse(self, verb: str, r: Reply) -> None:
        if r.code in (c.C500SyntaxError, c.C501ParamSyntax, c.C503BadSequence):
            self._error(r.code, r.enhanced, r.text)
        else:
            log.smtp_rejected(self.session, self.peer, verb, r.code, r.text)
            self._out.append(r.line())

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        self._out.append(format_reply(code, enhanced, text))

    def _error(self, code: int, enhanced: str, text: str) -> None:
        """A bad command: reply, and count it toward the session's error budget."""
        self._errors += 1
        if self._errors > self._s.max_errors:
            self._close_with(format_reply(421, "4.7.0", "Too many errors, closing"))
            return
        self._reply(code, enhanced, text)

    # -- transaction state -----------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._delivery = None
        self._msgid = ""
        self._mail_from = ""
        self._smtputf8 = False
        self._rcpts: list[str] = []
        self._decoder: DataDecoder | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_started = False
        self._bdat_failed: Reply | None = None
        self._bdat_check = LineEndingCheck()

    def _abort_transaction(self) -> None:
        if self._delivery is not None:
            self._delivery.abort()
        self._reset_transaction()

    def _require_no_args(self, arg: str, verb: str) -> None:
        if arg.strip():
            raise Reply(c.C501ParamSyntax, "5.5.4", f"{verb} takes no arguments")

    # -- commands --------------------------------------------------------------------------

    def _ehlo(self, arg: str) -> None:
        domain = arg.strip()
        if not domain:
            raise Reply(c.C501ParamSyntax, "5.5.4", "EHLO requires a domain or address literal")
        self._abort_transaction()
        self._helo = domain
        self._esmtp = True
        ext = [
            f"{self._s.hostname} greets {domain}",
            "PIPELINING",
            f"SIZE {self._s.max_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        if self._starttls_available():
            ext.append("STARTTLS")
        if self._s.submission:
            if self._auth_allowed():
                ext.append("AUTH " + " ".join(sasl.MECHANISMS))
            ext.append("DSN")
        ext.append("HELP")
        self._out.append(format_multiline(c.C250OK, ext))

    def _helo_cmd(self, arg: str) -> None:
        domain = arg.strip()
        if not domain:
            raise Reply(c.C501ParamSyntax, "5.5.4", "HELO requires a domain")
        self._abort_transaction()
        self._helo = domain
        self._esmtp = False
        self._reply(c.C250OK, "", self._s.hostname)

    def _require_auth(self) -> None:
        """On a submission listener, nothing is taken before AUTH."""
        if self._s.submission and self._account is None:
            raise Reply(C530AuthRequired, "5.7.0", "Authentication required")

    def _mail(self, arg: str) -> None:
        if self._helo is None:
            raise Reply(c.C503BadSequence, "5.5.1", "Send EHLO or HELO first")
        if self._delivery is not None:
            raise Reply(c.C503BadSequence, "5.5.1", "Sender already given (nested MAIL)")
        self._require_auth()
        path = parse_path_argument(arg, "FROM", sender=True)
        options = self._mail_options(path.params)
        require_ascii(path.address, options.smtputf8)
        self._check_sender(path.address)
        self._msgid = new_id()
        self._delivery = self._f.agent.begin(path.address, self._msgid, options)
        self._mail_from = path.address
        self._smtputf8 = options.smtputf8
        self._reply(c.C250OK, "2.1.0", "Sender OK")

    def _mail_options(self, params: dict[str, str | None]) -> MailOptions:
        """
        The MAIL parameters: SIZE, BODY, SMTPUTF8, and on submission RET and ENVID.

        @raise Reply: a bad or unknown parameter.
        """
        smtputf8 = eight_bit = False
        envid: str | None = None
        ret: Ret | None = None
        for name, value in params.items():
            if not self._esmtp:
                raise Reply(c.C555ParamsNotRecognized, "5.5.4", "No parameters after HELO")
            if name == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise Reply(c.C501ParamSyntax, "5.5.4", "SIZE takes a number")
                if int(value) > self._s.max_size:
                    raise Reply(c.C552ExceededStorage, "5.3.4", "Message size exceeds fixed limit")
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise Reply(c.C501ParamSyntax, "5.5.4", "BODY must be 7BIT or 8BITMIME")
                eight_bit = value.upper() == "8BITMIME"
            elif name == "SMTPUTF8":
                if value is not None:
                    raise Reply(c.C501ParamSyntax, "5.5.4", "SMTPUTF8 takes no value")
                smtputf8 = True
            elif name == "RET" and self._s.submission:
                ret = parse_ret(value)
            elif name == "ENVID" and self._s.submission:
                envid = parse_envid(value)
            else:
                raise unknown_parameter(name)
        return MailOptions(
            account=self._account, envid=envid, ret=ret, smtputf8=smtputf8, eight_bit=eight_bit
        )

    def _check_sender(self, address: str) -> None:
        """
        On submission, the account must own the envelope sender; the null sender is never
        the account's (bounces are ours to send).

        @raise Reply: C{553 5.7.1}.
        """
        account = self._account
        if account is None:
            return
        check = self._f.may_send_as
        assert check is not None
        if not address or not check(account, address):
            raise Reply(
                c.C553MailboxNameNotAllowed, "5.7.1", f"Sender address not owned by {account}"
            )

    def _rcpt_options(
        self, params: dict[str, str | None]
    ) -> tuple[frozenset[Notify] | None, str | None]:
        """
        The RCPT parameters: on submission NOTIFY and ORCPT (RFC 3461), nothing on port 25.

        @raise Reply: a bad or unknown parameter.
        """
        notify: frozenset[Notify] | None = None
        orcpt: str | None = None
        for name, value in params.items():
            if name == "NOTIFY" and self._s.submission:
                notify = parse_notify(value)
            elif name == "ORCPT" and self._s.submission:
                orcpt = parse_orcpt(value)
            else:
                raise unknown_parameter(name)
        return notify, orcpt

    def _rcpt(self, arg: str) -> None:
        self._require_auth()
        if self._delivery is None:
            raise Reply(c.C503BadSequence, "5.5.1", "Need MAIL before RCPT")
        path = parse_path_argument(arg, "TO", sender=False)
        notify, orcpt = self._rcpt_options(path.params)
        require_ascii(path.address, self._smtputf8)
        if len(self._rcpts) >= self._s.max_recipients:
            raise Reply(c.C452InsufficientStorage, "4.5.3", "Too many recipients")
        verdict = self._delivery.add_rcpt(path.address, notify, orcpt)
        if verdict is RcptVerdict.ACCEPT:
            self._rcpts.append(path.address)
            self._reply(c.C250OK, "2.1.5", "Recipient OK")
        elif verdict is RcptVerdict.UNKNOWN_USER:
            raise Reply(c.C550MailboxUnavailable, "5.1.1", "No such user here")
        elif verdict is RcptVerdict.RELAY_DENIED:
            raise Reply(c.C554TransactionFailed, "5.7.1", "Relay access denied")
        else:
            raise Reply(c.C452InsufficientStorage, "4.5.3", "Too many recipients")

    def _data(self, arg: str) -> None:
        self._require_no_args(arg, "DATA")
        if self._delivery is None:
            raise Reply(c.C503BadSequence, "5.5.1", "Need MAIL before DATA")
        if self._bdat_started:
            raise Reply(c.C503BadSequence, "5.5.1", "DATA cannot follow BDAT")
        if not self._rcpts:
            raise Reply(c.C554TransactionFailed, "5.5.1", "No valid recipients")
        self._decoder = DataDecoder(self._s.max_size)
        self._mode = _DATA
        self._reply(c.C354StartInput, "", "End data with <CR><LF>.<CR><LF>")

    def _data_input(self) -> None:
        decoder = self._decoder
        delivery = self._delivery
        assert decoder is not None and delivery is not None
        content, rest = decoder.feed(self._buf)
        if content:
            delivery.write(content)
        if rest is None:
            self._buf = b""
            return
        self._buf = rest
        self._mode = _COMMAND
        if decoder.too_big:
            self._fail_message("DATA", Reply(c.C552ExceededStorage, "5.3.4", "Message too big"))
        elif decoder.bare_line_ending:
            self._fail_message(
                "DATA",
                Reply(c.C554TransactionFailed, "5.6.0", "Bare CR or LF in message; use CRLF"),
            )
        else:
            self._commit()

    def _bdat(self, arg: str) -> None:
        words = arg.split()
        if (
            not 1 <= len(words) <= 2
            or not words[0].isdigit()
            or len(words[0]) > 18
            or (len(words) == 2 and words[1].upper() != "LAST")
        ):
            # We cannot tell where the chunk ends, so what follows cannot be read as
            # commands safely (it is message content): close.
            self._close_with(format_reply(421, "4.5.4", "Syntax: BDAT size [LAST]; closing"))
            return
        size = int(words[0])
        self._bdat_left = size
        self._bdat_last = len(words) == 2
        if self._delivery is None:
            self._bdat_failed = Reply(c.C503BadSequence, "5.5.1", "Need MAIL before BDAT")
        elif not self._rcpts:
            self._bdat_failed = Reply(c.C554TransactionFailed, "5.5.1", "No valid recipients")
        elif self._bdat_failed is None and self._delivery.size + size > self._s.max_size:
            self._bdat_failed = Reply(c.C552ExceededStorage, "5.3.4", "Message too big")
        self._bdat_started = True
        self._mode = _BDAT
        if size == 0:
            self._bdat_chunk_done()

    def _bdat_input(self) -> None:
        n = min(self._bdat_left, len(self._buf))
        chunk = self._buf[:n]
        self._buf = self._buf[n:]
        self._bdat_left -= n
        if self._bdat_failed is None and self._delivery is not None:
            self._bdat_check.feed(chunk)
            self._delivery.write(chunk)
        if self._bdat_left == 0:
            self._bdat_chunk_done()

    def _bdat_chunk_done(self) -> None:
        self._mode = _COMMAND
        failed = self._bdat_failed
        if failed is not None:
            if self._delivery is None:
                # No transaction to end: only this chunk is refused.
                self._bdat_failed = None
                self._bdat_started = False
                self._refuse("BDAT", failed)
            elif self._bdat_last:
                self._fail_message("BDAT", failed)
            else:
                self._refuse("BDAT", failed)
            return
        if not self._bdat_last:
            assert self._delivery is not None
            self._reply(c.C250OK, "2.0.0", f"{self._delivery.size} octets received")
            return
        if self._bdat_check.finish():
            self._fail_message(
                "BDAT",
                Reply(c.C554TransactionFailed, "5.6.0", "Bare CR or LF in message; use CRLF"),
            )
            return
        self._commit()

    def _fail_message(self, verb: str, reply: Reply) -> None:
        self._abort_transaction()
        log.smtp_rejected(self.session, self.peer, verb, reply.code, reply.text)
        self._out.append(reply.line())
        self._after_transaction_if_stopping()

    def _commit(self) -> None:
        delivery = self._delivery
        assert delivery is not None and self.transport is not None
        trace = received_header(
            helo=self._helo or "unknown",
            peer_ip=self.peer,
            hostname=self._s.hostname,
            protocol=protocol_name(
                self._esmtp, self._tls, self._account is not None, self._smtputf8
            ),
            message_id=self._msgid,
            recipient=self._rcpts[0] if len(self._rcpts) == 1 else None,
            now=self._clock.seconds(),
        )
        msgid, sender, rcpts = self._msgid, self._mail_from, self._rcpts
        size = delivery.size
        self._busy = True
        try:
            d = delivery.commit(trace)
        except Exception:
            d = Deferred()
            d.errback()

        def done(_: object) -> None:
            self._messages += 1
            log.message_accepted(self.session, self.peer, msgid, sender, rcpts, size)
            self._reply(c.C250OK, "2.0.0", f"Message accepted as {msgid}")

        def failed(f: Failure) -> None:
            log.internal_error(self.session, self.peer, "delivery", f)
            self._reply(
                c.C451LocalError,
                "4.3.0",
                f"Local error storing the message, session {self.session}",
            )

        d.addCallbacks(done, failed)
        d.addBoth(self._committed)

    def _committed(self, _: object) -> None:
        self._reset_transaction()
        self._resume()

    def _resume(self) -> None:
        """A reply that waited on a Deferred is out: read and handle input again."""
        self._busy = False
        if self._mode == _CLOSED or self.transport is None:
            self._out = []
            self._wake_idle_waiter()
            return
        if self._paused:
            self._paused = False
            pause(self.transport, False)
        self._last_input = self._clock.seconds()
        self._after_transaction_if_stopping()
        if self._processing:
            return
        if self._mode != _CLOSED:
            self._process()
        self._flush()

    def _rset(self, arg: str) -> None:
        self._require_no_args(arg, "RSET")
        self._abort_transaction()
        self._reply(c.C250OK, "2.0.0", "Reset")
        self._after_transaction_if_stopping()

    def _noop(self, arg: str) -> None:
        self._reply(c.C250OK, "2.0.0", "OK")

    def _quit(self, arg: str) -> None:
        self._require_no_args(arg, "QUIT")
        self._abort_transaction()
        self._close_with(format_reply(c.C221Closing, "2.0.0", f"{self._s.hostname} Bye"))

    def _vrfy(self, arg: str) -> None:
        if not arg.strip():
            raise Reply(c.C501ParamSyntax, "5.5.4", "VRFY needs an argument")
        # RFC 5321 §3.5.3: 252 rather than reveal who exists here.
        self._reply(
            c.C252CannotVerify, "2.5.0", "Cannot VRFY user; send mail and delivery will be tried"
        )

    def _expn(self, arg: str) -> None:
        self._reply(c.C502NotImplemented, "5.5.1", "EXPN not available")

    def _help(self, arg: str) -> None:
        self._reply(
            c.C214Help,
            "2.0.0",
            "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
        )

    # -- AUTH (RFC 4954) --------------------------------------------------------------------

    def _auth_allowed(self) -> bool:
        return self._tls or self._s.allow_plaintext_auth

    def _auth(self, arg: str) -> None:
        if not self._s.submission:
            raise Reply(c.C502NotImplemented, "5.5.1", "AUTH not available on this port")
        if self._helo is None or not self._esmtp:
            raise Reply(c.C503BadSequence, "5.5.1", "Send EHLO first")
        if self._account is not None:
            raise Reply(c.C503BadSequence, "5.5.1", "Already authenticated")
        if self._delivery is not None:
            raise Reply(c.C503BadSequence, "5.5.1", "AUTH not allowed in a mail transaction")
        if not self._auth_allowed():
            raise Reply(C538EncryptionRequired, "5.7.11", "Encryption required")
        words = arg.split()
        if not 1 <= len(words) <= 2:
            raise Reply(c.C501ParamSyntax, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        auth = self._f.auth
        assert auth is not None
        mechanism = sasl.new_mechanism(words[0], auth.scram_credentials)
        if mechanism is None:
            raise Reply(c.C504ParamNotImplemented, "5.5.4", "Unrecognized authentication type")
        self._sasl = mechanism
        if len(words) == 1:
            self._sasl_step(None)
        else:
            self._sasl_response(words[1].encode("ascii", "replace"))

    def _end_sasl(self) -> None:
        self._sasl = None
        self._sasl_ack = None

    def _sasl_response(self, line: bytes) -> None:
        """One response line of an AUTH exchange (or an AUTH command's initial response)."""
        if line == b"*":
            self._end_sasl()
            raise Reply(c.C501ParamSyntax, "5.7.0", "Authentication cancelled")
        try:
            data = b"" if line == b"=" else base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._end_sasl()
            raise Reply(c.C501ParamSyntax, "5.5.2", "Invalid base64 in authentication response")
        if self._sasl_ack is not None:
            account = self._sasl_ack
            self._end_sasl()
            if data:
                raise Reply(c.C501ParamSyntax, "5.5.2", "Expected an empty response")
            self._authenticated(account)
            return
        self._sasl_step(data)

    def _sasl_step(self, data: bytes | None) -> None:
        mechanism = self._sasl
        assert mechanism is not None
        self._sasl = None  # an exception below ends the exchange
        step = mechanism.respond(data)
        if isinstance(step, sasl.Challenge):
            self._sasl = mechanism
            self._out.append(b"334 " + base64.b64encode(step.data) + b"\r\n")
            return
        auth = self._f.auth
        assert auth is not None
        if isinstance(step, sasl.Success):
            if step.password is not None:
                self._wait_login(auth.authenticate(self.peer, step.username, step.password))
            else:
                self._wait_login(auth.scram_login(self.peer, step.username, True), step.data)
        elif step.kind == "credentials":
            self._wait_login(auth.scram_login(self.peer, step.username or "", False))
        elif step.kind == "malformed":
            raise Reply(c.C501ParamSyntax, "5.5.2", "Malformed authentication response")
        else:
            raise Reply(C535AuthFailed, "5.7.8", "Authentication credentials invalid")

    def _wait_login(self, d: Deferred[str], final: bytes | None = None) -> None:
        """
        Wait for a login's verdict with input paused, then answer it. With C{final} (SCRAM's
        C{v=}) a success is sent as a last challenge, and the client's empty response to it
        completes the login (RFC 4954 §4).
        """
        self._busy = True

        def succeeded(account: str) -> None:
            if final is None:
                self._authenticated(account)
            else:
                self._sasl_ack = account
                self._out.append(b"334 " + base64.b64encode(final) + b"\r\n")

        def failed(f: Failure) -> None:
            if f.check(Throttled):
                self._reply(C454TempAuthFailure, "4.7.0", "Too many failed logins, try later")
            elif f.check(LoginFailed):
                self._reply(C535AuthFailed, "5.7.8", "Authentication credentials invalid")
            else:
                log.internal_error(self.session, self.peer, "AUTH", f)
                self._reply(C454TempAuthFailure, "4.7.0", "Temporary authentication failure")

        d.addCallbacks(succeeded, failed)
        d.addBoth(lambda _: self._resume())

    def _authenticated(self, account: str) -> None:
        self._account = account
        self._reply(C235AuthSucceeded, "2.7.0", "Authentication successful")

    def _starttls_available(self) -> bool:
        return (
            self._s.tls_mode == "starttls"
            and not self._tls
            and self._f.tls is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def _starttls(self, arg: str) -> None:
        self._require_no_args(arg, "STARTTLS")
        if self._tls:
            raise Reply(c.C503BadSequence, "5.5.1", "TLS already active")
        if not self._starttls_available():
            raise Reply(c.C502NotImplemented, "5.5.1", "STARTTLS not available")
        if self._buf:
            # RFC 3207 §4.2 / CVE-2011-0411: nothing sent before the handshake may be taken as a
            # command inside TLS.
            self._buf = b""
        self._reply(c.C220Ready, "2.0.0", "Ready to start TLS")
        self._flush()
        transport = self.transport
        assert transport is not None
        transport.startTLS(self._f.tls)  # type: ignore[attr-defined]
        self._tls = True
        self._abort_transaction()
        self._helo = None
        self._esmtp = False
        self._account = None  # RFC 3207 §4.2: nothing learnt before TLS is kept


# The command table (a dispatch table, not getattr on a name the client sent).
_COMMANDS: dict[str, Callable[[SMTPServer, str], None]] = {
    "EHLO": SMTPServer._ehlo,
    "HELO": SMTPServer._helo_cmd,
    "MAIL": SMTPServer._mail,
    "RCPT": SMTPServer._rcpt,
    "DATA": SMTPServer._data,
    "BDAT": SMTPServer._bdat,
    "RSET": SMTPServer._rset,
    "NOOP": SMTPServer._noop,
    "QUIT": SMTPServer._quit,
    "VRFY": SMTPServer._vrfy,
    "EXPN": SMTPServer._expn,
    "HELP": SMTPServer._help,
    "STARTTLS": SMTPServer._starttls,
    "AUTH": SMTPServer._auth,
}
