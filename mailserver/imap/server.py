# -*- test-case-name: tests.test_imap_server -*-
"""
The IMAP server protocol (RFC 3501 IMAP4rev1, with the RFC 9051 behaviour clients rely on, and
IDLE, UIDPLUS, MOVE, SPECIAL-USE, NAMESPACE, ID, ENABLE, UNSELECT, LITERAL+, CONDSTORE).

Like the SMTP and POP3 servers, our own protocol on C{Protocol}: the framer
(L{mailserver.imap.parser.CommandFramer}) cuts commands out of the input, one command runs at a
time (the next waits while one waits on the store), replies to commands that arrive together
leave in one write, and message bodies over 256 KiB are streamed from their files by a producer.
The protocol never touches the disk except to read message files; every change goes through
L{mailserver.store.mailbox}.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import itertools
import os
import re
import secrets
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from mailserver import log
from mailserver.auth import LoginFailed, Throttled
from mailserver.imap import message as mime
from mailserver.imap.parser import (
    INLINE_LITERAL_MAX,
    AndKey,
    BadCharset,
    Command,
    CommandFramer,
    FetchAtt,
    LiteralInfo,
    LiteralTooBig,
    Malformed,
    ModSeqKey,
    NeedContinuation,
    NotKey,
    OrKey,
    ParseError,
    Reader,
    Section,
    SequenceSet,
    TooLong,
    encode_mutf7,
    parse_append,
    parse_command,
    parse_fetch,
    parse_search,
    parse_store,
)
from mailserver.imap.search import Matcher
from mailserver.imap.selected import SelectedMailbox, compress_uids, flag_list
from mailserver.limits import ConnectionLimiter
from mailserver.sessions import SessionTracker
from mailserver.store.index import (
    INBOX,
    SEPARATOR,
    Changes,
    FolderError,
    FolderState,
    MailIndex,
    MessageInfo,
    check_folder_name,
)
from mailserver.store.mailbox import Folder, MailboxStore
from mailserver.transport import pause, set_nodelay, write_now

TLSMode = Literal["starttls", "implicit", "none"]
Authenticate = Callable[[str, str, str], "Deferred[str]"]

_NOT_AUTH, _AUTH, _SELECTED, _LOGOUT = range(4)
_INLINE = 256 * 1024
_ID_PREFIX = secrets.token_hex(3)
_ids = itertools.count(1)

SPECIAL_FOLDERS = (
    ("Drafts", "\\Drafts"),
    ("Sent", "\\Sent"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)
"""Folders every new account gets (RFC 6154 SPECIAL-USE)."""

PERMANENT_FLAGS = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"
_FLAGS = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"


@dataclass(frozen=True, slots=True)
class IMAPSettings:
    """What one IMAP listener needs; built from the config by the composition root."""

    hostname: str
    tls_mode: TLSMode = "starttls"
    allow_plaintext_auth: bool = False
    max_line: int = 64 * 1024
    max_literal: int = 26 * 1024 * 1024
    idle_timeout: float = 1800.0
    max_errors: int = 20
    spill_dir: Path | None = None


class IMAPFactory(Factory):
    def __init__(
        self,
        settings: IMAPSettings,
        authenticate: Authenticate,
        store: MailboxStore,
        clock: IReactorTime,
        limiter: ConnectionLimiter,
        tls: object | None = None,
        tracker: SessionTracker | None = None,
    ) -> None:
        self.settings = settings
        self.authenticate = authenticate
        self.store = store
        self.clock = clock
        self.limiter = limiter
        self.tls = tls
        self.tracker = tracker if tracker is not None else SessionTracker()

    @override
    def buildProtocol(self, addr: object) -> IMAPServer:
        return IMAPServer(self)


class _Spill:
    """A large APPEND literal, written to an unlinked temporary file as it arrives."""

    def __init__(self, directory: Path | None) -> None:
        self.file: BinaryIO = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def close(self) -> None:
        self.file.flush()

    def discard(self) -> None:
        self.file.close()


class _Discard:
    """The sink for a large literal of a command that cannot use one: the data is dropped."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass


@implementer(IPushProducer)
class _Sender:
    """Streams queued output (bytes and file ranges) to the transport, with backpressure."""

    def __init__(self, server: IMAPServer, pieces: Iterator[bytes], done: Callable[[], None]):
        self._server = server
        self._pieces = pieces
        self._done = done
        self._paused = False
        self._finished = False

    def start(self) -> None:
        transport: Any = self._server.transport
        transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        transport: Any = self._server.transport
        self._server.made_progress()
        while not self._paused and not self._finished and transport is not None:
            piece = next(self._pieces, None)
            if piece is None:
                self._finished = True
                transport.unregisterProducer()
                self._done()
                return
            transport.write(piece)

    def stopProducing(self) -> None:
        self._finished = True
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


