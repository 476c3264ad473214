# -*- test-case-name: tests.test_log -*-
"""
The catalogue of log events, one function each, with a fixed C{event} name, the peer first in
the text (simple fail2ban patterns) and named fields; and the observer that writes them.

No event takes a secret as an argument, except L{initial_password}, which DESIGN.md §2 asks to
print exactly once, on first start.

Run C{twistd --logger=mailserver.log.observer ...} to get JSON lines when standard output is
not a terminal (under systemd) and readable text on a terminal; C{MAILSERVER_LOG_FORMAT=json} or
C{=text} forces one.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from typing import IO, Any, TextIO, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

_log = Logger(namespace="mailserver")

# Per-connection events cost as much as the rest of a small message's handling put together,
# so they are only built when asked for: MAILSERVER_DEBUG=1.
_debug = os.environ.get("MAILSERVER_DEBUG", "") not in ("", "0")


def _emit(level: LogLevel, event: str, fmt: str, **fields: Any) -> None:
    _log.emit(level, fmt, event=event, **fields)


def listening(kind: str, endpoint: str, tls: str) -> None:
    """A listener is open."""
    _emit(
        LogLevel.info,
        "listening",
        "{kind} listening on {endpoint} (tls={tls})",
        kind=kind,
        endpoint=endpoint,
        tls=tls,
    )


def smtp_connect(session: str, peer: str) -> None:
    """A client connected (only with MAILSERVER_DEBUG=1)."""
    if not _debug:
        return
    _emit(
        LogLevel.debug,
        "smtp.connect",
        "[{peer}] session={session} connect",
        session=session,
        peer=peer,
    )


def connection_refused(peer: str, reason: str) -> None:
    """A connection over a limit was refused."""
    _emit(
        LogLevel.warn,
        "connection.refused",
        "[{peer}] connection refused: {reason}",
        peer=peer,
        reason=reason,
    )


def smtp_disconnect(session: str, peer: str, messages: int, reason: str) -> None:
    """A session ended (only with MAILSERVER_DEBUG=1)."""
    if not _debug:
        return
    _emit(
        LogLevel.debug,
        "smtp.disconnect",
        "[{peer}] session={session} disconnect messages={messages} ({reason})",
        session=session,
        peer=peer,
        messages=messages,
        reason=reason,
    )


def smtp_rejected(session: str, peer: str, command: str, code: int, text: str) -> None:
    """A command was refused with a 4xx/5xx that an admin may want to see."""
    _emit(
        LogLevel.info,
        "smtp.rejected",
        "[{peer}] session={session} {command} rejected: {code} {text}",
        session=session,
        peer=peer,
        command=command,
        code=code,
        text=text,
    )


def message_accepted(
    session: str, peer: str, msgid: str, sender: str, recipients: list[str], size: int
) -> None:
    """A message got its 250: it is durable in every recipient's mailbox."""
    _emit(
        LogLevel.info,
        "message.accepted",
        "[{peer}] session={session} msgid={msgid} from=<{sender}> "
        "nrcpt={nrcpt} size={size} accepted",
        session=session,
        peer=peer,
        msgid=msgid,
        sender=sender,
        recipients=recipients,
        nrcpt=len(recipients),
        size=size,
    )


def delivered(msgid: str, account: str, filename: str, size: int) -> None:
    """One copy of a message is stored in an account's maildir."""
    _emit(
        LogLevel.info,
        "message.delivered",
        "msgid={msgid} to=<{account}> file={filename} size={size} status=delivered",
        msgid=msgid,
        account=account,
        filename=filename,
        size=size,
    )


def queued(queue_id: str, sender: str, recipients: list[str], size: int) -> None:
    """A message for remote recipients is durably in the outbound queue."""
    _emit(
        LogLevel.info,
        "queue.queued",
        "queueid={queue_id} from=<{sender}> nrcpt={nrcpt} size={size} queued",
        queue_id=queue_id,
        sender=sender,
        recipients=recipients,
        nrcpt=len(recipients),
        size=size,
    )


