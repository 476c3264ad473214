# -*- test-case-name: tests.test_spool -*-
"""
The vocabulary the queue's parts share: what the SMTP side hands over (L{Submission}), what
the scheduler asks the delivery side to send (L{Outgoing}), and what comes back per recipient
(L{RcptResult}). Plain frozen data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Notify = Literal["SUCCESS", "FAILURE", "DELAY", "NEVER"]
Ret = Literal["FULL", "HDRS"]
Outcome = Literal["sent", "deferred", "failed"]


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    """One envelope recipient with its RFC 3461 parameters."""

    address: str
    """C{local@domain} (the domain lower case)."""
    notify: frozenset[Notify] | None = None
    """RCPT NOTIFY=: None when not given (then FAILURE and DELAY apply, RFC 3461 §4.1);
    C{{"NEVER"}} alone, or a set of SUCCESS/FAILURE/DELAY."""
    orcpt: str | None = None
    """RCPT ORCPT=, decoded from xtext: C{"rfc822;user@example.org"}."""

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    def wants(self, kind: Notify) -> bool:
        """Whether a notice of C{kind} (SUCCESS, FAILURE, DELAY) goes to the sender."""
        if self.notify is None:
            return kind in ("FAILURE", "DELAY")
        return kind in self.notify


@dataclass(frozen=True, slots=True)
class MailOptions:
    """What the MAIL command and the session say about one message transaction."""

    account: str | None = None
    """The authenticated account (C{local@domain}); None on port 25."""
    envid: str | None = None
    """MAIL ENVID=, decoded from xtext (RFC 3461 §4.4)."""
    ret: Ret | None = None
    """MAIL RET=FULL|HDRS (RFC 3461 §4.3)."""
    smtputf8: bool = False
    eight_bit: bool = False
    """MAIL BODY=8BITMIME."""


@dataclass(frozen=True, slots=True)
class Submission:
    """A message accepted for remote recipients, as the SMTP side hands it to the queue."""

    queue_id: str
    """The SMTP transaction id (logged, in C{Received:}); the queue entry's name."""
    sender: str
    """Envelope sender, C{""} for the null sender (a bounce: never bounced itself)."""
    recipients: tuple[QueuedRecipient, ...]
    received: float
    """When it was accepted (POSIX time): expiry and delay notices count from here."""
    envid: str | None = None
    """MAIL ENVID=, decoded from xtext."""
    ret: Ret | None = None
    """MAIL RET=: how much of the message a failure notice returns (None: FULL for us)."""
    smtputf8: bool = False
    """MAIL SMTPUTF8 was given: the next hop must offer SMTPUTF8, or the message bounces."""
    eight_bit: bool = False
    """MAIL BODY=8BITMIME was given."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One queued message for one destination domain, as the scheduler hands it to delivery."""

    queue_id: str
    sender: str
    recipients: tuple[QueuedRecipient, ...]
    """Only those still to deliver, all in the same destination domain."""
    path: Path
    """The message file: canonical CRLF lines, our C{Received:} on top, not dot-stuffed. It may
    hold more after the message (the queue's envelope): read C{size} octets."""
    size: int
    """The message's length."""
    envid: str | None = None
    ret: Ret | None = None
    smtputf8: bool = False
    eight_bit: bool = False
    data: bytes | None = None
    """The file's content when the queue still holds it in memory (small messages queued by
    this process): sent from here, so the file need not be read again."""


@dataclass(frozen=True, slots=True)
class RcptResult:
    """What became of one recipient in one delivery attempt."""

    address: str
    outcome: Outcome
    """sent (the next hop took it), deferred (try again later), failed (permanent: bounce)."""
    code: int
    """The next hop's reply code; 0 when there was no reply (DNS failure, no connection)."""
    text: str
    """The reply text as the next hop sent it (enhanced code first when it gave one), or what
    went wrong locally (C{"connection refused"}, C{"no MX or A record"})."""
    host: str = ""
    """The host that answered, C{"mx.example.org[192.0.2.1]"}; C{""} when none did."""
    dsn_relayed: bool = False
    """The next hop offered DSN and took our NOTIFY/ORCPT/RET/ENVID: notices from here on are
    its job (RFC 3461 §4), so no "relayed" notice is owed for NOTIFY=SUCCESS."""


@dataclass(frozen=True, slots=True)
class NextHop:
    """Where mail for a domain goes: a route, the smarthost, or the domain's MX hosts."""

    host: str
    port: int = 25
    mx: bool = True
    """Look up MX records of C{host} (C{False} for C{[host]} in brackets: straight to its
    addresses, as Postfix reads it)."""


def parse_next_hop(text: str, default_port: int = 25) -> NextHop:
    """
    Read C{"[host]:port"}, C{"[host]"}, C{"host:port"} or C{"host"} (Postfix's form: brackets
    mean no MX look-up; an IPv6 address goes in brackets: C{"[2001:db8::1]:25"}).

    @raise ValueError: not one of those forms, or a bad port.
    """
    s = text.strip()
    mx = True
    port = default_port
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: unbalanced [")
        mx = False
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected :port after ]")
            port = _port(rest[1:], text)
    else:
        host, sep, rest = s.partition(":")
        if sep:
            port = _port(rest, text)
    host = host.strip().rstrip(".").lower()
    if not host or any(ch.isspace() or ch in "[]/@" for ch in host):
        raise ValueError(f"{text!r}: not a host name or address")
    if ":" in host and mx:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets")
    return NextHop(host, port, mx)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: bad port {text!r}")
    return int(text)