class IMAPServer(Protocol):
    """One IMAP session."""

    def __init__(self, factory: IMAPFactory) -> None:
        self._f = factory
        self._s = factory.settings
        self._clock = factory.clock
        self._store = factory.store
        self.session = f"{_ID_PREFIX}i{next(_ids):06x}"
        self.peer = "unknown"
        self._counted = False
        self._state = _NOT_AUTH
        self._tls = self._s.tls_mode == "implicit"
        self._framer = self._new_framer()
        self._queue: deque[object] = deque()
        self._out: list[bytes] = []
        self._busy = False
        self._streaming = False
        self._running = False
        self._paused = False
        self._errors = 0
        self._account: str | None = None
        self._folder: Folder | None = None
        self._box: SelectedMailbox | None = None
        self._changed = False  # the store told us the selected folder changed
        self._enabled: set[str] = set()
        self._idle_tag: str | None = None
        self._sasl_tag: str | None = None
        self._last_input = 0.0
        self._timer: IDelayedCall | None = None
        self._stopping = False
        self._closed: Deferred[None] | None = None

    def _new_framer(self) -> CommandFramer:
        return CommandFramer(
            max_line=self._s.max_line,
            max_literal=self._s.max_literal,
            open_literal=self._open_literal,
        )

    def _open_literal(self, info: LiteralInfo) -> _Spill | _Discard:
        # Only APPEND takes a literal this large (a message); for any other command it is
        # refused once the command is read (TOOBIG), so it is not worth a file.
        if info.name == "APPEND":
            return _Spill(self._s.spill_dir)
        return _Discard()

    # -- connection ------------------------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = str(getattr(self.transport.getPeer(), "host", "unknown"))
        set_nodelay(self.transport)
        refused = self._f.limiter.acquire(self.peer)
        if refused is not None:
            log.connection_refused(self.peer, refused)
            write_now(self.transport, b"* BYE [UNAVAILABLE] Too many connections, try later\r\n")
            self._state = _LOGOUT
            self.transport.loseConnection()
            return
        self._counted = True
        self._f.tracker.sessions.add(self)
        self._last_input = self._clock.seconds()
        self._timer = self._clock.callLater(self._s.idle_timeout, self._check_idle)
        greeting = f"* OK [CAPABILITY {self._capabilities()}] {self._s.hostname} IMAP4rev1 ready"
        write_now(self.transport, greeting.encode() + b"\r\n")

    @override
    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._state = _LOGOUT
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._framer.close()
        self._queue.clear()
        if self._counted:
            self._counted = False
            self._f.limiter.release(self.peer)
            self._f.tracker.sessions.discard(self)
        self._unselect()
        if self._closed is not None:
            d, self._closed = self._closed, None
            d.callback(None)

    # -- graceful stop ---------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """A command is waiting on the store (an APPEND, a STORE, an EXPUNGE...)."""
        return self._busy and not self._streaming

    def shutdown(self) -> Deferred[None]:
        """Say BYE and close once the command in progress (if any) is done."""
        self._stopping = True
        if self._state == _LOGOUT:
            return succeed(None)
        self._closed = Deferred()
        if not self._busy:
            self._bye(b"* BYE [UNAVAILABLE] Server shutting down\r\n")
        return self._closed

    def abort_now(self) -> None:
        if self.transport is not None and self._state != _LOGOUT:
            self._bye(b"* BYE [UNAVAILABLE] Server shutting down\r\n")
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def made_progress(self) -> None:
        self._last_input = self._clock.seconds()

    def _check_idle(self) -> None:
        self._timer = None
        if self._state == _LOGOUT:
            return
        elapsed = self._clock.seconds() - self._last_input
        waiting = self._busy and not self._streaming
        if waiting or elapsed < self._s.idle_timeout:
            self._timer = self._clock.callLater(
                max(self._s.idle_timeout - elapsed, 1.0), self._check_idle
            )
            return
        self._bye(b"* BYE Autologout; idle for too long\r\n")

    def _bye(self, line: bytes) -> None:
        self._out.append(line)
        self._flush()
        self._state = _LOGOUT
        if self.transport is not None:
            self.transport.loseConnection()

    # -- input -----------------------------------------------------------------------------

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._state == _LOGOUT:
            return
        self._last_input = self._clock.seconds()
        self._queue.extend(self._framer.feed(data))
        if self._busy and not self._paused:
            self._paused = True
            pause(self.transport, True)
        self._run()

    def _flush(self) -> None:
        if self._out and self.transport is not None:
            out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out = []
            write_now(self.transport, out)

    def _run(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            while self._queue and not self._busy and self._state != _LOGOUT:
                self._event(self._queue.popleft())
        finally:
            self._running = False
        self._flush()
        if self._stopping and not self._busy and self._state != _LOGOUT:
            self._bye(b"* BYE [UNAVAILABLE] Server shutting down\r\n")
            return
        if not self._busy and self._paused and self._state != _LOGOUT:
            self._paused = False
            pause(self.transport, False)
        if not self._busy and self._state == _SELECTED:
            self._push()

    def _event(self, event: object) -> None:
        if isinstance(event, Command):
            self._command(event)
        elif isinstance(event, NeedContinuation):
            self._continuation(event)
        elif isinstance(event, TooLong):
            self._bad(event.tag, "Command line too long", "TOOBIG")
        elif isinstance(event, LiteralTooBig):
            self._bad(event.tag, "Literal too big", "TOOBIG")
            if event.nonsync and event.size > self._s.max_literal * 4:
                self._bye(b"* BYE Literal far too big\r\n")
        elif isinstance(event, Malformed):
            self._bad(event.tag, event.message)

    def _continuation(self, event: NeedContinuation) -> None:
        info = event.info
        # RFC 3501 §4.3: a literal may stand for any string (a LOGIN password with a quote
        # in it, a SEARCH string in UTF-8, a mailbox name); only APPEND takes a large one.
        if info.name == "APPEND":
            refusal = None if self._state in (_AUTH, _SELECTED) else "APPEND not allowed now"
        else:
            refusal = "Literal too big for this command" if info.size > INLINE_LITERAL_MAX else None
        if refusal is not None:
            self._bad(info.tag, refusal, "TOOBIG" if info.name != "APPEND" else None)
            self._queue.extend(self._framer.refuse())
            return
        self._out.append(b"+ Ready for literal data\r\n")
        self._flush()
        self._queue.extend(self._framer.proceed())

    def _bad(self, tag: str | None, text: str, code: str | None = None) -> None:
        self._errors += 1
        prefix = f"[{code}] " if code else ""
        self._out.append(f"{tag or '*'} BAD {prefix}{text}\r\n".encode())
        if self._errors > self._s.max_errors:
            self._bye(b"* BYE Too many errors\r\n")

    def _tagged(self, tag: str, status: str, text: str) -> None:
        self._out.append(f"{tag} {status} {text}\r\n".encode())

    def _command(self, command: Command) -> None:
        if self._idle_tag is not None:
            self._idle_done(command)
            return
        if self._sasl_tag is not None:
            tag, self._sasl_tag = self._sasl_tag, None
            waiting = self._sasl_response(tag, command.lines[0])
            if waiting is not None:
                self._wait(tag, "AUTHENTICATE", waiting)
            return
        try:
            parsed = parse_command(command, utf8="UTF8=ACCEPT" in self._enabled)
        except ParseError as e:
            self._bad(e.tag, e.message)
            return
        handler = _HANDLERS.get(parsed.name)
        if handler is None:
            self._bad(parsed.tag, "Unknown command")
            return
        states, function = handler
        if self._state not in states:
            self._bad(parsed.tag, f"{parsed.name} not allowed now")
            return
        try:
            result = function(self, parsed.tag, parsed.args)
        except BadCharset as e:
            self._tagged(parsed.tag, "NO", f"[{e.code}] {e.message}")
            return
        except FolderError as e:
            self._tagged(parsed.tag, "NO", str(e))
            return
        except ParseError as e:
            if "mailbox name" in e.message:
                # A well-formed astring that is no valid name: NO (LIST: nothing matches).
                if parsed.name in ("LIST", "LSUB"):
                    self._tagged(parsed.tag, "OK", f"{parsed.name} completed")
                else:
                    if parsed.name in ("SELECT", "EXAMINE") and self._state == _SELECTED:
                        # A SELECT that fails leaves no mailbox selected (RFC 3501 §6.3.1).
                        self._unselect()
                        self._state = _AUTH
                    self._tagged(parsed.tag, "NO", f"[CANNOT] {e.message}")
                return
            self._bad(parsed.tag, e.message, e.code)
            return
        except Exception:
            log.internal_error(self.session, self.peer, parsed.name, Failure())
            self._tagged(parsed.tag, "NO", f"[SERVERBUG] Internal error, session {self.session}")
            return
        if isinstance(result, Deferred):
            self._wait(parsed.tag, parsed.name, result)

    def _wait(self, tag: str, name: str, d: Deferred[Any]) -> None:
        self._busy = True

        def failed(f: Failure) -> None:
            if f.check(FolderError):
                self._tagged(tag, "NO", str(f.value))
                return
            log.internal_error(self.session, self.peer, name, f)
            self._tagged(tag, "NO", f"[SERVERBUG] Internal error, session {self.session}")

        def resume(_: object) -> None:
            self._busy = False
            self._last_input = self._clock.seconds()
            if self._state == _LOGOUT or self.transport is None:
                self._out = []
                return
            self._run()

        d.addErrback(failed)
        d.addBoth(resume)

    # -- capabilities and the not-authenticated state --------------------------------------

    def _auth_allowed(self) -> bool:
        return self._tls or self._s.allow_plaintext_auth

    def _starttls_available(self) -> bool:
        return (
            self._s.tls_mode == "starttls"
            and not self._tls
            and self._f.tls is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def _capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        if self._state == _NOT_AUTH:
            if self._starttls_available():
                caps.append("STARTTLS")
            if self._auth_allowed():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        else:
            caps += [
                "NAMESPACE",
                "UNSELECT",
                "UIDPLUS",
                "MOVE",
                "SPECIAL-USE",
                "LIST-EXTENDED",
                "CHILDREN",
                "CONDSTORE",
                "UTF8=ACCEPT",
                "ESEARCH",
            ]
        return " ".join(caps)

    def _capability(self, tag: str, r: Reader) -> None:
        r.end()
        self._out.append(f"* CAPABILITY {self._capabilities()}\r\n".encode())
        self._tagged(tag, "OK", "CAPABILITY completed")

    def _noop(self, tag: str, r: Reader) -> Deferred[None] | None:
        r.end()
        return self._refresh_then(tag, "NOOP completed", allow_expunge=True)

    def _logout(self, tag: str, r: Reader) -> None:
        r.end()
        self._out.append(b"* BYE Logging out\r\n")
        self._tagged(tag, "OK", "LOGOUT completed")
        self._flush()
        self._state = _LOGOUT
        self._unselect()
        if self.transport is not None:
            self.transport.loseConnection()

    def _id(self, tag: str, r: Reader) -> None:
        r.sp()
        r.value()
        r.end()
        self._out.append(b'* ID ("name" "mailserver")\r\n')
        self._tagged(tag, "OK", "ID completed")

    def _starttls(self, tag: str, r: Reader) -> None:
        r.end()
        if not self._starttls_available():
            self._bad(tag, "STARTTLS not available")
            return
        self._tagged(tag, "OK", "Begin TLS negotiation now")
        self._flush()
        # RFC 3501 §6.2.1 / CVE-2011-0411: nothing the client sent after STARTTLS survives.
        self._queue.clear()
        self._framer.close()
        self._framer = self._new_framer()
        assert self.transport is not None
        self.transport.startTLS(self._f.tls)  # type: ignore[attr-defined]
        self._tls = True

    def _login(self, tag: str, r: Reader) -> Deferred[None] | None:
        r.sp()
        user = r.astring()
        r.sp()
        password = r.astring()
        r.end()
        if not self._auth_allowed():
            self._tagged(tag, "NO", "[PRIVACYREQUIRED] Use STARTTLS first")
            return None
        return self._authenticate(tag, user, password)

    def _authenticate_cmd(self, tag: str, r: Reader) -> Deferred[None] | None:
        r.sp()
        mechanism = r.atom().upper()
        initial: bytes | None = None
        if not r.at_end():
            r.sp()
            initial = r.astring()
        r.end()
        if not self._auth_allowed():
            self._tagged(tag, "NO", "[PRIVACYREQUIRED] Use STARTTLS first")
            return None
        if mechanism != "PLAIN":
            self._tagged(tag, "NO", "Unsupported authentication mechanism")
            return None
        if initial is None:
            self._sasl_tag = tag
            self._out.append(b"+ \r\n")
            return None
        return self._sasl_response(tag, initial)

    def _sasl_response(self, tag: str, raw: bytes) -> Deferred[None] | None:
        if raw.strip() == b"*":
            self._bad(tag, "Authentication cancelled")
            return None
        try:
            decoded = base64.b64decode(raw.strip(), validate=True) if raw.strip() != b"=" else b""
            authzid, authcid, password = decoded.split(b"\x00")
        except (binascii.Error, ValueError):
            self._bad(tag, "Malformed SASL PLAIN response")
            return None
        if authzid and authzid != authcid:
            self._tagged(tag, "NO", "[AUTHORIZATIONFAILED] Not authorized for that user")
            return None
        return self._authenticate(tag, authcid, password)

    def _authenticate(self, tag: str, user: bytes, password: bytes) -> Deferred[None]:
        d = self._f.authenticate(
            self.peer,
            user.decode("utf-8", "replace"),
            password.decode("utf-8", "replace"),
        )

        def ok(account: str) -> Deferred[None]:
            self._account = account
            self._state = _AUTH
            return self._store.run(account, _ensure_special_folders).addCallback(
                lambda _: self._tagged(tag, "OK", f"[CAPABILITY {self._capabilities()}] Logged in")
            )

        def failed(f: Failure) -> None:
            if f.check(Throttled):
                self._tagged(tag, "NO", "[UNAVAILABLE] Too many failed logins; try later")
            elif f.check(LoginFailed):
                self._tagged(tag, "NO", "[AUTHENTICATIONFAILED] Authentication failed")
            else:
                f.raiseException()

        return d.addCallbacks(ok, failed)

    # -- the authenticated state -----------------------------------------------------------

    def _enable(self, tag: str, r: Reader) -> None:
        names = []
        while not r.at_end():
            r.sp()
            names.append(r.atom().upper())
        if not names:
            raise r.error("ENABLE needs a capability")
        enabled = [n for n in names if n in ("CONDSTORE", "UTF8=ACCEPT")]
        self._enabled.update(enabled)
        if "CONDSTORE" in enabled and self._box is not None:
            self._box.condstore = True
        self._out.append(("* ENABLED " + " ".join(enabled)).rstrip().encode() + b"\r\n")
        self._tagged(tag, "OK", "ENABLE completed")

    def _namespace(self, tag: str, r: Reader) -> None:
        r.end()
        self._out.append(f'* NAMESPACE (("" "{SEPARATOR}")) NIL NIL\r\n'.encode())
        self._tagged(tag, "OK", "NAMESPACE completed")

    def _mailbox_arg(self, r: Reader) -> str:
        r.sp()
        return r.mailbox()

    def _name_out(self, name: str) -> bytes:
        if "UTF8=ACCEPT" in self._enabled:
            return mime.imap_string(name)
        return mime.imap_string(encode_mutf7(name))

    def _create(self, tag: str, r: Reader) -> Deferred[None]:
        name = self._mailbox_arg(r).rstrip(SEPARATOR)
        use = ""
        if not r.at_end():
            r.sp()
            r.value()  # CREATE-SPECIAL-USE and other parameters are ignored
        r.end()
        if name.upper() == INBOX:
            raise FolderError("INBOX exists already")
        account = self._require_account()
        name = check_folder_name(name)
        parts = name.split(SEPARATOR)
        parents = [SEPARATOR.join(parts[:i]) for i in range(1, len(parts))]

        def create(index: Any) -> None:
            # RFC 3501 §6.3.3: create the superior names too, so that LIST "" "%" shows a
            # way down to the new folder (Thunderbird walks the hierarchy that way).
            existing = {f.name for f in index.folders()}
            for parent in parents:
                if parent not in existing and parent != INBOX:
                    index.create_folder(parent)
            index.create_folder(name, use)

        d = self._store.run(account, create)
        return d.addCallback(lambda _: self._tagged(tag, "OK", "CREATE completed"))

    def _delete(self, tag: str, r: Reader) -> Deferred[None]:
        name = self._mailbox_arg(r)
        r.end()
        account = self._require_account()

        def deleted(_: object) -> None:
            if self._box is not None and self._box.name == name:
                # The session's own selected folder: back to the authenticated state.
                self._unselect()
                self._state = _AUTH
            self._store.changed(account, check_folder_name(name))  # others on it: BYE
            self._tagged(tag, "OK", "DELETE completed")

        def delete(index: Any) -> None:
            # RFC 3501 §6.3.4 would keep the name as \Noselect for its subfolders, which
            # the index has no way to say; refuse instead, as Dovecot does (RFC 9051 §7.1).
            prefix = check_folder_name(name) + SEPARATOR
            if any(f.name.startswith(prefix) for f in index.folders()):
                raise FolderError("[HASCHILDREN] Folder has subfolders; delete them first")
            index.delete_folder(name)

        return self._store.run(account, delete).addCallback(deleted)

    def _rename(self, tag: str, r: Reader) -> Deferred[None]:
        old = self._mailbox_arg(r)
        new = self._mailbox_arg(r)
        r.end()
        account = self._require_account()
        if old == INBOX:
            d = self._rename_inbox(account, new)
        else:
            d = self._store.rename_folder(account, old, new)

        def renamed(_: object) -> None:
            if old != INBOX and self._box is not None and self._box.name == old:
                self._unselect()
                self._state = _AUTH
            # Sessions on the old name: INBOX was emptied, another folder is gone (BYE).
            self._store.changed(account, check_folder_name(old))
            self._tagged(tag, "OK", "RENAME completed")

        return d.addCallback(renamed)

    def _rename_inbox(self, account: str, new: str) -> Deferred[None]:
        """RFC 3501 §6.3.5: renaming INBOX moves its messages to the new folder."""
        store = self._store

        def move(index: Any) -> None:
            index.create_folder(new)
            index.sync(INBOX)
            uids = [m.uid for m in index.state(INBOX).messages]
            index.copy(INBOX, uids, new, move=True)

        return store.run(account, move)

    def _subscribe(self, tag: str, r: Reader) -> Deferred[None]:
        name = self._mailbox_arg(r)
        r.end()
        d = self._store.set_subscribed(self._require_account(), name, True)
        return d.addCallback(lambda _: self._tagged(tag, "OK", "SUBSCRIBE completed"))

    def _unsubscribe(self, tag: str, r: Reader) -> Deferred[None]:
        name = self._mailbox_arg(r)
        r.end()
        d = self._store.set_subscribed(self._require_account(), name, False)
        return d.addCallback(lambda _: self._tagged(tag, "OK", "UNSUBSCRIBE completed"))

    def _list(self, tag: str, r: Reader, lsub: bool = False) -> Deferred[None]:
        r.sp()
        selection: list[str] = []
        if r.peek() == b"(":
            selection = [s.upper() for s in r.paren_list(r.atom, allow_empty=True)]
            r.sp()
        reference = r.mailbox()
        r.sp()
        patterns: list[str] = []
        if r.peek() == b"(":
            patterns = r.paren_list(r.list_mailbox)
        else:
            patterns = [r.list_mailbox()]
        return_opts: list[str] = []
        if not r.at_end():
            r.sp()
            if r.keyword() != "RETURN":
                raise r.error("expected RETURN")
            r.sp()
            return_opts = [str(v).upper() for v in r.paren_list(r.atom, allow_empty=True)]
        r.end()
        known_selection = {"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"}
        if not set(selection) <= known_selection:
            raise r.error("unknown LIST selection option")
        if "RECURSIVEMATCH" in selection and not set(selection) - {"RECURSIVEMATCH", "REMOTE"}:
            raise r.error("RECURSIVEMATCH needs another selection option")
        if not set(return_opts) <= {"SUBSCRIBED", "CHILDREN", "SPECIAL-USE"}:
            raise r.error("unknown LIST return option")
        subscribed_only = lsub or "SUBSCRIBED" in selection
        special_only = "SPECIAL-USE" in selection
        recursive = "RECURSIVEMATCH" in selection
        if reference == INBOX:
            reference = ""
        d = self._store.run(
            self._require_account(), lambda index: (index.folders(), index.subscriptions())
        )

        def answer(result: tuple[list[Any], list[str]]) -> None:
            folders, subscriptions = result
            word = "LSUB" if lsub else "LIST"
            full = [reference + p for p in patterns]
            if patterns == [""] and not lsub:
                self._out.append(f'* LIST (\\Noselect) "{SEPARATOR}" ""\r\n'.encode())
            elif "SUBSCRIBED" in selection and not lsub:
                self._list_subscribed(folders, subscriptions, full, recursive, return_opts)
            else:
                names = {f.name for f in folders}
                for folder in folders:
                    if not any(_matches(p, folder.name) for p in full):
                        continue
                    if subscribed_only and not folder.subscribed:
                        continue
                    if special_only and not folder.special_use:
                        continue
                    attrs = []
                    prefix = folder.name + SEPARATOR
                    has_children = any(n.startswith(prefix) for n in names)
                    if not lsub:
                        attrs.append("\\HasChildren" if has_children else "\\HasNoChildren")
                        if folder.special_use and (
                            "SPECIAL-USE" in return_opts or not return_opts or special_only
                        ):
                            attrs.append(folder.special_use)
                        if "SUBSCRIBED" in return_opts and folder.subscribed:
                            attrs.append("\\Subscribed")  # RFC 5258 §3.2
                    self._list_line(word, attrs, folder.name)
                if lsub:
                    self._lsub_parents(folders, full)
            self._tagged(tag, "OK", f"{word} completed")

        return d.addCallback(answer)

    def _list_line(self, word: str, attrs: list[str], name: str, extra: bytes = b"") -> None:
        line = f'* {word} ({" ".join(attrs)}) "{SEPARATOR}" '.encode() + self._name_out(name)
        self._out.append(line + extra + b"\r\n")

    def _list_subscribed(
        self,
        folders: list[Any],
        subscriptions: list[str],
        patterns: list[str],
        recursive: bool,
        return_opts: list[str],
    ) -> None:
        """
        LIST (SUBSCRIBED) (RFC 5258 §3.1): the subscribed names matching the patterns, with
        C{\\NonExistent} for those without a folder; with RECURSIVEMATCH, also the matching
        names that have subscribed descendants outside the patterns, with CHILDINFO.
        """
        existing = {f.name: f for f in folders}
        subscribed = set(subscriptions)
        candidates = subscribed | (set(existing) if recursive else set())
        for name in sorted(candidates):
            if not any(_matches(p, name) for p in patterns):
                continue
            childinfo = recursive and any(
                s.startswith(name + SEPARATOR) and not any(_matches(p, s) for p in patterns)
                for s in subscribed
            )
            if name not in subscribed and not childinfo:
                continue
            attrs = []
            folder = existing.get(name)
            if folder is not None:
                prefix = name + SEPARATOR
                children = any(n.startswith(prefix) for n in existing)
                attrs.append("\\HasChildren" if children else "\\HasNoChildren")
                if folder.special_use and "SPECIAL-USE" in return_opts:
                    attrs.append(folder.special_use)
            if name in subscribed:
                attrs.append("\\Subscribed")
            if folder is None:
                attrs.append("\\NonExistent")
            extra = b' ("CHILDINFO" ("SUBSCRIBED"))' if childinfo else b""
            self._list_line("LIST", attrs, name, extra)

    def _lsub_parents(self, folders: list[Any], patterns: list[str]) -> None:
        """
        RFC 3501 §6.3.9: when C{foo/bar} is subscribed and C{foo} is not, C{LSUB "" "%"}
        answers C{foo} with C{\\Noselect}, so that a client walking the tree finds C{bar}.
        """
        subscribed = {f.name for f in folders if f.subscribed}
        told: set[str] = set()
        for name in sorted(subscribed):
            if any(_matches(p, name) for p in patterns):
                continue
            parts = name.split(SEPARATOR)
            for i in range(len(parts) - 1, 0, -1):
                parent = SEPARATOR.join(parts[:i])
                if parent in subscribed or parent in told:
                    break
                if any(_matches(p, parent) for p in patterns):
                    told.add(parent)
                    self._list_line("LSUB", ["\\Noselect"], parent)
                    break

    def _lsub(self, tag: str, r: Reader) -> Deferred[None]:
        return self._list(tag, r, lsub=True)

    def _status(self, tag: str, r: Reader) -> Deferred[None]:
        name = self._mailbox_arg(r)
        r.sp()
        items = [str(i).upper() for i in r.paren_list(r.atom)]
        r.end()
        account = self._require_account()
        box = self._box

        recent = [0]

        def look(index: Any) -> tuple[tuple[int, int, int, int, int], int]:
            index.sync(name)
            recent[0] = index.recent_count(name)
            return index.status(name), index.unseen(name)

        def selected(_: object) -> tuple[tuple[int, int, int, int, int], int]:
            # The selected folder: the session's own view, just refreshed (and its changes
            # told), so that STATUS never counts a message the client was not told of.
            assert box is not None
            infos = list(box.infos())
            recent[0] = len(box.recent)
            counts = (
                box.exists,
                sum(m.size for m in infos),
                box.uidvalidity,
                box.uidnext,
                box.highestmodseq,
            )
            return counts, sum(1 for m in infos if "\\Seen" not in m.flags)

        def answer(result: tuple[tuple[int, int, int, int, int], int]) -> None:
            (count, octets, uidvalidity, uidnext, modseq), unseen = result
            values = {
                "MESSAGES": count,
                "RECENT": recent[0],
                "UIDNEXT": uidnext,
                "UIDVALIDITY": uidvalidity,
                "UNSEEN": unseen,
                "SIZE": octets,
                "HIGHESTMODSEQ": modseq,
                "DELETED": None,
            }
            out = []
            for item in items:
                if item not in values or values[item] is None:
                    raise ParseError(f"unknown STATUS item {item[:20]}", tag)
                out.append(f"{item} {values[item]}")
            line = b"* STATUS " + self._name_out(name) + f" ({' '.join(out)})\r\n".encode()
            self._out.append(line)
            self._tagged(tag, "OK", "STATUS completed")

        def bad(f: Failure) -> None:
            f.trap(ParseError)
            self._bad(tag, str(f.value))

        refreshed = (
            self._refresh(allow_expunge=True) if box is not None and box.name == name else None
        )
        if refreshed is not None:
            d = refreshed.addCallback(selected)
        else:
            d = self._store.run(account, look)
        return d.addCallback(answer).addErrback(bad)

    def _select(self, tag: str, r: Reader, read_only: bool = False) -> Deferred[None]:
        name = self._mailbox_arg(r)
        condstore = False
        if not r.at_end():
            r.sp()
            params = [str(p).upper() for p in r.paren_list(r.atom, allow_empty=True)]
            condstore = "CONDSTORE" in params
        r.end()
        if condstore:
            self._enabled.add("CONDSTORE")
        self._unselect()
        self._state = _AUTH
        account = self._require_account()
        d = self._store.open_folder(account, name, self._folder_changed, claim_recent=not read_only)

        def opened(folder: Folder) -> Deferred[None] | None:
            if not read_only or not folder.state.messages:
                show(folder, folder.recent_from)
                return None
            # EXAMINE: the messages no session has claimed are recent here too, and stay so.
            unclaimed = self._store.run(account, lambda index: index.unclaimed_from(name))
            return unclaimed.addCallback(lambda first: show(folder, first))

        def show(folder: Folder, recent_from: int) -> None:
            if self._state == _LOGOUT:
                folder.close()  # the connection was lost meanwhile: stop listening
                return
            self._folder = folder
            box = SelectedMailbox(
                folder.state, read_only=read_only, condstore="CONDSTORE" in self._enabled
            )
            box.claim(recent_from)
            self._box = box
            self._state = _SELECTED
            first_unseen = next(
                (i for i, m in enumerate(box.infos(), 1) if "\\Seen" not in m.flags), 0
            )
            lines = [
                f"* {box.exists} EXISTS",
                f"* {len(box.recent)} RECENT",
                *(line.decode().rstrip("\r\n") for line in box.flags_lines()),
                f"* OK [UIDVALIDITY {box.uidvalidity}] UIDs valid",
                f"* OK [UIDNEXT {box.uidnext}] Predicted next UID",
            ]
            if first_unseen:
                lines.append(f"* OK [UNSEEN {first_unseen}] First unseen")
            if box.condstore:
                lines.append(f"* OK [HIGHESTMODSEQ {box.highestmodseq}] Highest")
            self._out.append(("\r\n".join(lines) + "\r\n").encode())
            mode = "READ-ONLY" if read_only else "READ-WRITE"
            self._tagged(tag, "OK", f"[{mode}] {'EXAMINE' if read_only else 'SELECT'} completed")

        def failed(f: Failure) -> None:
            f.trap(FolderError)
            self._tagged(tag, "NO", "[NONEXISTENT] No such mailbox")

        return d.addCallbacks(opened, failed)

    def _examine(self, tag: str, r: Reader) -> Deferred[None]:
        return self._select(tag, r, read_only=True)

    def _append(self, tag: str, r: Reader) -> Deferred[None]:
        command = parse_append(r)
        account = self._require_account()
        name = check_folder_name(command.mailbox)  # a bad name is NO, without TRYCREATE
        results: list[tuple[int, MessageInfo]] = []

        async def add_all() -> None:
            for m in command.messages:
                data = m.data
                when = m.internal_date.timestamp() if m.internal_date is not None else None

                def write(out: BinaryIO, data: Any = data) -> None:
                    if data.data is not None:
                        out.write(data.data)
                    elif data.sink is not None:
                        src = data.sink.file
                        src.seek(0)
                        while chunk := src.read(256 * 1024):
                            out.write(chunk)

                try:
                    results.append(await self._store.append(account, name, write, m.flags, when))
                finally:
                    if data.sink is not None:
                        data.sink.discard()

        def done(_: object) -> None:
            uidvalidity = results[0][0] if results else 0
            uids = compress_uids(info.uid for _, info in results)
            self._tagged(tag, "OK", f"[APPENDUID {uidvalidity} {uids}] APPEND completed")

        def failed(f: Failure) -> None:
            f.trap(FolderError)
            self._tagged(tag, "NO", "[TRYCREATE] No such mailbox")

        d: Deferred[None] = Deferred.fromCoroutine(add_all())
        if self._state == _SELECTED and self._folder is not None and self._folder.name == name:
            d.addCallback(lambda _: self._refresh(allow_expunge=True))
        return d.addCallbacks(done, failed)

    # -- the selected state ----------------------------------------------------------------

    def _folder_changed(self) -> None:
        self._changed = True
        self._push()

    def _push(self) -> None:
        """
        In IDLE, tell the client of the selected folder's changes at once (RFC 2177). A change
        that comes while a command (or an earlier push) waits on the store is pushed when it
        is done: L{_run} calls this again.
        """
        if self._idle_tag is None or self._busy or not self._changed:
            return
        d = self._refresh(allow_expunge=True)
        if d is None:
            return
        self._busy = True

        def sent(_: object) -> None:
            self._busy = False
            self._run()

        d.addBoth(sent)

    def _refresh(self, allow_expunge: bool, uid_command: bool = False) -> Deferred[None] | None:
        """Look at the folder again and queue the untagged updates (EXISTS, EXPUNGE, FETCH)."""
        folder = self._folder
        box = self._box
        if folder is None or box is None:
            return None
        self._changed = False

        looked: list[tuple[FolderState, Changes | None]] = []

        def unclaimed(result: tuple[FolderState, Changes | None]) -> Deferred[int] | int:
            looked.append(result)
            state = result[0]
            top = box.uids[-1] if box.uids else 0
            if not box.read_only or not state.messages or state.messages[-1].uid <= top:
                return folder.recent_from
            # EXAMINE: new messages no session has claimed are recent here too (unclaimed).
            return self._store.run(folder.account, lambda index: index.unclaimed_from(box.name))

        def tell(recent_from: int) -> None:
            state, changes = looked[0]
            if changes is None or state.uidvalidity != box.uidvalidity:
                # The folder was recreated or the index rebuilt: the client's UIDs mean
                # nothing now, and IMAP cannot say so to a selected session (as Dovecot).
                self._unselect()
                self._bye(b"* BYE Selected mailbox UIDVALIDITY changed, have to disconnect\r\n")
                return
            updates = box.update(state, allow_expunge, uid_command, recent_from, changes)
            self._out.extend(updates.lines)

        def gone(f: Failure) -> None:
            # Another session deleted (or renamed) the selected folder: there is no way to
            # tell a client its messages are all gone but to end the session (as Dovecot).
            f.trap(FolderError)
            self._unselect()
            self._bye(b"* BYE Selected mailbox was deleted, have to disconnect\r\n")

        d = folder.look(claim_recent=not box.read_only).addCallback(unclaimed)
        return d.addCallbacks(tell, gone)

    def _refresh_then(
        self, tag: str, text: str, allow_expunge: bool, uid_command: bool = False
    ) -> Deferred[None] | None:
        d = self._refresh(allow_expunge, uid_command)
        if d is None:
            self._tagged(tag, "OK", text)
            return None
        return d.addCallback(lambda _: self._tagged(tag, "OK", text))

    def _unselect(self) -> None:
        if self._folder is not None:
            self._folder.close()
        self._folder = None
        self._box = None

    def _check(self, tag: str, r: Reader) -> Deferred[None] | None:
        r.end()
        return self._refresh_then(tag, "CHECK completed", allow_expunge=True)

    def _close(self, tag: str, r: Reader) -> Deferred[None] | None:
        r.end()
        box, folder = self._box, self._folder
        self._unselect()
        self._state = _AUTH
        if box is None or folder is None or box.read_only:
            self._tagged(tag, "OK", "CLOSE completed")
            return None
        deleted = [m.uid for m in box.infos() if "\\Deleted" in m.flags]
        d = folder.expunge(deleted)
        return d.addCallback(lambda _: self._tagged(tag, "OK", "CLOSE completed"))

    def _unselect_cmd(self, tag: str, r: Reader) -> None:
        r.end()
        self._unselect()
        self._state = _AUTH
        self._tagged(tag, "OK", "UNSELECT completed")

    def _expunge(self, tag: str, r: Reader, uid: bool = False) -> Deferred[None] | None:
        box, folder = self._box, self._folder
        assert box is not None and folder is not None
        wanted: set[int] | None = None
        if uid:
            r.sp()
            wanted = set(box.resolve(r.sequence_set().ranges, uid=True))
        r.end()
        if box.read_only:
            self._tagged(tag, "NO", "[READ-ONLY] Mailbox is read-only")
            return None
        deleted = [
            m.uid
            for m in box.infos()
            if "\\Deleted" in m.flags and (wanted is None or m.uid in wanted)
        ]
        d = folder.expunge(deleted)
        d.addCallback(lambda _: self._refresh(allow_expunge=True))
        return d.addCallback(lambda _: self._tagged(tag, "OK", "EXPUNGE completed"))

    def _uid_expunge(self, tag: str, r: Reader) -> Deferred[None] | None:
        return self._expunge(tag, r, uid=True)

    def _uids_of(self, sequence_set: SequenceSet, uid: bool, tag: str) -> list[int]:
        box = self._box
        assert box is not None
        if sequence_set.saved:
            raise ParseError("$ is not supported", tag)
        if not uid and not box.valid_msns(sequence_set.ranges):
            raise ParseError("Invalid message sequence number", tag)
        return box.resolve(sequence_set.ranges, uid)

    def _store_cmd(self, tag: str, r: Reader, uid: bool = False) -> Deferred[None] | None:
        command = parse_store(r)
        box, folder = self._box, self._folder
        assert box is not None and folder is not None
        uids = self._uids_of(command.sequence_set, uid, tag)
        if box.read_only:
            self._tagged(tag, "NO", "[READ-ONLY] Mailbox is read-only")
            return None
        if command.unchangedsince is not None:
            self._condstore_enabling(box)
        mode = {"": "set", "+": "add", "-": "remove"}[command.mode]
        d = folder.store_flags(uids, command.flags, mode, command.unchangedsince)  # type: ignore[arg-type]

        def answer(result: Any) -> None:
            changes, refused = result
            changed = {c.uid: c for c in changes}
            # The keywords named (even when nothing changed, as Dovecot) and those the replies
            # show, another session's too: FLAGS first if any is new to the client (§7.2.6).
            shown = set(command.flags).union(*(c.flags for c in changes))
            self._out.extend(box.learn_keywords(shown))
            for uid_ in uids:
                info = box.messages.get(uid_)
                if info is None:
                    continue
                change = changed.get(uid_)
                if change is not None:
                    info = info._replace(flags=change.flags, modseq=change.modseq)
                    box.own_flags(info)
                if not command.silent or (box.condstore and change is not None):
                    items = []
                    if uid or box.condstore:
                        items.append(f"UID {uid_}")
                    if not command.silent:
                        items.append("FLAGS " + flag_list(box.flags_of(uid_)))
                    if box.condstore:
                        items.append(f"MODSEQ ({info.modseq})")
                    self._out.append(f"* {box.msn(uid_)} FETCH ({' '.join(items)})\r\n".encode())
            if refused:
                # RFC 7162 §3.1.3: UIDs for UID STORE, sequence numbers for STORE.
                numbers = refused if uid else [box.msn(u) for u in refused]
                self._tagged(tag, "OK", f"[MODIFIED {compress_uids(numbers)}] STORE completed")
            else:
                self._tagged(tag, "OK", "STORE completed")

        return d.addCallback(answer)

    def _uid_store(self, tag: str, r: Reader) -> Deferred[None] | None:
        return self._store_cmd(tag, r, uid=True)

    def _copy(self, tag: str, r: Reader, uid: bool = False, move: bool = False) -> Deferred[None]:
        r.sp()
        sequence_set = r.sequence_set()
        target = self._mailbox_arg(r)
        r.end()
        box, folder = self._box, self._folder
        assert box is not None and folder is not None
        uids = self._uids_of(sequence_set, uid, tag)
        if move and box.read_only:
            raise FolderError("[READ-ONLY] Mailbox is read-only")
        d = folder.move(uids, target) if move else folder.copy(uids, target)

        def answer(result: tuple[int, list[tuple[int, int]]]) -> Deferred[None] | None:
            uidvalidity, pairs = result
            code = ""
            if pairs:
                code = (
                    f"[COPYUID {uidvalidity} {compress_uids(a for a, _ in pairs)}"
                    f" {compress_uids(b for _, b in pairs)}] "
                )
            word = "MOVE" if move else "COPY"
            if move:
                if pairs:
                    self._out.append(f"* OK {code}Moved\r\n".encode())
                refreshed = self._refresh(allow_expunge=True, uid_command=uid)
                if refreshed is not None:
                    return refreshed.addCallback(
                        lambda _: self._tagged(tag, "OK", f"{word} completed")
                    )
                self._tagged(tag, "OK", f"{word} completed")
                return None
            self._tagged(tag, "OK", f"{code}{word} completed")
            return None

        def failed(f: Failure) -> None:
            f.trap(FolderError)
            self._tagged(tag, "NO", "[TRYCREATE] No such mailbox")

        return d.addCallbacks(answer, failed)

    def _uid_copy(self, tag: str, r: Reader) -> Deferred[None]:
        return self._copy(tag, r, uid=True)

    def _move(self, tag: str, r: Reader) -> Deferred[None]:
        return self._copy(tag, r, move=True)

    def _uid_move(self, tag: str, r: Reader) -> Deferred[None]:
        return self._copy(tag, r, uid=True, move=True)

    def _search(self, tag: str, r: Reader, uid: bool = False) -> Deferred[None] | None:
        command = parse_search(r)
        box, folder = self._box, self._folder
        assert box is not None and folder is not None
        if _uses_modseq(command.key):
            self._condstore_enabling(box)
        matcher = Matcher(
            box.msn,
            box.exists,
            box.uids[-1] if box.uids else 0,
            lambda info: _read_text(folder.path(info.uid)),
            self._clock.seconds(),
            box.recent,
        )
        found: list[int] = []
        for info in box.infos():
            try:
                if matcher.matches(command.key, info):
                    found.append(info.uid)
            except FileNotFoundError:
                continue
        numbers = found if uid else [box.msn(u) for u in found]
        if command.result_options is not None:
            parts = [f'(TAG "{tag}")'] + (["UID"] if uid else [])
            opts = set(command.result_options) or {"ALL"}
            if "MIN" in opts and numbers:
                parts.append(f"MIN {min(numbers)}")
            if "MAX" in opts and numbers:
                parts.append(f"MAX {max(numbers)}")
            if "ALL" in opts and numbers:
                parts.append(f"ALL {compress_uids(numbers)}")
            if "COUNT" in opts:
                parts.append(f"COUNT {len(numbers)}")
            if box.condstore and _uses_modseq(command.key) and found:
                # RFC 7162 §3.1.5 with RFC 4731: the highest MODSEQ of the messages returned.
                # MIN and/or MAX alone: of the messages they name; else of all found.
                if opts <= {"MIN", "MAX"}:
                    named = {min(numbers) if o == "MIN" else max(numbers) for o in opts}
                    shown = [u for u, n in zip(found, numbers, strict=True) if n in named]
                else:
                    shown = found
                parts.append(f"MODSEQ {max(box.messages[u].modseq for u in shown)}")
            self._out.append(("* ESEARCH " + " ".join(parts) + "\r\n").encode())
        else:
            line = "* SEARCH" + "".join(f" {n}" for n in numbers)
            if box.condstore and _uses_modseq(command.key) and found:
                line += f" (MODSEQ {max(box.messages[u].modseq for u in found)})"
            self._out.append(line.encode() + b"\r\n")
        return self._refresh_then(tag, "SEARCH completed", allow_expunge=uid, uid_command=uid)

    def _uid_search(self, tag: str, r: Reader) -> Deferred[None] | None:
        return self._search(tag, r, uid=True)

    def _fetch(self, tag: str, r: Reader, uid: bool = False) -> Deferred[None] | None:
        command = parse_fetch(r, uid)
        box, folder = self._box, self._folder
        assert box is not None and folder is not None
        uids = self._uids_of(command.sequence_set, uid, tag)
        atts = list(command.atts)
        if uid and not any(a.name == "UID" for a in atts):
            atts.insert(0, FetchAtt("UID"))
        if command.changedsince is not None or any(a.name == "MODSEQ" for a in atts):
            self._condstore_enabling(box)
        if box.condstore and command.changedsince is not None:
            if not any(a.name == "MODSEQ" for a in atts):
                atts.append(FetchAtt("MODSEQ"))
            uids = [u for u in uids if box.messages[u].modseq > command.changedsince]
        if any(a.name.startswith("BINARY") for a in atts):
            raise ParseError("BINARY is not supported", tag)
        sets_seen = not box.read_only and any(
            a.name in ("RFC822", "RFC822.TEXT") or (a.section is not None and not a.peek)
            for a in atts
        )
        if sets_seen and not any(a.name == "FLAGS" for a in atts):
            unseen_now = {u for u in uids if "\\Seen" not in box.messages[u].flags}
            if unseen_now:
                atts.append(FetchAtt("FLAGS"))
        d: Deferred[Any] | None = None
        if sets_seen:
            unseen = [u for u in uids if "\\Seen" not in box.messages[u].flags]
            if unseen:
                d = folder.store_flags(unseen, ["\\Seen"], "add")

                def mark(result: Any) -> None:
                    # Another session's keywords may come with the new flags (§7.2.6).
                    self._out.extend(box.learn_keywords(set().union(*(c.flags for c in result[0]))))
                    for change in result[0]:
                        info = box.messages.get(change.uid)
                        if info is not None:
                            box.own_flags(info._replace(flags=change.flags, modseq=change.modseq))

                d.addCallback(mark)
        cache: dict[int, tuple[bytes, bytes, bytes]] = {}
        learned: dict[int, tuple[bytes, bytes, bytes]] = {}
        if any(a.name in _STRUCTURE_ITEMS and a.section is None for a in atts):
            # ENVELOPE/BODY/BODYSTRUCTURE: from the index when computed before (RFC 3501 data
            # that never changes for a message), else parsed now and remembered afterwards.
            name = folder.name
            wanted = list(uids)
            lookup = self._store.run(folder.account, lambda index: index.parsed(name, wanted))
            lookup.addCallback(cache.update)
            d = lookup if d is None else d.addCallback(lambda _: lookup)
        plan = _fast_plan(atts)
        if plan is not None:
            pieces = self._fetch_fast(tag, uids, plan, atts, uid, cache, learned)
        else:
            pieces = self._fetch_pieces(tag, uids, atts, uid, cache, learned)

        def send(_: object = None) -> Deferred[None] | None:
            sent = self._send_stream(pieces)
            if sent is None:
                self._remember_parsed(folder, learned)
                return None
            return sent.addCallback(lambda _: self._remember_parsed(folder, learned))

        if d is None:
            return send()
        return d.addCallback(send)

    def _remember_parsed(
        self, folder: Folder, learned: dict[int, tuple[bytes, bytes, bytes]]
    ) -> None:
        """Store what this FETCH parsed, in the background (it can always be parsed again)."""
        if not learned:
            return
        name = folder.name
        entries = dict(learned)
        d = self._store.run(folder.account, lambda index: index.remember_parsed(name, entries))
        d.addErrback(lambda f: log.internal_error(self.session, self.peer, "cache", f))

    def _condstore_enabling(self, box: SelectedMailbox) -> None:
        """
        A CONDSTORE-enabling command (RFC 7162 §3.1: FETCH MODSEQ or CHANGEDSINCE, SEARCH
        MODSEQ, STORE UNCHANGEDSINCE) while selected: CONDSTORE is on from now, and the first
        one reports the folder's HIGHESTMODSEQ (as SELECT (CONDSTORE) would have).
        """
        if not box.condstore:
            self._out.append(f"* OK [HIGHESTMODSEQ {box.highestmodseq}] Highest\r\n".encode())
        box.condstore = True
        self._enabled.add("CONDSTORE")

    def _uid_fetch(self, tag: str, r: Reader) -> Deferred[None] | None:
        return self._fetch(tag, r, uid=True)

    def _send_stream(self, pieces: Iterator[bytes]) -> Deferred[None] | None:
        """Send C{pieces}: small answers at once, large ones by a producer with backpressure."""
        pending = sum(len(p) for p in self._out)
        for piece in pieces:
            self._out.append(piece)
            pending += len(piece)
            if pending > _INLINE:
                self._flush()
                done: Deferred[None] = Deferred()
                self._streaming = True

                def finished(done: Deferred[None] = done) -> None:
                    self._streaming = False
                    done.callback(None)

                _Sender(self, pieces, finished).start()
                return done
        return None

    def _fetch_pieces(
        self,
        tag: str,
        uids: list[int],
        atts: list[FetchAtt],
        uid_command: bool,
        cache: dict[int, tuple[bytes, bytes, bytes]],
        learned: dict[int, tuple[bytes, bytes, bytes]],
    ) -> Iterator[bytes]:
        box, folder = self._box, self._folder
        assert box is not None and folder is not None
        for uid in uids:
            info = box.messages.get(uid)
            if info is None:
                continue
            yield from self._fetch_message(box, folder, info, atts, cache, learned)
        yield f"{tag} OK {'UID ' if uid_command else ''}FETCH completed\r\n".encode()

    def _fetch_message(
        self,
        box: SelectedMailbox,
        folder: Folder,
        info: MessageInfo,
        atts: list[FetchAtt],
        cache: dict[int, tuple[bytes, bytes, bytes]],
        learned: dict[int, tuple[bytes, bytes, bytes]],
    ) -> Iterator[bytes]:
        """One message's FETCH response by the general path (a vanished file: UID and FLAGS)."""
        try:
            yield from self._fetch_one(box, folder, info, atts, cache, learned)
        except FileNotFoundError:
            yield _vanished(box, info)

    def _fetch_fast(
        self,
        tag: str,
        uids: list[int],
        plan: tuple[tuple[int, bytes], ...],
        atts: list[FetchAtt],
        uid_command: bool,
        cache: dict[int, tuple[bytes, bytes, bytes]],
        learned: dict[int, tuple[bytes, bytes, bytes]],
    ) -> Iterator[bytes]:
        """
        L{_fetch_pieces} for a FETCH of only UID, FLAGS, RFC822.SIZE, INTERNALDATE, MODSEQ and
        whole messages (L{_fast_plan}): the bulk download. Each canonical message of at most
        L{_INLINE} octets is read with one C{os.read} and its response built at once; the
        responses leave in batches of about L{_BATCH} octets (one C{bytes} each). Any other
        message (a file that is not canonical, a large one, streamed) takes the general path.
        """
        box, folder = self._box, self._folder
        assert box is not None and folder is not None
        get = box.messages.get
        msn = box.msn
        flags_of = box.flags_of
        path = folder.path
        needs_file = any(code == _F_WHOLE for code, _ in plan)
        flag_text: dict[frozenset[str], bytes] = {}
        dates: dict[int, bytes] = {}
        os_open, os_fstat, os_read, os_close = os.open, os.fstat, os.read, os.close
        mode = os.O_RDONLY | os.O_CLOEXEC
        out: list[bytes] = []
        pending = 0
        for uid in uids:
            info = get(uid)
            if info is None:
                continue
            size = info.size
            data: bytes | None = b""
            if needs_file:
                if size > _INLINE:
                    data = None
                else:
                    try:
                        fd = os_open(path(uid), mode)
                    except FileNotFoundError:
                        out.append(_vanished(box, info))
                        continue
                    try:
                        if os_fstat(fd).st_size != size:
                            data = None
                        else:
                            data = os_read(fd, size)
                            if len(data) < size:
                                data = _read_rest(fd, data, size)
                    finally:
                        os_close(fd)
            if data is None:
                # Not canonical, or large: the general path (which streams a large one).
                if out:
                    yield b"".join(out)
                    out, pending = [], 0
                yield from self._fetch_message(box, folder, info, atts, cache, learned)
                continue
            out.append(b"* %d FETCH (" % msn(uid))
            for code, label in plan:
                if code == _F_WHOLE:
                    out.append(label % size)
                    out.append(data)
                elif code == _F_UID:
                    out.append(label % uid)
                elif code == _F_FLAGS:
                    flags = flags_of(uid)
                    text = flag_text.get(flags)
                    if text is None:
                        text = flag_text[flags] = flag_list(flags).encode()
                    out.append(label)
                    out.append(text)
                elif code == _F_SIZE:
                    out.append(label % size)
                elif code == _F_DATE:
                    when = info.internaldate
                    date = dates.get(when)
                    if date is None:
                        date = dates[when] = _imap_date(when).encode()
                    out.append(label)
                    out.append(date)
                    out.append(b'"')
                else:
                    out.append(label % info.modseq)
            out.append(b")\r\n")
            pending += size + 64
            if pending >= _BATCH:
                yield b"".join(out)
                out, pending = [], 0
        out.append(f"{tag} OK {'UID ' if uid_command else ''}FETCH completed\r\n".encode())
        yield b"".join(out)

    def _fetch_one(
        self,
        box: SelectedMailbox,
        folder: Folder,
        info: MessageInfo,
        atts: list[FetchAtt],
        cache: dict[int, tuple[bytes, bytes, bytes]],
        learned: dict[int, tuple[bytes, bytes, bytes]],
    ) -> Iterator[bytes]:
        cached = cache.get(info.uid)
        needs_file = any(
            a.name not in ("UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ")
            and not (cached is not None and a.name in _STRUCTURE_ITEMS and a.section is None)
            for a in atts
        )
        f: BinaryIO | None = None
        structure: mime.MessageStructure | None = None
        if needs_file:
            f = open(folder.path(info.uid), "rb")  # noqa: SIM115
        # A file whose size is the message's CRLF size is canonical: the whole message is
        # its bytes, sent without parsing its MIME structure (the common bulk download).
        canonical = f is not None and os.fstat(f.fileno()).st_size == info.size

        def parsed() -> mime.MessageStructure:
            nonlocal structure
            if structure is None:
                assert f is not None
                structure = mime.parse_structure(f)
            return structure

        try:
            head = f"* {box.msn(info.uid)} FETCH (".encode()
            buf = bytearray(head)
            first = True
            for att in atts:
                if not first:
                    buf += b" "
                first = False
                name = att.name
                if name == "UID":
                    buf += b"UID %d" % info.uid
                elif name == "FLAGS":
                    buf += b"FLAGS " + flag_list(box.flags_of(info.uid)).encode()
                elif name == "INTERNALDATE":
                    buf += b'INTERNALDATE "' + _imap_date(info.internaldate).encode() + b'"'
                elif name == "RFC822.SIZE":
                    buf += b"RFC822.SIZE %d" % info.size
                elif name == "MODSEQ":
                    buf += b"MODSEQ (%d)" % box.messages[info.uid].modseq
                elif name in _STRUCTURE_ITEMS and att.section is None:
                    if cached is None:
                        structure_ = parsed()
                        cached = (
                            mime.envelope(structure_),
                            mime.body_structure(structure_, False),
                            mime.body_structure(structure_, True),
                        )
                        cache[info.uid] = learned[info.uid] = cached
                    value = cached[_STRUCTURE_ITEMS.index(name)]
                    buf += name.encode() + b" " + value
                else:
                    assert f is not None
                    whole = name == "RFC822" or (
                        name == "BODY" and att.section is not None and att.section == Section()
                    )
                    if whole and canonical:
                        label = "RFC822" if name == "RFC822" else att.response_name()
                        section = mime.SectionData(ranges=((0, info.size),), size=info.size)
                        if att.partial is not None:
                            section = mime.apply_partial(section, att.partial[0], att.partial[1])
                    else:
                        label, section = self._section(att, parsed(), f)
                    buf += label.encode() + b" {%d}\r\n" % section.size
                    if section.size <= _INLINE:
                        for chunk in mime.iter_section(f, section):
                            buf += chunk
                    else:
                        yield bytes(buf)
                        buf = bytearray()
                        yield from mime.iter_section(f, section)
            buf += b")\r\n"
            yield bytes(buf)
        finally:
            if f is not None:
                f.close()

    def _section(
        self, att: FetchAtt, structure: mime.MessageStructure, f: BinaryIO
    ) -> tuple[str, mime.SectionData]:
        name = att.name
        if name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
            spec = {"RFC822": "", "RFC822.HEADER": "HEADER", "RFC822.TEXT": "TEXT"}[name]
            return name, mime.section_range(structure, spec, f)
        assert att.section is not None
        spec_text = str(att.section)
        section = mime.section_range(structure, spec_text.replace('"', ""), f)
        if att.partial is not None:
            section = mime.apply_partial(section, att.partial[0], att.partial[1])
        label = att.response_name()
        if name == "BINARY.SIZE":
            return label, section
        return label, section

    def _idle(self, tag: str, r: Reader) -> Deferred[None] | None:
        r.end()
        self._idle_tag = tag
        self._out.append(b"+ idling\r\n")
        if self._box is not None and self._changed:
            return self._refresh(allow_expunge=True)
        return None

    def _idle_done(self, command: Command) -> None:
        tag, self._idle_tag = self._idle_tag, None
        assert tag is not None
        if command.lines[0].strip().upper() != b"DONE" or command.literals:
            self._bad(tag, "Expected DONE")
            return
        self._tagged(tag, "OK", "IDLE terminated")

    def _require_account(self) -> str:
        assert self._account is not None
        return self._account


def _ensure_special_folders(index: MailIndex) -> None:
    """Give a new account its special-use folders (once: a user may delete them later)."""
    index.ensure_folders_once("special_folders", SPECIAL_FOLDERS)


def _matches(pattern: str, name: str) -> bool:
    """LIST pattern matching: C{*} matches anything, C{%} anything but the separator."""
    regex = "".join(
        ".*" if c == "*" else f"[^{re.escape(SEPARATOR)}]*" if c == "%" else re.escape(c)
        for c in pattern
    )
    return re.fullmatch(regex, name, re.IGNORECASE if name == INBOX else 0) is not None


def _vanished(box: SelectedMailbox, info: MessageInfo) -> bytes:
    """The response for a message whose file has vanished: its UID and FLAGS only."""
    flags = flag_list(info.flags)
    return f"* {box.msn(info.uid)} FETCH (UID {info.uid} FLAGS {flags})\r\n".encode()


def _read_rest(fd: int, data: bytes, size: int) -> bytes:
    """C{data} (a short first read of C{fd}) and the rest, to C{size} octets or the end."""
    parts = [data]
    got = len(data)
    while got < size:
        more = os.read(fd, size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


_F_UID, _F_FLAGS, _F_SIZE, _F_DATE, _F_MODSEQ, _F_WHOLE = range(6)
_FAST_SIMPLE = {
    "UID": (_F_UID, b"UID %d"),
    "FLAGS": (_F_FLAGS, b"FLAGS "),
    "RFC822.SIZE": (_F_SIZE, b"RFC822.SIZE %d"),
    "INTERNALDATE": (_F_DATE, b'INTERNALDATE "'),
    "MODSEQ": (_F_MODSEQ, b"MODSEQ (%d)"),
}
_BATCH = 64 * 1024
"""Octets of responses the fast FETCH path gathers into one C{bytes}."""


def _fast_plan(atts: list[FetchAtt]) -> tuple[tuple[int, bytes], ...] | None:
    """
    For a FETCH whose items are only UID, FLAGS, RFC822.SIZE, INTERNALDATE, MODSEQ and whole
    messages (C{BODY[]}, C{BODY.PEEK[]}, C{RFC822}; no partial), each item's kind and the
    text that starts it (the separator included; a C{%d} for its number), else C{None}.
    """
    plan: list[tuple[int, bytes]] = []
    for att in atts:
        name = att.name
        sep = b" " if plan else b""
        simple = _FAST_SIMPLE.get(name) if att.section is None else None
        if simple is not None:
            plan.append((simple[0], sep + simple[1]))
        elif att.partial is None and (
            (name == "RFC822" and att.section is None)
            or (name == "BODY" and att.section is not None and att.section == Section())
        ):
            label = "RFC822" if name == "RFC822" else att.response_name()
            plan.append((_F_WHOLE, sep + label.encode() + b" {%d}\r\n"))
        else:
            return None
    return tuple(plan)


def _imap_date(timestamp: int) -> str:
    when = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return when.strftime("%d-%b-%Y %H:%M:%S +0000")


def _read_text(path: str) -> tuple[bytes, bytes]:
    """A message's header and body, for SEARCH (bounded: the first 4 MiB)."""
    with open(path, "rb") as f:
        data = f.read(4 * 1024 * 1024)
    sep = data.find(b"\r\n\r\n")
    if sep < 0:
        sep = data.find(b"\n\n")
        return (data, b"") if sep < 0 else (data[:sep], data[sep + 2 :])
    return data[:sep], data[sep + 4 :]


def _uses_modseq(key: object) -> bool:
    if isinstance(key, ModSeqKey):
        return True
    if isinstance(key, AndKey):
        return any(_uses_modseq(k) for k in key.keys)
    if isinstance(key, OrKey):
        return _uses_modseq(key.left) or _uses_modseq(key.right)
    if isinstance(key, NotKey):
        return _uses_modseq(key.key)
    return False


_STRUCTURE_ITEMS = ("ENVELOPE", "BODY", "BODYSTRUCTURE")
"""FETCH items computed from the MIME structure alone, cached per message in the index."""

_ANY = (_NOT_AUTH, _AUTH, _SELECTED)
_AUTHED = (_AUTH, _SELECTED)
_SEL = (_SELECTED,)

_HANDLERS: dict[str, tuple[tuple[int, ...], Callable[..., Any]]] = {
    "CAPABILITY": (_ANY, IMAPServer._capability),
    "NOOP": (_ANY, IMAPServer._noop),
    "LOGOUT": (_ANY, IMAPServer._logout),
    "ID": (_ANY, IMAPServer._id),
    "STARTTLS": ((_NOT_AUTH,), IMAPServer._starttls),
    "LOGIN": ((_NOT_AUTH,), IMAPServer._login),
    "AUTHENTICATE": ((_NOT_AUTH,), IMAPServer._authenticate_cmd),
    "ENABLE": (_AUTHED, IMAPServer._enable),
    "NAMESPACE": (_AUTHED, IMAPServer._namespace),
    "SELECT": (_AUTHED, IMAPServer._select),
    "EXAMINE": (_AUTHED, IMAPServer._examine),
    "CREATE": (_AUTHED, IMAPServer._create),
    "DELETE": (_AUTHED, IMAPServer._delete),
    "RENAME": (_AUTHED, IMAPServer._rename),
    "SUBSCRIBE": (_AUTHED, IMAPServer._subscribe),
    "UNSUBSCRIBE": (_AUTHED, IMAPServer._unsubscribe),
    "LIST": (_AUTHED, IMAPServer._list),
    "LSUB": (_AUTHED, IMAPServer._lsub),
    "STATUS": (_AUTHED, IMAPServer._status),
    "APPEND": (_AUTHED, IMAPServer._append),
    "IDLE": (_AUTHED, IMAPServer._idle),
    "CHECK": (_SEL, IMAPServer._check),
    "CLOSE": (_SEL, IMAPServer._close),
    "UNSELECT": (_SEL, IMAPServer._unselect_cmd),
    "EXPUNGE": (_SEL, IMAPServer._expunge),
    "UID EXPUNGE": (_SEL, IMAPServer._uid_expunge),
    "SEARCH": (_SEL, IMAPServer._search),
    "UID SEARCH": (_SEL, IMAPServer._uid_search),
    "FETCH": (_SEL, IMAPServer._fetch),
    "UID FETCH": (_SEL, IMAPServer._uid_fetch),
    "STORE": (_SEL, IMAPServer._store_cmd),
    "UID STORE": (_SEL, IMAPServer._uid_store),
    "COPY": (_SEL, IMAPServer._copy),
    "UID COPY": (_SEL, IMAPServer._uid_copy),
    "MOVE": (_SEL, IMAPServer._move),
    "UID MOVE": (_SEL, IMAPServer._uid_move),
}