def delivery_attempt(
    queue_id: str,
    recipient: str,
    host: str,
    outcome: str,
    code: int,
    reply: str,
    next_try: float | None,
) -> None:
    """
    One recipient's delivery attempt ended: C{outcome} is sent, deferred or failed; C{host} the
    next hop that answered (C{""}: none did); C{next_try} the POSIX time of the next attempt
    when deferred.
    """
    _emit(
        LogLevel.info if outcome == "sent" else LogLevel.warn,
        "queue.attempt",
        "queueid={queue_id} to=<{recipient}> relay={relay} status={outcome} "
        "reply={reply_text}{retry_text}",
        queue_id=queue_id,
        recipient=recipient,
        host=host,
        relay=host or "none",
        outcome=outcome,
        code=code,
        reply=reply,
        reply_text=_printable(f"{code} {reply}" if code else reply),
        next_try=next_try,
        retry_text="" if next_try is None else f" next_try={next_try:.0f}",
    )


def notice_sent(queue_id: str, kind: str, to: str, notice_id: str) -> None:
    """A delivery status notice (failure, delay, relayed, delivered) left for the sender."""
    _emit(
        LogLevel.info,
        "queue.notice",
        "queueid={queue_id} {kind} notice to=<{to}> as {notice_id}",
        queue_id=queue_id,
        kind=kind,
        to=to,
        notice_id=notice_id,
    )


def notice_undeliverable(notice_id: str, recipient: str) -> None:
    """A notice for a local address that nobody receives (any more) was dropped."""
    _emit(
        LogLevel.warn,
        "queue.notice_dropped",
        "notice {notice_id} to=<{recipient}> dropped: no such local recipient",
        notice_id=notice_id,
        recipient=recipient,
    )


def queue_removed(queue_id: str, reason: str) -> None:
    """An entry left the queue: C{reason} is delivered, bounced, expired or deleted."""
    _emit(
        LogLevel.info,
        "queue.removed",
        "queueid={queue_id} removed ({reason})",
        queue_id=queue_id,
        reason=reason,
    )


def _printable(text: str, limit: int = 256) -> str:
    """
    C{text} as one safe line: control and invisible characters escaped, at most C{limit}
    characters. For names a client chose, so that none can forge a log line (a fail2ban match
    against someone else's address) or hide itself.
    """
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def auth_succeeded(peer: str, account: str) -> None:
    """A client logged in."""
    _emit(
        LogLevel.info,
        "auth.succeeded",
        "[{peer}] login as {account}",
        peer=peer,
        account=account,
    )


def auth_failed(peer: str, username: str) -> None:
    """
    A login failed: unknown user or wrong password (not told apart). The password is not an
    argument, so it cannot be logged.
    """
    _emit(
        LogLevel.warn,
        "auth.failed",
        "[{peer}] login failed for {username}",
        peer=peer,
        username=_printable(username),
    )


def auth_throttled(peer: str, username: str) -> None:
    """A login was refused unchecked: its client has failed too often lately."""
    _emit(
        LogLevel.warn,
        "auth.throttled",
        "[{peer}] login refused for {username}: too many failures from this client",
        peer=peer,
        username=_printable(username),
    )


def internal_error(session: str, peer: str, what: str, failure: Failure) -> None:
    """Something failed that should not have; the client got a generic 451 / -ERR / NO."""
    _log.failure(
        "[{peer}] session={session} internal error during {what}",
        failure,
        event="internal.error",
        session=session,
        peer=peer,
        what=what,
    )


def initial_password(address: str, password: str, path: str) -> None:
    """The generated password of the first account: printed once, on first start."""
    _emit(
        LogLevel.warn,
        "account.initial",
        "created account {address} with password {password} (also in {path}; "
        "change it with: mailserver user passwd {address})",
        address=address,
        password=password,
        path=path,
    )


def stopping(active: int) -> None:
    """A graceful stop began."""
    _emit(
        LogLevel.info,
        "stopping",
        "stopping: waiting for {active} message(s) in progress",
        active=active,
    )


def tls_reload_failed(failure: Failure) -> None:
    """SIGHUP asked for new certificates, but they could not be loaded; the old ones stay."""
    _log.failure(
        "TLS reload failed, keeping the old certificate", failure, event="tls.reload_failed"
    )


def observer() -> ILogObserver:
    """
    The log observer for C{twistd --logger=mailserver.log.observer}: info and above, JSON lines
    when standard output is not a terminal, text otherwise.
    """
    fmt = os.environ.get("MAILSERVER_LOG_FORMAT", "auto")
    out: TextIO = sys.stdout
    if fmt == "json" or (fmt == "auto" and not out.isatty()):
        writer = BatchedWriter(out)
        _writers.append(writer)
        inner: ILogObserver = JSONLines(cast("IO[Any]", writer))
    else:
        inner = textFileLogObserver(out)
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(LogLevel.info)])


_writers: list[BatchedWriter] = []


@implementer(ILogObserver)
class JSONLines:
    """
    Twisted's JSON log lines (C{jsonFileLogObserver}: a record separator, the event as JSON, a
    newline), written faster for the events of this module.

    Twisted's C{eventAsJSON} formats every field through the event's format string (its
    C{log_flattened}, for values JSON cannot carry) and serialises the level and the logger
    with hooks: four events a relayed message, a tenth of the reactor thread's time. The
    events of this module carry only strings, numbers and lists of strings, which JSON keeps as
    they are, so their line is the same minus C{log_flattened} (which they do not need to be
    read back and formatted). Other events (Twisted's own, failures) go the usual way.
    """

    def __init__(self, out: IO[Any] | TextIO) -> None:
        self._out = out
        self._slow = jsonFileLogObserver(cast("IO[Any]", out))

    def __call__(self, event: LogEvent) -> None:
        if "event" not in event or "log_failure" in event:
            self._slow(event)
            return
        fields = dict(event)  # the event's order, as Twisted's lines have it
        fields["log_logger"] = _UNPERSISTABLE
        fields["log_level"] = _LEVELS.get(event.get("log_level"))
        if fields.get("log_source") is not None:
            fields["log_source"] = _UNPERSISTABLE
        try:
            line = json.dumps(fields)
        except (TypeError, ValueError):
            self._slow(event)
            return
        self._out.write("\x1e" + line + "\n")


_UNPERSISTABLE = {"unpersistable": True}
_LEVELS = {
    level: json.loads(eventAsJSON({"log_level": level}))["log_level"]
    for level in LogLevel.iterconstants()
}


def drain() -> None:
    """Write out every line the observers have collected (tests; before a deliberate exit)."""
    for writer in _writers:
        writer.drain()


class BatchedWriter:
    """
    A text stream for the log observer that collects lines and writes them from a thread of
    its own every C{interval} seconds (and at exit).

    A write per event costs the reactor thread a system call, and with it the GIL, which the
    I/O threads then hold for a while: measured, a fifth of a relayed message's time. Lines
    reach the file (the journal) at most C{interval} later; a SIGKILL loses at most that much.
    The observer's C{flush} after each event is a no-op here.
    """

    def __init__(self, out: TextIO, interval: float = 0.1, *, start: bool = True) -> None:
        self._out = out
        self._interval = interval
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._stopped = threading.Event()
        if start:
            thread = threading.Thread(target=self._run, name="mailserver-log", daemon=True)
            thread.start()
            atexit.register(self.drain)

    def write(self, text: str) -> int:
        with self._lock:
            self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        """Nothing: the lines leave with the next L{drain}."""

    def drain(self) -> None:
        """Write what was collected, now."""
        with self._lock:
            if not self._parts:
                return
            data = "".join(self._parts)
            self._parts = []
        try:
            self._out.write(data)
            self._out.flush()
        except (OSError, ValueError):
            pass  # standard output gone (closed journal pipe): nothing left to tell

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.drain()


def queue_corrupt(queue_id: str, reason: str) -> None:
    """A queue entry could not be read at start and was moved to C{queue/corrupt/}."""
    _emit(
        LogLevel.error,
        "queue.corrupt",
        "queueid={queue_id} moved to queue/corrupt: {reason}",
        queue_id=queue_id,
        reason=reason,
    )


def queue_error(failure: Failure, queue_id: str, what: str) -> None:
    """
    Something failed in the queue that should not have (a spool write, a notice hand-over);
    the entry stays queued and is tried again later. Returns None, so it can end an errback
    chain: C{d.addErrback(log.queue_error, queue_id, "what")}.
    """
    _log.failure(
        "queueid={queue_id} error while {what}",
        failure,
        event="queue.error",
        queue_id=queue_id,
        what=what,
    )
